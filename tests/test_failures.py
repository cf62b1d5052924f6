"""Failure recording: a dead-lettered message keeps its final traceback in the database."""

from __future__ import annotations

import threading
import time
from datetime import timedelta
from typing import Any

import dramatiq
import pytest
from dramatiq.middleware import Middleware
from sqlalchemy import select, text

from tests.conftest import drain
from tests.factories import submission
from workers.database.engine import session_scope
from workers.database.models import Failure
from workers.pipeline.app import App
from workers.pipeline.dispatch import stage_message
from workers.pipeline.failures import Attempt, record_failure
from workers.pipeline.runtime import submit
from workers.stages.stage import Stage


def dead_letter_record(app: App, message_id: str, timeout: float = 10.0) -> Failure | None:
    """The failure record of a message once it is dead-lettered (None if it is not in time)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with session_scope(app.sessions) as session:
            row = session.scalar(select(Failure).where(Failure.message_id == message_id))
        if row is not None and row.dead_lettered_at is not None:
            return row
        time.sleep(0.1)
    return None


class Enqueued(Middleware):
    """The options of every message as it goes to the broker."""

    def __init__(self) -> None:
        self.options: list[dict[str, Any]] = []

    def after_enqueue(self, broker: dramatiq.Broker, message: Any, delay: int | None) -> None:
        self.options.append(dict(message.options))


def test_the_final_failure_is_recorded_with_its_traceback(
    app: App, stub_broker: Any, stub_worker: dramatiq.Worker, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: Any) -> list[Stage]:
        raise RuntimeError("resolver exploded")

    # An unexpected bug in the resolution stage (the recorder is what is under test), and a
    # message with a short retry policy so that it dies quickly.
    monkeypatch.setattr("workers.stages.resolution.plan", broken)
    sent_back = Enqueued()
    stub_broker.add_middleware(sent_back)
    sid = "5e1d0000-0000-0000-0000-000000000001"
    message = stage_message(Stage.RESOLVE, sid)
    fast = message.copy(options={"max_retries": 2, "min_backoff": 10, "max_backoff": 20})
    stub_broker.enqueue(fast)
    row = dead_letter_record(app, fast.message_id)
    # The retries went back to the broker without dramatiq's traceback (it can quote data).
    assert {options.get("retries") for options in sent_back.options} == {None, 1, 2}
    assert all("traceback" not in options for options in sent_back.options)
    assert row is not None and row.dead_lettered_at is not None
    assert (row.actor_name, row.queue_name, row.submission_id) == (
        "resolve_submission",
        "dearmp.resolve",
        sid,
    )
    assert row.exception_type == "builtins.RuntimeError"
    assert row.exception_message == "resolver exploded"
    assert "in broken" in row.traceback and "resolver exploded" in row.traceback
    assert row.attempts == 3  # the first try and two retries
    assert row.first_failed_at < row.last_failed_at


def test_a_message_that_cannot_parse_is_recorded_as_dead_at_once(
    app: App, stub_broker: Any, stub_worker: dramatiq.Worker
) -> None:
    bad = stage_message(Stage.VALIDATE, "x").copy(args=({"v": 99, "submission_id": "x"},))
    stub_broker.enqueue(bad)
    drain(stub_broker, stub_worker)
    with session_scope(app.sessions) as session:
        row = session.scalar(select(Failure).where(Failure.message_id == bad.message_id))
    assert row is not None and row.dead_lettered_at is not None
    assert row.attempts == 1 and row.exception_type.endswith("ForeignMessage")


def test_a_message_past_its_maximum_age_is_dead_lettered_not_run(
    app: App, stub_broker: Any, stub_worker: dramatiq.Worker
) -> None:
    sid = submit(app, stub_broker, submission())[0]
    drain(stub_broker, stub_worker)
    stale = stage_message(Stage.RESOLVE, sid)
    stale = stale.copy(message_timestamp=stale.message_timestamp - 25 * 3_600_000)
    stub_broker.enqueue(stale)
    drain(stub_broker, stub_worker)
    assert [m.message_id for m in stub_broker.dead_letters] == [stale.message_id]


def test_a_submission_whose_stage_fails_every_time_ends_failed_and_is_not_resent(
    app: App, stub_broker: Any, stub_worker: dramatiq.Worker, monkeypatch: pytest.MonkeyPatch
) -> None:
    from datetime import timedelta

    from tests.test_stages import get, step, store
    from workers.database.models import State
    from workers.pipeline.reconciler import find_stalled
    from workers.stages.comparison import compare
    from workers.stages.resolution import resolve
    from workers.stages.validation import validate

    sid = store(app, submission())
    step(app, validate, sid)
    step(app, resolve, sid)
    step(app, compare, sid)

    def broken(*args: Any) -> Any:
        raise UnicodeEncodeError("utf-8", "A\ud800", 1, 2, "surrogates not allowed")

    monkeypatch.setattr("workers.stages.rendering.plan", broken)
    fast = {"max_retries": 1, "min_backoff": 10, "max_backoff": 20}
    for resend in range(3):  # the stage's message, then the reconciler's resends
        with session_scope(app.sessions) as session:
            due = find_stalled(session, timedelta(0), max_dead_letters=3)
        assert (sid, Stage.RENDER) in due
        message = stage_message(Stage.RENDER, sid).copy(options=fast)
        stub_broker.enqueue(message)
        assert dead_letter_record(app, message.message_id) is not None
        drain(stub_broker, stub_worker)
        expected = State.FAILED if resend == 2 else State.COMPARED
        assert get(app, sid).state == expected
    failed = get(app, sid)
    assert failed.failure_reason is not None
    assert "render stage failed 3 times" in failed.failure_reason
    assert "UnicodeEncodeError" in failed.failure_reason
    with session_scope(app.sessions) as session:
        assert (sid, Stage.RENDER) not in find_stalled(session, timedelta(0))


def _attempt(message_id: str, attempts: int, dead: bool) -> Attempt:
    return Attempt(
        message_id=message_id,
        queue_name=Stage.RENDER.queue,
        actor_name=Stage.RENDER.actor,
        submission_id=None,
        exception=RuntimeError(f"attempt {attempts}"),
        attempts=attempts,
        dead_lettered=dead,
    )


def _failure(app: App, message_id: str) -> Failure:
    with session_scope(app.sessions) as session:
        row = session.scalar(select(Failure).where(Failure.message_id == message_id))
    assert row is not None
    return row


def test_an_earlier_attempt_recorded_late_does_not_undo_the_dead_lettering(app: App) -> None:
    # The retry is queued before the first attempt is recorded, so it can be recorded first.
    with session_scope(app.sessions) as session:
        record_failure(session, _attempt("m-1", 2, dead=True))
    with session_scope(app.sessions) as session:
        record_failure(session, _attempt("m-1", 1, dead=False))
    row = _failure(app, "m-1")
    assert row.attempts == 2 and row.dead_lettered_at is not None
    assert row.exception_message == "attempt 2"


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)  # SQLite writers take turns
def test_two_attempts_of_one_message_recorded_at_the_same_time_both_land(app: App) -> None:
    """Both insert the message's row; the second waits for the first and updates it."""
    first = app.sessions()
    try:
        record_failure(first, _attempt("m-2", 1, dead=False))
        first.flush()  # inserted, not committed
        errors: list[BaseException] = []

        def last() -> None:
            try:
                with session_scope(app.sessions) as session:
                    record_failure(session, _attempt("m-2", 2, dead=True))
            except BaseException as exc:
                errors.append(exc)

        thread = threading.Thread(target=last)
        thread.start()
        wait_for_a_lock_wait(app)
        first.commit()
    finally:
        first.close()
    thread.join(timeout=30)
    assert not thread.is_alive() and errors == []
    row = _failure(app, "m-2")
    assert row.attempts == 2 and row.dead_lettered_at is not None


def wait_for_a_lock_wait(app: App, timeout: float = 10.0) -> None:
    """Until some PostgreSQL backend waits for a lock (the thread's insert waits for ours)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with app.engine.connect() as connection:
            waiting = connection.scalar(text("SELECT count(*) FROM pg_locks WHERE NOT granted"))
        if waiting:
            return
    raise AssertionError("nothing waited for the uncommitted insert")


def test_the_reconciler_refuses_an_option_it_does_not_take_at_start(app: App) -> None:
    """A wrong option fails once, at start, not in every pass (where it would only be logged)."""
    from workers.pipeline.reconciler import run_forever

    stop = threading.Event()
    stop.set()
    with pytest.raises(TypeError, match="lease_second"):
        run_forever(
            app.sessions, dramatiq.get_broker(), 1.0, stop, older_than=timedelta(0), lease_second=5
        )
