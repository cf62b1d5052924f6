"""The MIME writer: any email DearMP sends (a letter, a notice, a confirmation) as a
:class:`Draft`, written by the email package in the wire format (:data:`WIRE`), the same
bytes for the same draft on every attempt. Outside text is made fit for a header here
(:func:`header_text`), and every header value is refused if it could start a header of its
own. Nothing here signs or sends: see :mod:`.dkim` and the backends."""

from __future__ import annotations

import email.policy
import email.quoprimime
import unicodedata
from dataclasses import dataclass
from datetime import datetime
from email.charset import QP, Charset
from email.header import Header
from email.message import Message
from email.mime.multipart import MIMEMultipart
from email.mime.nonmultipart import MIMENonMultipart
from email.utils import format_datetime, formataddr

import idna

from workers.database.models import Letter

# Parts are encoded quoted-printable in UTF-8 (7-bit safe, readable in an .eml); headers that
# are not ASCII become RFC 2047 encoded words.
UTF8 = Charset("utf-8")
UTF8.header_encoding = QP
UTF8.body_encoding = QP


class _Wire(email.policy.Compat32):
    """The wire format: compat32 with CRLF line ends. The compat32 classes are an order of
    magnitude cheaper than EmailMessage's header registry, which re-parses every header it is
    given; every header value here is checked for line breaks before it is set (see
    :func:`_one_line`).

    compat32 writes every header through :class:`email.header.Header`'s folding, which gives
    back a printable ASCII value that fits on its line unchanged: such a header (all but a long
    or non-ASCII one) is written as it is, the same bytes. Writing the sample letter took 244
    to 280 us with compat32's folding and 147 to 174 us with this (eight runs each,
    alternated; x86_64, Python 3.11); delivery writes every letter it sends."""

    def fold_binary(self, name: str, value: str) -> bytes:
        limit = self.max_line_length or 0
        if (
            isinstance(value, str)
            and len(name) + len(value) + 2 <= limit
            and value.isascii()
            and value.isprintable()
        ):
            return f"{name}: {value}{self.linesep}".encode("ascii")
        return super().fold_binary(name, value)


WIRE = _Wire(linesep="\r\n")


def _one_line(value: str) -> str:
    """A header value, refused if it could start a header of its own (header injection).

    Not a cleaner: the writer's last guard for every value it sets. Outside text is made fit
    for a header before it gets here (:func:`header_text`); what is stored or logged about an
    inbound message is :func:`workers.receiving.classify.clean`. A letter's own values go
    through this guard alone, so that a letter's bytes never change with the cleaner."""
    if "\r" in value or "\n" in value:
        raise ValueError("Header values may not contain linefeed or carriage return characters")
    return value


CRLF = "\r\n"


def wire_address(address: str) -> str:
    """An address as it goes in a header or the SMTP envelope: an internationalised domain as
    IDNA (``bob@xn--mnchen-3ya.de``). A non-ASCII local part would need SMTPUTF8 everywhere the
    letter and its replies go; validation refuses those, and one found here fails its letter."""
    local, _, domain = _one_line(address).strip().rpartition("@")
    if not local.isascii():
        raise ValueError("an address with a non-ASCII local part needs SMTPUTF8")
    if not domain.isascii():
        domain = idna.encode(domain, uts46=True).decode("ascii")
    return f"{local}@{domain}"


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


def _part(text: str, subtype: str) -> MIMENonMultipart:
    part = MIMENonMultipart("text", subtype)
    part.set_payload(text, UTF8)
    return part


# Taken out of outside text before it goes in a header: control and format characters (CR, LF,
# NEL, bidirectional overrides, zero-width joiners), line and paragraph separators, and lone
# surrogates.
_NOT_IN_HEADERS = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})


def header_text(text: str, limit: int) -> str:
    """Outside text (a reply's subject, an MP's name, an organisation) made fit for a header:
    one line, whitespace of any kind one space, no control or format character, at most
    ``limit`` characters. What it held cannot become a header of its own, here or when a
    reader's software writes it again (CPython's CVE-2024-6923: an encoded word holding CR LF
    became real headers), whatever the interpreter's patch level.

    The one cleaner for outside text in headers (notices and forwards); the writer refuses
    what is still unfit (:func:`_one_line`), and a diagnostic kept about an inbound message is
    :func:`workers.receiving.classify.clean` (addresses taken out, never a header)."""
    kept = "".join(
        " " if c.isspace() else c
        for c in text
        if c.isspace() or unicodedata.category(c) not in _NOT_IN_HEADERS
    )
    return " ".join(kept.split())[:limit].rstrip()


@dataclass(frozen=True)
class Draft:
    """Any email DearMP sends (a letter, a notice, a confirmation) before it is written. Every
    header value is one line (the writer refuses a line break; outside text goes through
    :func:`header_text` first); ``headers`` come last, plain ASCII (``Auto-Submitted``). The
    same draft is the same bytes: Date and Message-ID are the draft's, and so is the
    multipart boundary when there is HTML."""

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


def _boundary(letter: Letter) -> str:
    # From the content, not a random one: every attempt sends the same bytes.
    return f"==dearmp-{letter.content_sha256[:32]}=="


def _envelope_headers(draft: Draft) -> list[tuple[str, str]]:
    """From, To, Reply-To, Subject, Date, Message-ID and the draft's own, each refused if it
    has a line break."""
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


def build(draft: Draft) -> Message:
    """The email as the email package's objects: every header one line, non-ASCII encoded,
    parts quoted-printable in UTF-8 (lines of at most 76 characters, RFC 2045)."""
    text = _part(draft.text, "plain")
    message: Message = text
    if draft.html:
        message = MIMEMultipart("alternative", boundary=draft.boundary)
        for part in (text, _part(draft.html, "html")):
            del part["MIME-Version"]
            message.attach(part)
    for name, value in _envelope_headers(draft):
        message[name] = value
    return message


def write(draft: Draft) -> bytes:
    """The email's bytes, written by the email package with CRLF line ends."""
    return build(draft).as_bytes(policy=WIRE)


def letter_draft(letter: Letter) -> Draft:
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
        boundary=_boundary(letter),
    )


def build_message(letter: Letter) -> Message:
    """The email for a stored letter, the same bytes on every attempt."""
    return build(letter_draft(letter))


def from_domain(address: str) -> str:
    """The domain a From address is signed for (DMARC alignment)."""
    return wire_address(address).rsplit("@", 1)[1]


def letter_bytes(letter: Letter) -> bytes:
    """The letter as sent (written twice when letters are signed: when rendered, for the
    signature, and when delivered)."""
    return write(letter_draft(letter))
