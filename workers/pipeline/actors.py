"""The stage actors: thin adapters that parse a stage message and run the stage's plan.

``dramatiq workers.pipeline.actors:setup`` (or ``dearmp worker``) runs them. Importing this
module builds and connects nothing: :func:`setup` builds the broker from the settings, declares
the actors on it and installs it, in each worker process.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Callable
from functools import lru_cache, partial
from typing import Any, TypeVar

import dramatiq
import pydantic
import structlog
from dramatiq.middleware import CurrentMessage
from sqlalchemy.orm import Session

from config.settings import Settings, get_settings
from schemas.messages import NotAStageMessage, parse_stage_message
from workers.database.engine import session_scope
from workers.database.transitions import AlreadyMoved, Apply, run_group
from workers.letters.mail import PermanentDeliveryError, TransientDeliveryError
from workers.logging import bound
from workers.outbox import kinds
from workers.outbox import sending as outbox
from workers.outbox.sending import Kind, Outcome
from workers.pipeline.app import App, Apps, get_app
from workers.pipeline.broker import build_broker
from workers.pipeline.dispatch import dispatch_groups, group_by_stage, stage_message
from workers.pipeline.failures import Attempt, passing, record_failure
from workers.pipeline.handoff import Handoff
from workers.pipeline.middleware import ForeignMessage, SendHeld
from workers.pipeline.states import STAGES
from workers.stages import (
    comparison,
    confirmation,
    consent,
    inbound,
    rendering,
    resolution,
    validation,
)
from workers.stages.stage import Deferred, Stage

log = structlog.get_logger("workers")

T = TypeVar("T")

# A message that does not parse will not parse next time either: dead-letter it at once. A
# permanent refusal by the mail server is recorded on its item, and never retried.
# A message met passing trouble (the database or Redis away) goes again after this long, as a
# fresh message costing no retry (an outage of minutes once dead-lettered every message
# waiting), up to PASSING_WAITS times in a row (a minute): then dramatiq's retries count, so
# trouble that does not pass (a lock timeout on one submission) ends as a dead letter.
PASSING_WAIT_MS = 5_000
PASSING_WAITS = 12
WAITED = "dearmp_waited"  # the message option counting them
NOT_RETRIED = (ForeignMessage, NotAStageMessage, pydantic.ValidationError, PermanentDeliveryError)


def options(stage: Stage) -> dict[str, Any]:
    """The stage's actor options: its retry policy from the table of stages
    (:data:`workers.pipeline.states.STAGES`), and what is never retried."""
    return STAGES[stage].options() | {"throws": NOT_RETRIED}


# Sends what a stage moved on to its next stages, after the commit: (id, its next stages).
SendOn = Callable[[list[tuple[str, list[Stage]]]], None]
Work = Callable[[App, list[str], SendOn], list[Outcome]]


def run_stage(
    stage: Stage, raw: Any, work: Work, app: App, broker: dramatiq.Broker, send_on: SendOn
) -> None:
    """Run ``work`` for the message's submissions (their next stages go through ``send_on``).

    A message about one submission fails as a whole, and dramatiq retries it. In a message about
    several, a submission that fails goes on in a message of its own, so that the others are not
    run again for it; a permanent refusal by the mail server is dead-lettered under its own id
    at once where the table of stages says so (letters), as it would be alone.
    """
    ids = parse_stage_message(raw).ids
    try:
        outcomes = work(app, ids, send_on)
    except Exception as exc:  # before any submission's own outcome (the outbox's first read)
        if not passing(exc):
            raise
        outcomes = [(submission_id, exc) for submission_id in ids]
    settle(stage, ids, outcomes, app, broker, alone=len(ids) == 1)


def settle(
    stage: Stage,
    ids: list[str],
    outcomes: list[Outcome],
    app: App,
    broker: dramatiq.Broker,
    alone: bool,
) -> None:
    """What becomes of each submission a stage ran for (see :func:`run_stage`); ``alone``: the
    message was about one submission, whose error dramatiq retries."""
    policy = STAGES[stage]
    for submission_id, error in outcomes:
        if error is None:
            continue
        with bound(**{stage.id_name: submission_id}):
            if isinstance(error, AlreadyMoved):
                log.info("stage_already_done")
            elif isinstance(error, Deferred):
                # A fresh message with a delay: waiting is not a failure and costs no retry. Its
                # age counts from now, delay included: a longer wait is waited in hops of half
                # its stage's max_age (each a deferral again), so none arrives too old to run.
                delay = min(policy.max_age // 2, max(1, math.ceil(error.seconds * 1000)))
                broker.enqueue(stage_message(stage, submission_id), delay=delay)
                log.info("stage_deferred", reason=error.reason, seconds=round(error.seconds, 3))
            elif isinstance(error, PermanentDeliveryError) and not policy.dead_letters_refusals:
                log.info("stage_refused_for_good")  # recorded on its item: nothing more to do
            elif passing(error) and (waited := _waited()) < PASSING_WAITS:
                again = stage_message(stage, submission_id)
                again = again.copy(options={**again.options, WAITED: waited + 1})
                try:
                    broker.enqueue(again, delay=PASSING_WAIT_MS)
                except Exception as exc:  # Redis away too: the reconciler sends it again
                    log.warning("dispatch_failed", stage=stage.value, error=type(exc).__name__)
                    continue
                log.warning("stage_waits_out_trouble", error=type(error).__name__)
            elif alone:
                raise error
            elif isinstance(error, PermanentDeliveryError):
                dead_letter(app, stage, submission_id, error)
            else:
                log.warning("stage_failed_sending_alone", error=type(error).__name__)
                later = error.delay if isinstance(error, dramatiq.Retry) else None
                try:
                    broker.enqueue(stage_message(stage, submission_id), delay=later)
                except Exception as exc:  # the reconciler sends it again from the database
                    log.warning("dispatch_failed", stage=stage.value, error=type(exc).__name__)
    log.info("stage_done", count=len(ids))


def _waited() -> int:
    """How many times in a row the message being run waited out passing trouble."""
    current = CurrentMessage.get_current_message()
    return int(current.options.get(WAITED, 0)) if current is not None else 0


def dead_letter(app: App, stage: Stage, submission_id: str, error: BaseException) -> None:
    """Record a dead letter for one submission of a group, as for a message of its own (the
    database is the dead letters' source of truth: ``dearmp dlq`` lists and requeues it)."""
    attempt = Attempt(str(uuid.uuid4()), stage.queue, stage.actor, submission_id, error, 1, True)
    try:
        with session_scope(app.sessions) as session:
            record_failure(session, attempt)
    except Exception as exc:  # the submission's own failure is recorded already
        log.error("dead_letter_not_recorded", error=type(exc).__name__)
        return
    log.warning("stage_dead_lettered", error=type(error).__name__)


def together(
    app: App,
    ids: list[str],
    plan: Callable[[Session, str], Apply[T]],
    then: Callable[[list[tuple[str, T]]], None] | None = None,
) -> list[Outcome]:
    """A stage's decisions and writes for the message's ``ids`` in one transaction
    (:func:`workers.database.transitions.run_group`); ``then`` gets what moved on, after the
    commit."""
    outcomes = run_group(app.sessions, ids, plan)
    moved = [(sid, value) for sid, value, error in outcomes if error is None]
    if then is not None and moved:
        try:
            then(moved)  # type: ignore[arg-type]  # value is set whenever error is None
        except Exception as exc:  # committed already: the reconciler sends them on
            log.error("send_on_failed", size=len(moved), error=type(exc).__name__)
    return [(sid, error) for sid, _, error in outcomes]


def _resolve(app: App, ids: list[str], send_on: SendOn) -> list[Outcome]:
    # Live answers are fetched before any transaction; a source that fails one submission
    # fails that submission alone.
    order = app.settings.resolution_order
    ready, failed = [], []
    for submission_id in ids:
        try:
            resolution.warm_live(app.sessions, submission_id, order, app.live_sources)
        except Exception as exc:
            failed.append((submission_id, exc))
            continue
        ready.append(submission_id)

    def plan(session: Session, submission_id: str) -> Apply[list[Stage]]:
        return resolution.plan(session, submission_id, order, app.live_sources)

    return failed + (together(app, ready, plan, send_on) if ready else [])


def _validate(app: App, ids: list[str], send_on: SendOn) -> list[Outcome]:
    return together(app, ids, validation.plan, send_on)


def _compare(app: App, ids: list[str], send_on: SendOn) -> list[Outcome]:
    return together(app, ids, comparison.plan, send_on)


def _render(app: App, ids: list[str], send_on: SendOn) -> list[Outcome]:
    def plan(session: Session, submission_id: str) -> Apply[list[Stage]]:
        sandbox = app.settings.sandbox_address
        return rendering.plan(session, submission_id, sandbox, app.signer, app.returns)

    return together(app, ids, plan, send_on)


def _retry(error: Exception) -> Exception:
    """A passing refusal (a 4xx, a server away) goes back to dramatiq as a retry, which it does
    not log as an error (:class:`workers.pipeline.middleware.LogContext` warns with the answer),
    waiting as long as the provider said, if it did."""
    if isinstance(error, TransientDeliveryError):
        later = None if error.retry_after is None else int(error.retry_after * 1000)
        retry = dramatiq.Retry(str(error), delay=later)
        retry.__cause__ = error
        return retry
    return error


def _log_consent(app: App, ids: list[str], send_on: SendOn) -> list[Outcome]:
    def plan(session: Session, submission_id: str) -> Apply[int]:
        return consent.plan(session, submission_id, app.secret)

    return together(app, ids, plan)


def _notify(app: App, ids: list[str], send_on: SendOn) -> list[Outcome]:
    """The confirmation email (or its reminder) queued in the outbox."""
    policy = confirmation.ConfirmationPolicy.from_settings(app.settings)

    def queue(submission_id: str) -> list[str]:
        with session_scope(app.sessions) as session:
            return confirmation.notify(session, submission_id, policy)

    return _one_by_one(ids, queue, send_on)


def _inbound(app: App, ids: list[str], send_on: SendOn) -> list[Outcome]:
    """Each inbound message in a transaction of its own, its notices queued in the outbox."""
    policy = inbound.InboundPolicy.from_settings(app.settings)
    every_kind = outbox_for(app)[0]

    def queue(inbound_id: str) -> list[str]:
        return inbound.process_counted(app.sessions, inbound_id, app.returns, policy, every_kind)

    return _one_by_one(ids, queue, send_on)


def _one_by_one(
    ids: list[str], queue: Callable[[str], list[str]], send_on: SendOn
) -> list[Outcome]:
    """``queue`` for each id in turn, in its own transaction, what it queued sent on to the
    outbox after its commit. An error is that id's alone (a passing refusal by the mail server
    becomes a retry, as for letters)."""
    outcomes: list[Outcome] = []
    for object_id in ids:
        error = None
        try:
            if queued := queue(object_id):
                send_on([(item_id, [Stage.OUTBOX]) for item_id in queued])
        except Exception as exc:
            error = _retry(exc)
        outcomes.append((object_id, error))
    return outcomes


@lru_cache(maxsize=1)
def outbox_for(app: App) -> tuple[dict[str, Kind], outbox.OutboxPolicy]:
    """Every kind of email the outbox sends, and its policy, from the App's settings: built
    once per App (the process's), not per message."""
    settings = app.settings
    policy = outbox.OutboxPolicy(
        settings.delivery_lease_seconds,
        settings.outbox_max_attempts,
        first_backoff=settings.outbox_backoff_seconds,
    )
    context = kinds.Context(
        app.returns,
        app.signer,
        app.secret,
        app.mailer,
        app.delivery_policy,
        app.limiter,
        settings.public_url,
        confirmation.ConfirmationPolicy.from_settings(settings),
        settings.webhook_timeout_seconds,
        settings.worker_threads,
    )
    return kinds.kinds(context), policy


def _outbox(app: App, ids: list[str], send_on: SendOn) -> list[Outcome]:
    """The message's outbox items (letters, emails, webhooks) sent: one not yet due, or waiting
    after an attempt, is Deferred, and goes again in a fresh delayed message (:func:`settle`)."""
    every_kind, policy = outbox_for(app)
    with session_scope(app.sessions) as session:
        return outbox.send_group(session, ids, app.mailer, every_kind, policy)


WORK: dict[Stage, Work] = {
    Stage.VALIDATE: _validate,
    Stage.RESOLVE: _resolve,
    Stage.COMPARE: _compare,
    Stage.RENDER: _render,
    Stage.DELIVER: _outbox,  # a letter's item has its submission's id
    Stage.CONSENT: _log_consent,
    Stage.NOTIFY: _notify,
    Stage.INBOUND: _inbound,
    Stage.OUTBOX: _outbox,
    Stage.WEBHOOK: _outbox,  # the same work on a queue of its own: an endpoint never holds up mail
}


def in_line(app: App, broker: dramatiq.Broker, send_on: SendOn) -> SendOn:
    """``send_on``, except that a stage the table runs in line (``Policy.inline``) runs here and
    now for what moved to it; if it cannot, its submissions go to its queue."""

    def send(moved: list[tuple[str, list[Stage]]]) -> None:
        later = [(sid, [s for s in stages if not STAGES[s].inline]) for sid, stages in moved]
        send_on([(sid, stages) for sid, stages in later if stages])
        here = [(sid, [s for s in stages if STAGES[s].inline]) for sid, stages in moved]
        for stage, ids in group_by_stage(here).items():
            with bound(actor=stage.actor, in_line=True):
                try:
                    outcomes = WORK[stage](app, ids, send)
                except BaseException as exc:  # also dramatiq's time limit, or a shutdown
                    log.warning("in_line_failed", error=type(exc).__name__)
                    send_on([(sid, [stage]) for sid in ids])
                    if not isinstance(exc, Exception):
                        raise
                    continue
                settle(stage, ids, outcomes, app, broker, alone=False)

    return send


def _actor_function(
    stage: Stage, apps: Apps, broker: dramatiq.Broker, send_on: SendOn
) -> Callable[[dict[str, Any]], None]:
    """The stage's actor: its work, with the process's App (``apps()``)."""
    work = WORK[stage]

    def run(message: dict[str, Any]) -> None:
        app = apps()
        run_stage(stage, message, work, app, broker, in_line(app, broker, send_on))

    run.__name__ = run.__qualname__ = stage.actor
    return run


_broker: dramatiq.Broker | None = None


def setup(settings: Settings | None = None, apps: Apps = get_app) -> dramatiq.Broker:
    """The worker's composition root (``dramatiq workers.pipeline.actors:setup``, in each worker
    process before its threads start): the broker for ``settings`` with its middleware and the
    actors, given ``apps``, where the process's App comes from; installed as the process's
    broker. What the stages move on goes through the process's :class:`Handoff`, which the
    broker's :class:`SendHeld` flushes when the worker stops (the reconciler resends a failed
    send)."""
    global _broker
    settings = settings or get_settings()
    broker = build_broker(settings, apps)
    handoff = Handoff(partial(dispatch_groups, broker), settings.handoff_linger_ms / 1000)
    broker.add_middleware(SendHeld(handoff))

    def send_on(moved: list[tuple[str, list[Stage]]]) -> None:
        handoff.add(group_by_stage(moved))

    for stage in Stage:
        declare = dramatiq.actor(
            broker=broker,
            queue_name=stage.queue,
            actor_name=stage.actor,
            **options(stage),
        )
        declare(_actor_function(stage, apps, broker, send_on))
    dramatiq.set_broker(broker)
    if _broker is not None:  # set up again (tests): what the old one holds goes first
        held_by(_broker).flush()
    _broker = broker
    return broker


def held_by(broker: dramatiq.Broker) -> Handoff:
    """The handoff of a broker :func:`setup` built (its :class:`SendHeld` middleware's)."""
    [held] = [m for m in broker.middleware if isinstance(m, SendHeld)]
    return held.handoff
