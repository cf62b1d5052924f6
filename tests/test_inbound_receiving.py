"""The inbound doors against an attacker: a Mailgun signature cannot be replayed with other event
data, a malformed webhook body gets a clear JSON answer (never a 500) and what is stored can be
processed, and a recipient given many times is stored once. The webhook tests run on SQLite and
on PostgreSQL; the SMTP ones speak SMTP over loopback to the real receiver."""

from __future__ import annotations

import hashlib
import hmac
import json
import smtplib
import socket
import ssl
import threading
import time
from functools import partial
from pathlib import Path
from typing import Any

import dramatiq
import httpx
import pytest
import trustme
from click.testing import CliRunner
from sqlalchemy import func, select, update

from config.settings import get_settings
from tests.conftest import ApiClient, drain
from tests.services import free_port
from tests.test_after_sent import app as after_sent_app
from tests.test_after_sent import deliver, events, letter_of
from workers.cli import main
from workers.database.engine import make_engine, make_sessionmaker, migrate, session_scope
from workers.database.models import InboundMessage, WebhookToken, utcnow
from workers.pipeline.app import App
from workers.pipeline.dispatch import dispatch_groups
from workers.pipeline.runtime import state_counts
from workers.privacy.hashing import ip_hash
from workers.receiving import receiver as receiver_module
from workers.receiving.addresses import ReturnAddresses
from workers.receiving.receiver import (
    InboundController,
    InboundHandler,
    server_options,
    tls_context,
)
from workers.receiving.store import forget_tokens, store
from workers.stages.stage import Stage
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
    ("over the size limit", b'{"event-data": {"event": "' + b"f" * 100_000 + b'"}}'),
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


def test_one_token_at_either_domain_or_with_a_trailing_dot_is_stored_once(app: App) -> None:
    address = app.returns.reply("3f1e6c1a-8a54-4d3e-9a55-0c1f2e3d4b5a")
    assert address and app.settings.bounce_domain
    local, domain = address.split("@")
    given = [address, f"{local}@{domain}.", f"{local.upper()}@{app.settings.bounce_domain}"]
    assert len(store(app.sessions, "smtp", given, b"x" * 1000)) == 1
    with session_scope(app.sessions) as session:
        assert session.scalars(select(InboundMessage.recipient)).all() == [address]
    # Another letter's token, or the same id with a forged MAC, is another recipient.
    other = app.returns.reply("0c1f2e3d-8a54-4d3e-9a55-3f1e6c1a4b5a")
    forged = f"{local[:-2]}{'a' if local[-2] != 'a' else 'b'}{local[-1]}@{domain}"
    assert other
    assert len(store(app.sessions, "smtp", [address, other, forged], b"y")) == 3


# The SMTP receiver, on loopback.

RETURNS = ReturnAddresses(b"s" * 32, "bounces.example.org", "replies.example.org")
SID = "3f1e6c1a-8a54-4d3e-9a55-0c1f2e3d4b5a"
MESSAGE = b"From: a@b.example\r\nSubject: hello\r\n\r\nhello\r\n"


class Receiver:
    """`dearmp inbound`'s receiver on a loopback port, as `start_receiver` builds it."""

    def __init__(
        self,
        url: str,
        max_sessions: int = 100,
        idle_seconds: float = 60.0,
        tls: ssl.SSLContext | None = None,
        per_peer: int = 5,
        session_seconds: float = 600.0,
    ) -> None:
        self.sessions = make_sessionmaker(make_engine(url))
        self.sent_on: list[str] = []
        handler = InboundHandler(
            self.sessions, RETURNS, self.sent_on.extend, partial(ip_hash, b"k")
        )
        self.controller = InboundController(
            handler,
            max_sessions,
            per_peer,
            session_seconds,
            hostname="127.0.0.1",
            port=free_port(),
            **server_options(1_000_000, idle_seconds, tls),
        )

    def __enter__(self) -> Receiver:
        self.controller.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.controller.stop()
        self.sessions.kw["bind"].dispose()

    def client(self) -> smtplib.SMTP:
        return smtplib.SMTP("127.0.0.1", self.controller.port, timeout=30)

    def connect(self, source: str = "127.0.0.1") -> tuple[socket.socket, bytes]:
        """A raw connection (from ``source``, an address of the loopback), and its greeting."""
        conn = socket.create_connection(
            ("127.0.0.1", self.controller.port), timeout=30, source_address=(source, 0)
        )
        return conn, conn.recv(1000)

    def rows(self) -> list[InboundMessage]:
        with session_scope(self.sessions) as session:
            rows = list(session.scalars(select(InboundMessage)))
            session.expunge_all()
            return rows


@pytest.fixture
def smtp_db(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'inbound.sqlite3'}"
    migrate(url)
    return url


def closed_by_server(conn: socket.socket) -> bytes:
    """Everything the server says until it closes the connection (it has then forgotten the
    session: asyncio closes the socket after the protocol's connection_lost)."""
    said = b""
    while chunk := conn.recv(1000):
        said += chunk
    return said


@pytest.mark.smtp
def test_one_recipient_given_20_times_in_a_transaction_is_stored_once(smtp_db: str) -> None:
    reply, bounce = RETURNS.reply(SID), RETURNS.bounce(SID)
    assert reply and bounce
    local, domain = reply.split("@")
    given = [reply] * 17 + [reply.upper(), f"{local.upper()}@{domain}", bounce, bounce]
    big = MESSAGE + (b"x" * 998 + b"\r\n") * 500
    with Receiver(smtp_db) as receiver, receiver.client() as smtp:
        assert smtp.sendmail("<>", given, big) == {}
        rows = receiver.rows()
        assert sorted(r.recipient for r in rows) == sorted([reply, bounce])
        assert len(receiver.sent_on) == 2


@pytest.mark.smtp
def test_one_token_at_both_our_domains_is_stored_once_and_at_another_domain_refused(
    smtp_db: str,
) -> None:
    reply = RETURNS.reply(SID)
    assert reply
    local = reply.split("@")[0]
    with Receiver(smtp_db) as receiver, receiver.client() as smtp:
        smtp.ehlo()
        smtp.mail("<>")
        assert smtp.rcpt(reply)[0] == 250
        assert smtp.rcpt(f"{local}@bounces.example.org")[0] == 250
        assert smtp.rcpt(f"{local.upper()}@REPLIES.example.org")[0] == 250
        assert smtp.rcpt(f"{local}@gmail.example")[0] == 550  # never a relay
        assert smtp.data(MESSAGE)[0] == 250
        assert [r.recipient for r in receiver.rows()] == [reply]
        assert len(receiver.sent_on) == 1


@pytest.mark.smtp
def test_postmaster_is_taken_and_kept_for_the_operator_never_acted_on(smtp_db: str) -> None:
    refused = "postmaster@gmail.com"  # still never a relay
    given = ["postmaster@bounces.example.org", "PostMaster@REPLIES.example.org", "postmaster"]
    with Receiver(smtp_db) as receiver:
        for rcpt in given:
            with receiver.client() as smtp:
                assert smtp.sendmail("someone@example.net", [rcpt], MESSAGE) == {}
        with receiver.client() as smtp:
            smtp.ehlo()
            smtp.mail("someone@example.net")
            assert smtp.rcpt(refused)[0] == 550
        rows = receiver.rows()
        assert receiver.sent_on == []  # the inbound stage never sees it
    assert [r.recipient for r in rows] == given
    for row in rows:
        assert (row.status, row.kind, row.raw) == ("dropped", "postmaster", MESSAGE)
        assert row.reason and "operator" in row.reason


@pytest.mark.smtp
def test_mail_to_the_postmaster_is_kept_once_and_at_most_so_many_an_hour(
    smtp_db: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Anyone may write to the postmaster: every form of it in one envelope is one message kept,
    and past the hour's allowance a sender is told to try again later, keeping nothing."""
    monkeypatch.setattr(receiver_module, "POSTMASTER_PER_HOUR", 2)
    forms = ["postmaster", "postmaster@bounces.example.org", "PostMaster@REPLIES.example.org"]
    with Receiver(smtp_db) as receiver:
        for _ in range(3):  # envelopes left without DATA spend nothing
            with receiver.client() as smtp:
                smtp.ehlo()
                smtp.mail("someone@example.net")
                assert smtp.rcpt("postmaster")[0] == 250
                smtp.rset()
        for _ in range(2):
            with receiver.client() as smtp:
                assert smtp.sendmail("someone@example.net", forms, MESSAGE) == {}
        with receiver.client() as smtp:
            smtp.ehlo()
            smtp.mail("someone@example.net")
            code, answer = smtp.rcpt("postmaster")
            assert code == 452 and b"try again later" in answer
        rows = receiver.rows()
    assert [r.recipient for r in rows] == ["postmaster", "postmaster"]


def test_of_mail_to_the_postmaster_the_first_100_kb_are_kept(smtp_db: str) -> None:
    sessions = make_sessionmaker(make_engine(smtp_db))
    huge = MESSAGE + b"x" * 5_000_000
    assert store(sessions, "smtp", ["postmaster"], huge) == []
    with session_scope(sessions) as session:
        row = session.scalars(select(InboundMessage)).one()
        assert row.size == len(huge) and row.raw == huge[:100_000]
    sessions.kw["bind"].dispose()


def test_a_mailgun_event_stored_before_its_values_were_checked_is_processed(
    app: App, stub_broker: Any, stub_worker: dramatiq.Worker
) -> None:
    [sid] = deliver(app, stub_broker, stub_worker)
    old = {  # as the webhook stored it before: values as they came
        "event": "failed",
        "severity": "permanent",
        "delivery-status": {"code": 550, "enhanced-code": SURROGATE * 30, "message": "gone"},
    }
    ids = store(
        app.sessions, "mailgun", ["mailgun:failed"], json.dumps(old).encode(), submission_id=sid
    )
    dispatch_groups(stub_broker, {Stage.INBOUND: ids})
    drain(stub_broker, stub_worker)
    assert [row.status for row in mailgun_rows(app)] == ["done"]
    assert events(app, sid) == [("bounce", None)]


@pytest.mark.smtp
def test_starttls_is_offered_with_a_certificate_and_mail_goes_over_it(
    smtp_db: str, tmp_path: Path
) -> None:
    ca = trustme.CA()
    pem = tmp_path / "receiver.pem"
    ca.issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(str(pem))
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)
    bounce = RETURNS.bounce(SID)
    assert bounce
    with Receiver(smtp_db, tls=tls_context(pem, pem)) as receiver, receiver.client() as smtp:
        smtp.ehlo()
        assert smtp.has_extn("starttls")
        smtp.starttls(context=client_context)
        assert isinstance(smtp.sock, ssl.SSLSocket)
        assert smtp.sendmail("<>", [bounce], MESSAGE) == {}
        assert [r.raw for r in receiver.rows()] == [MESSAGE]
    with Receiver(smtp_db) as receiver, receiver.client() as smtp:  # none configured: none offered
        smtp.ehlo()
        assert not smtp.has_extn("starttls")


@pytest.mark.parametrize(
    ("cert", "key", "says"),
    [
        ("missing.pem", "missing.pem", "DEARMP_INBOUND_TLS_CERT: no readable file at"),
        ("cert.pem", None, "set DEARMP_INBOUND_TLS_CERT and DEARMP_INBOUND_TLS_KEY together"),
        ("cert.pem", "other.pem", "are not a PEM certificate and its key"),
        ("garbage.pem", "garbage.pem", "are not a PEM certificate and its key"),
    ],
)
def test_a_tls_certificate_that_will_not_load_is_one_line_at_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cert: str, key: str | None, says: str
) -> None:
    ca = trustme.CA()
    issued = ca.issue_cert("inbound.example.org")
    issued.cert_chain_pems[0].write_to_path(str(tmp_path / "cert.pem"))
    ca.issue_cert("other.example.org").private_key_pem.write_to_path(str(tmp_path / "other.pem"))
    (tmp_path / "garbage.pem").write_text("not a certificate\n")
    monkeypatch.setenv("DEARMP_BOUNCE_DOMAIN", "bounces.example.org")
    monkeypatch.setenv("DEARMP_INBOUND_TLS_CERT", str(tmp_path / cert))
    if key is not None:
        monkeypatch.setenv("DEARMP_INBOUND_TLS_KEY", str(tmp_path / key))
    get_settings.cache_clear()
    try:
        result = CliRunner().invoke(main, ["inbound"])
    finally:
        get_settings.cache_clear()
    assert result.exit_code == 1, result.output
    [line] = result.output.strip().splitlines()
    assert line.startswith("Error: configuration: ") and says in line, line


@pytest.mark.smtp
def test_an_idle_session_is_closed(smtp_db: str) -> None:
    with Receiver(smtp_db, idle_seconds=0.5) as receiver:
        conn, greeting = receiver.connect()
        assert greeting.startswith(b"220") and b"Python" not in greeting  # no software named
        conn.sendall(b"EHLO relay.example.net\r\n")
        assert closed_by_server(conn).startswith(b"250")  # then nothing more: closed
        conn.close()


@pytest.mark.smtp
def test_a_session_trickling_bytes_is_closed_once_it_has_lasted_its_time(smtp_db: str) -> None:
    """A byte at a time keeps a session from ever being idle: it still ends, with 421, once it
    has been open DEARMP_INBOUND_SESSION_SECONDS, and its place is free again."""
    with Receiver(smtp_db, idle_seconds=5, session_seconds=1.5, max_sessions=1) as receiver:
        conn, greeting = receiver.connect()
        assert greeting.startswith(b"220")
        conn.settimeout(0.1)  # a byte every tenth of a second, well inside the idle time
        started, said = time.monotonic(), b""
        while time.monotonic() - started < 15:
            try:
                conn.sendall(b"x")
                chunk = conn.recv(1000)
            except TimeoutError:
                continue
            except OSError:  # closed while we wrote
                break
            said += chunk
            if not chunk:
                break
        lasted = time.monotonic() - started
        conn.close()
        assert said.startswith(b"421 4.4.2") and lasted < 10, (said, lasted)
        again, greeting = receiver.connect()  # the one place is free
        assert greeting.startswith(b"220")
        again.close()


@pytest.mark.smtp
def test_one_address_holds_at_most_its_share_of_sessions(smtp_db: str) -> None:
    """Beyond DEARMP_INBOUND_MAX_SESSIONS_PER_PEER from one address, 421; other addresses still
    get in, and a session that ends frees its address's place."""
    with Receiver(smtp_db, max_sessions=10, per_peer=2) as receiver:
        held = [receiver.connect() for _ in range(2)]
        assert all(greeting.startswith(b"220") for _, greeting in held)
        extra, greeting = receiver.connect()
        assert greeting.startswith(b"421 4.7.0 Too many connections from you")
        assert closed_by_server(extra) == b""
        extra.close()
        other, greeting = receiver.connect(source="127.0.0.2")  # another host
        assert greeting.startswith(b"220")
        leaving, _ = held.pop()
        leaving.sendall(b"QUIT\r\n")
        assert closed_by_server(leaving).startswith(b"221")
        leaving.close()
        held.append(receiver.connect())
        assert held[-1][1].startswith(b"220")
        for conn, _ in [*held, (other, b"")]:
            conn.sendall(b"QUIT\r\n")
            assert closed_by_server(conn).startswith(b"221")
            conn.close()


@pytest.mark.smtp
def test_sessions_beyond_the_cap_are_told_421_and_a_closed_one_frees_its_place(
    smtp_db: str,
) -> None:
    with Receiver(smtp_db, max_sessions=3) as receiver:  # 3 places; 5 for one address
        held = [receiver.connect() for _ in range(3)]
        assert all(greeting.startswith(b"220") for _, greeting in held)
        for _ in range(5):
            extra, greeting = receiver.connect()
            assert greeting.startswith(b"421") and closed_by_server(extra) == b""
            extra.close()
        leaving, _ = held.pop()
        leaving.sendall(b"QUIT\r\n")
        assert closed_by_server(leaving).startswith(b"221")
        leaving.close()
        held.append(receiver.connect())  # its place is free
        assert held[-1][1].startswith(b"220")
        beyond, greeting = receiver.connect()
        assert greeting.startswith(b"421")
        beyond.close()
        for conn, _ in held:
            conn.sendall(b"QUIT\r\n")
            assert closed_by_server(conn).startswith(b"221")
            conn.close()
        bounce = RETURNS.bounce(SID)
        assert bounce
        with receiver.client() as smtp:
            assert smtp.sendmail("<>", [bounce], MESSAGE) == {}


@pytest.mark.smtp
def test_health_says_a_receiver_at_its_cap_or_stalled_is_not_receiving(
    smtp_db: str, tmp_path: Path
) -> None:
    """Accepting connections is not receiving: at its cap of sessions it answers 421, stalled
    it greets no one; health says so (it said ok)."""
    from tests.conftest import make_settings
    from workers.pipeline.checks import _receiver

    with Receiver(smtp_db, max_sessions=1) as receiver:
        settings = make_settings(tmp_path, inbound_host="127.0.0.1")
        settings.inbound_port = receiver.controller.port
        assert _receiver(settings).status == "ok"
        held, _ = receiver.connect()  # its one place taken
        full = _receiver(settings)
        assert full.status == "degraded" and "refuses senders (421 " in full.detail
        held.close()
    stalled = socket.create_server(("127.0.0.1", 0))  # listens, never answers
    try:
        settings.inbound_port = stalled.getsockname()[1]
        quiet = _receiver(settings)
        assert quiet.status == "degraded" and "does not greet within 3 s" in quiet.detail
    finally:
        stalled.close()


@pytest.mark.parametrize(
    ("address", "ours"),
    [
        ("postmaster", True),
        ("<Postmaster>", True),
        ("POSTMASTER@bounces.example.org", True),
        ("postmaster@Replies.Example.Org.", True),
        ("postmaster@elsewhere.example", False),
        ("postmaster@bounces.example.org.elsewhere.example", False),
        ("postmaster@sub.bounces.example.org", False),
        ("xpostmaster@bounces.example.org", False),
        ("postmaster@", False),
        ("abuse@bounces.example.org", False),
    ],
)
def test_postmaster_is_ours_bare_or_at_one_of_our_domains_only(address: str, ours: bool) -> None:
    assert RETURNS.is_postmaster(address) is ours
