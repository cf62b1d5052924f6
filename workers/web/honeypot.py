"""The honeypot's answer: a robot that fills the trap field gets what a real supporter gets.

Nothing is stored. The fake submission id looks like any other (a version 4 UUID) but carries a
keyed tag over its random part and the campaign, so the status URL it was given answers like a
submission that has just arrived, for that campaign, without a database row.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import uuid
from collections.abc import Iterable

TAG_BYTES = 6


def _tag(secret: bytes, head: bytes, slug: str) -> bytes:
    message = b"honeypot\x00" + head + slug.encode()
    return hmac.new(secret, message, hashlib.sha256).digest()[:TAG_BYTES]


def fake_submission_id(secret: bytes, slug: str) -> str:
    head = bytearray(secrets.token_bytes(16 - TAG_BYTES))
    head[6] = (head[6] & 0x0F) | 0x40  # version 4
    head[8] = (head[8] & 0x3F) | 0x80  # RFC 4122 variant
    return str(uuid.UUID(bytes=bytes(head) + _tag(secret, bytes(head), slug)))


def honeypot_campaign(secret: bytes, submission_id: str, slugs: Iterable[str]) -> str | None:
    """The campaign a fake id was given for, or None if it is not one of ours."""
    try:
        raw = uuid.UUID(submission_id).bytes
    except ValueError:
        return None
    head, tag = raw[:-TAG_BYTES], raw[-TAG_BYTES:]
    for slug in slugs:
        if hmac.compare_digest(tag, _tag(secret, head, slug)):
            return slug
    return None
