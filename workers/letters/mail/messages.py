"""The MIME writer: any email DearMP sends, as a :class:`Draft`, its headers folded and its parts
quoted by the email package, the same bytes for the same draft on every attempt. Every header
value is refused if it could start a header of its own. Nothing here signs or sends."""

from __future__ import annotations

import email.policy
import functools
import hashlib
from dataclasses import dataclass
from datetime import datetime
from email.charset import QP, Charset
from email.header import Header
from email.utils import format_datetime, formataddr
from typing import Any

from sqlalchemy import Row

from config.addresses import wire_address as wire_address
from workers.database.models import Letter

# Parts are encoded quoted-printable in UTF-8 (7-bit safe, readable in an .eml); headers that
# are not ASCII become RFC 2047 encoded words.
UTF8 = Charset("utf-8")
UTF8.header_encoding = QP
UTF8.body_encoding = QP


class _Wire(email.policy.Compat32):
    """compat32 with CRLF line ends; a printable ASCII header is written as it is when short, and
    folded once per value when long (a campaign's From and List-Id repeat on every letter)."""

    def fold_binary(self, name: str, value: str) -> bytes:
        if isinstance(value, str) and value.isascii() and value.isprintable():
            if len(name) + len(value) + 2 <= (self.max_line_length or 0):
                return f"{name}: {value}{self.linesep}".encode("ascii")
            return _folded(self, name, value)
        return super().fold_binary(name, value)


@functools.lru_cache(maxsize=256)
def _folded(policy: _Wire, name: str, value: str) -> bytes:
    return email.policy.Compat32.fold_binary(policy, name, value)


WIRE = _Wire(linesep="\r\n")


def _one_line(value: str) -> str:
    """A header value, refused if it could start a header of its own: the writer's last guard
    against header injection (outside text goes through :func:`workers.wording.one_line` first)."""
    if "\r" in value or "\n" in value:
        raise ValueError("Header values may not contain linefeed or carriage return characters")
    return value


CRLF = "\r\n"


def _plain(text: str) -> bool:
    """Text a header can carry as it is: printable ASCII that a mail client will not decode
    (an ``=?`` could start an encoded word, so typed text that looks like one is encoded)."""
    return text.isascii() and text.isprintable() and "=?" not in text


def _encoded(text: str, header: str) -> str:
    """``text`` as RFC 2047 encoded words of at most 75 characters, folded on lines of at most
    78 (CRLF and a space between words: a reader joins them back without the space)."""
    # compat32's splitter can overshoot its line length by one with multi-byte characters in
    # quoted-printable words: asked for 74, every word stays within RFC 2047's 75.
    return Header(text, UTF8, maxlinelen=74, header_name=header).encode(linesep=CRLF)


def _mailbox(header: str, name: str, addr: str) -> str:
    address = wire_address(addr)
    name = _one_line(name)
    if _plain(name):
        return formataddr((name, address))
    words = _encoded(name, header)
    last = words.rsplit(CRLF, 1)[-1]
    gap = " " if len(last) + len(address) + 3 <= 78 else f"{CRLF} "
    return f"{words}{gap}<{address}>"


def _quoted(text: str) -> str:
    """A part's body: UTF-8, quoted-printable by the email package (which ends its lines with
    LF, and writes a CR in the text as =0D), with CRLF line ends."""
    return UTF8.body_encode(text).replace("\n", CRLF)


@dataclass(frozen=True)
class Draft:
    """Any email DearMP sends before it is written. Every header value is one line; ``headers``
    come last, plain ASCII. Date, Message-ID and the boundary are the draft's: the same draft is
    the same bytes."""

    from_name: str
    from_email: str
    to_email: str
    subject: str
    date: datetime
    message_id: str
    text: str
    to_name: str = ""
    reply_to: str | None = None
    html: str | None = None
    boundary: str | None = None
    headers: tuple[tuple[str, str], ...] = ()


# An email no person wrote at the moment it was sent (RFC 3834): responders stay quiet.
AUTOMATIC = (("Auto-Submitted", "auto-generated"),)


def _envelope_headers(draft: Draft) -> list[tuple[str, str]]:
    headers = [
        ("From", _mailbox("From", draft.from_name, draft.from_email)),
        ("To", _mailbox("To", draft.to_name, draft.to_email)),
    ]
    if draft.reply_to:
        headers.append(("Reply-To", wire_address(draft.reply_to)))
    subject = _one_line(draft.subject)
    headers.append(("Subject", subject if _plain(subject) else _encoded(subject, "Subject")))
    headers.append(("Date", format_datetime(draft.date)))
    headers.append(("Message-ID", _one_line(draft.message_id)))
    headers.extend((name, _one_line(value)) for name, value in draft.headers)
    return headers


_PART = (
    'Content-Type: text/{}; charset="utf-8"\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n'
)

_PLAIN = f"MIME-Version: 1.0{CRLF}{_PART.format('plain')}".removesuffix(CRLF).encode("ascii")


def write(draft: Draft) -> bytes:
    """The email's bytes as the email package's compat32 generator writes them (a test holds
    them equal), laid out here for speed; the package still folds the headers (:data:`WIRE`)
    and quotes the parts (:data:`UTF8`). A draft with HTML is multipart/alternative."""
    if draft.html:
        boundary = draft.boundary or "==dearmp-" + _digest(draft.text, draft.html) + "=="
        # Folded here as compat32 would: the boundary differs per letter, so no cache serves it.
        kind = f'Content-Type: multipart/alternative; boundary="{boundary}"'
        if len(kind) > 78:  # compat32's line length
            kind = kind.replace("; ", f";{CRLF} ", 1)
        first = f"{kind}{CRLF}MIME-Version: 1.0{CRLF}".encode("ascii")
        body = (
            "".join(
                f"--{boundary}{CRLF}{_PART.format(subtype)}{_quoted(text)}{CRLF}"
                for subtype, text in (("plain", draft.text), ("html", draft.html))
            )
            + f"--{boundary}--{CRLF}"
        )
    else:
        first = _PLAIN
        body = _quoted(draft.text)
    headers = b"".join(WIRE.fold_binary(name, value) for name, value in _envelope_headers(draft))
    return first + headers + b"\r\n" + body.encode("ascii")


def _digest(*texts: str) -> str:
    return hashlib.sha256("\x1f".join(texts).encode("utf-8", "surrogatepass")).hexdigest()[:32]


# A letter's stored columns: the ORM object, or a row read with them (cheaper than making the
# object to send one).
StoredLetter = Letter | Row[Any]


def letter_draft(letter: StoredLetter) -> Draft:
    return Draft(
        from_name=letter.from_name,
        from_email=letter.from_email,
        to_name=letter.to_name,
        to_email=letter.to_email,
        reply_to=letter.reply_to,
        subject=letter.subject,
        # The letter's own creation time: a retry sends the same Date, like the same Message-ID.
        date=letter.created_at,
        message_id=letter.message_id,
        text=letter.body_text or "",
        html=letter.body_html or None,
        boundary=f"==dearmp-{letter.content_sha256[:32]}==",  # not random: the same bytes
        headers=letter_headers(letter),
    )


def letter_headers(letter: StoredLetter) -> tuple[tuple[str, str], ...]:
    """What an MP's office can sort on: the campaign (List-Id) and the share of the letter in
    the supporter's own words (X-Own-Words, in per cent)."""
    headers = []
    if letter.list_id:
        headers.append(("List-Id", letter.list_id))
    if letter.own_words is not None:
        headers.append(("X-Own-Words", f"{letter.own_words}%"))
    return tuple(headers)


def from_domain(address: str) -> str:
    """The domain a From address is signed for (DMARC alignment)."""
    return wire_address(address).rsplit("@", 1)[1]


def letter_bytes(letter: StoredLetter) -> bytes:
    """The letter as sent (written when rendered, for the signature, and when delivered)."""
    return write(letter_draft(letter))
