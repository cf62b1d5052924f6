"""A relayed reply reaches the supporter once even when the worker forwarding it is SIGKILLed
mid-forward: real worker processes, Redis, PostgreSQL, `dearmp inbound` and an SMTP server."""

from __future__ import annotations

import smtplib
from collections.abc import Iterator
from pathlib import Path

import pytest
from dramatiq.brokers.redis import RedisBroker
from sqlalchemy import select

from tests import mail_samples as samples
from tests.conftest import make_settings
from tests.factories import submission
from tests.services import SmtpSink, free_port, wait_for
from tests.test_e2e_redis import Stack
from workers.database.engine import session_scope
from workers.database.models import InboundMessage, Letter, OutboxItem
from workers.letters.definitions import update_definition
from workers.pipeline.app import App
from workers.pipeline.embedded_redis import EmbeddedRedis
from workers.pipeline.runtime import prepare, state_counts, submit

pytestmark = [
    pytest.mark.redis,
    pytest.mark.smtp,
    pytest.mark.parametrize("db_url", ["postgresql"], indirect=True),
]

SUPPORTER = "amira.haddad@example.com"


@pytest.fixture
def server() -> Iterator[SmtpSink]:
    sink = SmtpSink().start()
    yield sink
    sink.stop()


def test_a_reply_forwarded_by_a_worker_killed_mid_forward_arrives_once(
    tmp_path: Path, db_url: str, redis_server: EmbeddedRedis, server: SmtpSink
) -> None:
    app = App.from_settings(make_settings(tmp_path, database_url=db_url))
    prepare(app)
    with session_scope(app.sessions) as session:
        update_definition(session, "political-prisoners", replies="relay")
    inbound_port = free_port()
    stack = Stack(
        tmp_path,
        db_url,
        redis_server.url,
        DEARMP_MAIL_BACKEND="smtp",
        SMTP_HOST="127.0.0.1",
        SMTP_PORT=str(server.port),
        SMTP_TIMEOUT="60",
        DEARMP_BOUNCE_DOMAIN="bounces.campaign.example.org",
        DEARMP_REPLY_DOMAIN="replies.campaign.example.org",
        DEARMP_INBOUND_PORT=str(inbound_port),
        DEARMP_DELIVERY_LEASE_SECONDS="5",
    )
    broker = RedisBroker(url=redis_server.url, namespace="dearmp")
    try:
        worker = stack.start("worker", "--processes", "1", "--threads", "2")
        stack.start("reconcile")
        stack.start("inbound")
        sid = submit(app, broker, submission())[0]
        assert wait_for(lambda: state_counts(app, [sid]) == {"delivered": 1}, 60)
        with session_scope(app.sessions) as session:
            letter = session.get(Letter, sid)
            assert letter is not None and letter.reply_to is not None
            message_id, mp, reply_to = letter.message_id, letter.to_email, letter.reply_to
        # The supporter's mail server stalls at RCPT: the forward is mid-conversation.
        server.rcpt_delay = 120
        server.rcpt_seen.clear()
        assert wait_for(lambda: _listening(inbound_port), 30)
        with smtplib.SMTP("127.0.0.1", inbound_port, timeout=30) as smtp:
            smtp.sendmail(mp, [reply_to], samples.human_reply(message_id, mp, reply_to))
        assert server.rcpt_seen.wait(60), stack.log_text()[-3000:]
        stack.kill(worker)
        server.rcpt_delay = 0
        stack.start("worker", "--processes", "1", "--threads", "2")

        def forwards() -> list[str]:
            return [
                str(m["Message-ID"])
                for m in server.received.messages
                if str(m["To"]) == SUPPORTER and "Reply to your letter" in str(m["Subject"])
            ]

        # Taken back after its lease (5 s) by the reconciler, and sent by the new worker.
        assert wait_for(lambda: len(forwards()) >= 1, 90), stack.log_text()[-3000:]
        assert wait_for(lambda: _notice_status(app) == "sent", 30)
        assert len(forwards()) == 1
        with session_scope(app.sessions) as session:
            notice = session.scalars(select(OutboxItem).where(OutboxItem.kind != "letter")).one()
            assert notice.attempts == 2
            assert session.scalars(select(InboundMessage.raw)).one() is None
    finally:
        stack.stop()
        app.engine.dispose()


def _notice_status(app: App) -> str | None:
    with session_scope(app.sessions) as session:
        return session.scalar(select(OutboxItem.status).where(OutboxItem.kind != "letter"))


def _listening(port: int) -> bool:
    import socket

    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False
