"""Mail backends behind one small interface: a file outbox (the embedded default) and SMTP."""

from __future__ import annotations

import os
import smtplib
import ssl
import threading
from email.headerregistry import Address
from email.message import EmailMessage
from email.utils import format_datetime
from pathlib import Path
from typing import Protocol

from config.settings import Settings
from workers.models import Letter


class TransientDeliveryError(Exception):
    """Worth trying again later: connection trouble, a timeout, an SMTP 4xx answer."""


class PermanentDeliveryError(Exception):
    """Trying again will not help: an SMTP 5xx answer. Needs an operator."""


class Mailer(Protocol):
    name: str

    def send(self, message: EmailMessage) -> str:
        """Hand the message over; return the server's answer. Raises a *DeliveryError."""
        ...


def build_message(letter: Letter) -> EmailMessage:
    """The email for a stored letter; the email library encodes every header correctly."""
    message = EmailMessage()
    local, domain = letter.from_email.rsplit("@", 1)
    message["From"] = Address(display_name=letter.from_name, username=local, domain=domain)
    to_local, to_domain = letter.to_email.rsplit("@", 1)
    message["To"] = Address(display_name=letter.to_name, username=to_local, domain=to_domain)
    if letter.reply_to:
        message["Reply-To"] = letter.reply_to
    message["Subject"] = letter.subject
    message["Date"] = format_datetime(letter.created_at)
    message["Message-ID"] = letter.message_id
    message.set_content(letter.body_text or "")
    if letter.body_html:
        message.add_alternative(letter.body_html, subtype="html")
    return message


class OutboxMailer:
    """One ``.eml`` file per letter, named by its Message-ID: writing it twice leaves one file."""

    name = "outbox"

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def send(self, message: EmailMessage) -> str:
        self.directory.mkdir(parents=True, exist_ok=True)
        stem = str(message["Message-ID"]).strip("<>").split("@", 1)[0]
        path = self.directory / f"{stem}.eml"
        tmp = path.with_suffix(f".tmp{os.getpid()}-{threading.get_ident()}")
        tmp.write_bytes(message.as_bytes())
        os.replace(tmp, path)
        return f"written {path.name}"


class SmtpMailer:
    """SMTP with STARTTLS or implicit TLS, optional auth, and one reused connection per thread."""

    name = "smtp"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._local = threading.local()

    def _connect(self) -> smtplib.SMTP:
        s = self.settings
        context = ssl.create_default_context()
        conn: smtplib.SMTP
        if s.smtp_security == "tls":
            conn = smtplib.SMTP_SSL(
                s.smtp_host, s.smtp_port, timeout=s.smtp_timeout, context=context
            )
        else:
            conn = smtplib.SMTP(s.smtp_host, s.smtp_port, timeout=s.smtp_timeout)
            if s.smtp_security == "starttls":
                conn.starttls(context=context)
        conn.ehlo_or_helo_if_needed()
        if s.smtp_username and s.smtp_password:
            conn.login(s.smtp_username, s.smtp_password.get_secret_value())
        return conn

    def _connection(self) -> smtplib.SMTP:
        conn: smtplib.SMTP | None = getattr(self._local, "conn", None)
        if conn is not None:
            try:
                if conn.noop()[0] == 250:
                    return conn
            except smtplib.SMTPException:
                pass
            self._drop()
        conn = self._connect()
        self._local.conn = conn
        return conn

    def _drop(self) -> None:
        conn = getattr(self._local, "conn", None)
        self._local.conn = None
        if conn is not None:
            try:
                conn.close()
            except OSError:
                pass

    def send(self, message: EmailMessage) -> str:
        sender = message["From"].addresses[0].addr_spec
        recipients = [a.addr_spec for a in message["To"].addresses]
        try:
            conn = self._connection()
            # mail/rcpt/data by hand rather than sendmail(), to keep the server's final answer.
            code, answer = conn.mail(sender)
            if code != 250:
                raise smtplib.SMTPSenderRefused(code, answer, sender)
            for rcpt in recipients:
                code, answer = conn.rcpt(rcpt)
                if code not in (250, 251):
                    raise smtplib.SMTPRecipientsRefused({rcpt: (code, answer)})
            code, answer = conn.data(message.as_bytes())
            if code != 250:
                raise smtplib.SMTPDataError(code, answer)
            return f"{code} {answer.decode(errors='replace')}"
        except smtplib.SMTPRecipientsRefused as exc:
            self._reset()
            code, answer = next(iter(exc.recipients.values()))
            raise _classify(code, answer) from exc
        except smtplib.SMTPResponseException as exc:
            self._reset()
            raise _classify(exc.smtp_code, exc.smtp_error) from exc
        except (smtplib.SMTPException, OSError) as exc:
            self._drop()
            raise TransientDeliveryError(f"{type(exc).__name__}: {exc}") from exc

    def _reset(self) -> None:
        conn = getattr(self._local, "conn", None)
        try:
            if conn is not None:
                conn.rset()
        except (smtplib.SMTPException, OSError):
            self._drop()


def _classify(code: int, answer: bytes | str) -> Exception:
    text = answer.decode(errors="replace") if isinstance(answer, bytes) else answer
    if 400 <= code < 500:
        return TransientDeliveryError(f"{code} {text}")
    return PermanentDeliveryError(f"{code} {text}")


def make_mailer(settings: Settings) -> Mailer:
    if settings.mail_backend == "smtp":
        return SmtpMailer(settings)
    return OutboxMailer(settings.resolved_outbox_dir)
