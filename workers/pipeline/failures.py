"""Failure recording: each failed attempt of a message, and above all its last, in the database.

dramatiq's dead-lettered copy keeps only what the message held when it was enqueued, so the final
traceback would otherwise be lost. Tracebacks can quote data (an SQL error shows its parameters):
they are kept here, with the rest of the personal data, and never logged.
"""

from __future__ import annotations

import traceback as tb
from dataclasses import dataclass

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from workers.database.models import Failure, State, Submission, utcnow
from workers.database.transitions import AlreadyMoved, advance


@dataclass(frozen=True)
class Attempt:
    message_id: str
    queue_name: str
    actor_name: str
    submission_id: str | None
    exception: BaseException
    attempts: int
    dead_lettered: bool


def record_failure(session: Session, attempt: Attempt) -> Failure:
    """Insert or update the message's failure row with this attempt (the caller commits)."""
    now = utcnow()
    exc = attempt.exception
    row = session.scalar(select(Failure).where(Failure.message_id == attempt.message_id))
    if row is None:
        row = Failure(message_id=attempt.message_id, first_failed_at=now)
        session.add(row)
    row.queue_name = attempt.queue_name
    row.actor_name = attempt.actor_name
    row.submission_id = attempt.submission_id
    row.exception_type = f"{type(exc).__module__}.{type(exc).__qualname__}"
    row.exception_message = str(exc)[:4000]
    row.traceback = "".join(tb.format_exception(exc))[-20_000:]
    row.attempts = attempt.attempts
    row.last_failed_at = now
    if attempt.dead_lettered:
        row.dead_lettered_at = now
    return row


def dead_letters_of(session: Session, submission_id: str) -> int:
    """How many of the submission's messages have been dead-lettered."""
    return (
        session.scalar(
            select(func.count())
            .select_from(Failure)
            .where(Failure.submission_id == submission_id, Failure.dead_lettered_at.is_not(None))
        )
        or 0
    )


def end_if_failing(session: Session, attempt: Attempt, limit: int) -> bool:
    """A submission whose stage has been dead-lettered ``limit`` times (each after all its
    retries, the later ones after the reconciler's resends) fails the same way every time: it
    is moved to ``failed`` with the reason, so the reconciler stops resending it and the
    operator sees one failed submission, not a dead letter every pass. True if it was ended."""
    if not attempt.dead_lettered or attempt.submission_id is None:
        return False
    count = dead_letters_of(session, attempt.submission_id)
    if count < limit:
        return False
    submission = session.get(Submission, attempt.submission_id)
    if submission is None or State(submission.state).is_final:
        return False
    stage = attempt.actor_name.removesuffix("_submission")
    reason = (
        f"the {stage} stage failed {count} times in a row "
        f"({type(attempt.exception).__name__}); see `dearmp dlq show`"
    )
    try:
        advance(session, submission, State.FAILED, reason, failure_reason=reason)
    except AlreadyMoved:  # it moved on meanwhile (its guarded update wrote nothing)
        return False
    return True
