"""DKIM signing of the writer's bytes, and the email on the wire with its envelope:
:func:`outgoing` for a stored letter, :func:`outgoing_email` for any other email."""

from __future__ import annotations

import base64
from datetime import UTC, datetime

import dkim
from dkim.canonicalization import CanonicalizationPolicy
from dkim.crypto import HASH_ALGORITHMS, UnparsableKeyError, parse_pem_private_key

from config.settings import Settings
from workers.database.models import Letter
from workers.letters.mail.mailer import Outgoing
from workers.letters.mail.messages import (
    Draft,
    StoredLetter,
    from_domain,
    letter_bytes,
    letter_draft,
    wire_address,
    write,
)

# The headers a reader sees are listed twice: a relay that adds a second one then breaks the
# signature (RFC 6376 5.4).
SIGNED_HEADERS = [
    *(name for name in (b"from", b"to", b"subject", b"reply-to") for _ in range(2)),
    b"date",
    b"message-id",
    b"list-id",
    b"x-own-words",
    b"mime-version",
    b"content-type",
    b"content-transfer-encoding",
]


class DkimSigner:
    """Adds a DKIM-Signature (RSA-SHA256, relaxed/relaxed) for the From domain, made at the
    email's own Date: the same email signed again, at any later attempt, is the same bytes."""

    def __init__(self, selector: str, private_key: bytes) -> None:
        self.selector = selector.encode()
        self.private_key = private_key
        try:
            self._key = parse_pem_private_key(private_key)
        except UnparsableKeyError as exc:
            raise dkim.KeyFormatError(str(exc)) from exc

    def signature(self, data: bytes, domain: str, at: datetime) -> bytes:
        """The DKIM-Signature header for ``data`` (with its line end), its time (``t=``) ``at``:
        the email's Date. RSA PKCS#1 v1.5 is deterministic, so the same data, domain and time
        give the same header. What dkimpy's ``dkim.sign`` makes (a test holds them equal), but
        for its ``t=``, which it takes from the clock on each call."""
        signer = dkim.DKIM(data, signature_algorithm=_ALGORITHM, linesep=b"\r\n")
        signer.hasher = HASH_ALGORITHMS[_ALGORITHM]
        body_hash = signer.hasher(_CANONICAL.canonicalize_body(signer.body)).digest()
        when = at if at.tzinfo is not None else at.replace(tzinfo=UTC)
        fields = [
            (b"v", b"1"),
            (b"a", _ALGORITHM),
            (b"c", _CANONICAL.to_c_value()),
            (b"d", domain.encode()),
            (b"i", b"@" + domain.encode()),
            (b"q", b"dns/txt"),
            (b"s", self.selector),
            (b"t", str(int(when.timestamp())).encode("ascii")),
            (b"h", b" : ".join(SIGNED_HEADERS)),
            (b"bh", base64.b64encode(body_hash)),
            (b"b", b"0" * 60),  # folded onto a line of its own, as dkimpy does, then replaced
        ]
        header = signer.gen_header(
            fields, tuple(SIGNED_HEADERS), _CANONICAL, b"DKIM-Signature", self._key
        )
        return b"DKIM-Signature: " + bytes(header)

    def letter_signature(self, letter: Letter) -> str:
        """The signature to store with a letter when it is rendered."""
        data = letter_bytes(letter)
        return self.signature(data, from_domain(letter.from_email), letter.created_at).decode(
            "ascii"
        )


_ALGORITHM = b"rsa-sha256"
_CANONICAL = CanonicalizationPolicy.from_c_value(b"relaxed/relaxed")


def outgoing_email(
    draft: Draft, signer: DkimSigner | None, envelope_sender: str | None
) -> Outgoing:
    """Any email on the wire: written, signed for its From domain if there is a ``signer`` (at
    the draft's Date, so that composing it again gives the same bytes), from
    ``envelope_sender`` (the bounce address) or else its From."""
    data = write(draft)
    if signer is not None:
        data = signer.signature(data, from_domain(draft.from_email), draft.date) + data
    return _outgoing(draft, data, envelope_sender)


def outgoing(
    letter: StoredLetter, signer: DkimSigner | None = None, envelope_sender: str | None = None
) -> Outgoing:
    """The letter on the wire, with the signature made when it was rendered (so a resend is the
    same bytes), or signed now if it was rendered without one."""
    if not letter.dkim_signature:
        return outgoing_email(letter_draft(letter), signer, envelope_sender)
    data = letter.dkim_signature.encode("ascii") + letter_bytes(letter)
    return _outgoing(letter, data, envelope_sender)


def _outgoing(mail: Draft | StoredLetter, data: bytes, envelope_sender: str | None) -> Outgoing:
    sender = envelope_sender or wire_address(mail.from_email)
    return Outgoing(sender, [wire_address(mail.to_email)], data, mail.message_id)


def make_signer(settings: Settings) -> DkimSigner | None:
    key = settings.dkim_key()
    if key is None or not settings.dkim_selector:
        return None
    return DkimSigner(settings.dkim_selector, key)
