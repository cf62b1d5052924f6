"""The honeypot's answer: a robot that fills the trap field, looked at only after every check a
real submission meets, gets what a supporter gets, and nothing is stored or sent. The fake id
looks like a version 4 UUID but carries its creation time under a keyed pad and a keyed tag, so
its status moves on as a real one's does (``unconfirmed`` then ``expired``, or ``received`` then
``failed``) without a row."""

from __future__ import annotations

import hashlib
import hmac
import secrets
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from workers.database.models import State

TAG_BYTES = 6
# Bytes 0 to 3 of the id are the pad's nonce; 4, 5, 7 and 9 hold the creation time (whole
# seconds) under the pad; 6 and 8 carry the UUID's version and variant; 10 to 15 are the tag.
_NONCE = slice(0, 4)
_TIME_AT = (4, 5, 7, 9)
# How long a robot's letter seems to take through the pipeline before it fails.
SETTLE = timedelta(seconds=10)


@dataclass(frozen=True)
class Fake:
    campaign: str
    received_at: datetime


def _tag(secret: bytes, head: bytes, slug: str) -> bytes:
    message = b"honeypot\x00" + head + slug.encode()
    return hmac.new(secret, message, hashlib.sha256).digest()[:TAG_BYTES]


def _pad(secret: bytes, nonce: bytes) -> bytes:
    """Four bytes to hide the time under, and three for its microseconds."""
    return hmac.new(secret, b"honeypot-time\x00" + nonce, hashlib.sha256).digest()[:7]


def _micro(pad: bytes) -> int:
    return int.from_bytes(pad[4:], "big") % 1_000_000


def fake_submission_id(secret: bytes, slug: str, now: datetime) -> str:
    head = bytearray(secrets.token_bytes(16 - TAG_BYTES))
    pad = _pad(secret, bytes(head[_NONCE]))
    seconds = int(now.timestamp())
    if _micro(pad) > now.microsecond:  # its received_at is never after now
        seconds -= 1
    stamp = seconds.to_bytes(4, "big")
    for at, byte, key in zip(_TIME_AT, stamp, pad, strict=False):
        head[at] = byte ^ key
    head[6] = (head[6] & 0x0F) | 0x40  # version 4
    head[8] = (head[8] & 0x3F) | 0x80  # RFC 4122 variant
    return str(uuid.UUID(bytes=bytes(head) + _tag(secret, bytes(head), slug)))


def read_fake(secret: bytes, submission_id: str, slugs: Iterable[str]) -> Fake | None:
    """The campaign and time a fake id was given for, or None if it is not one of ours."""
    try:
        parsed = uuid.UUID(submission_id)
    except ValueError:
        return None
    if str(parsed) != submission_id:  # a real id is found only as written: so is a fake one
        return None
    raw = parsed.bytes
    head, tag = raw[:-TAG_BYTES], raw[-TAG_BYTES:]
    for slug in slugs:
        if hmac.compare_digest(tag, _tag(secret, head, slug)):
            pad = _pad(secret, head[_NONCE])
            stamp = bytes(head[at] ^ key for at, key in zip(_TIME_AT, pad, strict=False))
            seconds = int.from_bytes(stamp, "big")
            received = datetime.fromtimestamp(seconds, UTC).replace(microsecond=_micro(pad))
            return Fake(slug, received)
    return None


def fake_state(
    fake: Fake, confirmation: bool, confirm_valid: timedelta, now: datetime
) -> tuple[State, datetime]:
    """Where a robot's letter seems to be at ``now``, and since when."""
    if confirmation:
        expires = fake.received_at + confirm_valid
        return (State.EXPIRED, expires) if now >= expires else (State.UNCONFIRMED, fake.received_at)
    settled = fake.received_at + SETTLE
    return (State.FAILED, settled) if now >= settled else (State.RECEIVED, fake.received_at)
