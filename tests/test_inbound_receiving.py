"""The inbound doors against an attacker: a Mailgun signature cannot be replayed with other event
data, a malformed webhook body gets a clear JSON answer (never a 500) and what is stored can be
processed, and a recipient given many times is stored once. The webhook tests run on SQLite and
on PostgreSQL; the SMTP ones speak SMTP over loopback to the real receiver."""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
from typing import Any

import dramatiq
import httpx
import pytest
from sqlalchemy import func, select, update

from tests.conftest import ApiClient, drain
from tests.test_after_sent import app as after_sent_app
from tests.test_after_sent import deliver, events, letter_of
from workers.database.engine import session_scope
from workers.database.models import InboundMessage, WebhookToken, utcnow
from workers.inbound.store import forget_tokens, store
from workers.pipeline.app import App
from workers.pipeline.runtime import state_counts
from workers.web.api import create_app

URL = "/v1/webhooks/mailgun"
# The App with a bounce and a reply domain, and a Mailgun signing key.
app = after_sent_app


def signed(event: Any, token: str, key: bytes = b"mailgun-key") -> dict[str, Any]:
    timestamp = str(int(time.time()))
    signature = hmac.new(key, (timestamp + token).encode(), hashlib.sha256).hexdigest()
    return {
        "signature": {"timestamp": timestamp, "token": token, "signature": signature},
        "event-data": event,
    }


def failed(app: App, sid: str, event_id: str, **status: Any) -> dict[str, Any]:
    letter = letter_of(app, sid)
    return {
        "id": event_id,
        "event": "failed",
        "severity": "permanent",
        "recipient": letter.to_email,
        "delivery-status": {"code": 550, "enhanced-code": "5.1.1", "message": "no such user"}
        | status,
        "message": {"headers": {"message-id": letter.message_id.strip("<>")}},
    }


def mailgun_rows(app: App) -> list[InboundMessage]:
    with session_scope(app.sessions) as session:
        rows = list(
            session.scalars(select(InboundMessage).where(InboundMessage.source == "mailgun"))
        )
        session.expunge_all()
        return rows


def test_a_captured_signature_with_other_event_data_is_refused(
    app: App, stub_broker: Any, stub_worker: dramatiq.Worker
) -> None:
    [sid] = deliver(app, stub_broker, stub_worker)
    delivered = failed(app, sid, "ev-1") | {"event": "delivered", "severity": None}
    captured = signed(delivered, "t" * 50)
    with ApiClient(create_app(lambda: app, stub_broker)) as client:
        assert client.post(URL, json=captured).json() == {"stored": True}
        forged = captured | {"event-data": failed(app, sid, "ev-2")}
        answer = client.post(URL, json=forged)
        assert answer.status_code == 406 and "signature" in answer.json()["errors"]
        assert client.post(URL, json=captured).status_code == 406  # the very same request too
        drain(stub_broker, stub_worker)
    assert state_counts(app, [sid]) == {"delivered": 1}
    assert len(mailgun_rows(app)) == 1


def test_two_requests_with_one_signature_at_once_let_one_in(
    app: App, stub_broker: Any, stub_worker: dramatiq.Worker
) -> None:
    [sid] = deliver(app, stub_broker, stub_worker)
    token = "c" * 50
    bodies = [signed(failed(app, sid, f"ev-{n}"), token) for n in range(2)]
    start = threading.Barrier(2)
    answers: list[httpx.Response] = []
    with ApiClient(create_app(lambda: app, stub_broker)) as client:

        def post(body: dict[str, Any]) -> None:
            start.wait()
            answers.append(client.post(URL, json=body))

        threads = [threading.Thread(target=post, args=(body,)) for body in bodies]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        drain(stub_broker, stub_worker)
    assert sorted(a.status_code for a in answers) == [200, 406]
    assert len(mailgun_rows(app)) == 1
    assert events(app, sid) == [("bounce", "5.1.1")]


def test_tokens_are_forgotten_once_their_timestamps_would_be_refused(app: App) -> None:
    store(app.sessions, "mailgun", ["mailgun:failed"], b"{}", token="old")
    store(app.sessions, "mailgun", ["mailgun:failed"], b"{}", token="new")
    with session_scope(app.sessions) as session:
        session.execute(
            update(WebhookToken)
            .where(WebhookToken.token == "old")
            .values(seen_at=utcnow().replace(year=2020))
        )
    forget_tokens(app.sessions, older_than=600)
    with session_scope(app.sessions) as session:
        assert list(session.scalars(select(WebhookToken.token))) == ["new"]


SURROGATE = "\ud800"
MALFORMED_EVENTS: list[tuple[str, Any]] = [
    ("a lone surrogate as the event", {"id": "m1", "event": SURROGATE}),
    ("a number as the event", {"id": "m2", "event": 5}),
    ("a huge event name", {"id": "m3", "event": "failed" * 10_000}),
    ("no event", {"id": "m4"}),
    ("an event that is a list", [1, 2]),
    ("an event that is text", "failed"),
]


@pytest.mark.parametrize(("case", "event"), MALFORMED_EVENTS, ids=[c for c, _ in MALFORMED_EVENTS])
def test_a_malformed_event_gets_a_clear_json_422(
    app: App, stub_broker: Any, case: str, event: Any
) -> None:
    with ApiClient(create_app(lambda: app, stub_broker)) as client:
        answer = client.post(
            URL,
            content=json.dumps(signed(event, "m" * 50)),  # surrogates go as JSON's \ud800
            headers={"Content-Type": "application/json"},
        )
    assert answer.status_code == 422, answer.text
    assert answer.json()["errors"]
    assert mailgun_rows(app) == []


MALFORMED_BODIES: list[tuple[str, bytes]] = [
    ("a list", b"[]"),
    ("text", b'"signature"'),
    ("null", b"null"),
    ("not UTF-8", b'{"signature": "\xff\xfe"}'),
    ("not JSON", b"signature=1&event-data=2"),
    ("deeply nested", b'{"event-data": ' + b"[" * 20_000 + b"]" * 20_000 + b"}"),
    ("a signature of numbers", b'{"signature": {"timestamp": 1, "token": 2, "signature": 3}}'),
    (
        "a signature with a lone surrogate",
        json.dumps(
            {
                "signature": {"timestamp": "1", "token": SURROGATE, "signature": SURROGATE},
                "event-data": {"event": "failed"},
            }
        ).encode(),
    ),
    (
        "a signature that is not ASCII",
        json.dumps(
            {
                "signature": {"timestamp": "1", "token": "é" * 50, "signature": "é" * 64},
                "event-data": {"event": "failed"},
            }
        ).encode(),
    ),
]


@pytest.mark.parametrize(("case", "body"), MALFORMED_BODIES, ids=[c for c, _ in MALFORMED_BODIES])
def test_a_malformed_body_gets_a_clear_json_4xx(
    app: App, stub_broker: Any, case: str, body: bytes
) -> None:
    with ApiClient(create_app(lambda: app, stub_broker)) as client:
        answer = client.post(URL, content=body, headers={"Content-Type": "application/json"})
    assert answer.status_code in {406, 413, 422}, answer.text
    assert answer.json()["errors"]
    assert mailgun_rows(app) == []


def test_odd_values_in_a_genuine_event_are_stored_clean_and_processed(
    app: App, stub_broker: Any, stub_worker: dramatiq.Worker
) -> None:
    [sid, other] = deliver(app, stub_broker, stub_worker, n=2)
    odd = [
        failed(app, sid, "o1", **{"enhanced-code": SURROGATE, "message": f"x{SURROGATE}\x00y"}),
        failed(app, other, "o2", **{"enhanced-code": "5" * 20_000, "code": {"a": [1]}}),
        failed(app, sid, f"o3{SURROGATE}") | {"message": {"headers": {"message-id": SURROGATE}}},
        failed(app, sid, "o4") | {"delivery-status": [SURROGATE], "severity": [1]},
        failed(app, sid, "o5") | {"message": "x" * 30_000},
    ]
    with ApiClient(create_app(lambda: app, stub_broker)) as client:
        for n, event in enumerate(odd):
            answer = client.post(
                URL,
                content=json.dumps(signed(event, f"o{n}" * 10)),
                headers={"Content-Type": "application/json"},
            )
            assert answer.status_code == 200, answer.text
        drain(stub_broker, stub_worker)
    rows = mailgun_rows(app)
    assert len(rows) == len(odd)
    assert all(row.status in {"done", "dropped"} for row in rows), [r.status for r in rows]
    assert not any(stub_broker.dead_letters_by_queue.values())
    # The surrogate's event still returns its letter, with no status code it could not store.
    assert state_counts(app, [sid, other]) == {"bounced": 2}
    assert ("bounce", None) in events(app, sid)


def test_a_recipient_given_many_times_is_stored_once(app: App) -> None:
    address = app.returns.reply("3f1e6c1a-8a54-4d3e-9a55-0c1f2e3d4b5a")
    assert address
    local, domain = address.split("@")
    given = [address] * 10 + [address.upper(), f"<{address}>", f"{local.upper()}@{domain}"]
    assert len(store(app.sessions, "smtp", given, b"x" * 1000)) == 1
    with session_scope(app.sessions) as session:
        assert session.scalar(select(func.count()).select_from(InboundMessage)) == 1
