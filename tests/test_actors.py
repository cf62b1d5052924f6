"""The actors through dramatiq's StubBroker and a real Worker: serialisation, fan-out, retries."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import dramatiq
import pytest
from sqlalchemy import func, select

from tests.conftest import drain
from tests.factories import submission
from workers.database.engine import session_scope
from workers.database.models import ConsentEvent, OutboxItem, State, Submission
from workers.pipeline.app import App
from workers.pipeline.dispatch import stage_message
from workers.pipeline.runtime import state_counts, submit
from workers.stages.stage import Stage


def test_valid_and_invalid_submissions_reach_final_states(
    app: App, stub_broker: Any, stub_worker: dramatiq.Worker
) -> None:
    ids = [submit(app, stub_broker, submission())[0] for _ in range(5)]
    ids += [submit(app, stub_broker, submission(supporter__email="bad"))[0]]
    ids += [submit(app, stub_broker, submission(supporter__postcode="DM9 9XX"))[0]]
    drain(stub_broker, stub_worker)
    assert state_counts(app, ids) == {"delivered": 5, "rejected": 2}
    assert len(list(app.settings.resolved_outbox_dir.glob("*.eml"))) == 5
    assert stub_broker.dead_letters == []  # bad input is an outcome, not a dead letter


def test_consent_is_logged_for_every_valid_submission_even_when_no_letter_goes(
    app: App, stub_broker: Any, stub_worker: dramatiq.Worker
) -> None:
    with session_scope(app.sessions) as session:
        from workers.database.models import Constituency

        for seat in session.scalars(
            select(Constituency).where(Constituency.gss_code == "N05900006")
        ):
            seat.member_id = None  # the seat is vacant (the worker is already running)
    ok = submit(app, stub_broker, submission())[0]
    vacant = submit(app, stub_broker, submission(supporter__postcode="DM6 1AA"))[0]
    drain(stub_broker, stub_worker)
    # The sample campaign holds letters to a vacant seat until the seat has an MP again.
    assert state_counts(app, [ok, vacant]) == {"delivered": 1, "held": 1}
    with session_scope(app.sessions) as session:
        logged = session.scalars(select(ConsentEvent.submission_id).distinct()).all()
    assert set(logged) == {ok, vacant}


def test_every_actor_run_twice_on_the_same_message_has_no_second_effect(
    app: App, stub_broker: Any, stub_worker: dramatiq.Worker
) -> None:
    sid = submit(app, stub_broker, submission())[0]
    drain(stub_broker, stub_worker)
    for stage in Stage:
        stub_broker.enqueue(stage_message(stage, sid))
        stub_broker.enqueue(stage_message(stage, sid))
    drain(stub_broker, stub_worker)
    with session_scope(app.sessions) as session:
        sub = session.get(Submission, sid)
        assert sub is not None and sub.state == State.DELIVERED
        assert [e.state for e in sub.events].count("delivered") == 1
        delivery = session.get(OutboxItem, sid)
        assert delivery is not None and delivery.attempts == 1
        assert session.scalar(select(func.count()).select_from(ConsentEvent)) == 5
    assert len(list(app.settings.resolved_outbox_dir.glob("*.eml"))) == 1


def test_duplicate_submission_gives_one_letter(
    app: App, stub_broker: Any, stub_worker: dramatiq.Worker
) -> None:
    payload = submission()
    first, created = submit(app, stub_broker, payload)
    again, created_again = submit(app, stub_broker, payload)
    drain(stub_broker, stub_worker)
    assert (first, created, created_again) == (again, True, False)
    assert len(list(app.settings.resolved_outbox_dir.glob("*.eml"))) == 1


def test_a_malformed_stage_message_is_dead_lettered_at_once_not_retried(
    app: App, stub_broker: Any, stub_worker: dramatiq.Worker
) -> None:
    message = stage_message(Stage.VALIDATE, "x")
    stub_broker.enqueue(message.copy(args=({"v": 99, "submission_id": "x"},)))
    drain(stub_broker, stub_worker)
    dead = stub_broker.dead_letters
    assert len(dead) == 1 and dead[0].options.get("retries", 0) == 0


def test_unknown_submission_id_is_a_no_op(
    app: App, stub_broker: Any, stub_worker: dramatiq.Worker, tmp_path: Path
) -> None:
    for stage in Stage:
        stub_broker.enqueue(stage_message(stage, "00000000-0000-0000-0000-000000000000"))
    drain(stub_broker, stub_worker)
    assert stub_broker.dead_letters == []


@pytest.mark.parametrize("stage", [Stage.DELIVER, Stage.OUTBOX, Stage.WEBHOOK, Stage.VALIDATE])
def test_a_long_wait_never_makes_its_own_message_too_old_to_run(
    app: App, stub_broker: Any, stage: Stage
) -> None:
    """A month under a per-MP limit: the wait goes in hops (each a deferral again, costing no
    retry), never one message whose age at arrival is past its stage's max_age (dramatiq would
    skip it as too old, a dead letter; three of them failed the letter)."""
    from dramatiq.common import dq_name

    from workers.pipeline.actors import settle
    from workers.pipeline.states import STAGES
    from workers.stages.stage import Deferred

    month = Deferred(30 * 24 * 3600, "rate limit")
    settle(stage, ["s1"], [("s1", month)], app, stub_broker, alone=True)
    (raw,) = stub_broker.queues[dq_name(stage.queue)].queue
    message = dramatiq.Message.decode(raw)
    waited = message.options["eta"] - message.message_timestamp
    # The eta is read a moment after the message's timestamp: a second of slack, no more.
    half = STAGES[stage].max_age // 2
    assert half - 1000 < waited <= half + 1000 < STAGES[stage].max_age


def test_passing_trouble_sends_the_message_again_in_a_moment_costing_no_retry(
    app: App, stub_broker: Any
) -> None:
    """The database away while messages waited: each was retried by dramatiq until it was
    dead-lettered (200 in a 45 s outage), though the outage was nobody's failure."""
    from dramatiq.common import dq_name
    from sqlalchemy.exc import OperationalError

    from workers.pipeline.actors import PASSING_WAIT_MS, settle

    away = OperationalError("SELECT", {}, Exception("the database system is shutting down"))
    settle(Stage.VALIDATE, ["s1"], [("s1", away)], app, stub_broker, alone=True)  # no raise
    (raw,) = stub_broker.queues[dq_name(Stage.VALIDATE.queue)].queue
    message = dramatiq.Message.decode(raw)
    assert "retries" not in message.options
    assert message.options["eta"] - message.message_timestamp >= PASSING_WAIT_MS - 1000


def test_trouble_that_does_not_pass_in_a_minute_costs_retries_again(
    app: App, stub_broker: Any
) -> None:
    """Each wait is counted on the message; after PASSING_WAITS in a row (a lock timeout on one
    submission is an OperationalError too) dramatiq's retries count, and a dead letter ends it."""
    from dramatiq.common import dq_name
    from dramatiq.middleware import CurrentMessage
    from sqlalchemy.exc import OperationalError

    from workers.pipeline.actors import PASSING_WAITS, WAITED, settle
    from workers.pipeline.dispatch import stage_message

    away = OperationalError("SELECT", {}, Exception("canceling statement due to lock timeout"))
    tracker = CurrentMessage()
    waited = stage_message(Stage.VALIDATE, "s1")
    tracker.before_process_message(stub_broker, waited.copy(options={WAITED: 3}))
    try:
        settle(Stage.VALIDATE, ["s1"], [("s1", away)], app, stub_broker, alone=True)
        (raw,) = stub_broker.queues[dq_name(Stage.VALIDATE.queue)].queue
        assert dramatiq.Message.decode(raw).options[WAITED] == 4
        tracker.before_process_message(stub_broker, waited.copy(options={WAITED: PASSING_WAITS}))
        with pytest.raises(OperationalError):
            settle(Stage.VALIDATE, ["s1"], [("s1", away)], app, stub_broker, alone=True)
    finally:
        tracker.after_process_message(stub_broker, waited)


def test_passing_trouble_before_any_outcome_is_waited_out_too(app: App, stub_broker: Any) -> None:
    """The sending stages' first read (the outbox's items) met the database away: that cost a
    retry of dramatiq's (47 in a 90 s outage)."""
    from dramatiq.common import dq_name
    from sqlalchemy.exc import OperationalError

    from schemas.messages import stage_payload
    from workers.pipeline.actors import WAITED, run_stage

    def away(app: App, ids: list[str], send_on: Any) -> list[Any]:
        raise OperationalError("SELECT", {}, Exception("connection refused"))

    ids = [str(uuid.uuid4()), str(uuid.uuid4())]
    run_stage(Stage.DELIVER, stage_payload(ids), away, app, stub_broker, print)
    queued = stub_broker.queues[dq_name(Stage.DELIVER.queue)].queue
    assert sorted(dramatiq.Message.decode(raw).options[WAITED] for raw in queued) == [1, 1]
