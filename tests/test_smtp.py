"""Delivery over real SMTP (aiosmtpd on loopback): once per letter, safe headers, classified."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from tests.conftest import make_settings
from tests.factories import send_letter, submission
from tests.services import SmtpSink
from tests.test_stages import through_render
from workers.database.engine import session_scope
from workers.database.models import OutboxItem, State, Submission
from workers.letters.mail import PermanentDeliveryError, SmtpMailer, TransientDeliveryError
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
    from workers.letters.mail import Outgoing

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
