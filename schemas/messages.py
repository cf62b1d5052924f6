"""Messages between actors: ids and a schema version, never whole objects."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

MESSAGE_VERSION: Literal[1] = 1
# The most submissions one message carries (version 2).
MAX_IDS = 64

SubmissionId = Annotated[str, Field(min_length=1, max_length=64)]


class StageMessage(BaseModel):
    """A stage message about one submission (what front ends and the reconciler send)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    v: Literal[1] = MESSAGE_VERSION
    submission_id: SubmissionId

    @property
    def ids(self) -> list[str]:
        return [self.submission_id]


class StageMessageV2(BaseModel):
    """A stage message about several submissions that reached the stage together.

    Stages send their successors one message for each group of submissions they moved in one
    transaction. Each submission is still handled on its own: a guarded transition each, and one
    that fails goes on in a version 1 message of its own, with the stage's retries.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    v: Literal[2] = 2
    submission_id: SubmissionId
    also: list[SubmissionId] = Field(min_length=1, max_length=MAX_IDS - 1)

    @property
    def ids(self) -> list[str]:
        return [self.submission_id, *self.also]


def parse_stage_message(raw: Any) -> StageMessage | StageMessageV2:
    """A stage message of either version (raises pydantic's ValidationError if it is neither)."""
    if isinstance(raw, dict) and raw.get("v") == 2:
        return StageMessageV2.model_validate(raw)
    return StageMessage.model_validate(raw)


def stage_payload(ids: list[str]) -> dict[str, Any]:
    """The message body for ``ids`` (1 to :data:`MAX_IDS`): version 1 for one, 2 for more."""
    if not 1 <= len(ids) <= MAX_IDS:
        raise ValueError(f"a stage message carries 1 to {MAX_IDS} submissions")
    if len(ids) == 1:
        return {"v": MESSAGE_VERSION, "submission_id": ids[0]}
    return {"v": 2, "submission_id": ids[0], "also": list(ids[1:])}
