"""Mail backends behind one small interface, all sending the same stored, optionally signed bytes.

Backends: a file outbox (the embedded default), SMTP (STARTTLS or implicit TLS, auth, one reused
connection per thread) and an HTTP provider (Mailgun's raw-MIME API through ``requests``).
"""

from __future__ import annotations

import contextlib
import email.policy
import email.quoprimime
import os
import re
import smtplib
import ssl
import threading
import time
import unicodedata
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from email.charset import QP, Charset
from email.header import Header
from email.message import Message
from email.mime.multipart import MIMEMultipart
from email.mime.nonmultipart import MIMENonMultipart
from email.utils import format_datetime, formataddr, parsedate_to_datetime
from pathlib import Path
from typing import Protocol

import dkim
import idna
import requests
import structlog

from config.settings import Settings
from workers.database.models import Letter, utcnow
from workers.logging import mask_text

# Signed: the headers a reader sees and the MIME headers that say how to read the body. The
# ones a reader sees are listed twice: a header named more often than it occurs is signed as
# absent, so a relay that adds a second From, To, Subject or Reply-To breaks the signature
# (RFC 6376 5.4).
SIGNED_HEADERS = [
    *(name for name in (b"from", b"to", b"subject", b"reply-to") for _ in range(2)),
    b"date",
    b"message-id",
    b"mime-version",
    b"content-type",
    b"content-transfer-encoding",
]


class TransientDeliveryError(Exception):
    """Worth trying again later: connection trouble, a timeout, SMTP 4xx, HTTP 429 or 5xx.

    ``ours``: the refusal answers our side (the relay closing a session it has too many of, a
    conversation out of step, our login paused, every session busy), not the letter: the letter
    waits and tries again without it counting as one of its attempts."""

    def __init__(self, message: str, retry_after: float | None = None, ours: bool = False) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.ours = ours


class PermanentDeliveryError(Exception):
    """Trying again will not help: SMTP 5xx, HTTP 4xx. Recorded, then left for an operator."""


@dataclass(frozen=True)
class Outgoing:
    """One letter ready for the wire: envelope and the exact bytes to send."""

    sender: str
    recipients: list[str]
    data: bytes
    message_id: str


class Mailer(Protocol):
    name: str

    def send(self, mail: Outgoing) -> str:
        """Hand the letter over; return the server's answer. Raises a *DeliveryError."""
        ...

    def waiting(self) -> float:
        """Seconds before letters should be handed over again (0: now): the backend knows it
        would be refused for a reason that is not the letter's."""
        ...

    def close(self) -> None:
        """End what the backend holds open (a worker shutting down)."""
        ...


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
    inbound message is :func:`workers.inbound.classify.clean`. A letter's own values go
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
    :func:`workers.inbound.classify.clean` (addresses taken out, never a header)."""
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

    def sign(self, data: bytes, domain: str) -> bytes:
        return self.signature(data, domain) + data

    def letter_signature(self, letter: Letter) -> str:
        """The signature to store with a letter when it is rendered."""
        return self.signature(letter_bytes(letter), from_domain(letter.from_email)).decode("ascii")


def letter_bytes(letter: Letter) -> bytes:
    """The letter as sent (written twice when letters are signed: when rendered, for the
    signature, and when delivered)."""
    return write(letter_draft(letter))


def _envelope(draft_from: str, to: str, envelope_sender: str | None) -> tuple[str, list[str]]:
    return envelope_sender or wire_address(draft_from), [wire_address(to)]


def outgoing_email(
    draft: Draft, signer: DkimSigner | None, envelope_sender: str | None
) -> Outgoing:
    """Any email DearMP sends on the wire: written by :func:`write`, signed by ``signer`` for
    its From domain, from ``envelope_sender`` (``MAIL FROM``, the Return-Path: an address on
    the bounce domain) or, without one, from its From."""
    data = write(draft)
    if signer is not None:
        data = signer.sign(data, from_domain(draft.from_email))
    sender, recipients = _envelope(draft.from_email, draft.to_email, envelope_sender)
    return Outgoing(sender, recipients, data, draft.message_id)


def outgoing(
    letter: Letter, signer: DkimSigner | None = None, envelope_sender: str | None = None
) -> Outgoing:
    """The letter on the wire: with the signature made when it was rendered, so a resend is
    the same bytes; a letter rendered without one is signed now by ``signer``, if any. The
    envelope sender is the letter's own return address when there is one, else its From."""
    if not letter.dkim_signature:
        return outgoing_email(letter_draft(letter), signer, envelope_sender)
    data = letter.dkim_signature.encode("ascii") + letter_bytes(letter)
    sender, recipients = _envelope(letter.from_email, letter.to_email, envelope_sender)
    return Outgoing(sender, recipients, data, letter.message_id)


class OutboxMailer:
    """One ``.eml`` file per letter, named by its Message-ID: writing it twice leaves one file."""

    name = "outbox"

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def waiting(self) -> float:
        return 0.0

    def close(self) -> None:
        pass

    def send(self, mail: Outgoing) -> str:
        stem = mail.message_id.strip("<>").split("@", 1)[0]
        path = self.directory / f"{stem}.eml"
        tmp = path.with_suffix(f".tmp{os.getpid()}-{threading.get_ident()}")
        try:
            _write_private(tmp, mail.data)
        except FileNotFoundError:  # the first letter (or the folder was removed): make it
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            _write_private(tmp, mail.data)
        os.replace(tmp, path)
        return f"written {path.name}"


def _write_private(path: Path, data: bytes) -> None:
    """A letter's file, readable by this user only (it holds personal data)."""
    fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(data)


def _close(conn: smtplib.SMTP) -> None:
    """End a session as RFC 5321 asks (QUIT), then close the socket whatever the server does."""
    try:
        if conn.sock is not None:
            conn.quit()
    except (smtplib.SMTPException, OSError):
        pass
    finally:
        conn.close()


class RelayPause:
    """When the relay refuses us rather than a letter (our login; its certificate failing our
    TLS verification; our HELO name, sender address or right to relay: an answer to EHLO or
    MAIL FROM, or one to RCPT in a relay's words for our set-up or of policy), no thread of the
    process tries again for a while: ``first`` seconds (``SMTP_PAUSE_SECONDS``, 30 by default),
    doubling with each refusal in a row up to 15 minutes. Letters wait meanwhile
    (:meth:`waiting`), costing none of their attempts; the first letter after the pause is the
    probe, and its success ends the pause. A wrong password tried by every thread
    for every letter is the burst that gets an account locked; a sender refusal would fail every
    letter for a mistake in configuration. ``alarm`` is told of each pause and of its end (the
    deployment's operators see it in ``dearmp health`` and the metrics), with the relay's
    answer as its reason, email addresses and postcodes masked: an answer quoting a recipient
    would otherwise show a supporter's or an MP's address to everyone who runs ``health``."""

    LONGEST = 900.0

    def __init__(
        self,
        first: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
        alarm: Callable[[str | None, float], None] | None = None,
    ) -> None:
        self.first, self.clock, self.alarm = first, clock, alarm
        self.lock = threading.Lock()
        self.one_at_a_time = threading.Lock()
        self.refusals = 0
        self.closed_until = 0.0
        self.reason: str | None = None
        self.letters_accepted = 0
        # recipient -> letters_accepted when a policy answer last refused it (see refused_rcpt)
        self.refused_recipients: dict[str, int] = {}

    def waiting(self) -> float:
        """Seconds until the relay may be tried again (0: now)."""
        with self.lock:
            return max(0.0, self.closed_until - self.clock())

    def check(self) -> None:
        wait = self.waiting()
        if wait > 0:
            raise TransientDeliveryError(
                f"delivery paused: {self.reason}; next try in {wait:.0f} s",
                retry_after=wait,
                ours=True,
            )

    @contextlib.contextmanager
    def turn(self) -> Iterator[None]:
        """One login at a time in the process, and none while paused: the threads that wanted
        to log in with the first refusal do not each try the same password."""
        with self.one_at_a_time:
            self.check()
            yield

    def refused(self, reason: str) -> float:
        """The relay refused us: pause, and return for how long."""
        with self.lock:
            self.refusals += 1
            pause: float = min(self.LONGEST, self.first * 2.0 ** (self.refusals - 1))
            self.closed_until = self.clock() + pause
            self.reason = mask_text(reason)[:200]
        structlog.get_logger("workers").error(
            "mail_delivery_paused",
            reason=self.reason,
            pause_seconds=pause,
            refusals_in_a_row=self.refusals,
        )
        if self.alarm is not None:
            self.alarm(self.reason, pause)
        return pause

    def refused_rcpt(self, recipient: str, reason: str) -> float | None:
        """A policy answer (5.7.x) to RCPT, or one in a relay's words for our set-up there
        ("Sender address rejected", "Helo command rejected", which a relay's rule for one
        recipient can give too): it may refuse us (our right to relay, our sender) or this
        recipient ("Recipient address rejected: Access denied"), and its words do not say
        which. The first time it is taken as ours: pause, and return for how long. When the
        same recipient is refused again after the relay accepted other letters, the recipient
        is the cause: None (the letter's own permanent failure, with no pause)."""
        with self.lock:
            seen = self.refused_recipients.get(recipient)
            if seen is not None and seen < self.letters_accepted:
                return None
            if len(self.refused_recipients) >= 10_000:
                self.refused_recipients.clear()
            self.refused_recipients[recipient] = self.letters_accepted
        return self.refused(reason)

    def accepted(self) -> None:
        with self.lock:
            self.letters_accepted += 1
            if not self.refusals:
                return
            self.refusals, self.closed_until, self.reason = 0, 0.0, None
        structlog.get_logger("workers").warning("mail_delivery_resumed")
        if self.alarm is not None:
            self.alarm(None, 0.0)


class Refusal(Exception):
    """The server refused one letter with a definite answer to ``command``; ``usable``: the
    session was reset (RSET answered 250) and can carry the next letter."""

    def __init__(self, command: str, code: int, answer: bytes | str, recipient: str = "") -> None:
        super().__init__(f"{code} {_text(answer)}")
        self.command, self.code, self.answer, self.recipient = command, code, answer, recipient
        self.usable = False


@dataclass(eq=False)
class _Session:
    conn: smtplib.SMTP
    opened: float
    used: float
    letters: int = 0


class SmtpPool:
    """The SMTP sessions a worker process keeps open to its relay, shared by its threads.

    At most ``size`` sessions are open at once (a relay's limit per client is counted in
    sessions; a thread that finds them all busy waits for one), a session is closed (with
    QUIT) once it is ``max_age`` seconds old, has carried ``max_letters`` letters, or has sat
    idle for ``idle`` seconds, so that a relay's new rules reach us and idle threads hold
    nothing. A session that met an error is closed, not reused, unless the error is a
    :class:`Refusal` of one letter after which the session was reset (``usable``).

    When the relay answers a new connection with 421 ("too many connections") while this
    process has sessions open, the pool takes that as the relay's limit: it keeps to the
    sessions it has, and the thread waits for one of them instead of deferring its letter,
    until ``max_age`` has passed and a larger pool is tried again. With none open (other
    processes hold what the relay allows), no thread of the process connects for a while
    (``HOLD_FIRST`` seconds, doubling with each 421 in a row up to ``HOLD_LONGEST``) and then
    one tries: threads wait for that as for a busy session, and a letter that waits too long
    is deferred as ``ours`` (no attempt counted), not one refused connection per letter."""

    HOLD_FIRST = 1.0
    HOLD_LONGEST = 30.0

    def __init__(
        self,
        connect: Callable[[], smtplib.SMTP],
        size: int,
        max_age: float,
        max_letters: int,
        idle: float,
        wait: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.connect, self.clock = connect, clock
        self.max_age, self.max_letters, self.idle_for, self.wait = max_age, max_letters, idle, wait
        self.size = self.ceiling = size
        self.lowered_at = 0.0
        self.changed = threading.Condition()
        self.idle: list[_Session] = []
        self.open = 0  # sessions open now, idle or in use (or being opened)
        self.opened = 0  # sessions opened so far (for tests and metrics)
        self.refused_in_a_row = 0
        self.held_until = 0.0  # no new connection before this (see HOLD_FIRST)
        self.sweeper: threading.Timer | None = None

    @contextlib.contextmanager
    def session(self) -> Iterator[smtplib.SMTP]:
        session = self._take()
        try:
            yield session.conn
        except Refusal as refusal:
            if not refusal.usable:
                self._discard(session)
            else:
                self._put_back(session)
            raise
        except BaseException:
            self._discard(session)
            raise
        self._put_back(session)

    def _put_back(self, session: _Session) -> None:
        # A session that has carried its last letter goes back too: its QUIT, a round trip,
        # must not stand between the server's answer and the caller's record of the letter as
        # sent. The next use or the idle sweep closes it.
        session.letters += 1
        session.used = self.clock()
        with self.changed:
            self.idle.append(session)
            self.changed.notify()
            if self.sweeper is None:
                self.sweeper = threading.Timer(self.idle_for, self._sweep)
                self.sweeper.daemon = True
                self.sweeper.start()

    def _sweep(self) -> None:
        """Close the sessions that have sat idle too long (a timer while any are idle)."""
        with self.changed:
            now = self.clock()
            gone = [s for s in self.idle if self._spent(s, now)]
            self.idle = [s for s in self.idle if s not in gone]
            self.open -= len(gone)
            self.changed.notify(len(gone))
            self.sweeper = None
            if self.idle:
                self.sweeper = threading.Timer(self.idle_for, self._sweep)
                self.sweeper.daemon = True
                self.sweeper.start()
        for session in gone:
            _close(session.conn)

    def _spent(self, session: _Session, now: float) -> bool:
        return (
            now - session.opened >= self.max_age
            or session.letters >= self.max_letters
            or now - session.used >= self.idle_for
        )

    def _discard(self, session: _Session) -> None:
        _close(session.conn)
        with self.changed:
            self.open -= 1
            self.changed.notify()

    def _take(self) -> _Session:
        deadline = time.monotonic() + self.wait
        while True:
            with self.changed:
                now = self.clock()
                if self.ceiling < self.size and now - self.lowered_at >= self.max_age:
                    self.ceiling = self.size
                while not self.idle and (self.open >= self.ceiling or self._held()):
                    left = deadline - time.monotonic()
                    held = self.held_until - self.clock()
                    if left <= 0:
                        raise TransientDeliveryError(
                            "the mail server takes no more connections from us just now"
                            if held > 0
                            else "every connection to the mail server is busy",
                            retry_after=max(1.0, held),
                            ours=True,
                        )
                    self.changed.wait(min(left, held) if held > 0 else left)
                session = self.idle.pop() if self.idle else None  # the most recently used
                if session is None:
                    self.open += 1  # this thread opens one
            if session is not None:
                if self._usable(session):
                    return session
                self._discard(session)
                continue
            try:
                conn = self.connect()
            except smtplib.SMTPResponseException as exc:
                with self.changed:
                    self.open -= 1
                    self.changed.notify()
                    if exc.smtp_code != 421:
                        raise
                    if self.open == 0:  # others hold what the relay allows: hold off
                        self.refused_in_a_row += 1
                        hold = self.HOLD_FIRST * 2.0 ** (self.refused_in_a_row - 1)
                        self.held_until = self.clock() + min(self.HOLD_LONGEST, hold)
                        self.ceiling = 1  # then one thread tries
                    else:
                        self.ceiling = self.open
                    self.lowered_at = self.clock()
                continue  # the relay allows no more: wait for one of ours, or the hold
            except BaseException:
                with self.changed:
                    self.open -= 1
                    self.changed.notify()
                raise
            now = self.clock()
            with self.changed:
                self.opened += 1
                self.refused_in_a_row = 0
            return _Session(conn, opened=now, used=now)

    def _held(self) -> bool:
        return self.clock() < self.held_until

    def _usable(self, session: _Session) -> bool:
        now = self.clock()
        if self._spent(session, now):
            return False
        if now - session.used < 1.0:
            return True
        try:  # idle for a moment: make sure the server has not closed it meanwhile
            return bool(session.conn.noop()[0] == 250)
        except (smtplib.SMTPException, OSError):
            return False

    def close(self) -> None:
        """Close every idle session (a worker shutting down, or a pause beginning)."""
        with self.changed:
            idle, self.idle = self.idle, []
            self.open -= len(idle)
            self.changed.notify_all()
            if self.sweeper is not None:
                self.sweeper.cancel()
                self.sweeper = None
        for session in idle:
            _close(session.conn)


class SmtpMailer:
    """SMTP with STARTTLS or implicit TLS, optional auth, over a pool of sessions."""

    name = "smtp"

    def __init__(
        self, settings: Settings, alarm: Callable[[str | None, float], None] | None = None
    ) -> None:
        self.settings = settings
        self.relay = RelayPause(settings.smtp_pause, alarm=alarm)
        self.pool = SmtpPool(
            self._connect,
            size=settings.smtp_max_connections,
            max_age=settings.smtp_connection_max_age,
            max_letters=settings.smtp_connection_max_letters,
            idle=settings.smtp_connection_idle,
            wait=settings.smtp_timeout,
        )

    def _tls(self) -> ssl.SSLContext:
        context = ssl.create_default_context()
        if self.settings.smtp_ca_file:
            context.load_verify_locations(cafile=str(self.settings.smtp_ca_file))
        return context

    def _connect(self) -> smtplib.SMTP:
        s = self.settings
        conn: smtplib.SMTP | None = None
        try:
            if s.smtp_security == "tls":
                conn = smtplib.SMTP_SSL(
                    s.smtp_host,
                    s.smtp_port,
                    local_hostname=s.smtp_helo_name,
                    timeout=s.smtp_timeout,
                    context=self._tls(),
                )
            else:
                conn = smtplib.SMTP(
                    s.smtp_host,
                    s.smtp_port,
                    local_hostname=s.smtp_helo_name,
                    timeout=s.smtp_timeout,
                )
                if s.smtp_security == "starttls":
                    conn.starttls(context=self._tls())
            conn.ehlo_or_helo_if_needed()
            if s.smtp_username and s.smtp_password:
                with self.relay.turn():
                    try:
                        _login(conn, s.smtp_username, s.smtp_password.get_secret_value())
                    except smtplib.SMTPAuthenticationError as exc:
                        answer = _text(exc.smtp_error)
                        self.relay.refused(f"login refused: {exc.smtp_code} {answer}")
                        raise
        except BaseException as exc:
            if conn is not None:  # a set-up that failed (TLS, EHLO, AUTH) leaves no session
                _close(conn)
            if isinstance(exc, ssl.SSLCertVerificationError) and not self.relay.waiting():
                # The relay's certificate, or the CA we check it with: the same for every
                # letter, so a pause, not a handshake per letter charged to it. (Threads that
                # were in a handshake with the first make one pause, not one doubling each.)
                self.relay.refused(
                    f"TLS verification of the mail server failed ({exc.verify_message}): "
                    "check SMTP_CA_FILE and the relay's certificate"
                )
            raise
        return conn

    def waiting(self) -> float:
        return self.relay.waiting()

    def close(self) -> None:
        self.pool.close()

    def send(self, mail: Outgoing) -> str:
        # An error closes the session it happened on (the pool's rule): a server out of step
        # with us, or an address the library cannot write, cannot leave the next letter a
        # session mid-transaction. A definite refusal of this letter does not spoil the
        # session: once RSET is answered, it goes back to the pool (see _transaction).
        try:
            self.relay.check()
            with self.pool.session() as conn:
                code, answer = _transaction(conn, mail)
            self.relay.accepted()
            return f"{code} {answer.decode(errors='replace')}"
        except smtplib.SMTPAuthenticationError as exc:  # the pause is set already (_connect)
            text = _text(exc.smtp_error)
            wait = self.relay.waiting()
            raise TransientDeliveryError(f"{exc.smtp_code} {text}", wait, ours=True) from exc
        except ssl.SSLCertVerificationError as exc:  # the pause is set already (_connect)
            wait = self.relay.waiting()
            raise TransientDeliveryError(f"TLS: {exc}", wait, ours=True) from exc
        except Refusal as exc:
            error = self._refused(exc.command, exc.code, exc.answer, exc.recipient)
            if self.relay.waiting() > 0:
                # Paused: no session waits out the pause under the rules it was opened with
                # (a relay's operator fixes them and reloads; the probe gets a new session).
                self.pool.close()
            raise error from exc
        except smtplib.SMTPResponseException as exc:  # the greeting, EHLO, STARTTLS
            raise self._refused("SESSION", exc.smtp_code, exc.smtp_error) from exc
        except (smtplib.SMTPException, OSError) as exc:
            raise TransientDeliveryError(f"{type(exc).__name__}: {exc}") from exc

    def _refused(
        self, command: str, code: int, answer: bytes | str, recipient: str = ""
    ) -> Exception:
        """The error for a refusal of ``command`` (MAIL, RCPT, DATA, or SESSION for the
        session's set-up).

        - 421 and 503 answer the session's state, not the letter: it waits, then a new session.
        - Any other answer at DATA judges the letter (its content, its authentication: "5.7.26
          Unauthenticated email", "5.7.515 ... authentication level", spam): the letter's own,
          whatever its words.
        - A refusal of us pauses delivery (:class:`RelayPause`): the authentication answers
          and any refusal of setting up the session (EHLO, STARTTLS) or of our MAIL FROM.
        - At RCPT, an answer in a relay's words about our own set-up (:data:`ABOUT_US`, read
          with the addresses it quotes taken out: Postfix's "Helo command rejected" comes at
          RCPT) or a 5.7.x (security or policy: relaying, authorization) may refuse us or this
          recipient: it pauses delivery unless the relay has shown that it refuses only this
          recipient (:meth:`RelayPause.refused_rcpt`).
        - Otherwise 4xx is worth trying again and 5xx is the letter's permanent failure
          ("550 5.1.1 no such mailbox")."""
        text = _text(answer)
        message = f"{code} {text}"
        if code in OUT_OF_STEP:
            return TransientDeliveryError(message, retry_after=OUT_OF_STEP_WAIT, ours=True)
        permanent = 500 <= code < 600
        if command != "DATA" and (code in AUTH_PROBLEMS or command in ("MAIL", "SESSION")):
            return TransientDeliveryError(
                message, retry_after=self.relay.refused(message), ours=True
            )
        words = _unquoted(text)
        if command == "RCPT" and (
            ABOUT_US.search(words) or (permanent and words.lstrip().startswith("5.7."))
        ):
            pause = self.relay.refused_rcpt(recipient, message)
            if pause is not None:
                return TransientDeliveryError(message, retry_after=pause, ours=True)
        if 400 <= code < 500:
            return TransientDeliveryError(message)
        return PermanentDeliveryError(message)


def _transaction(conn: smtplib.SMTP, mail: Outgoing) -> tuple[int, bytes]:
    """MAIL, RCPT and DATA by hand rather than ``sendmail()``, to keep the final answer. A
    refusal raises :class:`Refusal`, ``usable`` when RSET then clears the transaction (a 421
    or 503 leaves the session's state unknown: it is closed)."""
    refused: Refusal | None = None
    code, answer = conn.mail(mail.sender)
    if code != 250:
        refused = Refusal("MAIL", code, answer)
    for rcpt in mail.recipients if refused is None else []:
        code, answer = conn.rcpt(rcpt)
        if code not in (250, 251):
            refused = Refusal("RCPT", code, answer, rcpt)
            break
    if refused is None:
        try:
            code, answer = conn.data(mail.data)
        except smtplib.SMTPDataError as exc:  # the answer to DATA itself
            refused = Refusal("DATA", exc.smtp_code, exc.smtp_error)
        else:
            if code == 250:
                return code, answer
            refused = Refusal("DATA", code, answer)
    if refused.code not in OUT_OF_STEP:
        try:
            refused.usable = conn.rset()[0] == 250
        except (smtplib.SMTPException, OSError):
            pass
    raise refused


def _login(conn: smtplib.SMTP, user: str, password: str) -> None:
    """AUTH with one mechanism, the first of smtplib's preference the server offers:
    ``SMTP.login`` tries each offered mechanism in turn with the same password, so one wrong
    password counts as two or three failures against the account at the relay."""
    conn.ehlo_or_helo_if_needed()
    offered = conn.esmtp_features.get("auth", "").upper().split()
    mechanism = next((m for m in ("CRAM-MD5", "PLAIN", "LOGIN") if m in offered), None)
    if mechanism is None:
        raise smtplib.SMTPException("the mail server offers no authentication this client has")
    conn.user, conn.password = user, password
    method = getattr(conn, "auth_" + mechanism.lower().replace("-", "_"))
    conn.auth(mechanism, method)  # a refusal raises SMTPAuthenticationError


def _text(answer: bytes | str) -> str:
    return answer.decode(errors="replace") if isinstance(answer, bytes) else answer


# 421: the server is closing the connection. 503: "bad sequence of commands", an answer to the
# state of the conversation (which we caused), not to the letter: the letter is tried again on a
# new connection.
OUT_OF_STEP = {421, 503}
# Seconds a letter waits after such an answer before it is tried again on a new session.
OUT_OF_STEP_WAIT = 10.0


# Authentication answers: our configuration is wrong, not the letter.
AUTH_PROBLEMS = {530, 534, 535, 538}
# A relay's words for a refusal of our own set-up rather than of the letter, as whole phrases
# (never single words, which a quoted address can hold: "<helo@example.com>", "<a@tls.example>").
# Postfix's smtpd writes "<%s>: Helo command rejected: ...", "<%s>: Sender address rejected:
# ...", "Client host rejected: cannot find your hostname, [%s]", "<%s>: Relay access denied"
# and "530 5.7.0 Must issue a STARTTLS command first" (Gmail's and Exim's words too); Gmail and
# Exchange answer "Authentication required". Read in an answer to RCPT only (see
# SmtpMailer._refused), with the addresses it quotes taken out (_unquoted).
ABOUT_US = re.compile(
    r"helo command rejected|sender address rejected|client host rejected|relay access denied"
    r"|must issue a starttls command first|authentication required",
    re.IGNORECASE,
)
# What an answer quotes of the envelope: <...> (its inside may hold a quoted local part, with
# spaces, ">" or "<"), a quoted string, and a bare word holding an "@".
QUOTED = re.compile(r'<(?:"(?:[^"\\]|\\.)*+"|[^<>"])*+>|"(?:[^"\\]|\\.)*+"|(?<!\S)[^\s@]*+@\S*+')


def _unquoted(text: str) -> str:
    """An SMTP answer without the addresses it quotes: the relay's own words."""
    return QUOTED.sub(" ", text)


class HttpMailer:
    """Mailgun's ``messages.mime`` API: the signed bytes go as they are; a session per thread."""

    name = "http"

    def __init__(self, settings: Settings) -> None:
        if not settings.email_api_key or not settings.email_api_domain:
            raise ValueError("the http mail backend needs EMAIL_API_KEY and EMAIL_API_DOMAIN")
        self.url = (
            f"{settings.email_api_url.rstrip('/')}/v3/{settings.email_api_domain}/messages.mime"
        )
        self.auth = ("api", settings.email_api_key.get_secret_value())
        self.timeout = (min(5.0, settings.email_api_timeout), settings.email_api_timeout)
        self._local = threading.local()

    def waiting(self) -> float:
        return 0.0

    def close(self) -> None:
        pass

    def _session(self) -> requests.Session:
        session: requests.Session | None = getattr(self._local, "session", None)
        if session is None:
            session = self._local.session = requests.Session()
            session.auth = self.auth
        return session

    def send(self, mail: Outgoing) -> str:
        try:
            response = self._session().post(
                self.url,
                data={"to": mail.recipients},
                files={"message": ("message.eml", mail.data, "message/rfc822")},
                timeout=self.timeout,
            )
        except requests.RequestException as exc:
            raise TransientDeliveryError(f"{type(exc).__name__}: {exc}") from exc
        answer = f"{response.status_code} {response.text[:500]}"
        if response.status_code < 300:
            return answer
        if response.status_code == 429 or response.status_code >= 500:
            raise TransientDeliveryError(answer, retry_after=retry_after(response))
        raise PermanentDeliveryError(answer)


def retry_after(response: requests.Response) -> float | None:
    """Seconds from a Retry-After header, given as seconds or as an HTTP date."""
    value = response.headers.get("Retry-After")
    if not value:
        return None
    if value.strip().isdigit():
        return float(value)
    try:
        return max(0.0, (parsedate_to_datetime(value) - utcnow()).total_seconds())
    except (TypeError, ValueError):
        return None


def make_mailer(
    settings: Settings, alarm: Callable[[str | None, float], None] | None = None
) -> Mailer:
    if settings.mail_backend == "smtp":
        return SmtpMailer(settings, alarm)
    if settings.mail_backend == "http":
        return HttpMailer(settings)
    return OutboxMailer(settings.resolved_outbox_dir)


def make_signer(settings: Settings) -> DkimSigner | None:
    key = settings.dkim_key()
    if key is None or not settings.dkim_selector:
        return None
    return DkimSigner(settings.dkim_selector, key)
