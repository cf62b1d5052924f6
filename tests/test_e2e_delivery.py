"""Delivery end to end with real worker processes, a real Redis and a real SMTP server.

Exactly one letter per submission when a worker is killed mid-delivery, and rate limits that
hold across processes without costing a retry or producing a dead letter.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from dramatiq.brokers.redis import RedisBroker
from sqlalchemy import func, select

from tests.conftest import make_settings
from tests.factories import submission
from tests.services import SmtpSink, wait_for
from tests.test_e2e_redis import Stack, wait_all_final
from workers.database.engine import session_scope
from workers.database.models import OutboxItem
from workers.pipeline.app import App
from workers.pipeline.dead_letters import dead_letters as redis_dead_letters
from workers.pipeline.embedded_redis import EmbeddedRedis
from workers.pipeline.runtime import prepare, submit

pytestmark = [pytest.mark.redis, pytest.mark.smtp]


@pytest.fixture
def setup(
    tmp_path: Path, db_url: str, redis_server: EmbeddedRedis, smtp_sink: SmtpSink
) -> Iterator[tuple[App, Any, dict[str, str]]]:
    app = App.from_settings(make_settings(tmp_path, database_url=db_url))
    prepare(app)
    env = {
        "DEARMP_MAIL_BACKEND": "smtp",
        "SMTP_HOST": "127.0.0.1",
        "SMTP_PORT": str(smtp_sink.port),
        "SMTP_TIMEOUT": "20",
    }
    yield app, RedisBroker(url=redis_server.url, namespace="dearmp"), env
    app.engine.dispose()


@pytest.fixture
def make_stack(
    setup: tuple[App, Any, dict[str, str]], tmp_path: Path, db_url: str, redis_server: EmbeddedRedis
) -> Iterator[Any]:
    """Build the worker stack for this test with extra settings; it is always stopped after."""
    stacks: list[Stack] = []

    def make(**env: str) -> Stack:
        stacks.append(Stack(tmp_path, db_url, redis_server.url, **(setup[2] | env)))
        return stacks[-1]

    yield make
    for stack in stacks:
        stack.stop()


def dead_letters(server: EmbeddedRedis) -> int:
    return len(redis_dead_letters(redis.Redis.from_url(server.url), "dearmp"))


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_worker_killed_mid_delivery_still_gives_exactly_one_letter_each(
    setup: tuple[App, Any, dict[str, str]],
    make_stack: Any,
    db_url: str,
    redis_server: EmbeddedRedis,
    smtp_sink: SmtpSink,
) -> None:
    app, broker, _ = setup
    stack = make_stack(DEARMP_DELIVERY_LEASE_SECONDS="5")
    smtp_sink.rcpt_delay = 30  # the first worker's letters hang inside the SMTP transaction
    doomed = stack.start("worker", "--processes", "1", "--threads", "2")
    stack.start("reconcile")
    ids = [submit(app, broker, submission())[0] for _ in range(6)]
    # A recipient seen: that letter's claim is committed (a claim is committed before sending).
    assert smtp_sink.rcpt_seen.wait(60), stack.log_text()[-2000:]
    stack.kill(doomed)  # SIGKILL in the middle of delivery: claimed, not finished
    with session_scope(app.sessions) as session:
        in_flight = session.scalar(
            select(func.count())
            .select_from(OutboxItem)
            .where(OutboxItem.status == "sending", OutboxItem.kind == "letter")
        )
    assert in_flight and in_flight >= 1
    smtp_sink.rcpt_delay = 0
    stack.start("worker", "--processes", "1", "--threads", "2")
    assert wait_all_final(app, ids, timeout=120) == {"delivered": 6}, stack.log_text()[-3000:]
    assert smtp_sink.received.count() == 6
    assert sorted(smtp_sink.received.message_ids()) == sorted(
        f"<{sid}@campaign.example.org>" for sid in ids
    )
    with session_scope(app.sessions) as session:
        retried = session.scalar(
            select(func.count())
            .select_from(OutboxItem)
            .where(OutboxItem.attempts > 1, OutboxItem.kind == "letter")
        )
    assert retried == in_flight  # the killed claims were taken over after their lease


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_rate_limit_holds_across_worker_processes(
    setup: tuple[App, Any, dict[str, str]],
    make_stack: Any,
    db_url: str,
    redis_server: EmbeddedRedis,
    smtp_sink: SmtpSink,
) -> None:
    # 500 letters at 50 a minute, with the window scaled to 3 s to fit in CI.
    limit, window, letters = 50, 3.0, 500
    app, broker, _ = setup
    stack = make_stack(DEARMP_MP_LIMIT=str(limit), DEARMP_MP_LIMIT_WINDOW=str(window))
    stack.start("worker", "--processes", "3", "--threads", "4")
    stack.start("reconcile")
    ids = [
        submit(app, broker, submission(supporter__postcode="DM1 1AA"))[0] for _ in range(letters)
    ]
    counts = wait_all_final(app, ids, timeout=240)
    assert counts == {"delivered": letters}, stack.log_text()[-3000:]
    arrivals = sorted(smtp_sink.arrivals)
    assert len(arrivals) == letters
    busiest = max(
        sum(1 for t in arrivals[i:] if t < start + window) for i, start in enumerate(arrivals)
    )
    assert busiest <= limit, f"{busiest} letters within {window}s"
    assert (arrivals[-1] - arrivals[0]) >= (letters / limit - 1) * window
    assert dead_letters(redis_server) == 0
    with session_scope(app.sessions) as session:
        assert session.scalar(select(func.max(OutboxItem.attempts))) == 1  # no retry used up
    assert '"event": "stage_deferred"' in stack.log_text()


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_crashed_workers_message_is_finished_by_another_within_60_seconds(
    setup: tuple[App, Any, dict[str, str]],
    make_stack: Any,
    db_url: str,
    redis_server: EmbeddedRedis,
    smtp_sink: SmtpSink,
) -> None:
    """No reconciler here: the broker itself must hand the dead worker's message on."""
    app, broker, _ = setup
    stack = make_stack(DEARMP_DELIVERY_LEASE_SECONDS="5")
    smtp_sink.rcpt_delay = 60
    doomed = stack.start("worker", "--processes", "1", "--threads", "1")
    [sid] = [submit(app, broker, submission())[0]]
    assert smtp_sink.rcpt_seen.wait(60), stack.log_text()[-2000:]
    stack.kill(doomed)
    killed_at = time.monotonic()
    smtp_sink.rcpt_delay = 0
    stack.start("worker", "--processes", "1", "--threads", "2")
    assert wait_for(lambda: smtp_sink.received.count() == 1, 90, 0.2), stack.log_text()[-4000:]
    recovered_in = time.monotonic() - killed_at
    assert wait_all_final(app, [sid], timeout=10) == {"delivered": 1}
    assert recovered_in < 60, f"took {recovered_in:.1f}s\n{stack.log_text()[-4000:]}"
    print(f"crash recovery: {recovered_in:.1f}s from SIGKILL to the letter delivered")
