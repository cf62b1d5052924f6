"""Hostile input through the real API and the real workers (in process, on StubBroker, with the
rate limits on a real Redis): random payloads from the published schema's fields and a corpus of
hostile strings. The invariants: nothing is a server error; every 202 ends in a final state with
no dead letter; every letter parses with no defects, lines within 998 octets and encoded words
within 75, what the supporter typed arrives as typed, and its DKIM signature verifies; no
supporter data reaches the logs, the stage messages or Redis. The inbound doors get the same:
generated mail through the real SMTP receiver and generated Mailgun events through the real
webhook, into the real inbound stage (see the second half)."""

from __future__ import annotations

import base64
import email
import email.policy
import hashlib
import hmac
import json
import quopri
import re
import smtplib
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dkim
import dramatiq
import pytest
import redis
from aiosmtpd.controller import Controller
from dramatiq.middleware import Middleware
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from sqlalchemy import select
from structlog.testing import capture_logs

from tests.conftest import ApiClient, drain, make_settings
from tests.factories import submission
from tests.services import dkim_dns, dkim_keys, free_port
from tests.test_stages import get
from workers.database.engine import session_scope
from workers.database.models import InboundMessage, Letter, State
from workers.letters.definitions import update_definition
from workers.letters.mail import DkimSigner
from workers.letters.rate_limits import RedisLimiter
from workers.pipeline.app import App, set_app
from workers.pipeline.runtime import prepare, start_receiver, submit
from workers.web.api import create_app

pytestmark = [pytest.mark.redis, pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)]

LINE_BREAKS = [
    "\n",
    "\r",
    "\r\n",
    "\x0b",
    "\x0c",
    "\x1c",
    "\x1d",
    "\x1e",
    "\x85",
    "\u2028",
    "\u2029",
]
HOSTILE = [
    *LINE_BREAKS,
    "\x00",
    "\x07",
    "\x1b[31m",
    "\ud800",
    "\udfff",
    "\ud83d",
    "\u202e",
    "\u2066",
    "\u200f",
    "\ufeff",
    "\ufffe",
    "=cmd|' /C calc'!A0",
    "+1+1",
    "@SUM(A1)",
    "-2",
    "{{ 7*7 }}",
    "{% for x in range(9) %}x{% endfor %}",
    "{{ self.__init__.__globals__ }}",
    "${7*7}",
    "<script>alert(1)</script>",
    "x\r\nBcc: victim@example.com",
    "=?utf-8?b?SGVsbG8=?=",
    "مهدی\u200cزاده",  # noqa: RUF001 - a Persian name with ZWNJ
    "👩\u200d👩\u200d👧",
    "e\u0301" * 40,
    "😀" * 100,
    "é" * 100,
]
EMAILS = [
    "bob@münchen.de",
    "zoë@example.org",
    "user@xn--mnchen-3ya.de",
    "a@b",
    "x\r\n@example.com",
    "=1+1@example.com",
    "first.last+tag@example.co.uk",
    "a" * 64 + "@" + "b" * 60 + ".example.com",
]
ENCODED_WORD = re.compile(rb"=\?[^?\s]+\?[bBqQ]\?[^?\s]*\?=")
TEXT_FIELDS = [
    "supporter__name",
    "supporter__address_lines",
    "letter__subject",
    "letter__body",
    "supporter__postcode",
    "supporter__phone",
    "source_url",
    "contact_preferences__wording_version",
    "idempotency_key",
    "campaign",
]


class Sent(Middleware):
    """Every stage message as it goes on the wire."""

    def __init__(self) -> None:
        self.encoded: list[bytes] = []

    def before_enqueue(self, broker: dramatiq.Broker, message: Any, delay: Any) -> None:
        self.encoded.append(message.encode())


@pytest.fixture
def sent(stub_broker: dramatiq.Broker) -> Iterator[Sent]:
    middleware = Sent()
    stub_broker.add_middleware(middleware)
    yield middleware
    stub_broker.middleware.remove(middleware)


@pytest.fixture
def client(app: App, stub_broker: Any, redis_server: Any) -> Iterator[TestClient]:
    app.signer = DkimSigner("dearmp", dkim_keys()[0])
    app.limiter = RedisLimiter(redis.Redis.from_url(redis_server.url))
    app.settings.api_ip_limit = app.settings.api_email_limit = 100_000
    with ApiClient(create_app(lambda: app, stub_broker), client=("203.0.113.9", 1)) as test:
        yield test


hostile_text = st.one_of(
    st.sampled_from(HOSTILE),
    st.text(max_size=40),
    st.lists(st.sampled_from(HOSTILE) | st.text(max_size=8), max_size=4).map("".join),
)


@st.composite
def payloads(draw: Any) -> tuple[dict[str, Any], str]:
    marker = f"Zq{uuid.uuid4().hex[:10]}"  # in the supporter's details, to look for later
    payload = submission(
        supporter__name=f"Ada {marker}",
        supporter__email=f"{marker.lower()}@example.com",
        supporter__address_lines=[f"1 {marker} Road"],
    )
    payload.pop("client_ip")
    for field in draw(st.lists(st.sampled_from(TEXT_FIELDS), max_size=3, unique=True)):
        target = payload
        *parents, leaf = field.split("__")
        for parent in parents:
            target = target[parent]
        value = draw(hostile_text)
        how = draw(st.sampled_from(["replace", "append", "prepend", "maximal"]))
        old = target[leaf] if not isinstance(target[leaf], list) else target[leaf][0]
        old = old if isinstance(old, str) else ""
        new = {
            "replace": value,
            "append": old + value,
            "prepend": value + old,
            "maximal": (old + value * 200)[: draw(st.sampled_from([100, 200, 2000, 10_000]))],
        }[how]
        target[leaf] = [new] if isinstance(target[leaf], list) else new
    if draw(st.booleans()):
        payload["supporter"]["email"] = draw(st.sampled_from(EMAILS))
    return payload, marker


def check_letter(data: bytes) -> email.message.EmailMessage:
    head = data.split(b"\r\n\r\n", 1)[0]
    for line in head.split(b"\r\n"):
        assert len(line) <= 998
        for word in ENCODED_WORD.findall(line):
            assert len(word) <= 75, word
    message = email.message_from_bytes(data, policy=email.policy.default)
    assert not message.defects, message.defects
    for part in message.walk():
        assert not part.defects, part.defects
    assert dkim.verify(data, dnsfunc=dkim_dns)
    return message  # type: ignore[return-value]


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(case=payloads())
def test_hostile_input_never_hurts_the_pipeline_or_leaks(
    app: App,
    client: TestClient,
    stub_broker: Any,
    stub_worker: dramatiq.Worker,
    sent: Sent,
    redis_server: Any,
    case: tuple[dict[str, Any], str],
) -> None:
    payload, marker = case
    event_kind = "422"
    with capture_logs() as logs:
        reply = client.post(
            "/v1/submissions",
            content=json.dumps(payload),  # surrogates go as JSON's \ud800 escapes
            headers={"Content-Type": "application/json"},
        )
        assert reply.status_code in {202, 404, 409, 413, 422}, reply.text
        if reply.status_code != 202:
            event(event_kind)
            errors = reply.json()["errors"]
            assert errors and all(isinstance(m, str) and m for m in errors.values())
            return
        drain(stub_broker, stub_worker)
    sid = reply.json()["id"]
    sub = get(app, sid)
    event(f"202, then {sub.state}")
    assert sub.state in {State.DELIVERED, State.REJECTED}, (sub.state, sub.failure_reason)
    if sub.state == State.REJECTED:
        assert sub.rejection and all(isinstance(m, str) and m for m in sub.rejection.values())
    assert not any(stub_broker.dead_letters_by_queue.values())
    if sub.state == State.DELIVERED:
        letter = check_letter((app.settings.resolved_outbox_dir / f"{sid}.eml").read_bytes())
        body = letter.get_body(("plain",))
        assert body is not None
        text = body.get_content()  # type: ignore[attr-defined]
        typed = " ".join(payload["letter"]["body"].split())
        assert typed[:200] in " ".join(text.split())  # arrives as typed, never as a template
    # No supporter data in the logs, the stage messages or Redis.
    assert marker not in json.dumps(logs, default=str)
    assert not any(marker.encode() in m for m in sent.encoded)
    store = redis.Redis.from_url(redis_server.url)
    for key in store.scan_iter():
        assert marker.lower().encode() not in key.lower()
        if store.type(key) == b"zset":
            members = store.zrange(key, 0, -1)
            assert not any(marker.lower().encode() in m.lower() for m in members)


# The inbound doors: generated mail through the real SMTP receiver, and generated Mailgun events
# through the real webhook route, into the real inbound stage (and the notices stage after it).
# The invariants: no crash (no 500, no 451 "could not store", no dead letter); every stored
# message ends done or dropped (or held or failed, with a reason), never left received; and
# every email DearMP writes from one (a forward, a bounce notice) has only header lines DearMP
# builds, each once.

CHARSETS = [
    "utf-8",
    "us-ascii",
    "iso-8859-1",
    "windows-1252",
    "koi8-r",
    "shift_jis",
    "utf-16",
    "utf-7",
    "x-no-such",
    "unknown-8bit",
    "",
    "utf-8*en",
    "utf-8'en'",
]
INJECTIONS = [
    "X\r\nX-Injected: yes",
    "X\r\nContent-Type: text/html\r\nX-Injected: yes",
    "a\nBcc: victim@example.com",
    "a\rTo: victim@example.com",
    "\x00\x07\x1b[31m\x7f",
    "\u2028X-Injected: yes\u2029",
    "\x85X-Injected: yes",
    "\r\n\r\n<script>alert(1)</script>",
    "=?utf-8?q?nested?=",
    "😀" * 40,
]
# What DearMP writes in the head of an email to a supporter; each at most once.
DEARMP_HEADERS = {
    "mime-version",
    "content-type",
    "content-transfer-encoding",
    "from",
    "sender",
    "to",
    "reply-to",
    "subject",
    "date",
    "message-id",
    "in-reply-to",
    "references",
    "auto-submitted",
    "list-unsubscribe",
    "list-unsubscribe-post",
    "dkim-signature",
}
HEADER_NAMES = [
    "Subject",
    "From",
    "Reply-To",
    "Sender",
    "To",
    "Cc",
    "Content-Type",
    "Content-Transfer-Encoding",
    "Message-ID",
    "In-Reply-To",
    "References",
    "Auto-Submitted",
    "Precedence",
    "X-Autoreply",
    "Received",
    "Authentication-Results",
    "X-DearMP-Notice",
    "X-Injected",
]


def _encoded_word(charset: str, how: str, text: str) -> str:
    try:
        data = text.encode(charset or "utf-8", "surrogatepass")
    except (LookupError, UnicodeError):
        data = text.encode("utf-8", "surrogatepass")
    if how == "b":
        payload = base64.b64encode(data).decode()
    else:
        payload = "".join(
            chr(b) if 33 <= b < 127 and chr(b) not in "=?_ " else f"={b:02X}" for b in data
        )
    return f"=?{charset}?{how}?{payload}?="


mail_text = st.one_of(st.sampled_from(INJECTIONS), st.sampled_from(HOSTILE), st.text(max_size=40))
encoded_words = st.builds(
    _encoded_word, st.sampled_from(CHARSETS), st.sampled_from(["b", "q", "B", "Q"]), mail_text
)
header_values = st.one_of(
    mail_text,
    st.lists(encoded_words | mail_text, min_size=1, max_size=4).map(" ".join),
    st.binary(max_size=60).map(lambda b: b.decode("latin-1")),  # raw 8-bit octets
    st.sampled_from(["", " ", "x" * 2000, "=?utf-8?b?" + "QQ" * 60 + "?=", "=?utf-8?q?unfinished"]),
)


def _part(content_type: str, charset: str, encoding: str, text: str) -> bytes:
    head = f'Content-Type: {content_type}; charset="{charset}"\r\n'
    if encoding:
        head += f"Content-Transfer-Encoding: {encoding}\r\n"
    try:
        data = text.encode(charset or "utf-8", "surrogatepass")
    except (LookupError, UnicodeError):
        data = text.encode("utf-8", "surrogatepass")
    if encoding.lower() == "base64":
        data = base64.encodebytes(data)
    elif encoding.lower() == "quoted-printable":
        data = quopri.encodestring(data)
    return head.encode("latin-1", "replace") + b"\r\n" + data


parts = st.builds(
    _part,
    st.sampled_from(["text/plain", "text/html", "text/enriched", "application/octet-stream"]),
    st.sampled_from(CHARSETS),
    st.sampled_from(["", "7bit", "8bit", "base64", "quoted-printable", "x-bogus", "BASE64"]),
    st.one_of(
        mail_text,
        st.text(max_size=300),
        st.just("<p>Dear &amp; <b>friend</b>&nbsp;<style>p{}</style><script>x()</script>"),
    ),
)


@st.composite
def bodies(draw: Any) -> bytes:
    """A body with its MIME headers: one part, a multipart (well or badly formed), raw
    octets, or something huge."""
    how = draw(st.sampled_from(["part", "multipart", "broken", "octets", "huge", "report"]))
    if how == "part":
        return draw(parts)
    if how == "octets":
        return b"\r\n" + draw(st.binary(max_size=2000))
    if how == "huge":
        line = draw(st.sampled_from([b"A" * 998, b"\xff\xfe" * 400, b"=" * 76]))
        return b"Content-Type: text/plain\r\n\r\n" + (line + b"\r\n") * draw(
            st.sampled_from([100, 2000])
        )
    inner = draw(st.lists(parts, min_size=0, max_size=3))
    boundary = draw(st.sampled_from(["b1", "", "x" * 100, "\x00", "b1\r\nX-Injected: yes"]))
    kind = "report; report-type=delivery-status" if how == "report" else "mixed"
    said = boundary if how != "broken" else draw(st.sampled_from(["b2", "", "b1--"]))
    body = f'Content-Type: multipart/{kind}; boundary="{boundary}"\r\n\r\n'.encode(
        "latin-1", "replace"
    )
    for part in inner:
        body += f"--{said}\r\n".encode("latin-1", "replace") + part + b"\r\n"
    if how == "report":
        body += f"--{said}\r\nContent-Type: message/delivery-status\r\n\r\n".encode(
            "latin-1", "replace"
        )
        body += b"Action: failed\r\nStatus: " + draw(
            st.sampled_from([b"5.1.1", b"4.4.1", b"9.9.9", b"\xff.1.1", b"5." * 100])
        )
        body += b"\r\n"
    if draw(st.booleans()):
        body += f"--{said}--\r\n".encode("latin-1", "replace")
    return body


@st.composite
def inbound_mail(draw: Any) -> tuple[str, bool, bytes]:
    """Which address it goes to, whether its From is the MP's (placed by the test), and its
    bytes (``{FROM}`` where the From address goes)."""
    to = draw(st.sampled_from(["reply", "reply", "bounce", "REPLY", "postmaster"]))
    from_mp = draw(st.booleans())
    headers = [
        (name, draw(header_values))
        for name in draw(st.lists(st.sampled_from(HEADER_NAMES), max_size=6))
    ]
    head = b"From: {FROM}\r\n"
    if draw(st.booleans()):
        head += b"In-Reply-To: {MSGID}\r\n"
    if draw(st.booleans()):
        head += f"Message-ID: <{uuid.uuid4()}@mp.example.org>\r\n".encode()
    for name, value in headers:
        head += name.encode() + b": " + value.encode("utf-8", "surrogatepass") + b"\r\n"
    if draw(st.booleans()):
        head += b"MIME-Version: 1.0\r\n"
    return to, from_mp, head + draw(bodies())


@pytest.fixture
def inbound_app(db_url: str, tmp_path: Path) -> Iterator[App]:
    """The App with a bounce and a reply domain, relayed replies, a Mailgun key, and no
    forward cap worth the name."""
    application = App.from_settings(
        make_settings(
            tmp_path,
            database_url=db_url,
            bounce_domain="bounces.campaign.example.org",
            reply_domain="replies.campaign.example.org",
            mailgun_signing_key="mailgun-key",
            forwards_per_letter=100,
        )
    )
    prepare(application)
    set_app(application)
    with session_scope(application.sessions) as session:
        update_definition(session, "political-prisoners", replies="relay")
    yield application
    set_app(None)
    application.engine.dispose()


@pytest.fixture
def letters(
    inbound_app: App, stub_broker: Any, stub_worker: dramatiq.Worker
) -> list[tuple[str, str, str]]:
    """Three delivered letters: (submission id, Message-ID, the MP's address)."""
    ids = [submit(inbound_app, stub_broker, submission())[0] for _ in range(3)]
    drain(stub_broker, stub_worker)
    found = []
    for sid in ids:
        with session_scope(inbound_app.sessions) as session:
            letter = session.get(Letter, sid)
            assert letter is not None
            found.append((sid, letter.message_id, letter.to_email))
    return found


@pytest.fixture
def receiver(inbound_app: App, stub_broker: Any) -> Iterator[Controller]:
    """`dearmp inbound`'s receiver on a loopback port, sending on to the stub broker."""
    controller = start_receiver(inbound_app, stub_broker, "127.0.0.1", free_port())
    yield controller
    controller.stop()


@pytest.fixture
def webhook(inbound_app: App, stub_broker: Any) -> Iterator[TestClient]:
    with ApiClient(create_app(lambda: inbound_app, stub_broker)) as client:
        yield client


@pytest.fixture
def seen() -> set[str]:
    """Stored messages and emails to supporters already looked at (in one test's examples)."""
    return set()


def check_inbound_outcomes(app: App, broker: Any, seen: set[str]) -> None:
    """Every stored message finished, and every new email to a supporter built by DearMP."""
    with session_scope(app.sessions) as session:
        rows = session.execute(
            select(
                InboundMessage.id, InboundMessage.status, InboundMessage.kind, InboundMessage.reason
            )
        ).all()
    for row_id, status, kind, reason in rows:
        assert status in {"done", "dropped", "held", "failed"}, (status, reason)
        if status != "done":
            assert reason, status
        if row_id not in seen:
            seen.add(row_id)
            event(f"{status} {kind}")
    assert not any(broker.dead_letters_by_queue.values())
    for path in sorted(app.settings.resolved_outbox_dir.glob("notice-*.eml")):
        if path.name in seen:
            continue
        seen.add(path.name)
        event("an email to the supporter")
        head = path.read_bytes().split(b"\r\n\r\n", 1)[0]
        names = [
            line.split(b":", 1)[0].decode("ascii").lower()
            for line in head.split(b"\r\n")
            if line and line[:1] not in (b" ", b"\t")
        ]
        built = [n for n in names if n in DEARMP_HEADERS or n.startswith("x-dearmp-")]
        assert names == built, names
        assert len(set(names)) == len(names), names
        for line in head.split(b"\r\n"):
            assert len(line) <= 998


@settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(case=inbound_mail(), which=st.integers(0, 2))
def test_generated_mail_through_the_receiver_never_hurts_the_inbound_stage(
    inbound_app: App,
    stub_broker: Any,
    stub_worker: dramatiq.Worker,
    letters: list[tuple[str, str, str]],
    receiver: Controller,
    seen: set[str],
    case: tuple[str, bool, bytes],
    which: int,
) -> None:
    to, from_mp, raw = case
    sid, message_id, mp = letters[which]
    rcpt = {
        "reply": inbound_app.returns.reply(sid),
        "REPLY": (inbound_app.returns.reply(sid) or "").upper(),
        "bounce": inbound_app.returns.bounce(sid),
        "postmaster": "postmaster@bounces.campaign.example.org",
    }[to]
    assert rcpt
    sender = mp if from_mp else "someone@elsewhere.example"
    raw = raw.replace(b"{FROM}", sender.encode()).replace(b"{MSGID}", message_id.encode())
    with smtplib.SMTP("127.0.0.1", receiver.port, timeout=60) as smtp:
        try:
            assert smtp.sendmail(sender, [rcpt], raw) == {}
            event("250")
        except smtplib.SMTPResponseException as told:
            # A line too long, say: refused plainly. Never "could not store" (451).
            assert told.smtp_code != 451 and told.smtp_code >= 500, told
            event(str(told.smtp_code))
    drain(stub_broker, stub_worker)
    check_inbound_outcomes(inbound_app, stub_broker, seen)


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False)
    | st.text(max_size=20)
    | st.sampled_from(HOSTILE),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)
mailgun_events = st.fixed_dictionaries(
    {
        "id": st.uuids().map(str) | json_values,
        "event": st.sampled_from(["failed", "delivered"])
        | st.sampled_from(["failed", "delivered", "opened", "\ud800", ""])
        | json_values,
        "severity": st.sampled_from(["permanent", "temporary"]) | json_values,
        "delivery-status": st.fixed_dictionaries(
            {
                "code": st.sampled_from([550, 421, "550"]) | json_values,
                "enhanced-code": st.sampled_from(["5.1.1", "4.2.2", "\ud800", "5" * 300])
                | json_values,
                "message": mail_text | json_values,
                "description": mail_text | json_values,
            }
        )
        | json_values,
    },
    optional={"recipient": json_values, "user-variables": json_values},
)


@settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(event_data=mailgun_events, which=st.integers(0, 2), ours=st.booleans())
def test_generated_mailgun_events_never_hurt_the_webhook_or_the_inbound_stage(
    inbound_app: App,
    stub_broker: Any,
    stub_worker: dramatiq.Worker,
    letters: list[tuple[str, str, str]],
    webhook: TestClient,
    seen: set[str],
    event_data: dict[str, Any],
    which: int,
    ours: bool,
) -> None:
    if ours:
        event_data["message"] = {"headers": {"message-id": letters[which][1].strip("<>")}}
    timestamp, token = str(int(time.time())), uuid.uuid4().hex
    signature = hmac.new(b"mailgun-key", (timestamp + token).encode(), hashlib.sha256).hexdigest()
    body = {
        "signature": {"timestamp": timestamp, "token": token, "signature": signature},
        "event-data": event_data,
    }
    answer = webhook.post(
        "/v1/webhooks/mailgun",
        content=json.dumps(body),  # surrogates go as JSON's \ud800 escapes
        headers={"Content-Type": "application/json"},
    )
    assert answer.status_code in {200, 413, 422}, answer.text
    assert answer.json()
    event(str(answer.status_code))
    drain(stub_broker, stub_worker)
    check_inbound_outcomes(inbound_app, stub_broker, seen)
