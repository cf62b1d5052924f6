"""Webhook endpoints as data, what ``dearmp webhooks`` edits. Configuration is hostile input:
what cannot work is refused with one line (:class:`Refused`)."""

from __future__ import annotations

import base64
import re
import secrets
from collections.abc import Sequence
from datetime import timedelta
from typing import Any
from urllib.parse import urlsplit

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from workers.database.models import Campaign, OutboxItem, OutboxStatus, WebhookEndpoint, utcnow
from workers.logging import mask_text
from workers.outbox.sending import send_again
from workers.webhooks.channel import UNSAFE, unsafe_host
from workers.webhooks.events import EVENTS, KIND, forget

WORD = re.compile(r"[a-z][a-z._-]{0,15}")  # a path segment shown as it is


class Refused(ValueError):
    """Configuration that cannot work; the message is the one line the operator sees."""


def new_secret() -> str:
    """A Standard Webhooks secret: ``whsec_`` and 32 random bytes in base64."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


def masked(url: str) -> str:
    """The URL for screens: its host, and its path with every segment that may be a token (any
    but a short lowercase word) masked, as is any query string; no credentials or fragment."""
    parts = urlsplit(url)
    path = "/".join(p if not p or WORD.fullmatch(p) else "[masked]" for p in parts.path.split("/"))
    query, host = "[masked]" if parts.query else "", parts.netloc.rpartition("@")[2]
    return parts._replace(netloc=host, path=path, query=query, fragment="").geturl()


def add(
    session: Session,
    url: str,
    events: Sequence[str],
    campaign: str | None = None,
    personal_data: bool = False,
) -> WebhookEndpoint:
    """A new enabled endpoint with a fresh secret (shown once by the CLI)."""
    unknown = sorted(set(events) - set(EVENTS))
    if not url.isprintable() or any(c.isspace() for c in url):
        raise Refused("the URL must not hold spaces or control characters")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 (read for its check: a port that is no number from 1 to 65535)
    except ValueError:
        raise Refused("the URL cannot be read: check its host and port") from None
    if parts.port == 0:
        raise Refused("the URL's port must be from 1 to 65535")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise Refused(f"the URL must be http:// or https:// with a host: {masked(url)}")
    if "\\" in url:  # urllib3 ends the host there, where urlsplit does not
        raise Refused("the URL must not hold a backslash")
    if unsafe_host(url):
        raise Refused(f"the URL cannot be used: {UNSAFE}")
    if parts.username is not None or parts.password is not None:
        raise Refused("the URL must not carry credentials (user:password@); use the signature")
    if unknown or not events:
        raise Refused(f"unknown event {', '.join(unknown) or '(none)'}; known: {', '.join(EVENTS)}")
    if campaign is not None and session.get(Campaign, campaign) is None:
        raise Refused(f"no campaign {campaign!r} (dearmp campaigns sync loads them)")
    wanted = " ".join(e for e in EVENTS if e in events)
    endpoint = WebhookEndpoint(
        url=url, campaign_slug=campaign, events=wanted, personal_data=personal_data, enabled=True
    )
    endpoint.secret = new_secret()
    session.add(endpoint)
    session.flush()
    forget()
    return endpoint


def get(session: Session, endpoint_id: int) -> WebhookEndpoint:
    endpoint = session.get(WebhookEndpoint, endpoint_id)
    if endpoint is None:
        raise Refused(f"no webhook endpoint {endpoint_id}")
    return endpoint


def rotate(session: Session, endpoint_id: int, overlap: timedelta) -> str:
    """A new secret; the current one signs too for ``overlap``, while the receiver changes over."""
    endpoint = get(session, endpoint_id)
    endpoint.previous_secret, endpoint.secret = endpoint.secret, new_secret()
    endpoint.previous_until = utcnow() + overlap
    return endpoint.secret


def enable(session: Session, endpoint_id: int, enabled: bool = True) -> list[str] | None:
    """Disabled, an endpoint gets no new webhooks and its pending ones wait; enabled again, those
    are due at once: their ids, for the caller to send after the commit. None if it was so."""
    endpoint = get(session, endpoint_id)
    if endpoint.enabled == enabled:
        return None
    endpoint.enabled = enabled
    forget()
    waiting = (
        update(OutboxItem)
        .where(OutboxItem.endpoint_id == endpoint_id, OutboxItem.status == OutboxStatus.PENDING)
        .values(next_attempt_at=None, dispatched_at=utcnow())
        .returning(OutboxItem.id)
    )
    return list(session.scalars(waiting)) if enabled else []


def remove(session: Session, endpoint_id: int) -> int:
    """Delete the endpoint and its deliveries; how many deliveries went with it."""
    get(session, endpoint_id)
    gone = session.execute(delete(OutboxItem).where(OutboxItem.endpoint_id == endpoint_id))
    session.execute(delete(WebhookEndpoint).where(WebhookEndpoint.id == endpoint_id))
    forget()
    return int(getattr(gone, "rowcount", 0) or 0)


def replay(session: Session, item_ids: Sequence[str]) -> list[str]:
    """Delivered or given-up webhooks sent again: the same items (so the same ``webhook-id``),
    their bodies written anew (a supporter erased since is sent without details)."""
    ids = select(OutboxItem.id).where(OutboxItem.id.in_(item_ids), OutboxItem.kind == KIND)
    return send_again(session, session.scalars(ids).all(), (OutboxStatus.SENT, OutboxStatus.FAILED))


def describe(session: Session, endpoint_id: int | None = None, limit: int = 20) -> Any:
    """Every endpoint (URL masked, no secret); or one, with its latest deliveries: ids, events,
    outcomes and errors, no personal data."""
    if endpoint_id is None:
        return [_summary(e) for e in session.scalars(select(WebhookEndpoint).order_by("id"))]
    endpoint = get(session, endpoint_id)
    until = endpoint.previous_until
    items = session.scalars(
        select(OutboxItem)
        .where(OutboxItem.endpoint_id == endpoint_id)
        .order_by(OutboxItem.created_at.desc())
        .limit(limit)
    )
    deliveries = [
        {
            "webhook_id": item.id,
            "event": item.key.split(":", 1)[0],
            "submission_id": item.submission_id,
            "status": item.status,
            "failures": item.failures,
            "sent_at": item.sent_at.isoformat() if item.sent_at else None,
            "error": mask_text(item.error)[:300] if item.error else None,
        }
        for item in items
    ]
    rotating = until.isoformat() if until and until > utcnow() else None
    return _summary(endpoint) | {"previous_secret_until": rotating, "deliveries": deliveries}


def _summary(endpoint: WebhookEndpoint) -> dict[str, Any]:
    return {
        "id": endpoint.id,
        "url": masked(endpoint.url),
        "events": endpoint.events.split(),
        "campaign_slug": endpoint.campaign_slug,
        "personal_data": endpoint.personal_data,
        "enabled": endpoint.enabled,
    }
