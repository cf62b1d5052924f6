"""Per-letter return and reply addresses: ``b-<token>`` (bounce domain) is a letter's envelope
sender, ``r-<token>`` (reply domain) its Reply-To, ``n-<token>`` (bounce domain) a notice's, so
that a notice's bounce is never taken for a letter's. The token is the id's 16 bytes and 80 bits
of an HMAC over purpose and id, in base32: nothing personal, unforgeable without the key."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import uuid
from dataclasses import dataclass
from typing import Literal

Purpose = Literal["b", "r", "n"]
PURPOSES: tuple[Purpose, ...] = ("b", "r", "n")
_MAC_BYTES = 10


def _mac(secret: bytes, purpose: str, raw_id: bytes) -> bytes:
    mac = hmac.new(secret, b"return\x00" + purpose.encode() + raw_id, hashlib.sha256)
    return mac.digest()[:_MAC_BYTES]


def make_local_part(secret: bytes, purpose: Purpose, object_id: str) -> str:
    raw = uuid.UUID(object_id).bytes
    token = base64.b32encode(raw + _mac(secret, purpose, raw)).decode().rstrip("=").lower()
    return f"{purpose}-{token}"


@dataclass(frozen=True)
class Token:
    purpose: Purpose
    object_id: str  # a submission id ("b", "r") or a notice id ("n")


def _decode(address: str) -> tuple[str, Purpose, bytes, bytes] | None:
    """A token address's domain, and its token's purpose, id bytes and MAC (unchecked); None if
    it is not one's shape."""
    local, at, domain = address.strip().strip("<>").rpartition("@")
    if not at or len(local) != 44:
        return None
    purpose, dash, token = local.lower().partition("-")
    if not dash or not token.isascii() or purpose not in PURPOSES:
        return None
    try:
        data = base64.b32decode(token.upper() + "======")
    except (binascii.Error, ValueError):
        return None
    if len(data) != 16 + _MAC_BYTES:
        return None
    if base64.b32encode(data).decode().rstrip("=").lower() != token:
        return None  # the last character's spare bits set: not an address we made
    return domain.lower().rstrip("."), purpose, data[:16], data[16:]


def read_address(secret: bytes, address: str, domains: set[str]) -> Token | None:
    """What one of our addresses names, or None: not ours, malformed, or forged."""
    decoded = _decode(address)
    if decoded is None or decoded[0] not in domains:
        return None
    _, purpose, raw, mac = decoded
    if not hmac.compare_digest(mac, _mac(secret, purpose, raw)):
        return None
    return Token(purpose, str(uuid.UUID(bytes=raw)))


def token_key(address: str) -> str | None:
    """What a token-shaped address names, whatever its domain or case: purpose, id and MAC
    (unchecked), or None. Two addresses with one key are one recipient."""
    decoded = _decode(address)
    if decoded is None:
        return None
    _, purpose, raw, mac = decoded
    return f"{purpose}:{uuid.UUID(bytes=raw)}:{mac.hex()}"


@dataclass(frozen=True)
class ReturnAddresses:
    """The deployment's bounce and reply domains, and the key that signs their tokens."""

    secret: bytes
    bounce_domain: str | None = None
    reply_domain: str | None = None

    @property
    def domains(self) -> set[str]:
        return {d.lower().rstrip(".") for d in (self.bounce_domain, self.reply_domain) if d}

    def _address(self, purpose: Purpose, object_id: str, domain: str | None) -> str | None:
        return f"{make_local_part(self.secret, purpose, object_id)}@{domain}" if domain else None

    def bounce(self, submission_id: str) -> str | None:
        """A letter's envelope sender, or None (the campaign's From) with no bounce domain."""
        return self._address("b", submission_id, self.bounce_domain)

    def reply(self, submission_id: str) -> str | None:
        return self._address("r", submission_id, self.reply_domain)

    def notice(self, notice_id: str) -> str | None:
        return self._address("n", notice_id, self.bounce_domain)

    def read(self, address: str) -> Token | None:
        return read_address(self.secret, address, self.domains)

    def is_postmaster(self, address: str) -> bool:
        """``postmaster``, bare or at one of our domains: for the operator, never a letter's."""
        local, at, domain = address.strip().strip("<>").rpartition("@")
        if not at:
            local, domain = domain, ""
        return local.lower() == "postmaster" and (
            not at or domain.lower().rstrip(".") in self.domains
        )

    def accepts(self, address: str) -> bool:
        """An address on one of our domains with a genuine token (the receiver's RCPT check)."""
        return self.read(address) is not None
