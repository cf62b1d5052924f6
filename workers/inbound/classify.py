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
_DAEMON = re.compile(
    r"mailer-daemon|postmaster|mail delivery (system|subsystem)|microsoftexchange[0-9a-f]{32}@",
    re.IGNORECASE,
)
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
    try:
        acknowledged = acknowledgement(_own_words(message))
    except Exception:  # never a reason to lose a reply
        acknowledged = False
    if acknowledged:
        return Classification("auto_reply", diagnostic="an office's acknowledgement")
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
    """A bounce that is not RFC 3464: from the mailer daemon, or marked automatic with a
    bounce's subject. A person who writes "Undeliverable ... 550 5.1.1" is a person writing."""
    sender = _header(message, "From")
    subject = _header(message, "Subject")
    auto = _header(message, "Auto-Submitted").strip().lower() not in ("", "no")
    if not (_DAEMON.search(sender) or (auto and _BOUNCE_SUBJECT.search(subject))):
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


# An office's acknowledgement sent without any automatic-reply header. Conservative: a marker
# that only machines write, or a thank-you opening together with words only an acknowledgement
# uses (received, a volume of correspondence, "we aim to respond"), in a short message. A person's
# reply that thanks the constituent has neither of the latter.
_MACHINE = re.compile(
    r"this is an? (automated|automatic|auto-generated|computer.generated) "
    r"(response|reply|acknowledge?ment|message|e-?mail|notification)|"
    r"(please )?do not reply to this (e-?mail|message)|"
    r"this (e-?mail address|mailbox|inbox) is not monitored",
    re.IGNORECASE,
)
_THANKS = re.compile(
    r"thank(s| you) for (your|contacting|e-?mailing|writing to|getting in touch with)",
    re.IGNORECASE,
)
_RECEIPT = re.compile(
    r"(e-?mail|message|correspondence|enquiry) (has been|was) (safely )?received|"
    r"(we|this office|the office) (have|has) received your (e-?mail|message|correspondence)|"
    r"this (e-?mail|message) (is to )?confirms? (that )?(we have|receipt)|"
    r"(large|high|significant|huge|considerable) (volume|number|amount) of "
    r"(correspondence|e-?mails|messages|enquiries)|"
    r"\bwe (aim|endeavour|try|strive|will aim|will try|will endeavour) to (respond|reply|get back)",
    re.IGNORECASE,
)
_QUOTE_START = re.compile(
    r"^\s*(-{2,} ?original message ?-{2,}|on .{1,200} wrote:|from: .+|_{10,})\s*$",
    re.IGNORECASE,
)
ACKNOWLEDGEMENT_MAX_CHARS = 3000


def _own_words(message: Message) -> str:
    """The first text part's words above the quoted letter, if any."""
    for part in message.walk():
        if part.get_content_type() not in ("text/plain", "text/html") or part.get_filename():
            continue
        payload = part.get_payload(decode=True)
        if not isinstance(payload, bytes):
            continue
        try:
            text = payload[:50_000].decode(part.get_content_charset() or "utf-8", "replace")
        except LookupError:  # a charset Python does not know: read it as Latin-1
            text = payload[:50_000].decode("latin-1")
        if part.get_content_type() == "text/html":
            text = re.sub(r"<[^>]{0,2000}>", " ", text)
        lines: list[str] = []
        for line in text.splitlines():
            if _QUOTE_START.match(line):
                break
            if not line.lstrip().startswith(">"):
                lines.append(line)
        return " ".join(" ".join(lines).split())
    return ""


def acknowledgement(words: str) -> bool:
    """Whether an office's own words are an automatic acknowledgement, not a person's reply."""
    if _MACHINE.search(words):
        return True
    if len(words) > ACKNOWLEDGEMENT_MAX_CHARS:
        return False
    return bool(_THANKS.search(words) and _RECEIPT.search(words))


def _aligned(domain: str, mp_domain: str) -> bool:
    """``domain`` is the MP address's domain or one of its subdomains (DMARC's relaxed
    alignment, without a public-suffix list: the other way round is never taken)."""
    return bool(mp_domain) and (domain == mp_domain or domain.endswith("." + mp_domain))


def _domain(address: str) -> str:
    return address.rpartition("@")[2].strip().strip("<>").rstrip(".").lower()


def _trusted_results(message: Message, authserv_ids: set[str]) -> list[list[tuple[str, str, str]]]:
    """For each ``Authentication-Results`` header with our relay's authserv-id (one of
    ``authserv_ids``), its (method, result, domain) results; anyone else's are ignored. The
    domain is the result's ``header.from``, ``header.d`` or ``header.i``."""
    headers: list[list[tuple[str, str, str]]] = []
    for value in message.get_all("Authentication-Results") or []:
        text = re.sub(r"\([^()]*\)", " ", str(value))  # comments (one level)
        serv, *resinfos = text.split(";")
        ident = serv.split()
        if not ident or ident[0].lower() not in authserv_ids:
            continue
        found: list[tuple[str, str, str]] = []
        for resinfo in resinfos:
            result = re.match(r"\s*([a-z0-9_-]+)\s*=\s*([a-z]+)", resinfo, re.IGNORECASE)
            if result is None:
                continue
            domain = re.search(r"header\.(?:from|d|i)\s*=\s*\"?([^\s\";]+)", resinfo, re.I)
            found.append(
                (result[1].lower(), result[2].lower(), _domain(domain[1]) if domain else "")
            )
        headers.append(found)
    return headers


def reply_origin(raw: bytes, mp_address: str, authserv_ids: set[str]) -> str | None:
    """Why a reply does not plausibly come from the MP's office, or None if it does.

    Every address in its ``From`` must be on the MP address's domain (each one: a display name
    holding another address is a trick, and parsers disagree on such headers). With our relay's
    authserv-id configured, its ``Authentication-Results`` must also show a DMARC pass for that
    domain, or a DKIM pass by it: a ``From`` alone is only a claim. Every header with that id
    must show it, wherever the relay puts its own: the sender may have written one with our id
    (the relay should remove those, RFC 8601 section 5), and one of ours that does not pass
    is not outvoted.
    """
    try:
        message = parse(raw)
        senders = " ".join(str(v) for v in message.get_all("From") or [])
    except Exception:  # hostile MIME
        return "unreadable sender"
    domains = {_domain(d) for d in re.findall(r"@([^\s<>\"'(),;:@]+)", senders)}
    mp_domain = _domain(mp_address)
    if not domains:
        return "no sender address"
    if not all(_aligned(d, mp_domain) for d in domains):
        return "the sender is not on the MP's domain"
    if not authserv_ids:
        return None
    headers = _trusted_results(message, {i.lower() for i in authserv_ids})
    passed = bool(headers) and all(
        any(
            method in ("dmarc", "dkim") and result == "pass" and _aligned(domain, mp_domain)
            for method, result, domain in results
        )
        for results in headers
    )
    return None if passed else "no DMARC or DKIM pass for the MP's domain from our relay"
