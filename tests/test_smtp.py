"""Delivery over real SMTP (aiosmtpd on loopback): once per letter, safe headers, classified."""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import pytest
import trustme
from sqlalchemy import select

from tests.conftest import make_settings
from tests.factories import send_letter, submission
from tests.services import SmtpSink
from tests.test_stages import through_render
from workers.database.engine import session_scope
from workers.database.models import OutboxItem, State, Submission
from workers.letters.mail import (
    Outgoing,
    PermanentDeliveryError,
    SmtpMailer,
    TransientDeliveryError,
)
from workers.pipeline.app import App
from workers.stages.delivery import DeliveryPolicy

POLICY = DeliveryPolicy()
POLICY_3 = DeliveryPolicy(max_attempts=3)


def mailer(tmp_path: Path, sink: SmtpSink, alarm: Any = None, **values: Any) -> SmtpMailer:
    """An SMTP mailer for the sink (``values``: other settings)."""
    settings = make_settings(
        tmp_path,
        mail_backend="smtp",
        smtp_host="127.0.0.1",
        smtp_port=sink.port,
        **({"smtp_timeout": 5} | values),
    )
    return SmtpMailer(settings, alarm)


def test_letters_arrive_once_with_dmarc_safe_headers(
    app: App, smtp_sink: SmtpSink, tmp_path: Path
) -> None:
    smtp = mailer(tmp_path, smtp_sink)
    sid = through_render(app, submission(supporter__name="Siân Llywelyn-Évans"))
    for _ in range(3):
        send_letter(app.sessions, sid, smtp, POLICY)
    assert smtp_sink.received.count() == 1
    message = smtp_sink.received.messages[0]
    assert message["Message-ID"] == f"<{sid}@campaign.example.org>"
    assert "letters@campaign.example.org" in message["From"]
    assert message["Reply-To"] == "amira.haddad@example.com"
    assert message["Date"]
    assert "=?utf-8?" in message["From"]  # the non-ASCII display name is encoded, not raw
    plain = next(part for part in message.walk() if part.get_content_type() == "text/plain")
    body = plain.get_payload(decode=True)
    assert isinstance(body, bytes) and "Dear Alex Rivers," in body.decode()
    with session_scope(app.sessions) as session:
        delivery = session.get(OutboxItem, sid)
        assert delivery is not None and delivery.response is not None
        assert delivery.response.startswith("250")


def test_one_connection_is_reused_across_letters(
    app: App, smtp_sink: SmtpSink, tmp_path: Path
) -> None:
    smtp = mailer(tmp_path, smtp_sink)
    for _ in range(3):
        send_letter(app.sessions, through_render(app, submission()), smtp, POLICY)
    assert smtp_sink.received.count() == 3
    assert len(set(smtp_sink.sessions)) == 1 and smtp.pool.opened == 1


def test_a_4xx_answer_is_retried_later_and_then_sent(
    app: App, smtp_sink: SmtpSink, tmp_path: Path
) -> None:
    smtp = mailer(tmp_path, smtp_sink)
    sid = through_render(app, submission())
    smtp_sink.answer = "451 4.3.0 Try again later"
    with pytest.raises(TransientDeliveryError, match="451"):
        send_letter(app.sessions, sid, smtp, POLICY)
    with session_scope(app.sessions) as session:
        delivery = session.get(OutboxItem, sid)
        assert delivery is not None and delivery.status == "pending"
    smtp_sink.answer = None
    send_letter(app.sessions, sid, smtp, POLICY)
    assert smtp_sink.received.count() == 1


def test_a_5xx_answer_is_a_recorded_permanent_failure(
    app: App, smtp_sink: SmtpSink, tmp_path: Path
) -> None:
    smtp = mailer(tmp_path, smtp_sink)
    sid = through_render(app, submission())
    smtp_sink.answer = "550 5.1.1 Mailbox unavailable"
    with pytest.raises(PermanentDeliveryError, match="550"):  # recorded, then dead-lettered
        send_letter(app.sessions, sid, smtp, POLICY)
    with session_scope(app.sessions) as session:
        sub = session.get(Submission, sid)
        assert sub is not None and sub.state == State.FAILED
        assert sub.failure_reason is not None and "550" in sub.failure_reason
        status = session.scalar(select(OutboxItem.status).where(OutboxItem.id == sid))
        assert status == "failed"
    assert smtp_sink.received.count() == 0


def test_a_servers_answer_is_kept_on_one_line_without_what_moves_a_terminal(
    app: App, smtp_sink: SmtpSink, tmp_path: Path
) -> None:
    """A hostile relay's escape sequences, a bare CR and a bidirectional override never reach
    what an operator reads (``show``, ``deliveries waiting``, ``health``)."""
    smtp = mailer(tmp_path, smtp_sink)
    sid = through_render(app, submission())
    smtp_sink.answer = "550 5.7.1 no\rx\x1b[2Khealthy \x1b]8;;https://evil.example/\x07here\u202e"
    with pytest.raises(PermanentDeliveryError, match="550"):
        send_letter(app.sessions, sid, smtp, POLICY)
    with session_scope(app.sessions) as session:
        sub, item = session.get(Submission, sid), session.get(OutboxItem, sid)
        assert sub is not None and item is not None
        for said in (sub.failure_reason, item.error):
            assert (
                said is not None
                and "550 5.7.1 no x[2Khealthy ]8;;https://evil.example/here" in said
            )
            assert said.isprintable()


def test_mail_server_down_is_transient_until_the_attempts_run_out(app: App, tmp_path: Path) -> None:
    settings = make_settings(
        tmp_path, mail_backend="smtp", smtp_host="127.0.0.1", smtp_port=1, smtp_timeout=2
    )
    sid = through_render(app, submission())
    for _ in range(2):
        with pytest.raises(TransientDeliveryError):
            send_letter(app.sessions, sid, SmtpMailer(settings), POLICY_3)
    send_letter(app.sessions, sid, SmtpMailer(settings), POLICY_3)  # the third: given up
    with session_scope(app.sessions) as session:
        sub = session.get(Submission, sid)
        assert sub is not None and sub.state == State.FAILED
        assert sub.failure_reason is not None
        assert sub.failure_reason.startswith("gave up after 3 failed attempts:")


def test_a_421_makes_the_letter_wait_without_using_an_attempt(
    app: App, smtp_sink: SmtpSink, tmp_path: Path
) -> None:
    from workers.stages.stage import Deferred

    smtp = mailer(tmp_path, smtp_sink)
    sid = through_render(app, submission())
    smtp_sink.answer = "421 4.7.0 Too many connections from your host"
    for _ in range(25):  # more than DEARMP_DELIVERY_MAX_ATTEMPTS would allow
        with pytest.raises(Deferred, match="421"):
            send_letter(app.sessions, sid, smtp, POLICY_3)
    with session_scope(app.sessions) as session:
        delivery = session.get(OutboxItem, sid)
        assert delivery is not None and (delivery.status, delivery.attempts) == ("pending", 0)
        sub = session.get(Submission, sid)
        assert sub is not None and sub.state == State.RENDERED
        assert delivery.next_attempt_at is not None  # the reconciler waits too
    smtp_sink.answer = None
    send_letter(app.sessions, sid, smtp, POLICY_3)
    with session_scope(app.sessions) as session:
        delivery = session.get(OutboxItem, sid)
        assert delivery is not None and (delivery.status, delivery.attempts) == ("sent", 1)
    assert smtp_sink.received.count() == 1


def test_a_refusal_of_one_letter_keeps_its_session_for_the_next(
    tmp_path: Path, smtp_sink: SmtpSink
) -> None:
    """A 4xx (or 5xx) to one letter at RCPT or DATA says nothing about the session: RSET, and
    the next letter goes on the same one, with no new TLS and AUTH."""
    smtp = mailer(tmp_path, smtp_sink)

    def mail(n: int) -> Outgoing:
        body = f"From: a@example.org\r\nTo: mp{n}@example.org\r\nSubject: {n}\r\n\r\nhi\r\n"
        return Outgoing("a@example.org", [f"mp{n}@example.org"], body.encode(), f"<{n}@x>")

    for n in range(0, 10, 3):
        smtp_sink.refuse[f"mp{n}@example.org"] = "451 4.3.0 <x>: Try again later"
    smtp_sink.refuse["mp5@example.org"] = "550 5.1.1 <x>: Recipient address rejected: unknown"
    refused = 0
    for n in range(10):
        smtp_sink.answer = "451 4.3.0 Queue full" if n == 7 else None  # at DATA
        try:
            smtp.send(mail(n))
        except (TransientDeliveryError, PermanentDeliveryError):
            refused += 1
    assert refused == 6 and smtp_sink.received.count() == 4
    assert smtp.pool.opened == 1 and len(set(smtp_sink.sessions)) == 1
    assert smtp_sink.most_sessions == 1


# A relay aiosmtpd cannot be made into: it answers where it should not, without end, or a
# byte at a time. What each answer is: bytes to send, or a function that writes to the session.
Answer = bytes | Callable[[BinaryIO], None]
OK_LINE = b"250 2.0.0 ok\r\n"


class RawRelay:
    """A relay on a raw loopback socket that answers as a normal one except where ``answers``
    says: "greeting", "EHLO", "STARTTLS", "AUTH", "MAIL", "RCPT", "DATA" or "end" (the end of
    the message). ``tls``: a server context, used after STARTTLS (offered in EHLO) or, with
    ``implicit``, from the start; ``offer``: more EHLO extensions ("AUTH CRAM-MD5")."""

    def __init__(
        self,
        answers: dict[str, Answer],
        tls: ssl.SSLContext | None = None,
        implicit: bool = False,
        offer: tuple[bytes, ...] = (),
    ) -> None:
        self.answers, self.tls, self.implicit, self.offer = answers, tls, implicit, offer
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.listener.getsockname()[1])
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = self.listener.accept()
                threading.Thread(target=self._session, args=(conn,), daemon=True).start()

    def _session(self, conn: socket.socket) -> None:
        try:
            if self.tls is not None and self.implicit:
                conn = self.tls.wrap_socket(conn, server_side=True)
            secured = self.implicit
            file = conn.makefile("rwb")

            def say(what: str, usual: bytes) -> None:
                answer = self.answers.get(what, usual)
                if callable(answer):
                    answer(file)
                else:
                    file.write(answer)
                    file.flush()

            say("greeting", b"220 relay.example ESMTP\r\n")
            while line := file.readline(10_000):
                verb = line[:4].upper().decode()
                if verb in ("EHLO", "HELO"):
                    starttls = (b"STARTTLS",) if self.tls and not secured else ()
                    offered = [b"relay.example", b"8BITMIME", *starttls, *self.offer]
                    lines = [b"250-" + o for o in offered[:-1]] + [b"250 " + offered[-1]]
                    say("EHLO", b"\r\n".join(lines) + b"\r\n")
                elif verb == "STAR":
                    if "STARTTLS" in self.answers or self.tls is None:
                        say("STARTTLS", b"454 4.7.0 no TLS\r\n")
                        return
                    say("STARTTLS", b"220 2.0.0 go ahead\r\n")
                    conn, secured = self.tls.wrap_socket(conn, server_side=True), True
                    file = conn.makefile("rwb")
                elif verb == "DATA":
                    say("DATA", b"354 go ahead\r\n")
                    if self.answers.get("DATA", b"354").startswith(b"354"):
                        while file.readline(10_000) not in (b".\r\n", b""):
                            pass
                        say("end", OK_LINE)
                elif verb == "QUIT":
                    say("QUIT", b"221 2.0.0 bye\r\n")
                    return
                else:  # AUTH, MAIL, RCPT, RSET, NOOP
                    say(verb, b"235 2.7.0 ok\r\n" if verb == "AUTH" else OK_LINE)
        except (OSError, ValueError):
            pass  # the client went
        finally:
            conn.close()  # (the TLS socket, if it became one)

    def stop(self) -> None:
        self.listener.close()


def endless(code: bytes) -> Answer:
    """Continuation lines (a megabyte of them: enough to show no bound holds), then the end."""

    def reply(file: BinaryIO) -> None:
        for _ in range(2_000):
            file.write(code + b"-" + b"x" * 500 + b"\r\n")
        file.write(code + b" ok\r\n")
        file.flush()

    return reply


def dripping(code: bytes) -> Answer:
    """A reply a byte at a time, each within a per-read timeout, the whole taking 3 s."""

    def reply(file: BinaryIO) -> None:
        for byte in code + b"-still\r\n" + code + b"-thinking\r\n" + code + b" ok\r\n":
            file.write(bytes([byte]))
            file.flush()
            time.sleep(0.1)  # the server's pace, not a wait for the test

    return reply


def tls_contexts(tmp_path: Path) -> tuple[ssl.SSLContext, Path]:
    """A relay's TLS context, and the CA file (SMTP_CA_FILE) that verifies it."""
    ca = trustme.CA()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    return context, tmp_path / "ca.pem"


def raw_mailer(
    tmp_path: Path, relay: RawRelay, security: str = "none", **values: Any
) -> SmtpMailer:
    """An SMTP mailer for ``relay``, its timeout 1 s (``values``: other settings)."""
    ca = {"smtp_ca_file": tmp_path / "ca.pem"} if security != "none" else {}
    settings = make_settings(
        tmp_path,
        mail_backend="smtp",
        smtp_host="127.0.0.1",
        smtp_port=relay.port,
        smtp_security=security,
        **({"smtp_timeout": 1} | ca | values),
    )
    return SmtpMailer(settings)


MAIL = Outgoing(
    "a@example.org",
    ["b@example.org"],
    b"From: a@example.org\r\nTo: b@example.org\r\nSubject: x\r\n\r\nhello\r\n",
    "<1@example.org>",
)


@pytest.mark.smtp
@pytest.mark.parametrize(
    ("where", "security"),
    [
        ("greeting", "none"),
        ("EHLO", "none"),
        ("end", "none"),
        ("end", "starttls"),
        ("end", "tls"),
    ],
)
@pytest.mark.parametrize("reply", [endless, dripping])
def test_a_reply_without_end_or_that_drips_fails_the_attempt_within_the_timeout(
    tmp_path: Path, where: str, security: str, reply: Callable[[bytes], Answer]
) -> None:
    """Continuation lines for ever would fill the memory; a byte now and then, each within the
    socket's timeout, would hold the worker for ever: one reply is at most 64 KiB and complete
    within SMTP_TIMEOUT (1 s here), also after STARTTLS and with implicit TLS. Past either, the
    attempt fails as a lost connection does (tried again later)."""
    tls = tls_contexts(tmp_path)[0] if security != "none" else None
    code = b"220" if where == "greeting" else b"250"
    relay = RawRelay({where: reply(code)}, tls=tls, implicit=security == "tls")
    try:
        began = time.monotonic()
        with pytest.raises(TransientDeliveryError, match="SMTPServerDisconnected") as raised:
            raw_mailer(tmp_path, relay, security).send(MAIL)
        took = time.monotonic() - began
    finally:
        relay.stop()
    said = "longer than 65536 bytes" if reply is endless else "took longer than 1 s"
    assert said in str(raised.value) and not raised.value.ours
    assert took < 2.5


@pytest.mark.smtp
@pytest.mark.parametrize(
    "answers",
    [
        {"greeting": b"999 hello\r\n"},
        {"EHLO": b"999 what\r\n"},
        {"MAIL": b"999 what is this\r\n"},
        {"RCPT": b"199 maybe\r\n"},
        {"DATA": b"250 taken already\r\n"},  # no 354
        {"end": b"354 go ahead again\r\n"},
        {"end": b"999 what\r\n"},
        {"end": b"what?\r\n"},  # no code at all
        {"end": b"250 " + b"y" * 20_000 + b"\r\n"},  # longer than smtplib reads
        {"end": b"250 " + b"y" * 8_187 + b"\r\n"},  # by one byte: smtplib's "500" paused us
    ],
    ids=["greeting", "EHLO", "MAIL", "RCPT", "DATA", "354-twice", "999", "no-code", "long", "by-1"],
)
def test_an_answer_outside_smtps_codes_is_a_failed_attempt_not_a_refusal(
    tmp_path: Path, answers: dict[str, Answer]
) -> None:
    """Only 4xx and 5xx refuse: any other code answering a command is the server out of
    protocol. The attempt failed and is tried again later (it costs the attempt); it is not the
    letter's failure for good, nor a pause of everyone's letters."""
    relay = RawRelay(answers)
    try:
        mailer = raw_mailer(tmp_path, relay)
        with pytest.raises(TransientDeliveryError) as raised:
            mailer.send(MAIL)
    finally:
        relay.stop()
    assert not raised.value.ours and raised.value.retry_after is None
    assert mailer.waiting() == 0


@pytest.mark.smtp
def test_any_2xx_to_the_end_of_data_took_the_letter(tmp_path: Path) -> None:
    """RFC 5321: a 2yz is a positive completion. A 251 once made the letter go again."""
    relay = RawRelay({"end": b"251 2.0.0 queued as X\r\n"})
    try:
        assert raw_mailer(tmp_path, relay).send(MAIL) == "251 2.0.0 queued as X"
    finally:
        relay.stop()


@pytest.mark.smtp
def test_a_letter_whose_data_is_answered_out_of_protocol_is_tried_again(
    app: App, tmp_path: Path
) -> None:
    relay = RawRelay({"end": b"354 go ahead again\r\n"})
    try:
        sid = through_render(app, submission())
        with pytest.raises(TransientDeliveryError, match="354"):
            send_letter(app.sessions, sid, raw_mailer(tmp_path, relay), POLICY_3)
    finally:
        relay.stop()
    with session_scope(app.sessions) as session:
        delivery = session.get(OutboxItem, sid)
        assert delivery is not None and (delivery.status, delivery.attempts) == ("pending", 1)
        sub = session.get(Submission, sid)
        assert sub is not None and sub.state == State.RENDERED


def test_redis_away_while_a_letter_is_written_costs_it_no_attempt(app: App) -> None:
    """Its rate limits are asked of Redis as it is written: Redis restarting then (transport,
    as the database's passing trouble) leaves it unclaimed, waiting, no attempt spent."""
    import redis

    from tests.factories import send_letters
    from workers.stages.stage import Deferred

    class Away:
        def reserve(self, key: str, limits: Any) -> float:
            raise redis.ConnectionError("Error while reading: Connection reset by peer")

        def mark_sent(self, key: str, limits: Any) -> None:
            raise AssertionError("not sent")

    sid = through_render(app, submission())
    [(_, waited)] = send_letters(app.sessions, [sid], app.mailer, POLICY, Away())
    assert isinstance(waited, Deferred)
    with session_scope(app.sessions) as session:
        item = session.get(OutboxItem, sid)
        assert item is not None and (item.status, item.attempts, item.failures) == ("pending", 0, 0)
    send_letter(app.sessions, sid, app.mailer, POLICY)  # Redis back
    with session_scope(app.sessions) as session:
        item = session.get(OutboxItem, sid)
        assert item is not None and (item.status, item.attempts) == ("sent", 1)
