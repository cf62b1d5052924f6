"""Guarded state transitions: the database decides which worker moves a submission on."""

from __future__ import annotations

from typing import Any, cast

from sqlalchemy import CursorResult, Result, update
from sqlalchemy.orm import Session

from workers.models import State, Submission, SubmissionEvent, utcnow


def rowcount(result: Result[Any]) -> int:
    """Rows matched by an UPDATE (``Session.execute`` is typed as returning a plain Result)."""
    return cast("CursorResult[Any]", result).rowcount


class AlreadyMoved(Exception):
    """Another worker moved the submission first; this attempt has nothing left to do."""


def advance(
    session: Session,
    submission: Submission,
    to_state: State,
    detail: str | None = None,
    **fields: Any,
) -> None:
    """Move ``submission`` from its current state to ``to_state`` and record the transition.

    The UPDATE is conditional on the state this worker read, so of two workers running the same
    message only one succeeds; the other gets :class:`AlreadyMoved` and its transaction rolls back.
    """
    now = utcnow()
    result = session.execute(
        update(Submission)
        .where(Submission.id == submission.id, Submission.state == submission.state)
        .values(state=to_state.value, updated_at=now, dispatched_at=now, **fields)
        .execution_options(synchronize_session=False)
    )
    if rowcount(result) != 1:
        raise AlreadyMoved(submission.id)
    session.add(
        SubmissionEvent(submission_id=submission.id, state=to_state.value, at=now, detail=detail)
    )
    session.expire(submission)
