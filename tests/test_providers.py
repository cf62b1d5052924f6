"""The other mail backends, for real: an HTTP provider API over requests, SMTP with TLS and AUTH."""

from __future__ import annotations

import json
import ssl
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from email import message_from_bytes
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import trustme
from aiosmtpd.smtp import AuthResult, LoginPassword

from config.settings import Settings
from tests.conftest import make_settings
from tests.factories import send_letter, submission
from tests.services import SmtpSink, reply
from tests.test_stages import through_render
from workers.database.engine import session_scope
from workers.database.models import OutboxItem
from workers.letters.mail import (
    HttpMailer,
    Outgoing,
    PermanentDeliveryError,
    SmtpMailer,
    TransientDeliveryError,
)
from workers.letters.mail.http import retry_after
from workers.pipeline.app import App
from workers.stages.delivery import DeliveryPolicy

POLICY = DeliveryPolicy()
MAIL = Outgoing(
    "from@campaign.example.org", ["mp@parliament.uk"], b"Subject: x\r\n\r\nhi\r\n", "<m@x>"
)


class ProviderStub:
    """A local HTTP server in the shape of Mailgun's messages.mime endpoint."""

    def __init__(self) -> None:
        self.replies: list[tuple[int, dict[str, str], Any]] = []  # str, bytes, or pieces
        self.requests: list[dict[str, Any]] = []
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                seen = {"path": self.path, "headers": dict(self.headers), "body": body}
                stub.requests.append(seen | {"at": time.monotonic()})
                status, headers, text = (
                    stub.replies.pop(0) if stub.replies else (200, {}, '{"id": "<q1>"}')
                )
                reply(self, status, headers, text.encode() if isinstance(text, str) else text)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        ).start()


@pytest.fixture
def provider() -> Iterator[ProviderStub]:
    stub = ProviderStub()
    yield stub
    stub.server.shutdown()


def http_settings(tmp_path: Path, provider: ProviderStub) -> Settings:
    return make_settings(
        tmp_path,
        mail_backend="http",
        email_api_url=provider.url,
        email_api_key="key-123",
        email_api_domain="campaign.example.org",
    )


def http_mailer(tmp_path: Path, provider: ProviderStub) -> HttpMailer:
    return HttpMailer(http_settings(tmp_path, provider))


def test_http_provider_gets_the_exact_bytes_and_the_answer_is_kept(
    app: App, provider: ProviderStub, tmp_path: Path
) -> None:
    sid = through_render(app, submission())
    send_letter(app.sessions, sid, http_mailer(tmp_path, provider), POLICY)
    [request] = provider.requests
    assert request["path"] == "/v3/campaign.example.org/messages.mime"
    assert request["headers"]["Authorization"].startswith("Basic ")
    assert b"Message-ID: <" + sid.encode() + b"@campaign.example.org>" in request["body"]
    with session_scope(app.sessions) as session:
        delivery = session.get(OutboxItem, sid)
        assert delivery is not None and delivery.status == "sent"
        assert delivery.response is not None and delivery.response.startswith("200")


@pytest.mark.parametrize(
    ("status", "headers", "retry_after"),
    [(429, {"Retry-After": "7"}, 7.0), (503, {}, None), (500, {"Retry-After": "1"}, 1.0)],
)
def test_http_429_and_5xx_are_transient_and_retry_after_is_honoured(
    tmp_path: Path, provider: ProviderStub, status: int, headers: dict[str, str], retry_after: Any
) -> None:
    provider.replies.append((status, headers, json.dumps({"message": "slow down"})))
    with pytest.raises(TransientDeliveryError) as raised:
        http_mailer(tmp_path, provider).send(MAIL)
    assert raised.value.retry_after == retry_after


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("120", 120.0),
        (" 5 ", 5.0),
        ("²", None),
        ("1¹", None),
        ("-3", None),
        ("soon", None),
        ("3600", 3600.0),
        ("999999999999", 3600.0),  # at most an hour: it overflowed a timedelta
        ("9" * 400, 3600.0),  # float('inf')
        ("Fri, 01 Jan 2036 00:00:00 GMT", 3600.0),  # a letter pending for ten years
    ],
)
def test_a_retry_after_value_is_read_or_ignored_never_an_error(
    value: str, seconds: float | None
) -> None:
    assert retry_after(value) == seconds


def test_http_4xx_is_permanent(tmp_path: Path, provider: ProviderStub) -> None:
    provider.replies.append((400, {}, '{"message": "to parameter is not a valid address"}'))
    with pytest.raises(PermanentDeliveryError, match="400"):
        http_mailer(tmp_path, provider).send(MAIL)


@pytest.mark.parametrize("status", [401, 403, 404])
def test_http_refusing_our_key_or_domain_pauses_delivery_and_costs_no_attempt(
    tmp_path: Path, provider: ProviderStub, status: int
) -> None:
    """A wrong key or domain is the same for every letter: delivery pauses, as for a relay
    that refuses our login, and the letters wait (``ours``) instead of failing one by one."""
    provider.replies.append((status, {}, '{"message": "Forbidden"}'))
    alarms: list[tuple[Any, ...]] = []
    mailer = HttpMailer(http_settings(tmp_path, provider), alarm=lambda *a: alarms.append(a))
    with pytest.raises(TransientDeliveryError) as raised:
        mailer.send(MAIL)
    assert raised.value.ours and raised.value.retry_after == 30.0
    [(_, _, lasting)] = alarms
    assert lasting  # the same answer until someone acts: `dearmp health` says down
    assert 29 < mailer.waiting() <= 30
    with pytest.raises(TransientDeliveryError, match="delivery paused"):
        mailer.send(MAIL)  # not sent again while paused
    assert len(provider.requests) == 1


def test_http_refusals_of_threads_at_once_are_one_refusal(
    tmp_path: Path, provider: ProviderStub
) -> None:
    """Eight threads refused together pause delivery for the first pause, not doubled eight
    times (to 15 minutes) for one wrong key."""
    provider.replies.extend([(401, {}, '{"message": "Forbidden"}')] * 8)
    mailer = http_mailer(tmp_path, provider)
    barrier = threading.Barrier(8)
    waits: list[float | None] = []

    def one() -> None:
        barrier.wait()
        try:
            mailer.send(MAIL)
        except TransientDeliveryError as exc:
            waits.append(exc.retry_after)

    threads = [threading.Thread(target=one) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(waits) == 8 and all(w is not None and w <= 30 for w in waits)
    assert mailer.relay.refusals == 1 and mailer.waiting() <= 30


def test_http_provider_unreachable_is_transient(tmp_path: Path) -> None:
    settings = make_settings(
        tmp_path,
        mail_backend="http",
        email_api_url="http://127.0.0.1:1",
        email_api_key="k",
        email_api_domain="d.example",
        email_api_timeout=2,
    )
    with pytest.raises(TransientDeliveryError):
        HttpMailer(settings).send(MAIL)


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def tls_server_context(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(context)
    return context


def check_login(server: Any, session: Any, envelope: Any, mechanism: str, data: Any) -> AuthResult:
    ok = isinstance(data, LoginPassword) and (data.login, data.password) == (b"dearmp", b"s3cret")
    return AuthResult(success=ok)


@pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS")
@pytest.mark.parametrize("security", ["starttls", "tls"])
def test_smtp_over_tls_with_auth(tmp_path: Path, ca: trustme.CA, security: str) -> None:
    options: dict[str, Any] = {"authenticator": check_login, "auth_required": True}
    if security == "starttls":
        options |= {"tls_context": tls_server_context(ca), "require_starttls": True}
    else:
        # Implicit TLS: aiosmtpd counts only STARTTLS as TLS unless told otherwise.
        options |= {"ssl_context": tls_server_context(ca), "auth_require_tls": False}
    sink = SmtpSink(**options).start()
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    try:
        settings = make_settings(
            tmp_path,
            mail_backend="smtp",
            smtp_host="127.0.0.1",
            smtp_port=sink.port,
            smtp_security=security,
            smtp_username="dearmp",
            smtp_password="s3cret",
            smtp_ca_file=ca_file,
            smtp_timeout=5,
        )
        answer = SmtpMailer(settings).send(MAIL)
        assert answer.startswith("250")
        assert sink.received.count() == 1
        assert message_from_bytes(MAIL.data)["Subject"] == sink.received.messages[0]["Subject"]
        wrong = settings.model_copy(update={"smtp_password": None})
        # Auth required, none given: a configuration problem, so the letter waits and retries.
        with pytest.raises(TransientDeliveryError, match="530"):
            SmtpMailer(wrong).send(MAIL)
    finally:
        sink.stop()


def test_health_asks_the_email_api_whether_it_takes_our_key_and_sends_nothing(
    tmp_path: Path, provider: ProviderStub
) -> None:
    from tests.services import free_port
    from workers.pipeline.checks import _mail_server

    settings = http_settings(tmp_path, provider)
    provider.replies.append((400, {}, '{"message": "to parameter is missing"}'))
    assert _mail_server(settings).status == "ok"  # the key and domain taken, nothing to send
    assert provider.requests[-1]["path"] == "/v3/campaign.example.org/messages.mime"
    assert provider.requests[-1]["headers"]["Authorization"].startswith("Basic ")
    provider.replies.append((401, {}, "Forbidden"))
    refused = _mail_server(settings)
    assert refused.status == "down" and "refuses our key or domain (HTTP 401)" in refused.detail
    provider.replies.append((405, {}, "Method Not Allowed"))  # a website, not the API
    wrong = _mail_server(settings)
    assert wrong.status == "down" and "answered HTTP 405: check EMAIL_API_URL" in wrong.detail
    settings.email_api_url = f"http://127.0.0.1:{free_port()}"
    assert "cannot reach the email API" in _mail_server(settings).detail
    assert all(r["body"] == b"" for r in provider.requests)  # nothing sent


def test_the_email_apis_answer_is_read_capped_and_a_2xx_is_sent_whatever_its_body(
    tmp_path: Path, provider: ProviderStub
) -> None:
    """A few KB of gzip once decoded to gigabytes in memory. An answer of a few KB is all the
    API says; a 200 whose answer is not read whole (past the cap, or not over within the
    timeout) took the letter all the same: sent (again, it could be sent twice), and said."""
    import zlib

    packer = zlib.compressobj(9, zlib.DEFLATED, 31)
    pieces = [packer.compress(b" " * (1 << 20)) for _ in range(8)]
    bomb = b"".join([*pieces, packer.compress(b'{"id": "<q1>"}'), packer.flush()])
    provider.replies.append((200, {"Content-Encoding": "gzip"}, bomb))
    mailer = http_mailer(tmp_path, provider)
    assert mailer.send(MAIL).endswith("(an answer longer than 8,192 bytes)")
    # A refusal's answer is read as far as the cap: its start is what is kept.
    provider.replies.append((400, {}, "bad address " + "x" * 100_000))
    with pytest.raises(PermanentDeliveryError, match=r"^400 bad address x+$") as refused:
        mailer.send(MAIL)
    assert len(str(refused.value)) < 600

    def trickle() -> Iterator[bytes]:
        for _ in range(400):
            time.sleep(0.05)  # the server's pace
            yield b" "

    quick = HttpMailer(
        http_settings(tmp_path, provider).model_copy(update={"email_api_timeout": 0.5})
    )
    provider.replies.append((200, {}, trickle()))
    began = time.monotonic()
    assert quick.send(MAIL).endswith("(an answer not over in 0.5 s)")
    assert time.monotonic() - began < 2.0


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_a_redirect_from_the_email_api_is_never_followed_nor_sent_it_pauses_delivery(
    tmp_path: Path, provider: ProviderStub, status: int
) -> None:
    """Followed, a 302 turned the POST into a GET whose 200 marked the letter sent (nothing
    was), and a 307 posted the letter to another host. EMAIL_API_URL is wrong: delivery pauses,
    lasting, as when the API refuses our key."""
    elsewhere = ProviderStub()
    try:
        provider.replies.append((status, {"Location": f"{elsewhere.url}/v3/x"}, ""))
        alarms: list[tuple[Any, ...]] = []
        mailer = HttpMailer(http_settings(tmp_path, provider), alarm=lambda *a: alarms.append(a))
        with pytest.raises(TransientDeliveryError, match="redirects are not followed") as raised:
            mailer.send(MAIL)
        assert raised.value.ours and raised.value.retry_after == 30.0
        [(reason, _, lasting)] = alarms
        assert lasting and mailer.waiting() > 0 and "check EMAIL_API_URL" in reason
        provider.replies.append((status, {"Location": f"{elsewhere.url}/v3/x"}, ""))
        settings = http_settings(tmp_path, provider)
        from workers.pipeline.checks import _mail_server

        assert f"answered HTTP {status}: check EMAIL_API_URL" in _mail_server(settings).detail
        assert elsewhere.requests == [] and len(provider.requests) == 2
    finally:
        elsewhere.server.shutdown()


def test_a_retry_after_of_years_waits_an_hour_and_the_letter_stays_pending(
    app: App, provider: ProviderStub, tmp_path: Path
) -> None:
    """999999999999 seconds raised OverflowError in the outbox and left the letter 'sending';
    ten years left it pending, never overdue."""
    from workers.database.models import utcnow

    sid = through_render(app, submission())
    provider.replies.append((429, {"Retry-After": "999999999999"}, "slow down"))
    with pytest.raises(TransientDeliveryError) as raised:
        send_letter(app.sessions, sid, http_mailer(tmp_path, provider), POLICY)
    assert raised.value.retry_after == 3600.0
    with session_scope(app.sessions) as session:
        item = session.get(OutboxItem, sid)
        assert item is not None and item.status == "pending" and item.next_attempt_at
        assert item.next_attempt_at - utcnow() <= timedelta(hours=1)
