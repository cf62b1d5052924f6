"""How a stage message is sent: after the database commit, in groups of the stage's size.

Messages carry only submission ids and a schema version. If Redis is unreachable the send is
logged and left to the reconciler, which sends again every submission that has not moved on.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import dramatiq
import structlog
from dramatiq import Message

from schemas.messages import is_submission_id, stage_payload
from workers.stages.stage import Stage

log = structlog.get_logger(__name__)


def stage_message(stage: Stage, submission_id: str, *also: str) -> Message[None]:
    """The message that sends ``submission_id`` (and ``also``: version 2) to ``stage``."""
    payload = stage_payload([submission_id, *also])
    return Message(
        queue_name=stage.queue, actor_name=stage.actor, args=(payload,), kwargs={}, options={}
    )


def submission_id_of(message: Any) -> str | None:
    """The submission a stage message is about, if it is one (read from any dramatiq message);
    for a message about a group (version 2), the first of them."""
    args = message.args
    if isinstance(args, list | tuple) and args and isinstance(args[0], dict):
        value = args[0].get("submission_id")
        return value if is_submission_id(value) else None
    return None


def dispatch(broker: dramatiq.Broker, stages: Iterable[Stage], submission_id: str) -> bool:
    """Send ``submission_id`` on to each stage; False (logged) if the broker could not take it."""
    return dispatch_groups(broker, {stage: [submission_id] for stage in stages})


def dispatch_groups(broker: dramatiq.Broker, sends: Mapping[Stage, Sequence[str]]) -> bool:
    """Send each stage its submissions, in messages of up to the stage's
    :attr:`Stage.group_size`. False (logged) if the broker could not take one."""
    ok = True
    for stage, ids in sends.items():
        size = stage.group_size
        for start in range(0, len(ids), size):
            group = ids[start : start + size]
            try:
                broker.enqueue(stage_message(stage, *group))
            except Exception as exc:  # any transport failure: the reconciler resends from the DB
                log.warning(
                    "dispatch_failed", stage=stage.value, error=type(exc).__name__, size=len(group)
                )
                ok = False
    return ok


def group_by_stage(moved: Iterable[tuple[str, Iterable[Stage]]]) -> dict[Stage, list[str]]:
    """``(submission id, its next stages)`` pairs as the submissions each stage gets."""
    sends: dict[Stage, list[str]] = {}
    for submission_id, stages in moved:
        for stage in stages:
            sends.setdefault(stage, []).append(submission_id)
    return sends
