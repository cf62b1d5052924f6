"""Intake: store what a front end posted, exactly once per idempotency key.

Nothing is judged here beyond what identifies the submission (validation rejects with reasons).
A key is bound to the body first posted with it: a repeat with the same body gets the stored
submission; another body under the same key is a conflict (:attr:`Accepted.conflict`), never a
silent second letter or a lost one.
"""

from __future__ import annotations

import ipaddress
import json
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from workers.database.engine import insert_on_conflict
from workers.database.models import SUBMISSIONS, State, Submission, new_id, utcnow
from workers.database.transitions import RECORD_EVENT
from workers.privacy.hashing import ip_hash, keyed_hash, supporter_hash

# What a retry of the same request may change without being another submission: the transport's
# consent evidence (the client's address and browser, taken from the connection) and the robot
# trap; the key itself names the binding. Every other field is what the supporter wrote and chose.
NOT_IN_BODY_HASH = frozenset({"client_ip", "user_agent", "idempotency_key", "website"})


@dataclass(frozen=True)
class Accepted:
    submission_id: str
    created: bool
    state: str = ""  # the submission's state now: a repeat is answered with where it has got to
    conflict: bool = False  # the key was stored with another body: nothing stored, nothing sent


def _without_nulls(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_nulls(v) for v in value]
    return value


def body_hash(secret: bytes, payload: Any) -> str:
    """Keyed hash of the canonical body: sorted keys, no nulls (an absent optional field and a
    null one are the same body), without the fields in :data:`NOT_IN_BODY_HASH`. Keyed, as the
    body is personal data: the hash outlives its scrubbing and erasure."""
    if isinstance(payload, dict):
        payload = {k: v for k, v in payload.items() if k not in NOT_IN_BODY_HASH}
    canonical = json.dumps(
        _without_nulls(payload), sort_keys=True, separators=(",", ":"), ensure_ascii=False
    )
    return keyed_hash(secret, canonical, "submission-body")


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
    return accept_many(session, [(payload, state)], secret)[0]


def accept_many(session: Session, items: list[tuple[Any, State]], secret: bytes) -> list[Accepted]:
    """Record several submissions in one statement (the HTTP intake's group commit)."""
    now = utcnow()
    rows = []
    for payload, state in items:
        campaign = _text(payload.get("campaign"), 200) if isinstance(payload, dict) else None
        key = _text(payload.get("idempotency_key"), 200) if isinstance(payload, dict) else None
        stored, hashed_ip = _split_ip(payload, secret)
        rows.append(
            {
                "id": new_id(),
                "campaign_slug": campaign or "",
                "idempotency_key": key,
                "state": state.value,
                "payload": stored,
                "client_ip_hash": hashed_ip,
                "supporter_hash": _supporter(payload, secret),
                "body_hash": body_hash(secret, payload),
                "created_at": now,
                "updated_at": now,
                "dispatched_at": now,
            }
        )
    # Core statements, the HTTP front door's hot path. A submission whose key is already stored
    # (or repeated in this batch) inserts nothing (on PostgreSQL after waiting for a concurrent
    # insert of it to commit) and gets the stored id. An executemany with RETURNING, not
    # ``.values(rows)``: SQLAlchemy's insertmanyvalues reuses one cached compilation.
    connection = session.connection()
    stmt = (
        insert_on_conflict(connection, SUBMISSIONS)
        .on_conflict_do_nothing(index_elements=["campaign_slug", "idempotency_key"])
        .returning(SUBMISSIONS.c.id)
    )
    inserted = set(connection.execute(stmt, rows).scalars())
    results, events = [], []
    for row in rows:
        if row["id"] in inserted:
            results.append(Accepted(row["id"], created=True, state=row["state"]))
            events.append({"submission_id": row["id"], "state": row["state"], "at": now})
            continue
        found = _find(session, row["campaign_slug"], row["idempotency_key"] or "", row["body_hash"])
        if found is None:
            raise RuntimeError("idempotency conflict without a stored submission")
        results.append(found)
    if events:
        connection.execute(RECORD_EVENT, events)
    return results


def _supporter(payload: Any, secret: bytes) -> str | None:
    supporter = payload.get("supporter") if isinstance(payload, dict) else None
    email = supporter.get("email") if isinstance(supporter, dict) else None
    return supporter_hash(secret, email) if isinstance(email, str) and email.strip() else None


def stored(session: Session, payload: Any, secret: bytes) -> Accepted | None:
    """The submission already stored under this payload's campaign and key, compared with it;
    None when there is none (what a filled robot trap is answered with: see workers.web)."""
    campaign = _text(payload.get("campaign"), 200) if isinstance(payload, dict) else None
    key = _text(payload.get("idempotency_key"), 200) if isinstance(payload, dict) else None
    if key is None:
        return None
    return _find(session, campaign or "", key, body_hash(secret, payload))


def _find(session: Session, campaign: str, key: str, hashed: str) -> Accepted | None:
    row = session.execute(
        select(Submission.id, Submission.state, Submission.body_hash).where(
            Submission.campaign_slug == campaign, Submission.idempotency_key == key
        )
    ).one_or_none()
    if row is None:
        return None
    # A row stored before bodies were hashed has none: its repeat is taken as the same body.
    conflict = row.body_hash is not None and row.body_hash != hashed
    return Accepted(row.id, created=False, state=row.state, conflict=conflict)
