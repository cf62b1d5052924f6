"""Address health: once ``threshold`` letters to one MP address bounce for good within
``window``, it is failing and resolution holds new letters to it, until a new address in the
directory or ``dearmp directory address EMAIL --ok``. An address an operator paused
(:mod:`workers.stages.pauses`) stays paused whatever bounces of earlier letters say."""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import func, select, text
from sqlalchemy.orm import Session

from workers.database.models import AddressHealth, Letter, LetterEvent, State, Submission, utcnow
from workers.wording import counted

_LOCK = text("SELECT pg_advisory_xact_lock(hashtext(:address))")
FAILING = "failing"
OK = "ok"
PAUSED = "paused"


def key(address: str) -> str:
    return address.strip().lower()


def is_failing(session: Session, address: str | None) -> bool:
    if not address:
        return False
    status = session.scalar(select(AddressHealth.status).where(AddressHealth.email == key(address)))
    return status == FAILING


def recent_bounces(session: Session, address: str, since: datetime) -> int:
    """Distinct letters to ``address`` that bounced for good since ``since``; a letter resent
    to a new address does not count its returns from before."""
    count = session.scalar(
        select(func.count(func.distinct(LetterEvent.submission_id)))
        .join(Letter, Letter.submission_id == LetterEvent.submission_id)
        .where(
            LetterEvent.kind == "bounce",
            LetterEvent.at >= since,
            LetterEvent.at >= Letter.created_at,
            func.lower(Letter.to_email) == key(address),  # one address, however cased
        )
    )
    return int(count or 0)


def note_bounce(
    session: Session,
    address: str,
    member_id: int | None,
    threshold: int,
    window: timedelta,
    now: datetime | None = None,
) -> bool:
    """After a permanent bounce is recorded: mark the address failing once enough letters to it
    have bounced. True when this call marked it."""
    now = now or utcnow()
    if session.get_bind().dialect.name == "postgresql":
        # One transaction at a time counts an address's bounces, so the last sees them all.
        session.execute(_LOCK, {"address": f"health:{key(address)}"})
    bounces = recent_bounces(session, address, now - window)
    if bounces < threshold:
        return False
    row = session.get(AddressHealth, key(address), with_for_update=True)
    if row is None:
        row = AddressHealth(email=key(address), member_id=member_id)
        session.add(row)
    elif row.status in (FAILING, PAUSED):
        row.bounces = bounces
        return False
    elif row.changed_at > now - window:
        # Marked ok by an operator within the window: only bounces since then count.
        if recent_bounces(session, address, row.changed_at) < threshold:
            return False
    hours = window.total_seconds() / 3600
    row.status, row.bounces, row.changed_at = FAILING, bounces, now
    row.reason = f"{counted(bounces, 'letter')} returned for good within {counted(hours, 'hour')}"
    session.flush()
    return True


def mark_ok(session: Session, address: str, reason: str = "marked ok by an operator") -> bool:
    """The address works again. True if it was failing."""
    row = session.get(AddressHealth, key(address), with_for_update=True)
    if row is None or row.status != FAILING:
        return False
    row.status, row.reason, row.changed_at = OK, reason, utcnow()
    return True


def failing(session: Session) -> list[AddressHealth]:
    return list(
        session.scalars(
            select(AddressHealth)
            .where(AddressHealth.status == FAILING)
            .order_by(AddressHealth.changed_at)
        )
    )


def held_for(session: Session, member_id: int) -> list[str]:
    """Submissions held for ``member_id`` (their address failing, or the seat vacant)."""
    return list(
        session.scalars(
            select(Submission.id).where(
                Submission.state == State.HELD, Submission.member_id == member_id
            )
        )
    )


def failing_count(session: Session) -> int:
    count = session.scalar(
        select(func.count()).select_from(AddressHealth).where(AddressHealth.status == FAILING)
    )
    return int(count or 0)
