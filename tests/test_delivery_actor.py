"""The delivery actor on dramatiq's StubBroker: waiting is not failing, failing is recorded."""

from __future__ import annotations

import time
from dataclasses import replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import dramatiq
from sqlalchemy import select

from schemas.campaign import QuietHours, RateLimit
from tests.conftest import drain
from tests.factories import submission
from tests.services import SmtpSink, wait_for
from tests.test_providers import ProviderStub, http_mailer
from tests.test_smtp import mailer as smtp_mailer
from workers.database.engine import session_scope
from workers.database.models import OutboxItem, Submission
from workers.letters.definitions import update_definition
from workers.letters.rate_limits import UK
from workers.pipeline.app import App
from workers.pipeline.dispatch import submission_id_of
from workers.pipeline.runtime import state_counts, submit


def change_campaign(app: App, **changes: Any) -> None:
    """What an operator does by editing the campaign file and syncing it."""
    with session_scope(app.sessions) as session:
        update_definition(session, "political-prisoners", **changes)


def test_a_rate_limited_letter_waits_without_using_retries(
    app: App, stub_broker: Any, stub_worker: dramatiq.Worker
) -> None:
    change_campaign(app, rate_limit=RateLimit(per_mp=2, window_seconds=1))
    started = time.monotonic()
    ids = [submit(app, stub_broker, submission())[0] for _ in range(6)]
    drain(stub_broker, stub_worker)
    assert state_counts(app, ids) == {"delivered": 6}
    assert time.monotonic() - started >= 2.0  # six letters at two a second: three windows
    assert stub_broker.dead_letters == []
    with session_scope(app.sessions) as session:
        assert set(
            session.scalars(select(OutboxItem.attempts).where(OutboxItem.kind == "letter"))
        ) == {1}


def test_quiet_hours_defer_and_tell_the_reconciler_to_wait(
    app: App, stub_broker: Any, stub_worker: dramatiq.Worker
) -> None:
    # Quiet from an hour ago until three hours from now, whatever the time of day (UK time).
    now = datetime.now(UK)
    start, end = (f"{now + timedelta(hours=h):%H:%M}" for h in (-1, 3))
    change_campaign(app, quiet_hours=QuietHours(start=start, end=end))
    sid = submit(app, stub_broker, submission())[0]

    def deferred() -> bool:
        with session_scope(app.sessions) as session:
            sub, item = session.get(Submission, sid), session.get(OutboxItem, sid)
            # Rendered, and its letter not due until then: the reconciler leaves it.
            return (
                sub is not None
                and sub.state == "rendered"
                and item is not None
                and item.dispatched_at > item.created_at + timedelta(hours=1)
            )

    def held_until() -> float | None:  # the eta of the letter's deferred delivery message
        for consumer in stub_worker.consumers.values():
            for item in list(consumer.delay_queue.queue):
                if submission_id_of(item.message) == sid:
                    return float(item.message.options["eta"])
        return None

    assert wait_for(deferred, 15)
    assert wait_for(lambda: held_until() is not None, 15)
    assert (held_until() or 0) > time.time() * 1000 + 1000  # held until the quiet hours end
    with session_scope(app.sessions) as session:
        delivery = session.get(OutboxItem, sid)
        assert delivery is not None and (delivery.status, delivery.attempts) == ("pending", 0)
    assert stub_broker.dead_letters == []


def test_a_permanent_refusal_is_recorded_then_dead_lettered(
    app: App, stub_broker: Any, stub_worker: dramatiq.Worker, smtp_sink: SmtpSink, tmp_path: Path
) -> None:
    app.mailer = smtp_mailer(tmp_path, smtp_sink)
    smtp_sink.answer = "550 5.1.1 <mp@parliament.uk>: Recipient address rejected"
    sid = submit(app, stub_broker, submission())[0]
    drain(stub_broker, stub_worker)
    with session_scope(app.sessions) as session:
        sub = session.get(Submission, sid)
        assert sub is not None and sub.state == "failed"
        assert sub.failure_reason is not None and "550 5.1.1" in sub.failure_reason
    [dead] = stub_broker.dead_letters
    assert dead.actor_name == "deliver_submission" and dead.options.get("retries", 0) == 0


def test_retry_after_from_the_provider_is_honoured(
    app: App, stub_broker: Any, stub_worker: dramatiq.Worker, tmp_path: Path
) -> None:
    provider = ProviderStub()
    try:
        app.mailer = http_mailer(tmp_path, provider)
        provider.replies.append((429, {"Retry-After": "2"}, "{}"))
        started = time.monotonic()
        sid = submit(app, stub_broker, submission())[0]
        drain(stub_broker, stub_worker)
        waited = provider_times(provider)
        assert state_counts(app, [sid]) == {"delivered": 1}
        assert len(provider.requests) == 2 and waited >= 2.0
        assert time.monotonic() - started >= 2.0
    finally:
        provider.server.shutdown()


def provider_times(provider: ProviderStub) -> float:
    first, second = (r["at"] for r in provider.requests)
    return float(second - first)


def test_a_passing_refusal_is_a_warning_with_the_answer_not_an_error(
    app: App,
    stub_broker: Any,
    stub_worker: dramatiq.Worker,
    smtp_sink: SmtpSink,
    tmp_path: Path,
    caplog: Any,
) -> None:
    import logging

    from structlog.testing import capture_logs

    from tests.test_stages import through_render
    from workers.pipeline.dispatch import stage_message
    from workers.stages.stage import Stage

    app.mailer = smtp_mailer(tmp_path, smtp_sink)
    app.settings.outbox_backoff_seconds = 0.05  # the next attempt at once, then given up
    app.delivery_policy = replace(app.delivery_policy, max_attempts=2)
    smtp_sink.answer = "451 4.3.0 Try again later, Amira Haddad"  # it may quote the sender
    sid = through_render(app, submission())
    with caplog.at_level(logging.INFO), capture_logs() as logs:
        stub_broker.enqueue(stage_message(Stage.DELIVER, sid))
        drain(stub_broker, stub_worker)
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [], [r.getMessage() for r in errors]
    first, last = [e for e in logs if e["event"] == "outbox_failed"]
    assert first["log_level"] == "warning" and first["error"] == "TransientDeliveryError"
    assert first["answer"] == "451 4.3.0" and not first["final"] and "reason" not in first
    assert last["final"] and last["answer"] == "451 4.3.0"
    assert "Amira" not in repr(logs)
    assert state_counts(app, [sid]) == {"failed": 1}  # recorded, explained: no dead letter
    assert stub_broker.dead_letters == []
