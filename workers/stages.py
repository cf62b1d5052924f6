"""The pipeline's stages: one queue and one actor each, and how a stage message is sent.

Messages carry only a submission id and a schema version. Sending happens after the database
commit; if Redis is unreachable the send is logged and left to the reconciler, which finds every
submission that has not moved on and sends it again.
"""

from __future__ import annotations

from collections.abc import Iterable
from enum import StrEnum
from typing import Any

import dramatiq
import structlog
from dramatiq import Message

from schemas.messages import StageMessage

log = structlog.get_logger(__name__)


class Stage(StrEnum):
    VALIDATE = "validate"
    RESOLVE = "resolve"
    RENDER = "render"
    DELIVER = "deliver"
    CONSENT = "consent"
    NOTIFY = "notify"  # the sender-confirmation email, for campaigns that ask for one

    @property
    def queue(self) -> str:
        return f"dearmp.{self.value}"

    @property
    def actor(self) -> str:
        return f"{self.value}_submission"


class Deferred(Exception):
    """The stage must wait (quiet hours, a rate limit): send it again later, costing no retry."""

    def __init__(self, seconds: float, reason: str) -> None:
        super().__init__(f"{reason}: wait {seconds:.1f}s")
        self.seconds = seconds
        self.reason = reason


def stage_message(stage: Stage, submission_id: str) -> Message[None]:
    payload = StageMessage(submission_id=submission_id).model_dump()
    return Message(
        queue_name=stage.queue, actor_name=stage.actor, args=(payload,), kwargs={}, options={}
    )


def submission_id_of(message: Any) -> str | None:
    """The submission a stage message is about, if it is one (read from any dramatiq message)."""
    args = message.args
    if args and isinstance(args[0], dict):
        value = args[0].get("submission_id")
        return value if isinstance(value, str) else None
    return None


def dispatch(broker: dramatiq.Broker, stages: Iterable[Stage], submission_id: str) -> bool:
    """Send ``submission_id`` on to each stage; False (logged) if the broker could not take it."""
    ok = True
    for stage in stages:
        try:
            broker.enqueue(stage_message(stage, submission_id))
        except Exception as exc:  # any transport failure: the reconciler resends from the DB
            log.warning("dispatch_failed", stage=stage.value, error=type(exc).__name__)
            ok = False
    return ok
