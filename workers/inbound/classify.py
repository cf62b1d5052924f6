"""What a message that came back to a letter is: a bounce, a delay, an automatic reply, a reply.

- Delivery status notifications (RFC 3464): ``multipart/report; report-type=delivery-status``,
  each recipient's ``Action`` and ``Status`` (5.x.x permanent, 4.x.x temporary).
- Bounces that are not RFC 3464 (older Exim, qmail, some appliances): from the mailer daemon or
  with a bounce's subject, and an SMTP status in the text.
- Automatic replies (RFC 3834 ``Auto-Submitted``; Exchange's ``X-Auto-Response-Suppress`` and
  "Automatic reply:"; ``Precedence: bulk/junk/list/auto_reply``; ``X-Autoreply``).
- Anything else is a person's reply.

Hostile or broken mail never raises: it is ``malformed``, or a ``loop`` (too many hops, or one
of our own notices come back). Only a short diagnostic is kept, with addresses taken out.
"""

from __future__ import annotations

import email
import email.policy
import re
from dataclasses import dataclass
from email.message import Message
from typing import Literal

Kind = Literal["bounce", "delay", "delivered", "auto_reply", "reply", "malformed", "loop"]

# More Received headers than this is a message going round in circles (Postfix's own limit: 50).
MAX_HOPS = 40
# Our notices carry this header; one that comes back to us is a loop, never acted on.
NOTICE_HEADER = "X-DearMP-Notice"

_STATUS = re.compile(r"\b([245])\.(\d{1,3})\.(\d{1,3})\b")
_SMTP_CODE = re.compile(r"\b([45])\d\d[ -]")
_ADDRESS = re.compile(r"[^\s<>\"'()]+@[^\s<>\"'()]+")
_BOUNCE_SUBJECT = re.compile(
    r"undeliver|undelivered|delivery (status notification|failure|has failed)|"
    r"mail delivery failed|returned mail|failure notice|delivery failure|non.?delivery|"
    r"could not be delivered|returned to sender",
    re.IGNORECASE,
)
_DAEMON = re.compile(r"mailer-daemon|postmaster|mail delivery (system|subsystem)", re.IGNORECASE)
_AUTO_SUBJECT = re.compile(
    r"^\s*(automatic reply|auto(matic)?[- ]?(reply|response)|autoreply|out of (the )?office|"
    r"auto:|automatische antwort|r[ée]ponse automatique)",
    re.IGNORECASE,
)
_PERMANENT_WORDS = re.compile(
    r"permanent (error|failure)|does not exist|user unknown|no such user|mailbox unavailable|"
    r"address rejected|recipient (address )?rejected",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class Classification:
    kind: Kind
    status: str | None = None  # the enhanced status code, e.g. "5.1.1"
    diagnostic: str | None = None  # the remote server's words, one line, addresses removed
    original_message_id: str | None = None  # of the message that bounced, when it says

    @property
    def acts(self) -> bool:
        return self.kind not in ("malformed", "loop")


def clean(text: str | None, limit: int = 300) -> str | None:
    """One printable line, addresses taken out, at most ``limit`` characters."""
    if not text:
        return None
    line = " ".join(str(text).split())
    line = _ADDRESS.sub("<address>", line)
    line = "".join(c if c.isprintable() else "?" for c in line)
    return line[:limit] or None


def parse(raw: bytes) -> Message:
    return email.message_from_bytes(raw, policy=email.policy.compat32)


def _header(message: Message, name: str) -> str:
    value = message.get(name)
    return str(value) if value is not None else ""


def classify(raw: bytes) -> Classification:
    """Never raises: anything the email package cannot read is ``malformed``."""
    try:
        message = parse(raw)
        return _classify(message)
    except Exception as exc:  # hostile MIME: whatever it makes the parser do, it is dropped
        return Classification("malformed", diagnostic=type(exc).__name__)


def _classify(message: Message) -> Classification:
    if message.defects and not message.keys():
        return Classification("malformed", diagnostic="no headers")
    if len(message.get_all("Received") or []) > MAX_HOPS:
        return Classification("loop", diagnostic=f"more than {MAX_HOPS} Received headers")
    if message.get(NOTICE_HEADER) is not None:
        return Classification("loop", diagnostic="one of our own notices came back")
    report = _delivery_status(message)
    if report is not None:
        return report
    plain = _plain_bounce(message)
    if plain is not None:
        return plain
    if _automatic(message):
        return Classification("auto_reply", diagnostic=clean(_header(message, "Subject"), 120))
    return Classification("reply")


def _delivery_status(message: Message) -> Classification | None:
    """An RFC 3464 report: the worst of its recipients' actions."""
    if message.get_content_type() != "multipart/report":
        return None
    status_part = next(
        (p for p in message.walk() if p.get_content_type() == "message/delivery-status"), None
    )
    if status_part is None:
        return None
    blocks = status_part.get_payload()
    if not isinstance(blocks, list):  # the parser could not split it into field blocks
        blocks = [parse(str(blocks).encode("utf-8", "replace"))]
    found: list[tuple[int, str, str | None, str | None]] = []
    for block in blocks[1:] if len(blocks) > 1 else blocks:
        if not isinstance(block, Message):
            continue
        action = _header(block, "Action").strip().lower()
        status = _STATUS.search(_header(block, "Status"))
        code = ".".join(status.groups()) if status else None
        diagnostic = _header(block, "Diagnostic-Code").partition(";")[2] or None
        rank = {"failed": 3, "delayed": 2}.get(action, 1 if action else 0)
        if code and code.startswith("5") and rank < 3 and action not in ("delivered", "relayed"):
            rank = 3
        found.append((rank, action, code, diagnostic))
    if not found:
        return None
    rank, action, code, diagnostic = max(found, key=lambda f: f[0])
    original = _original_message_id(message)
    if rank == 3:
        return Classification("bounce", code, clean(diagnostic), original)
    if rank == 2:
        return Classification("delay", code, clean(diagnostic), original)
    if action in ("delivered", "relayed", "expanded"):
        return Classification("delivered", code, clean(diagnostic), original)
    return Classification("delay", code, clean(diagnostic), original)


def _original_message_id(message: Message) -> str | None:
    for part in message.walk():
        kind = part.get_content_type()
        if kind == "message/rfc822":
            inner = part.get_payload()
            if isinstance(inner, list) and inner and isinstance(inner[0], Message):
                return _header(inner[0], "Message-ID").strip() or None
        elif kind == "text/rfc822-headers":
            payload = part.get_payload(decode=True)
            if isinstance(payload, bytes):
                return _header(parse(payload), "Message-ID").strip() or None
    return None


def _text(message: Message, limit: int = 200_000) -> str:
    """The message's plain text parts, decoded, up to ``limit`` characters."""
    out: list[str] = []
    size = 0
    for part in message.walk():
        if part.get_content_maintype() == "multipart" or part.get_content_type() not in (
            "text/plain",
            "text/html",
        ):
            continue
        payload = part.get_payload(decode=True)
        if not isinstance(payload, bytes):
            continue
        text = payload.decode(part.get_content_charset() or "utf-8", "replace")
        if part.get_content_type() == "text/html":
            text = re.sub(r"<[^>]{0,2000}>", " ", text)
        out.append(text[: limit - size])
        size += len(out[-1])
        if size >= limit:
            break
    return "\n".join(out)


def _plain_bounce(message: Message) -> Classification | None:
    sender = _header(message, "From")
    subject = _header(message, "Subject")
    if not (_DAEMON.search(sender) or _BOUNCE_SUBJECT.search(subject)):
        return None
    if _AUTO_SUBJECT.search(subject):
        return None
    text = _text(message)
    status = _STATUS.search(text)
    code = ".".join(status.groups()) if status else None
    line = next(
        (ln for ln in text.splitlines() if (status and status.group(0) in ln)), None
    ) or next((ln for ln in text.splitlines() if _SMTP_CODE.search(ln)), None)
    smtp = _SMTP_CODE.search(line or "")
    permanent = (code or "").startswith("5") or (smtp is not None and smtp.group(1) == "5")
    temporary = (code or "").startswith("4") or (smtp is not None and smtp.group(1) == "4")
    if not permanent and not temporary:
        if _PERMANENT_WORDS.search(text):
            permanent = True
        elif re.search(r"temporar|delayed|will (keep )?try", text, re.IGNORECASE):
            temporary = True
        else:
            return None
    original = _original_message_id(message)
    if original is None:
        found = re.search(r"^Message-ID:\s*(<[^>\s]{1,250}>)", text, re.IGNORECASE | re.MULTILINE)
        original = found.group(1) if found else None
    kind: Kind = "bounce" if permanent else "delay"
    return Classification(kind, code, clean(line), original)


def _automatic(message: Message) -> bool:
    auto = _header(message, "Auto-Submitted").strip().lower()
    if auto and auto != "no":
        return True
    if message.get("X-Autoreply") or message.get("X-Autorespond"):
        return True
    if message.get("X-Auto-Response-Suppress") and _AUTO_SUBJECT.search(
        _header(message, "Subject")
    ):
        return True
    if _header(message, "Precedence").strip().lower() in ("bulk", "junk", "list", "auto_reply"):
        return True
    return bool(_AUTO_SUBJECT.search(_header(message, "Subject")))
