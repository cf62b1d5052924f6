"""Mail backends behind one interface (:mod:`.mailer`), all sending the same stored, optionally
signed bytes: a file outbox (the embedded default), SMTP and HTTP (Mailgun); the MIME writer
(:mod:`.messages`), DKIM (:mod:`.dkim`) and the relay policy (:mod:`.relay`)."""

from __future__ import annotations

from config.settings import Settings
from workers.letters.mail.dkim import DkimSigner, make_signer, outgoing, outgoing_email
from workers.letters.mail.http import HttpMailer
from workers.letters.mail.mailer import (
    Mailer,
    Outgoing,
    PermanentDeliveryError,
    TransientDeliveryError,
)
from workers.letters.mail.messages import AUTOMATIC, Draft, from_domain, wire_address
from workers.letters.mail.outbox import OutboxMailer
from workers.letters.mail.relay import OUT_OF_STEP_WAIT, Alarm
from workers.letters.mail.smtp import SmtpMailer

__all__ = [
    "AUTOMATIC",
    "OUT_OF_STEP_WAIT",
    "DkimSigner",
    "Draft",
    "HttpMailer",
    "Mailer",
    "OutboxMailer",
    "Outgoing",
    "PermanentDeliveryError",
    "SmtpMailer",
    "TransientDeliveryError",
    "from_domain",
    "make_mailer",
    "make_signer",
    "outgoing",
    "outgoing_email",
    "wire_address",
]


def make_mailer(settings: Settings, alarm: Alarm | None = None) -> Mailer:
    if settings.mail_backend == "smtp":
        return SmtpMailer(settings, alarm)
    if settings.mail_backend == "http":
        return HttpMailer(settings, alarm)
    return OutboxMailer(settings.resolved_outbox_dir)
