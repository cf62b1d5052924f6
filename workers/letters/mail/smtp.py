"""SMTP: STARTTLS or implicit TLS, optional login, and a pool of sessions a worker's threads
share. MAIL, RCPT and DATA are sent by hand to keep each answer; the relay policy (:mod:`.relay`)
says what an answer means."""

from __future__ import annotations

import binascii
import contextlib
import smtplib
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial

from config.settings import Settings
from workers.letters.mail.mailer import Outgoing, TransientDeliveryError
from workers.letters.mail.relay import (
    OUT_OF_STEP,
    REFUSALS,
    Alarm,
    RelayPause,
    answer_text,
    classify,
    status,
)


def close(conn: smtplib.SMTP) -> None:
    """End a session as RFC 5321 asks (QUIT), then close the socket whatever the server does."""
    try:
        if conn.sock is not None:
            conn.quit()
    except (smtplib.SMTPException, OSError):
        pass
    finally:
        conn.close()


# The most one reply of the server may be, its continuation lines together: EHLO's, the longest
# a relay gives, is under a kilobyte; a reply that never ends would fill the memory.
REPLY_MOST = 64 * 1024


class _Reply:
    """The session's socket as smtplib reads a reply from it: one reply (from :meth:`next`) is
    at most :data:`REPLY_MOST` bytes, complete within ``timeout`` seconds (a socket's timeout is
    per read: a reply a byte at a time would hold the session for ever), and no line longer than
    smtplib reads (its "500 Line too long" is no answer of the server's). Past any, an OSError,
    which smtplib makes SMTPServerDisconnected: the attempt failed, as on a lost connection."""

    def __init__(self, sock: socket.socket, timeout: float) -> None:
        self.sock, self.timeout = sock, timeout
        self.file = sock.makefile("rb")
        self.left, self.deadline = REPLY_MOST, 0.0

    def next(self) -> None:
        self.left, self.deadline = REPLY_MOST, time.monotonic() + self.timeout

    def readline(self, limit: int) -> bytes:
        line = b""
        try:
            while not line.endswith(b"\n"):
                wait = self.deadline - time.monotonic()
                if wait <= 0:
                    raise TimeoutError
                self.sock.settimeout(wait)
                ahead = self.file.peek(1)[: limit - len(line)]  # one read at most
                if not ahead:
                    return line  # the server closed the session
                size = ahead.find(b"\n") + 1 or len(ahead)
                if size > self.left:
                    raise OSError(f"the mail server's reply is longer than {REPLY_MOST} bytes")
                self.left -= size
                line += self.file.read(size)
                if len(line) >= limit:  # smtplib asks for one byte more than a line may be
                    raise OSError(
                        f"a line of the mail server's reply is longer than {limit - 1} bytes"
                    )
        except TimeoutError:
            said = f"the mail server's reply took longer than {self.timeout:g} s"
            raise TimeoutError(said) from None
        finally:
            self.sock.settimeout(self.timeout)
        return line

    def close(self) -> None:
        self.file.close()


class SMTP(smtplib.SMTP):
    """smtplib's session, each reply read through :class:`_Reply` (also after STARTTLS, which
    drops smtplib's file of the socket)."""

    def getreply(self) -> tuple[int, bytes]:
        if self.file is None and self.sock is not None:
            self.file = _Reply(self.sock, self.timeout)
        if isinstance(self.file, _Reply):
            self.file.next()
        return super().getreply()


class SMTP_SSL(SMTP, smtplib.SMTP_SSL):
    """:class:`SMTP` with implicit TLS."""


def connect(settings: Settings, timeout: float | None = None) -> smtplib.SMTP:
    """A session with the relay as far as EHLO, without logging in: implicit TLS or STARTTLS
    verified (against SMTP_CA_FILE if set), then EHLO. Letters' sessions and ``dearmp health``
    connect this one way; a set-up that fails leaves no session open."""
    s = settings
    context = ssl.create_default_context()
    if s.smtp_ca_file:
        context.load_verify_locations(cafile=str(s.smtp_ca_file))
    smtp: Callable[..., smtplib.SMTP] = SMTP
    if s.smtp_security == "tls":
        smtp = partial(SMTP_SSL, context=context)
    conn = smtp(
        s.smtp_host, s.smtp_port, local_hostname=s.smtp_helo_name, timeout=timeout or s.smtp_timeout
    )
    try:
        if s.smtp_security == "starttls":
            conn.starttls(context=context)
        conn.ehlo_or_helo_if_needed()
    except BaseException:
        close(conn)
        raise
    return conn


class Refusal(Exception):
    """The server refused one letter with a definite answer to ``command``; ``usable``: the
    session was reset (RSET answered 250) and can carry the next letter."""

    def __init__(self, command: str, code: int, answer: bytes | str, recipient: str = "") -> None:
        super().__init__(f"{code} {answer_text(answer)}")
        self.command, self.code, self.answer, self.recipient = command, code, answer, recipient
        self.usable = False


@dataclass(eq=False)
class _Session:
    conn: smtplib.SMTP
    opened: float
    used: float
    letters: int = 0


class SmtpPool:
    """At most ``size`` SMTP sessions to the relay, shared by a worker's threads, each closed
    once ``max_age`` old, after ``max_letters`` letters, ``idle`` seconds unused, or an error
    (unless a :class:`Refusal` left it ``usable``). A 421 to a new connection is the relay's
    limit: keep to the sessions open, or with none hold off (``HOLD_FIRST`` doubling up to
    ``HOLD_LONGEST``). A letter that waits longer than ``wait`` is deferred as ``ours``."""

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
        except BaseException as exc:
            if isinstance(exc, Refusal) and exc.usable:
                self._put_back(session)
            else:
                self._discard(session)
            raise
        self._put_back(session)

    def _put_back(self, session: _Session) -> None:
        # A spent session goes back too: its QUIT must not delay recording the letter as sent.
        session.letters += 1
        session.used = self.clock()
        with self.changed:
            self.idle.append(session)
            self.changed.notify()
            if self.sweeper is None:
                self._schedule_sweep()

    def _schedule_sweep(self) -> None:
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
                self._schedule_sweep()
        for session in gone:
            close(session.conn)

    def _spent(self, session: _Session, now: float) -> bool:
        return (
            now - session.opened >= self.max_age
            or session.letters >= self.max_letters
            or now - session.used >= self.idle_for
        )

    def _discard(self, session: _Session) -> None:
        close(session.conn)
        self._release()

    def _release(self) -> None:
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
                while not self.idle and (
                    self.open >= self.ceiling or self.clock() < self.held_until
                ):
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
                self._release()
                raise
            now = self.clock()
            with self.changed:
                self.opened += 1
                self.refused_in_a_row = 0
            return _Session(conn, opened=now, used=now)

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
            close(session.conn)


class SmtpMailer:
    """SMTP with STARTTLS or implicit TLS, optional auth, over a pool of sessions."""

    name = "smtp"

    def __init__(self, settings: Settings, alarm: Alarm | None = None) -> None:
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

    def _connect(self) -> smtplib.SMTP:
        s = self.settings
        conn: smtplib.SMTP | None = None
        try:
            conn = connect(s)
            if s.smtp_username and s.smtp_password:
                with self.relay.turn():
                    try:
                        _login(conn, s.smtp_username, s.smtp_password.get_secret_value())
                    except smtplib.SMTPAuthenticationError as exc:
                        said = status(exc.smtp_code, exc.smtp_error)
                        self.relay.refused(
                            f"the mail server refused our login ({said}): "
                            "check SMTP_USERNAME and SMTP_PASSWORD",
                            exc.smtp_code >= 500,
                        )
                        raise
                    except NoLogin as exc:
                        self.relay.refused(str(exc), lasting=True)
                        raise
        except BaseException as exc:
            if conn is not None:  # a login that failed leaves no session
                close(conn)
            reason = _same_for_every_letter(exc)
            if reason is None:
                raise
            # A handshake the relay ended may be its restart: a pause that a try may end.
            ended = isinstance(exc, ssl.SSLEOFError | ssl.SSLZeroReturnError)
            self.relay.refused_once(reason, lasting=not ended)
            raise SetUpFailed(reason) from exc
        return conn

    def waiting(self) -> float:
        return self.relay.waiting()

    def close(self) -> None:
        self.pool.close()

    def send(self, mail: Outgoing) -> str:
        # An error closes its session (the pool's rule), unless RSET cleared a refusal.
        try:
            self.relay.check()
            with self.pool.session() as conn:
                code, answer = _transaction(conn, mail)
            self.relay.accepted()
            return f"{code} {answer_text(answer)}"
        except (smtplib.SMTPAuthenticationError, SetUpFailed) as exc:
            # The pause is set already (_connect).
            if isinstance(exc, SetUpFailed):
                text = str(exc)
            else:
                text = f"{exc.smtp_code} {answer_text(exc.smtp_error)}"
            raise TransientDeliveryError(text, self.relay.waiting(), ours=True) from exc
        except Refusal as exc:
            error = classify(self.relay, exc.command, exc.code, exc.answer, exc.recipient)
            if self.relay.waiting() > 0:
                # Paused: the probe after the pause gets a new session, under the relay's new rules.
                self.pool.close()
            raise error from exc
        except smtplib.SMTPResponseException as exc:  # the greeting, EHLO, STARTTLS
            raise classify(self.relay, "SESSION", exc.smtp_code, exc.smtp_error) from exc
        except (smtplib.SMTPException, OSError) as exc:
            raise TransientDeliveryError(f"{type(exc).__name__}: {exc}") from exc


def _transaction(conn: smtplib.SMTP, mail: Outgoing) -> tuple[int, bytes]:
    """MAIL, RCPT and DATA by hand, to keep the final answer. A refusal raises :class:`Refusal`,
    ``usable`` when RSET then clears the transaction (not after a 421 or 503, nor an answer
    out of protocol)."""
    try:
        code, answer = conn.mail(mail.sender)
        if code != 250:
            raise Refusal("MAIL", code, answer)
        for rcpt in mail.recipients:
            code, answer = conn.rcpt(rcpt)
            if code not in (250, 251):
                raise Refusal("RCPT", code, answer, rcpt)
        try:
            code, answer = conn.data(mail.data)
        except smtplib.SMTPDataError as exc:  # the answer to DATA itself
            raise Refusal("DATA", exc.smtp_code, exc.smtp_error) from None
        if not 200 <= code < 300:  # any 2xx took it (RFC 5321): never sent again
            raise Refusal("DATA", code, answer)
        return code, answer
    except Refusal as refused:
        if refused.code in REFUSALS and refused.code not in OUT_OF_STEP:
            with contextlib.suppress(smtplib.SMTPException, OSError):
                refused.usable = conn.rset()[0] == 250
        raise


class SetUpFailed(smtplib.SMTPException):
    """No session could be set up, the same way for every letter (our settings, or the relay's
    set-up): delivery pauses, as for a refused login, and no letter is charged an attempt."""


def _same_for_every_letter(exc: BaseException) -> str | None:
    """Why a session could not be set up, when every letter would meet the same: one line
    naming the setting to check; None when it may pass (a lost connection, a 4xx)."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return (
            f"TLS verification of the mail server failed ({exc.verify_message}): "
            "check SMTP_CA_FILE and the relay's certificate"
        )
    if isinstance(exc, smtplib.SMTPNotSupportedError):  # (here, only STARTTLS raises it)
        return "the mail server offers no STARTTLS: check SMTP_SECURITY (starttls) and SMTP_PORT"
    if isinstance(exc, ssl.SSLError):  # a handshake's (after it, smtplib's errors are its own)
        return (
            f"TLS with the mail server failed ({exc.reason or type(exc).__name__}): "
            "check SMTP_SECURITY and SMTP_PORT"
        )
    if isinstance(exc, binascii.Error):  # smtplib decodes a login's challenge (334) with it
        return (
            "the mail server's login challenge is not base64: "
            "check SMTP_HOST and SMTP_PORT (is it the relay?)"
        )
    return None


class NoLogin(SetUpFailed):
    """SMTP_USERNAME is set and the server offers no AUTH mechanism smtplib has: as a refused
    login, the same for every letter."""

    def __init__(self) -> None:
        super().__init__(
            "the mail server offers no login (AUTH) this client has, and SMTP_USERNAME is set: "
            "check SMTP_SECURITY (many relays offer AUTH only after STARTTLS)"
        )


def login_mechanism(conn: smtplib.SMTP) -> str | None:
    """The first mechanism of smtplib's preference the server offers (after EHLO), if any."""
    offered = conn.esmtp_features.get("auth", "").upper().split()
    return next((m for m in ("CRAM-MD5", "PLAIN", "LOGIN") if m in offered), None)


def _login(conn: smtplib.SMTP, user: str, password: str) -> None:
    """AUTH with the first mechanism of smtplib's preference the server offers, only that one:
    ``SMTP.login`` tries each with the same password, so one wrong password would count two or
    three times against the account."""
    conn.ehlo_or_helo_if_needed()
    mechanism = login_mechanism(conn)
    if mechanism is None:
        raise NoLogin
    conn.user, conn.password = user, password
    method = getattr(conn, "auth_" + mechanism.lower().replace("-", "_"))
    conn.auth(mechanism, method)  # a refusal raises SMTPAuthenticationError
