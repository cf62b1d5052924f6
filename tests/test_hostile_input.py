"""Hostile input through the real API and the real workers (in process, on StubBroker, with the
rate limits on a real Redis): random payloads from the published schema's fields and a corpus of
hostile strings. The invariants: nothing is a server error; every 202 ends in a final state with
no dead letter; every letter parses with no defects, lines within 998 octets and encoded words
within 75, what the supporter typed arrives as typed, and its DKIM signature verifies; no
supporter data reaches the logs, the stage messages or Redis."""

from __future__ import annotations

import email
import email.policy
import json
import re
import uuid
from collections.abc import Iterator
from typing import Any

import dkim
import dramatiq
import pytest
import redis
from dramatiq.middleware import Middleware
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from tests.conftest import ApiClient, drain
from tests.factories import submission
from tests.services import dkim_dns, dkim_keys
from tests.test_stages import get
from workers.database.models import State
from workers.letters.mail import DkimSigner
from workers.letters.rate_limits import RedisLimiter
from workers.pipeline.app import App
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
