"""DKIM signing of the writer's bytes, and the email on the wire with its envelope:
:func:`outgoing` for a stored letter, :func:`outgoing_email` for any other email."""

from __future__ import annotations

import dkim

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
    """Adds a DKIM-Signature (RSA-SHA256, relaxed/relaxed) for the From domain."""

    def __init__(self, selector: str, private_key: bytes) -> None:
        self.selector = selector.encode()
        self.private_key = private_key

    def signature(self, data: bytes, domain: str) -> bytes:
        """The DKIM-Signature header for ``data`` (with its line end)."""
        signature: bytes = dkim.sign(
            data,
            self.selector,
            domain.encode(),
            self.private_key,
            canonicalize=(b"relaxed", b"relaxed"),
            include_headers=SIGNED_HEADERS,
        )
        return signature

    def letter_signature(self, letter: Letter) -> str:
        """The signature to store with a letter when it is rendered."""
        return self.signature(letter_bytes(letter), from_domain(letter.from_email)).decode("ascii")


def outgoing_email(
    draft: Draft, signer: DkimSigner | None, envelope_sender: str | None
) -> Outgoing:
    """Any email on the wire: written, signed for its From domain if there is a ``signer``,
    from ``envelope_sender`` (the bounce address) or else its From."""
    data = write(draft)
    if signer is not None:
        data = signer.signature(data, from_domain(draft.from_email)) + data
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
