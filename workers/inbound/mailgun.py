"""Mailgun's delivery events (``POST /v1/webhooks/mailgun``): verified, then read like a bounce.

Mailgun signs each webhook: ``signature.signature`` is the hex HMAC-SHA256, keyed with the
account's webhook signing key, of ``timestamp`` followed by ``token``. A request whose signature
does not match, or whose timestamp is more than :data:`MAX_AGE` seconds from now, is refused; a
replayed event is stored once (its ``event-data.id`` is unique).

The letter is found by the event's Message-ID (``event-data.message.headers.message-id``),
which is the letter's own.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from typing import Any

from workers.inbound.classify import Classification, clean

MAX_AGE = 300.0


def verify(signing_key: bytes, signature: Any, now: float | None = None) -> bool:
    if not isinstance(signature, dict):
        return False
    timestamp, token, given = (signature.get(k) for k in ("timestamp", "token", "signature"))
    if not all(isinstance(v, str) and 0 < len(v) <= 200 for v in (timestamp, token, given)):
        return False
    assert isinstance(timestamp, str) and isinstance(token, str) and isinstance(given, str)
    if not timestamp.isascii() or not timestamp.isdigit():
        return False
    if abs((now if now is not None else time.time()) - int(timestamp)) > MAX_AGE:
        return False
    expected = hmac.new(signing_key, (timestamp + token).encode(), hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, given.lower())


def _get(data: Any, *path: str) -> Any:
    for key in path:
        if not isinstance(data, dict):
            return None
        data = data.get(key)
    return data


def message_id(event: dict[str, Any]) -> str | None:
    """The letter's Message-ID as we store it (in angle brackets)."""
    value = _get(event, "message", "headers", "message-id")
    if not isinstance(value, str) or not value or len(value) > 250:
        return None
    value = value.strip()
    return value if value.startswith("<") else f"<{value}>"


def event_id(event: dict[str, Any]) -> str | None:
    value = event.get("id")
    return f"mailgun:{value}" if isinstance(value, str) and 0 < len(value) <= 150 else None


def event_classification(event: Any) -> Classification:
    """What a stored event says about its letter."""
    if not isinstance(event, dict):
        return Classification("malformed", diagnostic="not a Mailgun event")
    kind = event.get("event")
    status = _get(event, "delivery-status")
    code = _get(status, "code")
    enhanced = _get(status, "enhanced-code")
    words = _get(status, "description") or _get(status, "message")
    diagnostic = clean(f"{code or ''} {words or ''}")
    if kind == "delivered":
        return Classification("delivered", enhanced if isinstance(enhanced, str) else None)
    if kind == "failed":
        severity = event.get("severity")
        permanent = severity == "permanent"
        return Classification(
            "bounce" if permanent else "delay",
            enhanced if isinstance(enhanced, str) else None,
            diagnostic,
        )
    ignored = clean(str(kind), 40)
    return Classification("malformed", diagnostic=f"an event of no interest: {ignored}")
