"""What every actor does around its stage: parse the message, run the work, send it on."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, TypeVar

import dramatiq
import pydantic
import structlog
from sqlalchemy.orm import Session

from config.settings import get_settings
from schemas.messages import NotAStageMessage, parse_stage_message
from workers.app import App, get_app
from workers.broker import broker  # installs the broker before any actor is declared
from workers.handoff import Handoff
from workers.middleware import ForeignMessage, SendHeld
from workers.stages import Deferred, Stage, dispatch_groups, group_by_stage, stage_message
from workers.transitions import AlreadyMoved, Apply, run_group

log = structlog.get_logger("workers")

__all__ = [
    "DAY",
    "HANDOFF",
    "HOUR",
    "NOT_RETRIED",
    "broker",
    "one_by_one",
    "run_stage",
    "send_on",
    "together",
]

T = TypeVar("T")

# Retry policy per actor (in each actor's module): bounded retries with backoff, a time limit per
# attempt, and a maximum age after which a message is dead-lettered instead of run. A message is
# young again whenever it is re-sent (deferral, reconciler, requeue), so the age bounds retrying.
HOUR = 3_600_000
DAY = 24 * HOUR

# A message that does not parse will not parse next time either: dead-letter it at once.
NOT_RETRIED = (ForeignMessage, NotAStageMessage, pydantic.ValidationError)


# dramatiq refuses delays of seven days or more.
MAX_DELAY_MS = 7 * DAY - 60_000


# Each submission a message was about, and its error (None when the stage did its work).
Outcome = tuple[str, BaseException | None]
Work = Callable[[App, list[str]], list[Outcome]]


def run_stage(stage: Stage, raw: Any, work: Work) -> None:
    """Run ``work`` for the message's submissions; their next stages are sent by ``work``.

    A message about one submission fails as a whole, and dramatiq retries it. In a message about
    several, a submission that fails goes on in a message of its own (with the stage's retries
    and, at the end, the dead-letter queue), so that the others are not run again for it.
    """
    message = parse_stage_message(raw)
    ids = message.ids
    for submission_id, error in work(get_app(), ids):
        if error is None:
            continue
        with structlog.contextvars.bound_contextvars(submission_id=submission_id):
            if isinstance(error, AlreadyMoved):
                log.info("stage_already_done")
            elif isinstance(error, Deferred):
                # A fresh message with a delay: waiting is not a failure and costs no retry.
                delay = min(MAX_DELAY_MS, max(1, math.ceil(error.seconds * 1000)))
                broker.enqueue(stage_message(stage, submission_id), delay=delay)
                log.info("stage_deferred", reason=error.reason, seconds=round(error.seconds, 3))
            elif len(ids) == 1:
                raise error
            else:
                log.warning("stage_failed_sending_alone", error=type(error).__name__)
                later = error.delay if isinstance(error, dramatiq.Retry) else None
                try:
                    broker.enqueue(stage_message(stage, submission_id), delay=later)
                except Exception as exc:  # the reconciler sends it again from the database
                    log.warning("dispatch_failed", stage=stage.value, error=type(exc).__name__)
    log.info("stage_done", submissions=len(ids))


# What the stages of this process moved on, sent to the next stages in groups (see
# :mod:`workers.handoff`); a worker shutting down sends what is held first.
HANDOFF = Handoff(
    lambda sends: dispatch_groups(broker, sends), get_settings().handoff_linger_ms / 1000
)
broker.add_middleware(SendHeld(HANDOFF))


def send_on(moved: list[tuple[str, list[Stage]]]) -> None:
    """Send submissions a stage moved on to their next stages, a message per group."""
    HANDOFF.add(group_by_stage(moved))


def together(
    app: App,
    ids: list[str],
    plan: Callable[[Session, str], Apply[T]],
    then: Callable[[list[tuple[str, T]]], None] | None = None,
) -> list[Outcome]:
    """A stage's decisions and writes for the message's ``ids`` in one transaction
    (:func:`workers.transitions.run_group`); ``then`` gets what moved on, after the commit."""
    outcomes = run_group(app.sessions, ids, plan)
    moved = [(sid, value) for sid, value, error in outcomes if error is None]
    if then is not None and moved:
        try:
            then(moved)  # type: ignore[arg-type]  # value is set whenever error is None
        except Exception as exc:  # committed already: the reconciler sends them on
            log.error("send_on_failed", size=len(moved), error=type(exc).__name__)
    return [(sid, error) for sid, _, error in outcomes]


def one_by_one(app: App, ids: list[str], work: Callable[[App, str], list[Stage]]) -> list[Outcome]:
    """A stage that handles its submissions one at a time, sending each on as it goes."""
    outcomes: list[Outcome] = []
    for submission_id in ids:
        with structlog.contextvars.bound_contextvars(submission_id=submission_id):
            try:
                next_stages = work(app, submission_id)
            except Exception as exc:
                outcomes.append((submission_id, exc))
                continue
            HANDOFF.add({stage: [submission_id] for stage in next_stages})
        outcomes.append((submission_id, None))
    return outcomes
