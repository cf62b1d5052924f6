"""The consent ledger: append-only and tamper-evident.

Each event carries the hash of the one before and its own hash over its content and that link,
so changing, removing or reordering any event breaks the chain. Appends are serialised (an
advisory lock on PostgreSQL, the write lock on SQLite): the chain's order is the ids'. Triggers
refuse updates and deletes (migration 0005).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from typing import Any

from sqlalchemy import insert, select, text
from sqlalchemy.orm import Session

from workers.database.engine import write_lock
from workers.database.models import CONSENT_EVENTS, ConsentEvent

GENESIS = "0" * 64
# The fields a hash covers: everything but the id, the link and the hash itself.
HASHED = (
    "submission_id",
    "supporter_hash",
    "event_type",
    "campaign_slug",
    "channel",
    "choice",
    "wording_version",
    "wording",
    "wording_sha256",
    "lawful_basis",
    "privacy_notice_version",
    "source_url",
    "user_agent",
    "ip_hash",
    "recorded_at",
)
LOCK_KEY = 0x6465_6172_6D70  # "dearmp": the advisory lock that serialises appends


def _utc_iso(value: Any) -> str:
    """A timestamp from a view (SQLite gives text, PostgreSQL a datetime) as UTC ISO 8601."""
    moment = datetime.fromisoformat(value) if isinstance(value, str) else value
    return str(moment.replace(tzinfo=moment.tzinfo or UTC).astimezone(UTC).isoformat())


# The hashed fields in the order the canonical JSON lists them (sorted), and its encoder.
_SORTED = tuple(sorted(HASHED))
_CANONICAL = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, default=datetime.isoformat)


def event_hash(prev_hash: str, fields: dict[str, Any]) -> str:
    """SHA-256 of the previous hash and the event's canonical JSON (keys sorted, no spaces)."""
    body = _CANONICAL.encode({name: fields.get(name) for name in _SORTED})
    return hashlib.sha256(f"{prev_hash}\n{body}".encode()).hexdigest()


def _fields(event: ConsentEvent | Mapping[str, Any]) -> dict[str, Any]:
    get = partial(getattr, event) if isinstance(event, ConsentEvent) else event.get
    return {name: get(name) for name in HASHED}


_HEAD = select(CONSENT_EVENTS.c.hash).order_by(CONSENT_EVENTS.c.id.desc()).limit(1)
_LOCK = text("SELECT pg_advisory_xact_lock(:key)")
_INSERT = insert(CONSENT_EVENTS)
# PostgreSQL: one multi-row INSERT whose SERIAL ids follow the rows' order (SQLAlchemy's
# "insertmanyvalues" with sorted RETURNING: INSERT ... SELECT ... ORDER BY), not a statement per
# row; SQLite's executemany is one loop in C, and its rowids follow the order already.
_INSERT_IN_ORDER = _INSERT.returning(CONSENT_EVENTS.c.id, sort_by_parameter_order=True)


def append(session: Session, events: Iterable[ConsentEvent | Mapping[str, Any]]) -> int:
    """Chain ``events`` (ORM objects, or mappings of the :data:`HASHED` fields) onto the ledger
    in order, in one statement whose rows take their ids in order; returns how many. The caller
    commits, which releases the lock."""
    fields = [_fields(event) for event in events]
    if not fields:
        return 0
    hold(session)
    # A transaction that has appended already knows the head: the last hash it wrote.
    transaction = session.get_transaction()
    known = session.info.get(_HEAD_KNOWN, (None, None))
    previous = known[1] if known[0] is transaction else (session.scalar(_HEAD) or GENESIS)
    rows = []
    for row in fields:
        link = previous
        previous = event_hash(link, row)
        rows.append({**row, "prev_hash": link, "hash": previous})
    postgresql = session.get_bind().dialect.name == "postgresql"
    session.execute(_INSERT_IN_ORDER if postgresql else _INSERT, rows)
    session.info[_HEAD_KNOWN] = (transaction, previous)
    return len(rows)


def hold(session: Session) -> None:
    """Take the ledger's lock for this transaction (once per transaction).

    A transaction that appends calls this before it takes any row lock, so that none waits for
    the ledger's lock while holding a row another one waits for. On SQLite it takes the write
    lock, so that the head read next is the last one written."""
    session.connection()  # the session's transaction has begun
    transaction = session.get_transaction()
    if session.info.get(_LOCKED) is transaction:
        return
    if session.get_bind().dialect.name == "postgresql":
        session.execute(_LOCK, {"key": LOCK_KEY})
    else:
        write_lock(session)
    session.info[_LOCKED] = transaction


_HEAD_KNOWN = "workers.privacy.ledger.head"  # session.info: (the transaction, the head it wrote)
_LOCKED = "workers.privacy.ledger.locked"  # session.info: the transaction that holds the lock


@dataclass(frozen=True)
class Verification:
    events: int
    head: str
    broken_at: int | None = None
    reason: str | None = None

    @property
    def intact(self) -> bool:
        return self.broken_at is None


def verify(session: Session, recorded: str | None = None) -> Verification:
    """Walk the chain from the start; report the first event whose link or content is wrong.

    The hashes are not keyed: someone who can write to the database could rewrite the chain
    and hash it all again. ``recorded``, a head printed earlier and kept outside the database,
    must still be in the chain (broken at event 0 if not): rewritten before it, or cut, it is
    gone."""
    previous, count, seen = GENESIS, 0, recorded is None
    events = select(ConsentEvent).order_by(ConsentEvent.id)
    for event in session.scalars(events.execution_options(yield_per=5000)):
        if event.prev_hash != previous:
            return Verification(count, previous, event.id, "its link to the event before is wrong")
        if event.hash != event_hash(previous, _fields(event)):
            return Verification(count, previous, event.id, "its content does not match its hash")
        previous, count, seen = event.hash, count + 1, seen or event.hash == recorded
    if not seen:
        why = f"the head recorded earlier ({recorded}) is not in it: rewritten or cut since"
        return Verification(count, previous, 0, why)
    return Verification(count, previous)


def current_preferences(session: Session, supporter_hash: str) -> dict[str, dict[str, Any]]:
    """Channel → the supporter's current choice (the latest that was asked wins), from the view."""
    rows = session.execute(
        text(
            "SELECT channel, choice, since, campaign_slug, wording_version FROM consent_current "
            "WHERE supporter_hash = :s"
        ),
        {"s": supporter_hash},
    ).all()
    return {
        channel: {
            "choice": choice,
            "since": _utc_iso(since),
            "campaign": campaign,
            "wording_version": version,
        }
        for channel, choice, since, campaign, version in rows
    }
