"""Intake: store what a front end posted, exactly once per idempotency key.

Nothing is judged here beyond what identifies the submission: every check belongs to validation,
so that even a malformed submission ends as a recorded rejection with reasons.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Table, insert, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from workers.models import State, Submission, SubmissionEvent, new_id, utcnow
from workers.privacy import ip_hash, supporter_hash

SUBMISSIONS: Table = Submission.__table__  # type: ignore[assignment]
EVENTS: Table = SubmissionEvent.__table__  # type: ignore[assignment]


@dataclass(frozen=True)
class Accepted:
    submission_id: str
    created: bool


def _text(value: Any, limit: int) -> str | None:
    return value if isinstance(value, str) and 0 < len(value) <= limit else None


def _split_ip(payload: Any, secret: bytes) -> tuple[Any, str | None]:
    """Drop a well-formed client IP from the payload, keeping only its keyed hash."""
    if not isinstance(payload, dict) or not payload.get("client_ip"):
        return payload, None
    try:
        address = str(ipaddress.ip_address(payload["client_ip"]))
    except (TypeError, ValueError):
        return payload, None  # left in place: validation rejects it with a message
    return {**payload, "client_ip": None}, ip_hash(secret, address)


def accept(
    session: Session, payload: Any, secret: bytes, state: State = State.RECEIVED
) -> Accepted:
    """Record a submission in state ``received`` (caller commits, then dispatches validation),
    or ``unconfirmed`` when its campaign first asks the sender to confirm by email."""
    campaign = _text(payload.get("campaign"), 200) if isinstance(payload, dict) else None
    key = _text(payload.get("idempotency_key"), 200) if isinstance(payload, dict) else None
    stored, hashed_ip = _split_ip(payload, secret)
    now = utcnow()
    submission_id = new_id()
    values = {
        "id": submission_id,
        "campaign_slug": campaign or "",
        "idempotency_key": key,
        "state": state.value,
        "payload": stored,
        "client_ip_hash": hashed_ip,
        "supporter_hash": _supporter(payload, secret),
        "created_at": now,
        "updated_at": now,
        "dispatched_at": now,
    }
    # One statement: a concurrent intake of the same key makes this one insert nothing (on
    # PostgreSQL it waits for the other to commit), and the stored submission is answered.
    # Core statements on the session's connection: the intake is the HTTP front door's hot path.
    connection = session.connection()
    table = SUBMISSIONS
    stmt: Any = (postgresql if connection.dialect.name == "postgresql" else sqlite).insert(table)
    stmt = stmt.values(values).on_conflict_do_nothing(
        index_elements=["campaign_slug", "idempotency_key"]
    )
    inserted = connection.execute(stmt.returning(table.c.id)).first()
    if inserted is None:
        found = _find(session, campaign or "", key or "")
        if found is None:
            raise RuntimeError("idempotency conflict without a stored submission")
        return Accepted(found, created=False)
    connection.execute(
        insert(EVENTS).values(submission_id=submission_id, state=state.value, at=now)
    )
    return Accepted(submission_id, created=True)


def _supporter(payload: Any, secret: bytes) -> str | None:
    supporter = payload.get("supporter") if isinstance(payload, dict) else None
    email = supporter.get("email") if isinstance(supporter, dict) else None
    return supporter_hash(secret, email) if isinstance(email, str) and email.strip() else None


def _find(session: Session, campaign: str, key: str) -> str | None:
    return session.scalar(
        select(Submission.id).where(
            Submission.campaign_slug == campaign, Submission.idempotency_key == key
        )
    )
