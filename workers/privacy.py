"""Keyed hashes: identify a supporter or a client address without storing it."""

from __future__ import annotations

import hashlib
import hmac
from typing import Any

from workers.logging import mask_text


def keyed_hash(secret: bytes, value: str, purpose: str) -> str:
    """HMAC-SHA256 of ``value``; ``purpose`` keeps hashes of one kind from matching another."""
    return hmac.new(secret, f"{purpose}\x00{value}".encode(), hashlib.sha256).hexdigest()


def mask_supporter(text: str, payload: Any) -> str:
    """``text`` with the supporter's own details (and anything email- or postcode-shaped) hidden."""
    supporter = payload.get("supporter", {}) if isinstance(payload, dict) else {}
    details = [supporter.get("name"), supporter.get("email"), supporter.get("phone")]
    details += [supporter.get("postcode"), *supporter.get("address_lines", [])]
    for value in sorted((d for d in details if isinstance(d, str) and d), key=len, reverse=True):
        text = text.replace(value, "[hidden]")
    return mask_text(text)


def supporter_hash(secret: bytes, email: str) -> str:
    return keyed_hash(secret, email.strip().lower(), "supporter-email")


def ip_hash(secret: bytes, ip: str) -> str:
    return keyed_hash(secret, ip, "client-ip")
