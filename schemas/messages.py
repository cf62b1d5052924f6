"""Messages between actors: ids and a schema version, never whole objects."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

MESSAGE_VERSION: Literal[1] = 1


class StageMessage(BaseModel):
    """The one message shape every pipeline stage receives."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    v: Literal[1] = MESSAGE_VERSION
    submission_id: str = Field(min_length=1, max_length=64)
