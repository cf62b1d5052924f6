"""Delivery: hand a stored letter to the mail backend exactly once.

The delivery row is the unique key per letter. It is claimed ("sending") and committed before
the mail transaction, and marked "sent" with the server's answer after it. A second worker, a
duplicate message or a reconciler resend finds the claim and does nothing. Only a claim older
than the lease (a worker that died mid-send) is taken over, and the letter goes again with the
same Message-ID.
"""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import or_, update
from sqlalchemy.orm import Session, sessionmaker

from workers.db import session_scope
from workers.mail import Mailer, PermanentDeliveryError, TransientDeliveryError, build_message
from workers.models import Delivery, DeliveryStatus, Letter, State, Submission, utcnow
from workers.stages import Stage
from workers.transitions import AlreadyMoved, advance, rowcount


def claim(session: Session, submission_id: str, lease_seconds: int) -> bool:
    """Take the delivery for this worker; False if it is sent, failed or held by a live claim."""
    now = utcnow()
    result = session.execute(
        update(Delivery)
        .where(
            Delivery.submission_id == submission_id,
            or_(
                Delivery.status == DeliveryStatus.PENDING,
                (Delivery.status == DeliveryStatus.SENDING)
                & (Delivery.claimed_at < now - timedelta(seconds=lease_seconds)),
            ),
        )
        .values(status=DeliveryStatus.SENDING, claimed_at=now, attempts=Delivery.attempts + 1)
        .execution_options(synchronize_session=False)
    )
    return rowcount(result) == 1


def _finish(session: Session, submission_id: str, to_state: State, **delivery: object) -> None:
    if delivery:
        session.execute(
            update(Delivery).where(Delivery.submission_id == submission_id).values(**delivery)
        )
    submission = session.get(Submission, submission_id)
    if submission is not None and submission.state == State.RENDERED:
        detail = str(delivery.get("error") or delivery.get("response") or "")[:500]
        reason = str(delivery["error"]) if to_state == State.FAILED else None
        try:
            advance(session, submission, to_state, detail=detail, failure_reason=reason)
        except AlreadyMoved:
            pass


def deliver(
    sessions: sessionmaker[Session],
    submission_id: str,
    mailer: Mailer,
    lease_seconds: int,
    max_attempts: int = 20,
) -> list[Stage]:
    """Send the letter if nobody has; raises TransientDeliveryError for the retry policy.

    Transient failures are retried by dramatiq and, after that, resent by the reconciler, until
    ``max_attempts`` have been made: then the letter is a recorded failure with the last error.
    """
    with session_scope(sessions) as session:
        submission = session.get(Submission, submission_id)
        if submission is None or submission.state != State.RENDERED:
            return []
        delivery = session.get(Delivery, submission_id)
        letter = session.get(Letter, submission_id)
        if delivery is None or letter is None:
            return []
        if delivery.status == DeliveryStatus.SENT:
            # Sent, but the state change was lost: repair it, send nothing.
            _finish(session, submission_id, State.DELIVERED)
            return []
        if delivery.status == DeliveryStatus.PENDING and delivery.attempts >= max_attempts:
            reason = f"gave up after {delivery.attempts} attempts; last error: {delivery.error}"
            _finish(
                session, submission_id, State.FAILED, status=DeliveryStatus.FAILED, error=reason
            )
            return []
        if not claim(session, submission_id, lease_seconds):
            return []
        message = build_message(letter)

    # No transaction is open while we talk to the mail server.
    try:
        response = mailer.send(message)
    except TransientDeliveryError as exc:
        with session_scope(sessions) as session:
            session.execute(
                update(Delivery)
                .where(Delivery.submission_id == submission_id)
                .values(status=DeliveryStatus.PENDING, error=str(exc)[:2000])
            )
        raise
    except PermanentDeliveryError as exc:
        with session_scope(sessions) as session:
            _finish(
                session,
                submission_id,
                State.FAILED,
                status=DeliveryStatus.FAILED,
                error=str(exc)[:2000],
            )
        return []

    with session_scope(sessions) as session:
        _finish(
            session,
            submission_id,
            State.DELIVERED,
            status=DeliveryStatus.SENT,
            sent_at=utcnow(),
            response=response[:2000],
            error=None,
        )
    return []
