"""What every actor does around its stage: parse the message, run the work, send it on."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import dramatiq
import pydantic
import structlog

from schemas.messages import StageMessage
from workers.app import App, get_app
from workers.broker import broker  # installs the broker before any actor is declared
from workers.stages import Stage, dispatch
from workers.transitions import AlreadyMoved

log = structlog.get_logger("workers")

__all__ = ["NOT_RETRIED", "broker", "run_stage"]

# A message that does not parse will not parse next time either: dead-letter it at once.
NOT_RETRIED = (pydantic.ValidationError,)


def run_stage(raw: Any, work: Callable[[App, str], list[Stage]]) -> None:
    message = StageMessage.model_validate(raw)
    try:
        next_stages = work(get_app(), message.submission_id)
    except AlreadyMoved:
        log.info("stage_already_done")
        return
    dispatch(dramatiq.get_broker(), next_stages, message.submission_id)
    log.info("stage_done", next=[s.value for s in next_stages])
