"""The reconciler: the database knows where every submission is; resend what has stopped moving.

Redis can lose messages (a restart without persistence, a failed enqueue). Every submission in a
non-final state whose last dispatch is older than the deadline is sent to its stage again. The
stages are idempotent, so a resend of a message that was only slow does no harm.
"""

from __future__ import annotations

import inspect
import threading
from datetime import datetime, timedelta
from typing import Any

import dramatiq
import structlog
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from config.settings import default
from workers.database.engine import session_scope
from workers.database.models import (
    Failure,
    InboundMessage,
    InboundStatus,
    OutboxItem,
    OutboxStatus,
    State,
    Submission,
    SubmissionEvent,
    utcnow,
)
from workers.database.transitions import advance
from workers.mp.directory import current_version_id
from workers.outbox import sending as outbox
from workers.outbox.kinds import stage_of
from workers.pipeline.dispatch import dispatch
from workers.pipeline.heartbeat import record_pass
from workers.pipeline.states import RESENT_TO
from workers.stages import digests, survey
from workers.stages.confirmation import ConfirmationPolicy
from workers.stages.stage import Stage

log = structlog.get_logger(__name__)

BATCH = 1000
# The defaults of DEARMP_HELD_RECHECK, DEARMP_MAX_DEAD_LETTERS, DEARMP_DELIVERY_LEASE_SECONDS.
HELD_RECHECK = timedelta(seconds=default("held_recheck"))
MAX_DEAD_LETTERS: int = default("max_dead_letters")
LEASE = timedelta(seconds=default("delivery_lease_seconds"))


def find_stalled(
    session: Session,
    older_than: timedelta,
    held_recheck: timedelta = HELD_RECHECK,
    confirmation: ConfirmationPolicy | None = None,
    max_dead_letters: int = MAX_DEAD_LETTERS,
) -> list[tuple[str, Stage]]:
    """(submission id, stage) for everything due a resend; marks them dispatched now.

    Consent logging dead-lettered ``max_dead_letters`` times is not resent (``dearmp dlq``
    shows why). Held submissions go back to resolution when the directory has changed since
    they were held, or every ``held_recheck`` (so a hold can expire).
    """
    now = utcnow()
    cutoff = now - older_than
    due: list[tuple[str, Stage]] = []
    current = current_version_id(session)
    held = session.scalars(
        select(Submission.id)
        .where(Submission.state == State.HELD)
        .where(
            (Submission.dispatched_at < now - held_recheck)
            | (
                (Submission.dispatched_at < cutoff)
                & (
                    Submission.directory_version_id.is_(None)
                    | (Submission.directory_version_id != current)
                )
            )
        )
        .limit(BATCH)
    ).all()
    due.extend((sid, Stage.RESOLVE) for sid in held)

    # Sender confirmation: expire what was never confirmed; (re)send the email or the reminder.
    policy = confirmation or ConfirmationPolicy()
    for submission in session.scalars(
        select(Submission)
        .where(Submission.state == State.UNCONFIRMED)
        .where(Submission.created_at < now - policy.valid)
        .limit(BATCH)
    ):
        advance(session, submission, State.EXPIRED, detail="never confirmed by the sender")
    notify = session.scalars(
        select(Submission.id)
        .where(Submission.state == State.UNCONFIRMED, Submission.dispatched_at < cutoff)
        .where(
            ~_queued(Submission.id, "confirm")
            | (
                ~_queued(Submission.id, "reminder")
                & _queued(Submission.id, "confirm", OutboxStatus.SENT)
                & (Submission.created_at < now - policy.reminder_after)
            )
        )
        .limit(BATCH)
    ).all()
    due.extend((sid, Stage.NOTIFY) for sid in notify)
    stalled = session.execute(
        select(Submission.id, Submission.state)
        .where(Submission.state.in_([s.value for s in RESENT_TO]))
        .where(Submission.dispatched_at < cutoff)
        .where(~outbox.waiting(Submission.id))  # the outbox sends its letter
        .order_by(Submission.dispatched_at)
        .limit(BATCH)
    ).all()
    due.extend((sid, RESENT_TO[State(state)]) for sid, state in stalled)

    validated = select(SubmissionEvent.submission_id).where(
        SubmissionEvent.state == State.VALIDATED
    )
    unlogged = session.scalars(
        select(Submission.id)
        .where(Submission.consent_logged_at.is_(None))
        .where(Submission.dispatched_at < cutoff)
        .where(Submission.id.in_(validated))
        .where(Submission.id.not_in(_failing_consent(max_dead_letters)))
        .limit(BATCH)
    ).all()
    due.extend((sid, Stage.CONSENT) for sid in unlogged)

    marked = _mark_dispatched(session, Submission, list({sid for sid, _ in due}), now)
    return [(sid, stage) for sid, stage in due if sid in marked]


def _mark_dispatched(session: Session, model: Any, ids: list[str], now: datetime) -> set[str]:
    """Mark the rows dispatched now, locking them in the order of their ids as the stages do and
    skipping a row a worker is writing (it is moving on), so that the reconciler never waits in
    a cycle with a worker's transaction (PostgreSQL; SQLite has one writer). The ids marked."""
    if not ids:
        return set()
    free = (
        select(model.id)
        .where(model.id.in_(sorted(ids)))
        .order_by(model.id)
        .with_for_update(skip_locked=True)
    )
    return set(
        session.scalars(
            update(model)
            .where(model.id.in_(free))
            .values(dispatched_at=now)
            .returning(model.id)
            .execution_options(synchronize_session=False)
        )
    )


def find_after_sent(
    session: Session,
    older_than: timedelta,
    now: datetime | None = None,
    lease: timedelta = LEASE,
) -> list[tuple[str, Stage]]:
    """Inbound messages stored but not acted on, outbox items due (pending and past their
    backoff, or claimed by a worker that died mid-send) and surveys come due; marks them
    dispatched now. Everything is read before the first write: on SQLite that takes the one
    write lock, which a pass that found nothing must not hold while the stages commit."""
    now = now or utcnow()
    cutoff = now - older_than
    inbound = session.scalars(
        select(InboundMessage.id)
        .where(
            InboundMessage.status == InboundStatus.RECEIVED,
            InboundMessage.dispatched_at < cutoff,
        )
        .limit(BATCH)
    ).all()
    items = session.execute(
        select(OutboxItem.id, OutboxItem.kind)
        .where(outbox.due(now, lease), OutboxItem.dispatched_at < cutoff)
        .limit(BATCH)
    ).all()
    surveys = survey.due(session, now)
    marked = _mark_dispatched(session, InboundMessage, list(inbound), now)
    marked |= _mark_dispatched(session, OutboxItem, [i for i, _ in items], now)
    inbound = [i for i in inbound if i in marked]
    sent = [(n, stage_of(kind)) for n, kind in items if n in marked]
    return [(i, Stage.INBOUND) for i in inbound] + sent + [(n, Stage.OUTBOX) for n in surveys]


def _queued(submission_id: Any, key: str, status: OutboxStatus | None = None) -> Any:
    """Whether the submission's outbox item ``key`` is there (in ``status``)."""
    found = select(OutboxItem.id).where(
        OutboxItem.submission_id == submission_id, OutboxItem.key == key
    )
    return found.where(OutboxItem.status == status).exists() if status else found.exists()


def _failing_consent(limit: int) -> Any:
    return (
        select(Failure.submission_id)
        .where(
            Failure.actor_name == Stage.CONSENT.actor,
            Failure.dead_lettered_at.is_not(None),
            Failure.submission_id.is_not(None),
        )
        .group_by(Failure.submission_id)
        .having(func.count() >= limit)
    )


def reconcile_once(
    sessions: sessionmaker[Session],
    broker: dramatiq.Broker,
    older_than: timedelta,
    held_recheck: timedelta = HELD_RECHECK,
    confirmation: ConfirmationPolicy | None = None,
    max_dead_letters: int = MAX_DEAD_LETTERS,
    lease: timedelta = LEASE,
    shared: dict[str, str] | None = None,
) -> int:
    """One pass: find what has stalled, commit the new dispatch times, then resend. ``lease``:
    an outbox item claimed longer ago by a worker that never finished is taken over
    (``DEARMP_DELIVERY_LEASE_SECONDS``); ``shared``: the settings it says it holds
    (:func:`~workers.pipeline.heartbeat.shared`)."""
    with session_scope(sessions) as session:
        due = find_stalled(session, older_than, held_recheck, confirmation, max_dead_letters)
    try:
        with session_scope(sessions) as session:
            due += find_after_sent(session, older_than, lease=lease)
    except Exception as exc:  # the pipeline's own resends above are not held up by it
        log.warning("reconciler_after_sent_failed", error=type(exc).__name__)
    try:  # the MPs' daily digests that are due, and those whose letters' move was lost
        with session_scope(sessions) as session:
            made = digests.build_due(session) + digests.stalled(session)
            due += [(digest, Stage.DELIVER) for digest in made]
    except Exception as exc:
        log.warning("reconciler_digests_failed", error=type(exc).__name__)
    for submission_id, stage in due:
        dispatch(broker, [stage], submission_id)
    if due:
        log.info("reconciler_resent", count=len(due))
    record_pass(broker, shared)  # `dearmp health` says when the last pass was
    return len(due)


def run_forever(
    sessions: sessionmaker[Session],
    broker: dramatiq.Broker,
    interval: float,
    stop: threading.Event,
    **options: Any,
) -> None:
    """Reconcile (``options``: :func:`reconcile_once`'s) every ``interval`` seconds until
    ``stop`` is set; a failed pass is retried. Options it does not take fail here, at start,
    not in every pass."""
    inspect.signature(reconcile_once).bind(sessions, broker, **options)
    while not stop.is_set():
        try:
            reconcile_once(sessions, broker, **options)
        except Exception as exc:  # the database may be briefly away: try again next tick
            log.warning("reconciler_pass_failed", error=type(exc).__name__)
        stop.wait(interval)
