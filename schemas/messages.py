"""Messages between actors: ids and a schema version, never whole objects."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

MESSAGE_VERSION: Literal[1] = 1
# The most submissions one message carries (version 2).
MAX_IDS = 64

# A submission id is a UUID as the intake writes it. Checked before it is used or logged: an id
# of any other shape (a name and address, ten megabytes) is not ours.
SUBMISSION_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
SubmissionId = Annotated[str, Field(pattern=f"^{SUBMISSION_ID.pattern}$", max_length=36)]


def is_submission_id(value: Any) -> bool:
    return (
        isinstance(value, str) and len(value) == 36 and SUBMISSION_ID.fullmatch(value) is not None
    )


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


class NotAStageMessage(ValueError):
    """A message on a stage's queue that is not a stage message: it never will be, so it is
    dead-lettered at once (with this as its reason), not retried."""


def parse_stage_message(raw: Any) -> StageMessage | StageMessageV2:
    """A stage message of either version, or :class:`NotAStageMessage` saying what is wrong
    (without quoting the value: it could be anything a sender put there)."""
    try:
        if isinstance(raw, dict) and raw.get("v") == 2:
            return StageMessageV2.model_validate(raw)
        return StageMessage.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'message'}: {e['type']}"
            for e in exc.errors(include_url=False, include_input=False)[:5]
        )
        raise NotAStageMessage(f"not a stage message ({problems})") from None


def parse_stage_args(args: Any, kwargs: Any) -> StageMessage | StageMessageV2:
    """A stage actor's arguments: exactly one, a stage message."""
    if not isinstance(args, list | tuple) or len(args) != 1 or kwargs:
        raise NotAStageMessage("not a stage message (a stage actor takes one argument)")
    return parse_stage_message(args[0])


def stage_payload(ids: list[str]) -> dict[str, Any]:
    """The message body for ``ids`` (1 to :data:`MAX_IDS`): version 1 for one, 2 for more."""
    if not 1 <= len(ids) <= MAX_IDS:
        raise ValueError(f"a stage message carries 1 to {MAX_IDS} submissions")
    if len(ids) == 1:
        return {"v": MESSAGE_VERSION, "submission_id": ids[0]}
    return {"v": 2, "submission_id": ids[0], "also": list(ids[1:])}
