"""What every actor does around its stage: parse the message, run the work, send it on."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pydantic
import structlog

from schemas.messages import StageMessage
from workers.app import App, get_app
from workers.broker import broker  # installs the broker before any actor is declared
from workers.stages import Deferred, Stage, dispatch, stage_message
from workers.transitions import AlreadyMoved

log = structlog.get_logger("workers")

__all__ = ["DAY", "HOUR", "NOT_RETRIED", "broker", "run_stage"]

# Retry policy per actor (in each actor's module): bounded retries with backoff, a time limit per
# attempt, and a maximum age after which a message is dead-lettered instead of run. A message is
# young again whenever it is re-sent (deferral, reconciler, requeue), so the age bounds retrying.
HOUR = 3_600_000
DAY = 24 * HOUR

# A message that does not parse will not parse next time either: dead-letter it at once.
NOT_RETRIED = (pydantic.ValidationError,)


# dramatiq refuses delays of seven days or more.
MAX_DELAY_MS = 7 * DAY - 60_000


def run_stage(stage: Stage, raw: Any, work: Callable[[App, str], list[Stage]]) -> None:
    message = StageMessage.model_validate(raw)
    try:
        next_stages = work(get_app(), message.submission_id)
    except AlreadyMoved:
        log.info("stage_already_done")
        return
    except Deferred as deferred:
        # A fresh message with a delay: waiting is not a failure and costs no retry.
        delay = min(MAX_DELAY_MS, max(1, math.ceil(deferred.seconds * 1000)))
        broker.enqueue(stage_message(stage, message.submission_id), delay=delay)
        log.info("stage_deferred", reason=deferred.reason, seconds=round(deferred.seconds, 3))
        return
    dispatch(broker, next_stages, message.submission_id)
    log.info("stage_done", next=[s.value for s in next_stages])
