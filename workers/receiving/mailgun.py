"""Mailgun's delivery events (``POST /v1/webhooks/mailgun``): verified, then read like a bounce.
A request is refused unless its HMAC-SHA256 signature matches and its timestamp is within
:data:`MAX_AGE`; each token is remembered for as long, so a signature cannot be replayed. Only
what classifying needs is kept, each value checked. The letter is found by its Message-ID."""

from __future__ import annotations

import hashlib
import hmac
import re
import time
from typing import Any

from workers.receiving.classify import Classification, clean

MAX_AGE = 300.0
# Mailgun's event names: "failed", "delivered", "opened", "unsubscribed"...
_EVENT = re.compile(r"[a-z][a-z_-]{0,39}")
_ENHANCED = re.compile(r"[245]\.\d{1,3}\.\d{1,3}")
# What a signature's three parts may hold: Mailgun's are digits and hexadecimal.
_SIGNATURE_PART = re.compile(r"[0-9A-Za-z]{1,200}")


def verify(signing_key: bytes, signature: Any) -> bool:
    timestamp, token, given = (_get(signature, k) for k in ("timestamp", "token", "signature"))
    if not all(
        isinstance(v, str) and _SIGNATURE_PART.fullmatch(v) for v in (timestamp, token, given)
    ):
        return False  # (hmac.compare_digest raises on text that is not ASCII)
    if not timestamp.isdigit() or abs(time.time() - int(timestamp)) > MAX_AGE:
        return False
    expected = hmac.new(signing_key, (timestamp + token).encode(), hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, given.lower())


def _get(data: Any, *path: str) -> Any:
    for key in path:
        if not isinstance(data, dict):
            return None
        data = data.get(key)
    return data


def _printable_ascii(value: Any, limit: int) -> str | None:
    if not isinstance(value, str) or not 0 < len(value) <= limit:
        return None
    return value if value.isascii() and value.isprintable() else None


def message_id(event: dict[str, Any]) -> str | None:
    """The letter's Message-ID as we store it (in angle brackets), or None if we could not
    have made it."""
    value = _printable_ascii(_get(event, "message", "headers", "message-id"), 250)
    if value is None or not value.strip():
        return None
    value = value.strip()
    return value if value.startswith("<") else f"<{value}>"


def event_id(event: dict[str, Any]) -> str | None:
    value = _printable_ascii(event.get("id"), 150)
    return f"mailgun:{value}" if value is not None else None


def event_kind(event: dict[str, Any]) -> str | None:
    """The event's name ("failed", "delivered"...), or None if it has no name of that shape."""
    kind = event.get("event")
    return kind if isinstance(kind, str) and _EVENT.fullmatch(kind) else None


def _enhanced(value: Any) -> str | None:
    return value if isinstance(value, str) and _ENHANCED.fullmatch(value) else None


def _words(value: Any) -> str | None:
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        return None
    return clean(str(value)[:2000])


def kept_fields(event: dict[str, Any]) -> dict[str, Any]:
    """What classifying needs and nothing more, each value checked or made one printable line
    without addresses."""
    status = event.get("delivery-status")
    status = status if isinstance(status, dict) else {}
    severity = event.get("severity")
    return {
        "event": event_kind(event),
        "severity": severity if severity in ("permanent", "temporary") else None,
        "delivery-status": {
            "code": _words(status.get("code")),
            "enhanced-code": _enhanced(status.get("enhanced-code")),
            "message": _words(status.get("message")),
            "description": _words(status.get("description")),
        },
    }


def event_classification(event: Any) -> Classification:
    """What a stored event says about its letter."""
    if not isinstance(event, dict):
        return Classification("malformed", diagnostic="not a Mailgun event")
    kind = event.get("event")
    status = _get(event, "delivery-status")
    # Checked again here: a row stored before the webhook checked it is read the same way.
    enhanced = _enhanced(_get(status, "enhanced-code"))
    if kind == "delivered":
        return Classification("delivered", enhanced)
    if kind == "failed":
        words = _get(status, "description") or _get(status, "message")
        diagnostic = clean(f"{_get(status, 'code') or ''} {words or ''}")
        permanent = event.get("severity") == "permanent"
        return Classification("bounce" if permanent else "delay", enhanced, diagnostic)
    ignored = clean(str(kind), 40)
    return Classification("malformed", diagnostic=f"an event of no interest: {ignored}")
