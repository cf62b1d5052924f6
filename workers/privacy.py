"""Keyed hashes: identify a supporter or a client address without storing it."""

from __future__ import annotations

import hashlib
import hmac


def keyed_hash(secret: bytes, value: str, purpose: str) -> str:
    """HMAC-SHA256 of ``value``; ``purpose`` keeps hashes of one kind from matching another."""
    return hmac.new(secret, f"{purpose}\x00{value}".encode(), hashlib.sha256).hexdigest()


def supporter_hash(secret: bytes, email: str) -> str:
    return keyed_hash(secret, email.strip().lower(), "supporter-email")


def ip_hash(secret: bytes, ip: str) -> str:
    return keyed_hash(secret, ip, "client-ip")
