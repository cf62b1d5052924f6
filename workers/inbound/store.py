"""Storing what came back, durably, before the sender is told it was taken."""

from __future__ import annotations

from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from workers.database.engine import session_scope
from workers.database.models import InboundMessage


def store(
    sessions: sessionmaker[Session],
    source: str,
    recipients: list[str],
    raw: bytes,
    peer_hash: str | None = None,
    external_id: str | None = None,
    submission_id: str | None = None,
) -> list[str]:
    """One row per recipient, committed; their ids. An event already stored (the same
    ``external_id``) is not stored again: no ids."""
    rows = [
        InboundMessage(
            source=source,
            recipient=recipient[:254],
            raw=raw,
            size=len(raw),
            peer_hash=peer_hash,
            external_id=external_id,
            submission_id=submission_id,
        )
        for recipient in recipients
    ]
    try:
        with session_scope(sessions) as session:
            session.add_all(rows)
    except IntegrityError:
        if external_id is None:
            raise
        return []
    return [row.id for row in rows]
