"""Storing what came back, durably, before the sender is told it was taken."""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import delete
from sqlalchemy.orm import Session, sessionmaker

from workers.database.engine import insert_on_conflict, session_scope
from workers.database.models import InboundMessage, InboundStatus, WebhookToken, new_id, utcnow
from workers.receiving.addresses import token_key

FOR_THE_OPERATOR = "to the postmaster: kept for the operator, never acted on as a letter's"
# Of mail to the postmaster, which anyone may send: enough to read, not a way to fill the database.
POSTMASTER_KEEP = 100_000


class Replayed(Exception):
    """A webhook signature's token seen before: the request is a replay, and nothing is stored."""


def recipient_key(address: str) -> str:
    """One address however it is written: no case, angle brackets or trailing dot."""
    return address.strip().strip("<>").lower().rstrip(".")


def unique_recipients(recipients: list[str]) -> list[str]:
    """Each recipient once, in the order given: one of our addresses is its decoded token (at
    whichever of our domains, in any case), anything else its :func:`recipient_key`."""
    unique: dict[str, str] = {}
    for recipient in recipients:
        unique.setdefault(token_key(recipient) or recipient_key(recipient), recipient)
    return list(unique.values())


def store(
    sessions: sessionmaker[Session],
    source: str,
    recipients: list[str],
    raw: bytes,
    peer_hash: str | None = None,
    external_id: str | None = None,
    submission_id: str | None = None,
    token: str | None = None,
) -> list[str]:
    """One row per distinct recipient, committed; the ids the inbound stage is to act on. Mail
    to the postmaster is kept (truncated) for the operator, with no id; an event already stored
    (same ``external_id``) gives no id. ``token`` (a webhook signature's) is remembered in the
    same transaction; one seen before raises :class:`Replayed`."""
    now = utcnow()
    ids: list[str] = []
    with session_scope(sessions) as session:
        if token is not None and not _remember(session, token, now):
            raise Replayed
        for recipient in unique_recipients(recipients):
            row_id = new_id()
            operators = source == "smtp" and _to_postmaster(recipient)
            stored = session.execute(
                insert_on_conflict(session, InboundMessage)
                .values(
                    id=row_id,
                    source=source,
                    recipient=recipient[:254],
                    raw=raw[:POSTMASTER_KEEP] if operators else raw,
                    size=len(raw),
                    peer_hash=peer_hash,
                    external_id=external_id,
                    submission_id=submission_id,
                    status=(InboundStatus.DROPPED if operators else InboundStatus.RECEIVED).value,
                    kind="postmaster" if operators else None,
                    reason=FOR_THE_OPERATOR if operators else None,
                    received_at=now,
                    dispatched_at=now,
                    processed_at=now if operators else None,
                )
                .on_conflict_do_nothing(index_elements=["external_id"])
                .returning(InboundMessage.id)
            )
            if stored.first() is not None and not operators:
                ids.append(row_id)
    return ids


def _to_postmaster(recipient: str) -> bool:
    # The receiver takes no other address whose local part is not a token.
    key = recipient_key(recipient)
    return (key.rpartition("@")[0] or key) == "postmaster"


def _remember(session: Session, token: str, now: datetime) -> bool:
    """Whether ``token`` is new (and now remembered); the unique key decides between two."""
    added = session.execute(
        insert_on_conflict(session, WebhookToken)
        .values(token=token, seen_at=now)
        .on_conflict_do_nothing(index_elements=["token"])
        .returning(WebhookToken.token)
    )
    return added.first() is not None


def forget_tokens(sessions: sessionmaker[Session], older_than: float) -> None:
    """Forget tokens seen more than ``older_than`` seconds ago: their timestamps are refused now."""
    with session_scope(sessions) as session:
        session.execute(
            delete(WebhookToken).where(
                WebhookToken.seen_at < utcnow() - timedelta(seconds=older_than)
            )
        )
