"""Failure recording: each failed attempt of a message, above all its last, in the database.

dramatiq's dead-lettered copy would lose the final traceback. Tracebacks can quote data, so they
are kept here with the rest of the personal data, and never logged.
"""

from __future__ import annotations

import traceback as tb
from dataclasses import dataclass
from typing import Any

import redis
from sqlalchemy import ColumnElement, func, select, update
from sqlalchemy import exc as db
from sqlalchemy.orm import InstrumentedAttribute, Session

from workers.database.engine import insert_on_conflict
from workers.database.models import Failure, State, Submission, utcnow
from workers.database.transitions import AlreadyMoved, advance
from workers.logging import mask_text
from workers.wording import counted, one_line


@dataclass(frozen=True)
class Attempt:
    message_id: str
    queue_name: str
    actor_name: str
    submission_id: str | None
    exception: BaseException
    attempts: int
    dead_lettered: bool


def record_failure(session: Session, attempt: Attempt) -> None:
    """Record this attempt on the message's failure row (the caller commits). One upsert, as
    two attempts of a message may be recorded at once: the later attempt wins, and a
    dead-lettering is never undone."""
    now = utcnow()
    exc = attempt.exception
    values = {
        "message_id": attempt.message_id,
        "queue_name": attempt.queue_name,
        "actor_name": attempt.actor_name,
        "submission_id": attempt.submission_id,
        "exception_type": f"{type(exc).__module__}.{type(exc).__qualname__}",
        "exception_message": str(exc)[:4000],
        "traceback": "".join(tb.format_exception(exc))[-20_000:],
        "attempts": attempt.attempts,
        "last_failed_at": now,
        "dead_lettered_at": now if attempt.dead_lettered else None,
    }
    stmt = insert_on_conflict(session, Failure).values(first_failed_at=now, **values)
    changed = {key: getattr(stmt.excluded, key) for key in values if key != "message_id"}
    changed["dead_lettered_at"] = func.coalesce(
        stmt.excluded.dead_lettered_at, Failure.dead_lettered_at
    )
    session.execute(
        stmt.on_conflict_do_update(
            index_elements=["message_id"],
            set_=changed,
            where=Failure.attempts <= stmt.excluded.attempts,
        )
    )


def end_if_failing(session: Session, attempt: Attempt, limit: int) -> bool:
    """Move a submission whose stage has been dead-lettered ``limit`` times to ``failed``, so
    the reconciler stops resending it and the operator sees one failed submission. True if it
    was ended."""
    if not attempt.dead_lettered or attempt.submission_id is None:
        return False
    dead = (Failure.submission_id == attempt.submission_id) & Failure.dead_lettered_at.is_not(None)
    count = session.scalar(select(func.count()).select_from(Failure).where(dead)) or 0
    if count < limit:
        return False
    submission = session.get(Submission, attempt.submission_id)
    if submission is None or State(submission.state).is_final:
        return False
    stage = attempt.actor_name.removesuffix("_submission")
    reason = (
        f"the {stage} stage failed {counted(count, 'time')} in a row "
        f"({type(attempt.exception).__name__}); see `dearmp dlq show`"
    )
    try:
        advance(session, submission, State.FAILED, reason, failure_reason=reason)
    except AlreadyMoved:  # it moved on meanwhile (its guarded update wrote nothing)
        return False
    return True


def passing(error: BaseException) -> bool:
    """Database trouble that passes (a lock, a failover, a lost connection, a full pool), or
    Redis away (it is transport: a rate limit asked while it restarts): not the message's
    fault, never counted against it."""
    return isinstance(
        error,
        (
            db.OperationalError,
            db.InterfaceError,
            db.DisconnectionError,
            db.TimeoutError,
            redis.ConnectionError,
            redis.TimeoutError,
        ),
    ) or (isinstance(error, db.DBAPIError) and error.connection_invalidated)


@dataclass(frozen=True)
class Counted:
    failures: int  # the row's count, this one included
    final: bool  # the limit reached: the caller ends the row with ``reason``
    reason: str  # the error, addresses and postcodes masked; ``gave up ...`` when final


def count_failure(
    session: Session,
    counter: InstrumentedAttribute[int],
    guard: ColumnElement[bool],
    error: BaseException | str,
    limit: int,
) -> Counted | None:
    """One more failed attempt of an inbound message or an outbox item: ``counter`` of the row
    ``guard`` selects is raised by one (the caller commits). None when not counted (passing
    trouble, or the row is gone). The reason is masked (an error can quote an address) and on
    one line (it can quote a server's escape sequences)."""
    if isinstance(error, BaseException):
        if passing(error):
            return None
        error = f"{type(error).__name__}: {error}"
    model: Any = counter.class_
    failures = session.scalar(
        update(model)
        .where(guard)
        .values({counter.key: counter + 1})
        .returning(counter)
        .execution_options(synchronize_session=False)
    )
    if failures is None:
        return None
    final = failures >= limit
    reason = f"gave up after {counted(failures, 'failed attempt')}: {error}" if final else error
    return Counted(failures, final, one_line(mask_text(reason), 500))
