"""Emails to a supporter about their letter (returned, a reply forwarded, did the MP reply?),
from the campaign's address, marked automatic (RFC 3834) and with ``X-DearMP-Notice`` so that
one that comes back is recognised as a loop. A reply is hostile input: its subject is decoded
and made one clean line, its text and sender read as the classifier reads them."""

from __future__ import annotations

import email.policy
from dataclasses import dataclass
from datetime import datetime

from workers.letters.mail import (
    AUTOMATIC,
    DkimSigner,
    Draft,
    Outgoing,
    from_domain,
    outgoing_email,
)
from workers.receiving.classify import (
    NOTICE_HEADER,
    from_office,
    parse,
    part_text,
    raw_values,
    reply_sender,
)
from workers.wording import one_line

MAX_FORWARD_CHARS = 100_000  # the most of a reply's text a forward carries
# The most of a subject (a reply's own, and a notice's) and of a From name, in characters.
REPLY_SUBJECT_CHARS = 150
SUBJECT_CHARS = 200
DISPLAY_CHARS = 200


@dataclass(frozen=True)
class Sender:
    name: str  # the campaign's organisation
    address: str


@dataclass(frozen=True)
class Reply:
    subject: str  # decoded, one clean line
    text: str
    replier: str | None  # the address in its From, when it is one plain address (reply_sender)


def _draft(
    notice_id: str,
    sender: Sender,
    display: str,
    to: str,
    subject: str,
    created: datetime,
    text: str,
    reply_to: str | None = None,
) -> Draft:
    return Draft(
        from_name=one_line(display, DISPLAY_CHARS),
        from_email=sender.address,
        to_email=to,
        reply_to=reply_to,
        subject=one_line(subject, SUBJECT_CHARS),
        date=created,
        message_id=f"<notice-{notice_id}@{from_domain(sender.address)}>",
        text=text,
        headers=(*AUTOMATIC, (NOTICE_HEADER, notice_id)),
    )


def outgoing(message: Draft, envelope_sender: str, signer: DkimSigner | None) -> Outgoing:
    """The notice on the wire, signed for its From domain."""
    return outgoing_email(message, signer, envelope_sender)


def bounce_notice(
    notice_id: str, sender: Sender, to: str, mp_name: str, member_id: int | None, created: datetime
) -> Draft:
    contact = (
        f"https://members.parliament.uk/member/{member_id}/contact"
        if member_id is not None
        else "https://members.parliament.uk"
    )
    return _draft(
        notice_id,
        sender,
        sender.name,
        to,
        f"Your letter to {mp_name} was returned",
        created,
        f"Your letter to {mp_name} was sent, but their mail server returned it: the address we "
        "have for them is not accepting email at the moment.\n\n"
        "We will not send it again on our own. You can reach your MP through their official "
        f"contact details:\n\n{contact}\n\n"
        "or by post at the House of Commons, London SW1A 0AA.\n\n"
        f"{sender.name}\n",
    )


# The most of a header decoded: the header parser's memory grows far faster than its input.
MAX_HEADER_DECODED = 4000


def decoded_header(value: str) -> str:
    """A header's text as a reader sees it (encoded words decoded), from its first
    :data:`MAX_HEADER_DECODED` characters; not yet fit for a header."""
    value = value[:MAX_HEADER_DECODED]
    try:
        return str(email.policy.default.header_factory("subject", value))
    except Exception:  # hostile input the header parser trips on: its raw text
        return value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def reply_text(raw: bytes) -> Reply:
    """A reply's subject, its plain text (or its HTML's text), at most
    :data:`MAX_FORWARD_CHARS`, and its sender's address; attachments are not forwarded."""
    message = parse(raw)
    texts: dict[str, str] = {}
    for part in message.walk():
        kind = part.get_content_type()
        if kind in ("text/plain", "text/html") and kind not in texts and not part.get_filename():
            texts[kind] = part_text(part)
    text = texts.get("text/plain") or texts.get("text/html", "")
    subject = one_line(
        decoded_header(next(iter(raw_values(message, "subject")), "")), REPLY_SUBJECT_CHARS
    )
    return Reply(subject, text.replace("\r\n", "\n")[:MAX_FORWARD_CHARS], reply_sender(message))


def forward(
    notice_id: str,
    sender: Sender,
    to: str,
    raw: bytes,
    mp_name: str,
    mp_address: str,
    created: datetime,
) -> Draft:
    """A reply to the supporter's letter, forwarded from the campaign's domain. Its first lines
    and its ``Reply-To`` name the reply's own sender; its From name says "Office of" the MP only
    when the sender is the office's, and never holds an address (what spam filters look for)."""
    reply = reply_text(raw)
    who = reply.replier or "a sender whose address could not be read"
    answer = (
        f"To answer, reply to this email: your answer goes to {reply.replier}."
        if reply.replier
        else "Replying to this email will not reach them."
    )
    office = from_office(reply.replier, mp_address)
    display = f"Office of {mp_name}" if office else "A reply to your letter"
    heading = f"Reply to your letter to {mp_name}"
    return _draft(
        notice_id,
        sender,
        f"{display} via {sender.name}".replace("@", " at "),
        to,
        f"{heading}: {reply.subject}" if reply.subject else heading,
        created,
        f"Forwarded from {who}.\n\n"
        f"{who} replied to your letter to {mp_name}, which went to {mp_address}. "
        f"{sender.name} forwards the reply below as it came, without attachments. {answer}\n\n"
        "----------------------------------------------------------------------\n\n"
        f"{reply.text}\n",
        reply_to=reply.replier,
    )


def survey(
    notice_id: str,
    sender: Sender,
    to: str,
    mp_name: str,
    links: dict[str, str],
    created: datetime,
    reminder: bool,
) -> Draft:
    return _draft(
        notice_id,
        sender,
        sender.name,
        to,
        ("Reminder: " if reminder else "") + f"Did {mp_name} reply to your letter?",
        created,
        f"A while ago you wrote to your MP, {mp_name}. Did they reply?\n\n"
        f"Yes, they replied:\n{links['yes']}\n\n"
        f"Not yet:\n{links['not_yet']}\n\n"
        f"No, and I don't expect them to:\n{links['no']}\n\n"
        "Each link opens a page where one button records your answer. It tells the campaign "
        "how MPs respond; nothing else about you is kept with it.\n\n"
        f"{sender.name}\n",
    )


def digested(
    notice_id: str, sender: Sender, to: str, mp_name: str, text: str, created: datetime
) -> Draft:
    """The supporter's letter went in the MP's daily digest (:mod:`workers.stages.digests`)."""
    subject = f"Your letter went to {mp_name} in today's digest"
    return _draft(notice_id, sender, sender.name, to, subject, created, text)
