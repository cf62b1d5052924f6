"""What came back to a letter: a bounce (RFC 3464, or a mailer daemon's text), a delay, an
automatic reply (RFC 3834 and vendors' headers, or a machine's words), an office's
acknowledgement (a guess from the words: forwarded like a reply, not counted as the MP's), or a
reply. Hostile or broken mail never raises: it is ``malformed`` or a ``loop``."""

from __future__ import annotations

import email
import email.policy
import re
from dataclasses import dataclass
from email.message import Message
from email.utils import getaddresses
from itertools import takewhile
from typing import Literal

from inscriptis import get_text

from workers.wording import one_line

Kind = Literal[
    "bounce", "delay", "delivered", "auto_reply", "acknowledgement", "reply", "malformed", "loop"
]

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
_TEMPORARY_WORDS = re.compile(r"temporar|delayed|will (keep )?try", re.IGNORECASE)


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
    """One line (:func:`one_line`), addresses taken out, at most ``limit`` characters: for what
    is stored or logged about a message."""
    if not text:
        return None
    # Cut before the address pattern runs: on a long line without spaces its time grows as the
    # square of the length, holding the interpreter (a sender chooses the line).
    return one_line(_ADDRESS.sub("<address>", one_line(str(text), limit * 4)), limit) or None


def parse(raw: bytes) -> Message:
    return email.message_from_bytes(raw, policy=email.policy.compat32)


def _header(message: Message, name: str) -> str:
    return str(message.get(name, ""))


def classify(raw: bytes) -> Classification:
    """Never raises: anything the email package cannot read is ``malformed``."""
    try:
        return _classify(parse(raw))
    except Exception as exc:  # hostile MIME: whatever it makes the parser do, it is dropped
        return Classification("malformed", diagnostic=type(exc).__name__)


def _classify(message: Message) -> Classification:
    if message.defects and not message.keys():
        return Classification("malformed", diagnostic="no headers")
    if len(message.get_all("Received") or []) > MAX_HOPS:
        return Classification("loop", diagnostic=f"more than {MAX_HOPS} Received headers")
    if message.get(NOTICE_HEADER) is not None:
        return Classification("loop", diagnostic="one of our own notices came back")
    bounce = _delivery_status(message) or _plain_bounce(message)
    if bounce is not None:
        return bounce
    if _automatic(message):
        return Classification("auto_reply", diagnostic=clean(_header(message, "Subject"), 120))
    try:
        words = _own_words(message)
    except Exception:  # never a reason to lose a reply
        words = ""
    if automated(words):
        return Classification("auto_reply", diagnostic="an automated response")
    if acknowledgement(words):
        return Classification("acknowledgement", diagnostic="an office's acknowledgement")
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
    for block in blocks[1:] or blocks:  # the first block is the message's, the rest recipients'
        if not isinstance(block, Message):
            continue
        action = _header(block, "Action").strip().lower()
        status = _STATUS.search(_header(block, "Status"))
        code = ".".join(status.groups()) if status else None
        diagnostic = _header(block, "Diagnostic-Code").partition(";")[2] or None
        rank = {"failed": 3, "delayed": 2}.get(action, 1 if action else 0)
        if code and code.startswith("5") and action not in ("delivered", "relayed"):
            rank = 3
        found.append((rank, action, code, diagnostic))
    if not found:
        return None
    rank, action, code, diagnostic = max(found, key=lambda f: f[0])
    kind: Kind = "delay"
    if rank == 3:
        kind = "bounce"
    elif rank < 2 and action in ("delivered", "relayed", "expanded"):
        kind = "delivered"
    return Classification(kind, code, clean(diagnostic), _original_message_id(message))


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


# The most of a part's content that is read, in bytes (a forward reads up to its own limit).
PART_BYTES = 1_000_000


def part_text(part: Message, limit: int = PART_BYTES) -> str:
    """A text part's content as a reader sees it, from at most ``limit`` bytes: decoded in its
    charset, or as UTF-8 when that charset is unknown or cannot replace bad bytes; HTML as text.
    Never raises."""
    payload = part.get_payload(decode=True)
    if not isinstance(payload, bytes):
        return ""
    payload = payload[:limit]
    try:
        text = payload.decode(part.get_content_charset() or "utf-8", "replace")
    except (LookupError, ValueError, TypeError):
        text = payload.decode("utf-8", "replace")
    if part.get_content_type() == "text/html":
        text = str(get_text(text))
    return text


def _text(message: Message, limit: int = 200_000) -> str:
    """The message's text parts, decoded, up to ``limit`` characters."""
    out: list[str] = []
    for part in message.walk():
        if part.get_content_type() in ("text/plain", "text/html"):
            out.append(part_text(part, limit)[:limit])
            limit -= len(out[-1])
            if limit <= 0:
                break
    return "\n".join(out)


def _plain_bounce(message: Message) -> Classification | None:
    """A bounce that is not RFC 3464: from the mailer daemon, or marked automatic with a
    bounce's subject. A person who writes "Undeliverable ... 550 5.1.1" is a person writing."""
    subject = _header(message, "Subject")
    daemon = _DAEMON.search(_header(message, "From"))
    if not (daemon or (_auto_submitted(message) and _BOUNCE_SUBJECT.search(subject))):
        return None
    if _AUTO_SUBJECT.search(subject):
        return None
    text = _text(message)
    lines = text.splitlines()
    status = _STATUS.search(text)
    code = ".".join(status.groups()) if status else None
    line = next((ln for ln in lines if status and status.group(0) in ln), None) or next(
        (ln for ln in lines if _SMTP_CODE.search(ln)), None
    )
    smtp = _SMTP_CODE.search(line or "")
    digits = {(code or " ")[0], smtp.group(1) if smtp else ""}  # the status's class, and SMTP's
    kind: Kind
    if "5" in digits or ("4" not in digits and _PERMANENT_WORDS.search(text)):
        kind = "bounce"
    elif "4" in digits or _TEMPORARY_WORDS.search(text):
        kind = "delay"
    else:
        return None
    original = _original_message_id(message)
    if original is None:
        found = re.search(r"^Message-ID:\s*(<[^>\s]{1,250}>)", text, re.IGNORECASE | re.MULTILINE)
        original = found.group(1) if found else None
    return Classification(kind, code, clean(line), original)


def _auto_submitted(message: Message) -> bool:
    return _header(message, "Auto-Submitted").strip().lower() not in ("", "no")


def _automatic(message: Message) -> bool:
    """Marked as sent by a machine: an automatic reply, or a mailing list's mail (an office's
    newsletter is no reply). Not ``List-Unsubscribe`` or ``X-Auto-Response-Suppress`` alone:
    casework and helpdesk systems put them on a person's one-to-one reply."""
    marks = ("X-Autoreply", "X-Autorespond", "List-Id")
    return (
        _auto_submitted(message)
        or any(message.get(mark) for mark in marks)
        or _header(message, "Precedence").strip().lower() in ("bulk", "junk", "list", "auto_reply")
        or bool(_AUTO_SUBJECT.search(_header(message, "Subject")))
    )


# Words only a machine writes: an automatic reply whatever its headers.
_MACHINE = re.compile(
    r"this is an? (automated|automatic|auto-generated|computer.generated) "
    r"(response|reply|acknowledge?ment|message|e-?mail|notification)|"
    r"(please )?do not reply to this (e-?mail|message)|"
    r"this (e-?mail address|mailbox|inbox) is not monitored",
    re.IGNORECASE,
)
# An office's acknowledgement without an automatic-reply header: a thank-you and words of receipt.
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
        if not isinstance(part.get_payload(decode=True), bytes):
            continue
        lines = takewhile(
            lambda ln: not _QUOTE_START.match(ln), part_text(part, 50_000).splitlines()
        )
        return " ".join(" ".join(ln for ln in lines if not ln.lstrip().startswith(">")).split())
    return ""


def automated(words: str) -> bool:
    """Whether an office's own words say a machine wrote them: an automatic reply."""
    return bool(_MACHINE.search(words))


def acknowledgement(words: str) -> bool:
    """Whether an office's own words read like an acknowledgement of receipt (a thank-you and
    words of receipt, in a short message). A form reply can read the same, so it is never
    discarded as a machine's."""
    if len(words) > ACKNOWLEDGEMENT_MAX_CHARS:
        return False
    return bool(_THANKS.search(words) and _RECEIPT.search(words))


def _aligned(domain: str, mp_domain: str) -> bool:
    """``domain`` is ``mp_domain`` or one of its subdomains (DMARC's relaxed alignment, one way)."""
    return bool(mp_domain) and (domain == mp_domain or domain.endswith("." + mp_domain))


def _domain(address: str) -> str:
    return address.rpartition("@")[2].strip().strip("<>").rstrip(".").lower()


# Big mail services anyone can have an address on: there only the MP's exact address vouches.
FREEMAIL = frozenset(
    {
        "gmail.com", "googlemail.com", "outlook.com", "hotmail.com", "hotmail.co.uk",
        "live.com", "live.co.uk", "msn.com", "yahoo.com", "yahoo.co.uk", "ymail.com",
        "rocketmail.com", "icloud.com", "me.com", "mac.com", "aol.com", "aol.co.uk",
        "btinternet.com", "btopenworld.com", "talk21.com", "sky.com", "talktalk.net",
        "virginmedia.com", "ntlworld.com", "blueyonder.co.uk", "tiscali.co.uk",
        "protonmail.com", "proton.me", "pm.me", "gmx.com", "gmx.co.uk", "gmx.net", "mail.com",
        "zoho.com", "fastmail.com", "hushmail.com", "yandex.com", "mail.ru",
    }
)  # fmt: skip
# The same services under a country's domain: yahoo.fr, hotmail.it, outlook.co.nz...
_FREEMAIL_ANYWHERE = re.compile(
    r"(yahoo|hotmail|outlook|live|aol|gmx|ymail)\.(com?\.)?[a-z]{2,3}", re.IGNORECASE
)


def freemail(domain: str) -> bool:
    """Whether ``domain`` is a big mail service's, where anyone can have an address."""
    domain = _domain(domain)
    return domain in FREEMAIL or bool(_FREEMAIL_ANYWHERE.fullmatch(domain))


_SIMPLE_ADDRESS = re.compile(r"[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]{1,64}@[A-Za-z0-9.-]{1,253}")


def raw_values(message: Message, name: str) -> list[str]:
    """A header's values as they came (8-bit bytes as surrogate escapes), each unfolded."""
    return [
        "".join(str(value).splitlines())
        for key, value in message.raw_items()
        if key.lower() == name
    ]


MAX_FROM = 1000  # characters: a longer From is no one's plain address


def reply_sender(message: Message) -> str | None:
    """The address a reply comes from when its one ``From`` names exactly one plain address,
    else None (parsers disagree on the other forms, such as ``"x@evil" <mp@office>``). The one
    reading of the sender, for the relay policy and the forward."""
    values = raw_values(message, "from")
    if len(values) != 1 or len(values[0]) > MAX_FROM:
        return None
    value = values[0]
    found = getaddresses([value])
    if len(found) != 1 or not _SIMPLE_ADDRESS.fullmatch(found[0][1]):
        return None
    address = found[0][1]
    plain = " ".join(value.split())
    if not (plain == address or plain.endswith(f"<{address}>")):
        return None
    if any(other.lower() != address.lower() for other in _ADDRESS.findall(plain)):
        return None
    return address


def _relay_passed(message: Message, authserv_ids: set[str], mp_domain: str) -> bool:
    """Whether there are ``Authentication-Results`` headers our relay added (above the first
    ``Received``, RFC 8601 section 5, with one of ``authserv_ids``) and each shows a DMARC or
    DKIM pass for ``mp_domain`` (``header.from``, ``header.d`` or ``header.i``)."""
    verdicts: list[bool] = []
    for key, value in message.raw_items():
        name = key.lower()
        if name == "received":
            return bool(verdicts) and all(verdicts)
        if name != "authentication-results":
            continue
        text = re.sub(r"\([^()]*\)", " ", " ".join(str(value).split()))  # comments (one level)
        serv, *resinfos = text.split(";")
        ident = serv.split()
        if ident and ident[0].lower() in authserv_ids:
            verdicts.append(any(_passes(resinfo, mp_domain) for resinfo in resinfos))
    return False  # with no Received, no header is our relay's


def _passes(resinfo: str, mp_domain: str) -> bool:
    result = re.match(r"\s*([a-z0-9_-]+)\s*=\s*([a-z]+)", resinfo, re.IGNORECASE)
    if result is None or result[1].lower() not in ("dmarc", "dkim") or result[2].lower() != "pass":
        return False
    domain = re.search(r"header\.(?:from|d|i)\s*=\s*\"?([^\s\";]+)", resinfo, re.I)
    return _aligned(_domain(domain[1]) if domain else "", mp_domain)


def from_office(sender: str | None, mp_address: str) -> bool:
    """Whether a reply's sender is on the MP address's domain (or is that address, on a big mail
    service). What the ``From`` claims, nothing more."""
    if sender is None:
        return False
    if freemail(_domain(mp_address)):
        return sender.lower() == mp_address.strip().strip("<>").lower()
    return _aligned(_domain(sender), _domain(mp_address))


def reply_origin(raw: bytes, mp_address: str, authserv_ids: set[str]) -> str | None:
    """Why a reply does not plausibly come from the MP's office, or None if it does: its
    sender must be the office's (:func:`from_office`) and, given our relay's authserv-ids,
    every header our relay added must show a DMARC or DKIM pass for the MP's domain."""
    try:
        message = parse(raw)
        sender = reply_sender(message)
    except Exception:  # hostile MIME
        return "unreadable sender"
    if sender is None:
        return "the sender is not one plain address"
    mp_domain = _domain(mp_address)
    if not from_office(sender, mp_address):
        if freemail(mp_domain):
            return "the MP's address is on a shared mail service and the sender is not it"
        return "the sender is not on the MP's domain"
    if not authserv_ids or _relay_passed(message, {i.lower() for i in authserv_ids}, mp_domain):
        return None
    return "no DMARC or DKIM pass for the MP's domain from our relay"
