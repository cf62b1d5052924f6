"""Emails to a supporter about their letter: it was returned, their MP replied (forwarded), did
their MP reply? Written by the email package, From the campaign's own address (DMARC-aligned
and DKIM-signed like the letters), marked automatic (RFC 3834) so that responders stay quiet,
and carrying ``X-DearMP-Notice``: one that comes back to us is recognised as a loop.

The same notice gives the same bytes every time it is sent (Date is its creation time), so a
resend after a crash is a duplicate a mailbox can tell by its Message-ID.
"""

from __future__ import annotations

import email.policy
import re
from dataclasses import dataclass
from datetime import datetime
from email.message import EmailMessage
from email.utils import format_datetime, formataddr, getaddresses

from workers.inbound.classify import NOTICE_HEADER, clean, parse
from workers.letters.mail import DkimSigner, Outgoing, wire_address

# The most of a reply's text a forward carries.
MAX_FORWARD_CHARS = 100_000
_SIMPLE_ADDRESS = re.compile(r"^[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]{1,64}@[A-Za-z0-9.-]{1,253}$")


@dataclass(frozen=True)
class Sender:
    """Who notices come from: the campaign's address and organisation."""

    name: str
    address: str

    @property
    def domain(self) -> str:
        return wire_address(self.address).rsplit("@", 1)[1]


def _base(
    notice_id: str, sender: Sender, display: str, to: str, subject: str, created: datetime
) -> EmailMessage:
    message = EmailMessage(policy=email.policy.SMTP)
    message["From"] = formataddr((" ".join(display.split()), wire_address(sender.address)))
    message["To"] = wire_address(to)
    message["Subject"] = " ".join(subject.split())[:200]
    message["Date"] = format_datetime(created)
    message["Message-ID"] = f"<notice-{notice_id}@{sender.domain}>"
    message["Auto-Submitted"] = "auto-generated"
    message[NOTICE_HEADER] = notice_id
    return message


def outgoing(
    message: EmailMessage, envelope_sender: str, signer: DkimSigner | None, domain: str
) -> Outgoing:
    data = message.as_bytes()
    if signer is not None:
        data = signer.sign(data, domain)
    to = str(message["To"])
    return Outgoing(envelope_sender, [to], data, str(message["Message-ID"]))


def bounce_notice(
    notice_id: str,
    sender: Sender,
    to: str,
    mp_name: str,
    member_id: int | None,
    created: datetime,
) -> EmailMessage:
    contact = (
        f"https://members.parliament.uk/member/{member_id}/contact"
        if member_id is not None
        else "https://members.parliament.uk"
    )
    message = _base(
        notice_id, sender, sender.name, to, f"Your letter to {mp_name} was returned", created
    )
    message.set_content(
        f"Your letter to {mp_name} was sent, but their mail server returned it: the address we "
        "have for them is not accepting email at the moment.\n\n"
        "We will not send it again on our own. You can reach your MP through their official "
        f"contact details:\n\n{contact}\n\n"
        "or by post at the House of Commons, London SW1A 0AA.\n\n"
        f"{sender.name}\n"
    )
    return message


def reply_text(raw: bytes) -> tuple[str, str, str | None]:
    """(subject, text, the replier's address) of a reply: its plain text (or its HTML's text),
    at most :data:`MAX_FORWARD_CHARS`; attachments are not forwarded."""
    message = parse(raw)
    subject = clean(str(message.get("Subject") or ""), 150) or ""
    text = ""
    html = ""
    for part in message.walk():
        if part.get_content_maintype() == "multipart" or part.get_filename():
            continue
        kind = part.get_content_type()
        if kind not in ("text/plain", "text/html"):
            continue
        payload = part.get_payload(decode=True)
        if not isinstance(payload, bytes):
            continue
        decoded = payload.decode(part.get_content_charset() or "utf-8", "replace")
        if kind == "text/plain" and not text:
            text = decoded
        elif kind == "text/html" and not html:
            html = decoded
    if not text and html:
        text = re.sub(r"<[^>]{0,2000}>", " ", html)
        text = re.sub(r"[ \t]+", " ", text)
    text = text.replace("\r\n", "\n")[:MAX_FORWARD_CHARS]
    replier = None
    for _, addr in getaddresses([str(message.get("From") or "")]):
        if _SIMPLE_ADDRESS.match(addr):
            replier = addr
            break
    return subject, text, replier


def forward(
    notice_id: str,
    sender: Sender,
    to: str,
    raw: bytes,
    mp_name: str,
    mp_address: str,
    created: datetime,
) -> EmailMessage:
    """The MP's reply, forwarded from the campaign's domain with ``Reply-To`` the MP's address,
    so that the supporter's answer goes straight to their MP."""
    subject, text, replier = reply_text(raw)
    message = _base(
        notice_id,
        sender,
        f"{mp_name} via {sender.name}",
        to,
        f"Reply from {mp_name}: {subject}" if subject else f"Reply from {mp_name}",
        created,
    )
    message["Reply-To"] = wire_address(replier or mp_address)
    message.set_content(
        f"{mp_name} replied to your letter. Their reply is below; to answer them, reply to this "
        "email and it will go to their office directly.\n\n"
        "----------------------------------------------------------------------\n\n"
        f"{text}\n"
    )
    return message


def survey(
    notice_id: str,
    sender: Sender,
    to: str,
    mp_name: str,
    links: dict[str, str],
    created: datetime,
    reminder: bool,
) -> EmailMessage:
    message = _base(
        notice_id,
        sender,
        sender.name,
        to,
        ("Reminder: " if reminder else "") + f"Did {mp_name} reply to your letter?",
        created,
    )
    message.set_content(
        f"A while ago you wrote to your MP, {mp_name}. Did they reply?\n\n"
        f"Yes, they replied:\n{links['yes']}\n\n"
        f"Not yet:\n{links['not_yet']}\n\n"
        f"No, and I don't expect them to:\n{links['no']}\n\n"
        "Each link opens a page where one button records your answer. It tells the campaign "
        "how MPs respond; nothing else about you is kept with it.\n\n"
        f"{sender.name}\n"
    )
    return message
