"""Messages that are not ours, on a real Redis with a real worker process: each is dead-lettered
at once with a recorded reason, the consumer keeps consuming, and nothing a sender put in a
message reaches the log."""

from __future__ import annotations

import json
from typing import Any

import pytest
import redis
from click.testing import CliRunner
from dramatiq import Message
from dramatiq.brokers.redis import RedisBroker
from sqlalchemy import select

from tests.factories import submission
from tests.services import wait_for
from tests.test_e2e_redis import Stack, wait_all_final
from tests.test_operations import cli
from tests.test_operations import ops as ops  # the fixture
from tests.test_operations import postcodes_port as postcodes_port  # its fixtures
from tests.test_sources import parliament as parliament
from workers.cli import main
from workers.database.engine import session_scope
from workers.database.models import Failure, State, Submission
from workers.pipeline.app import App
from workers.pipeline.dispatch import stage_message
from workers.pipeline.runtime import submit
from workers.stages.stage import Stage

pytestmark = [
    pytest.mark.redis,
    pytest.mark.smtp,
    pytest.mark.parametrize("db_url", ["sqlite"], indirect=True),
]
Ops = tuple[App, RedisBroker, Stack]


def failures(app: App) -> list[Failure]:
    with session_scope(app.sessions) as session:
        return list(session.scalars(select(Failure)))


def dead_letters() -> list[dict[str, Any]]:
    return list(json.loads(cli("dlq", "list", "--json")))


def in_progress() -> int:
    return sum(int(d["in_progress"]) for d in json.loads(cli("queues", "--json")))


def delivered(app: App, ids: list[str]) -> bool:
    with session_scope(app.sessions) as session:
        states = session.scalars(select(Submission.state).where(Submission.id.in_(ids))).all()
    return len(states) == len(ids) and all(s == State.DELIVERED for s in states)


def test_bytes_that_are_not_a_message_are_dead_lettered_and_the_rest_go_on(ops: Ops) -> None:
    app, broker, stack = ops
    client = redis.Redis.from_url(app.settings.resolved_redis_url)
    queue = f"dearmp:{Stage.VALIDATE.queue}"
    client.hset(f"{queue}.msgs", "junk-1", b"\xff\xfe\x00 not json at all")
    client.hset(f"{queue}.msgs", "junk-2", b'{"json": "but not a message"}')
    client.rpush(queue, "junk-1", "junk-2")
    ids = [submit(app, broker, submission())[0] for _ in range(3)]  # fetched with the junk
    assert wait_for(lambda: delivered(app, ids), 60), stack.log_text()[-3000:]
    assert wait_for(lambda: len(dead_letters()) == 2, 10)
    rows = dead_letters()
    assert {r["actor"] for r in rows} == {"(unreadable)"}
    assert all(r["reason"] and "UnreadableMessage" in r["reason"] for r in rows)
    assert wait_for(lambda: in_progress() == 0, 10)  # nothing stranded "in progress"
    assert "Consumer encountered" not in stack.log_text()
    # Listed, never requeued; purged with a record.
    requeue = CliRunner().invoke(main, ["dlq", "requeue", "--all", "--yes"])
    assert requeue.exit_code == 1, requeue.output  # none could be
    assert "cannot requeue" in requeue.stdout and "not a readable stage message" in requeue.stdout
    assert "requeued 0," in requeue.stdout
    cli("dlq", "purge", "--yes")
    assert dead_letters() == []


def test_arguments_of_the_wrong_shape_are_dead_lettered_at_once_with_a_reason(ops: Ops) -> None:
    app, broker, stack = ops
    sid = "5e1d0000-0000-4000-8000-000000000001"
    shapes = [
        stage_message(Stage.RESOLVE, sid).copy(args=({"v": 1, "submission_id": sid}, "extra")),
        stage_message(Stage.RESOLVE, sid).copy(kwargs={"surprise": True}),
        stage_message(Stage.RESOLVE, sid).copy(args=(["not", "a", "dict"],)),
        stage_message(Stage.RESOLVE, sid).copy(args=()),
        # An id made of a name and an address, and one of ten megabytes.
        stage_message(Stage.RENDER, sid).copy(
            args=({"v": 1, "submission_id": "Amira Haddad, 12 Mill Lane, DM1 1AA"},)
        ),
        stage_message(Stage.RENDER, sid).copy(args=({"v": 1, "submission_id": "Q" * 10_000_000},)),
    ]
    for message in shapes:
        broker.enqueue(message)
    wanted = {m.message_id for m in shapes}

    def recorded() -> dict[str, Failure]:
        return {f.message_id: f for f in failures(app) if f.message_id in wanted}

    assert wait_for(lambda: len(recorded()) == len(shapes), 60), stack.log_text()[-3000:]
    assert wait_for(lambda: all(f.dead_lettered_at for f in recorded().values()), 10), [
        (f.exception_type, f.exception_message, f.attempts, f.dead_lettered_at)
        for f in recorded().values()
    ]
    for failure in recorded().values():
        assert failure.attempts == 1  # not retried
        assert failure.exception_type.endswith("ForeignMessage")
        assert failure.submission_id in {None, sid}  # an id of the wrong shape is not taken
    # The worker goes on with real work.
    ids = [submit(app, broker, submission())[0]]
    assert wait_all_final(app, ids, 60)
    log = stack.log_text()
    assert "Amira" not in log and "Mill Lane" not in log and "QQQQQQQQ" not in log


def test_an_unknown_actor_and_an_old_message_are_dead_lettered_with_reasons(ops: Ops) -> None:
    _, broker, stack = ops
    unknown: Message[Any] = Message(
        queue_name=Stage.VALIDATE.queue,
        actor_name="no_such_actor",
        args=({"v": 1, "submission_id": "5e1d0000-0000-4000-8000-000000000002"},),
        kwargs={},
        options={},
    )
    old = stage_message(Stage.RESOLVE, "5e1d0000-0000-4000-8000-000000000003")
    old = old.copy(message_timestamp=old.message_timestamp - 25 * 3_600_000)
    broker.enqueue(unknown)
    broker.enqueue(old)
    # An unknown actor's message is recorded once the consumer has dead-lettered it (after_nack):
    # Redis lists it a moment before the database gives its reason.
    assert wait_for(
        lambda: len(rows := dead_letters()) == 2 and all(r["reason"] for r in rows), 60
    ), stack.log_text()[-3000:]
    reasons = {r["message_id"]: r["reason"] for r in dead_letters()}
    assert reasons[unknown.message_id].endswith("ActorNotFound")
    assert reasons[old.message_id].endswith("MessageTooOld")
