"""Stage messages about several submissions (version 2): what one stage moved together goes on
in one message, and a submission that fails in a group goes on alone with its own retries."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import dramatiq
import pytest
from dramatiq.middleware import Middleware
from sqlalchemy import event, select, update

from schemas.messages import (
    MAX_IDS,
    NotAStageMessage,
    StageMessage,
    parse_stage_message,
    stage_payload,
)
from tests.conftest import drain
from tests.factories import send_letters, submission
from tests.services import SmtpSink, free_port, wait_for
from tests.test_smtp import mailer as smtp_mailer
from tests.test_sources import parliament, sources  # noqa: F401  (the Members API fixture)
from tests.test_stages import through_render
from workers.database.engine import session_scope
from workers.database.models import Failure, OutboxItem, Submission, utcnow
from workers.letters.mail import OutboxMailer, Outgoing
from workers.pipeline.app import App
from workers.pipeline.dispatch import dispatch_groups, stage_message, submission_id_of
from workers.pipeline.intake import accept
from workers.pipeline.runtime import state_counts
from workers.stages.stage import Stage


class Sent(Middleware):
    """Records every stage message enqueued: (queue, how many submissions it carries)."""

    def __init__(self) -> None:
        self.messages: list[tuple[str, list[str]]] = []

    def before_enqueue(self, broker: dramatiq.Broker, message: Any, delay: Any) -> None:
        if message.args and isinstance(message.args[0], dict):
            self.messages.append((message.queue_name, parse_stage_message(message.args[0]).ids))

    def to(self, stage: Stage) -> list[list[str]]:
        """The groups sent to ``stage``, each in the order of its ids (a stage's order)."""
        return [sorted(ids) for queue, ids in self.messages if queue == stage.queue]


@pytest.fixture
def sent(stub_broker: Any) -> Any:
    recorder = Sent()
    stub_broker.add_middleware(recorder)
    yield recorder
    stub_broker.middleware.remove(recorder)


def store(app: App, count: int, **changes: Any) -> list[str]:
    with session_scope(app.sessions) as session:
        return [
            accept(
                session,
                submission(**({"supporter__email": f"s{i}@example.com"} | changes)),
                app.secret,
            ).submission_id
            for i in range(count)
        ]


def uid(n: int) -> str:
    return f"00000000-0000-4000-8000-{n:012d}"


A, B, C = uid(1), uid(2), uid(3)


def test_version_1_is_unchanged_and_version_2_carries_up_to_64() -> None:
    assert stage_payload([A]) == {"v": 1, "submission_id": A}
    assert stage_payload([A, B]) == {"v": 2, "submission_id": A, "also": [B]}
    assert parse_stage_message({"v": 1, "submission_id": A}) == StageMessage(submission_id=A)
    assert parse_stage_message(stage_payload([A, B, C])).ids == [A, B, C]
    for bad in (
        {"v": 2, "submission_id": A, "also": []},
        {"v": 2, "submission_id": A, "also": [B] * MAX_IDS},
        {"v": 1, "submission_id": A, "also": [B]},
        {"v": 2, "submission_id": A, "also": [""]},
        {"v": 1, "submission_id": "Amira Haddad, 12 Mill Lane"},  # not an id's shape
        {"v": 1, "submission_id": "ABCDEF00-0000-4000-8000-000000000001"},
    ):
        with pytest.raises(NotAStageMessage):
            parse_stage_message(bad)
    with pytest.raises(ValueError):
        stage_payload([])
    message = stage_message(Stage.RESOLVE, A, B)
    assert submission_id_of(message) == A


def test_groups_are_split_to_each_stages_size(stub_broker: Any, sent: Sent) -> None:
    ids = [uid(i) for i in range(70)]
    assert dispatch_groups(stub_broker, {Stage.RESOLVE: ids, Stage.DELIVER: ids[:20]})
    assert [len(group) for group in sent.to(Stage.RESOLVE)] == [64, 6]
    assert [len(group) for group in sent.to(Stage.DELIVER)] == [16, 4]
    assert dispatch_groups(stub_broker, {Stage.NOTIFY: [A, B]})
    assert sent.to(Stage.NOTIFY) == [[A], [B]]


def test_a_group_moves_on_together_and_bad_input_is_still_a_rejection(
    app: App, stub_broker: Any, stub_worker: dramatiq.Worker, sent: Sent
) -> None:
    good = sorted(store(app, 5))  # a stage handles its group in the order of the ids
    bad = store(app, 1, supporter__email="not an address")
    stub_broker.enqueue(stage_message(Stage.VALIDATE, *good, *bad))
    drain(stub_broker, stub_worker)
    assert state_counts(app, good + bad) == {"delivered": 5, "rejected": 1}
    # One group message on to each next stage: the five valid ones, together.
    assert sent.to(Stage.RESOLVE) == [good] and sent.to(Stage.CONSENT) == [good]
    assert sent.to(Stage.RENDER) == [good] and sent.to(Stage.DELIVER) == [good]
    assert len(list(app.settings.resolved_outbox_dir.glob("*.eml"))) == 5
    assert stub_broker.dead_letters == []
    # The same group again: nothing is sent twice, nothing moves.
    stub_broker.enqueue(stage_message(Stage.VALIDATE, *good, *bad))
    for stage in (Stage.RESOLVE, Stage.RENDER, Stage.DELIVER, Stage.CONSENT):
        stub_broker.enqueue(stage_message(stage, *good))
    drain(stub_broker, stub_worker)
    assert len(list(app.settings.resolved_outbox_dir.glob("*.eml"))) == 5
    assert state_counts(app, good + bad) == {"delivered": 5, "rejected": 1}


@pytest.mark.parametrize("size", [1, 4])
def test_a_refused_letter_fails_at_once_and_is_dead_lettered_under_its_own_id(
    app: App,
    stub_broker: Any,
    stub_worker: dramatiq.Worker,
    smtp_sink: SmtpSink,
    tmp_path: Path,
    sent: Sent,
    size: int,
) -> None:
    """Alone or in a group, the same: the refusal is recorded on the submission the first time
    (no second attempt at a server that said no), and an operator finds one dead letter for
    it, which names it alone; the rest of its group is delivered."""
    app.mailer = smtp_mailer(tmp_path, smtp_sink)
    smtp_sink.refuse["priya.nandakumar.mp@mp.example.org"] = "550 5.1.1 No such mailbox"
    fine = store(app, size - 1)
    refused = store(app, 1, supporter__postcode="DM2 1AA")  # Harrowgate Sands: Priya
    stub_broker.enqueue(stage_message(Stage.VALIDATE, *fine, *refused))
    drain(stub_broker, stub_worker)
    assert state_counts(app, fine) == ({"delivered": size - 1} if fine else {})
    assert state_counts(app, refused) == {"failed": 1}
    assert smtp_sink.received.count() == size - 1
    with session_scope(app.sessions) as session:
        failed = session.get(Submission, refused[0])
        delivery = session.get(OutboxItem, refused[0])
        assert failed is not None and failed.state == "failed"
        assert failed.failure_reason is not None and "550 5.1.1" in failed.failure_reason
        assert delivery is not None and (delivery.status, delivery.attempts) == ("failed", 1)
    with session_scope(app.sessions) as session:
        [dead] = session.scalars(select(Failure).where(Failure.dead_lettered_at.is_not(None)))
        session.expunge(dead)
    assert (dead.actor_name, dead.submission_id) == ("deliver_submission", refused[0])
    assert "PermanentDeliveryError" in dead.exception_type
    assert sent.to(Stage.DELIVER) == [sorted(fine + refused)]


def test_a_live_lookup_that_fails_one_submission_sends_only_that_one_alone(
    app: App,
    stub_broker: Any,
    stub_worker: dramatiq.Worker,
    parliament: Any,  # noqa: F811
    sent: Sent,
) -> None:
    app.settings.resolution_order = "local,live"
    app.live_sources = sources(f"http://127.0.0.1:{free_port()}", parliament[1].url)
    local = store(app, 2)
    unknown = store(app, 1, supporter__postcode="AB10 1AB")  # not in the sample directory
    stub_broker.enqueue(stage_message(Stage.VALIDATE, *local, *unknown))
    assert wait_for(lambda: state_counts(app, local) == {"delivered": 2}, 30)
    assert wait_for(lambda: unknown in sent.to(Stage.RESOLVE), 10)
    assert sent.to(Stage.RESOLVE)[0] == sorted(local + unknown)
    with session_scope(app.sessions) as session:
        state = session.scalar(select(Submission.state).where(Submission.id == unknown[0]))
    assert state == "validated"  # waiting for its own retries, not lost


def test_the_http_intake_sends_a_committed_batch_as_one_validation_message(
    app: App, stub_broker: Any, sent: Sent
) -> None:
    from workers.database.models import State
    from workers.web.batcher import IntakeBatcher

    batcher = IntakeBatcher(lambda: app, stub_broker)
    batcher._dispatch([(A, State.RECEIVED), (B, State.RECEIVED), (C, State.UNCONFIRMED)])
    assert sent.to(Stage.VALIDATE) == [sorted([A, B])]
    assert sent.to(Stage.NOTIFY) == [[C]]  # a confirmation email is one message each


class Interrupted(BaseException):
    """Like dramatiq's time limit: not an Exception."""


class Counting:
    """The outbox, counting letters, and interrupted at the letter ``stop_at`` (from 1)."""

    name = "outbox"

    def __init__(self, outbox: OutboxMailer, stop_at: int = 0) -> None:
        self.outbox, self.stop_at, self.count = outbox, stop_at, 0

    def waiting(self) -> float:
        return 0.0

    def close(self) -> None:
        pass

    def send(self, mail: Outgoing) -> str:
        self.count += 1
        if self.count == self.stop_at:
            raise Interrupted()
        return self.outbox.send(mail)


def _commits(app: App) -> list[int]:
    counted = [0]

    def count(_conn: Any) -> None:
        counted[0] += 1

    event.listen(app.engine, "commit", count)
    return counted


def test_each_letter_of_a_group_is_recorded_in_a_commit_of_its_own(app: App) -> None:
    ids = [through_render(app, submission(supporter__email=f"s{i}@example.com")) for i in range(6)]
    commits = _commits(app)
    outcomes = send_letters(app.sessions, ids, app.mailer)
    assert sorted(outcomes) == sorted((sid, None) for sid in ids)
    # The group's claims, then each letter's item marked sent, then the moves to delivered.
    assert commits[0] == 1 + 6 + 1
    assert state_counts(app, ids) == {"delivered": 6}
    assert len(list(app.settings.resolved_outbox_dir.glob("*.eml"))) == 6


def test_a_letter_of_a_group_that_another_worker_holds_is_left_to_it(app: App) -> None:
    ids = sorted(
        through_render(app, submission(supporter__email=f"s{i}@example.com")) for i in range(4)
    )
    with session_scope(app.sessions) as session:  # another worker's live claim on one of them
        session.execute(
            update(OutboxItem)
            .where(OutboxItem.id == ids[1])
            .values(status="sending", claimed_at=utcnow())
        )
    mailer = Counting(OutboxMailer(app.settings.resolved_outbox_dir))
    outcomes = send_letters(app.sessions, ids, mailer)
    assert dict(outcomes) == dict.fromkeys(ids)  # the held one: nothing to do here
    assert mailer.count == 3
    assert state_counts(app, [ids[1]]) == {"rendered": 1}  # still the other worker's
    assert state_counts(app, ids[:1] + ids[2:]) == {"delivered": 3}


def test_a_group_interrupted_mid_send_records_the_letters_it_sent(app: App) -> None:
    ids = [through_render(app, submission(supporter__email=f"s{i}@example.com")) for i in range(5)]
    ids.sort()  # the order a group is sent in
    mailer = Counting(OutboxMailer(app.settings.resolved_outbox_dir), stop_at=4)
    with pytest.raises(Interrupted):
        send_letters(app.sessions, ids, mailer)
    assert state_counts(app, ids[:3]) == {"delivered": 3}  # each recorded as it was sent
    assert state_counts(app, ids[3:]) == {"rendered": 2}  # claimed: taken back after the lease
    with session_scope(app.sessions) as session:
        statuses = [session.get(OutboxItem, sid).status for sid in ids]  # type: ignore[union-attr]
    assert statuses == ["sent"] * 3 + ["sending"] * 2


def test_a_move_that_fails_after_the_send_leaves_the_sent_mark_and_is_made_again(
    app: App, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The letter's sent mark commits alone, the moment the server took it; if the move to
    delivered then fails, the message's retry (or the reconciler's resend of a rendered
    submission whose letter is no longer waiting) makes the move, sending nothing."""
    sid = through_render(app, submission())
    mailer = Counting(OutboxMailer(app.settings.resolved_outbox_dir))

    def fails(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("the move failed")

    monkeypatch.setattr("workers.stages.delivery.advance", fails)
    [(_, error)] = send_letters(app.sessions, [sid], mailer)
    assert isinstance(error, RuntimeError)
    monkeypatch.undo()
    with session_scope(app.sessions) as session:
        assert session.get(OutboxItem, sid).status == "sent"  # type: ignore[union-attr]
    assert state_counts(app, [sid]) == {"rendered": 1}
    # The retry (or a duplicate message) moves it and sends nothing.
    assert send_letters(app.sessions, [sid], mailer) == [(sid, None)]
    assert state_counts(app, [sid]) == {"delivered": 1}
    assert mailer.count == 1


def test_the_reconciler_resends_a_sent_letter_whose_move_was_lost_and_not_one_that_waits(
    app: App,
) -> None:
    """A worker that dies between a letter's sent mark and its move leaves a rendered
    submission whose letter is sent: the reconciler resends it to delivery, which moves it and
    sends nothing. A letter waiting in the outbox (its backoff, quiet hours) is the outbox's
    to resend when it is due, not the reconciler's by its state."""
    from datetime import timedelta

    from workers.pipeline.reconciler import find_stalled

    sent, waiting = (
        through_render(app, submission(supporter__email=f"s{i}@example.com")) for i in range(2)
    )
    long_ago = utcnow() - timedelta(hours=1)
    with session_scope(app.sessions) as session:
        session.execute(update(Submission).values(dispatched_at=long_ago))
        session.execute(
            update(OutboxItem).where(OutboxItem.id == sent).values(status="sent", sent_at=long_ago)
        )
        later = utcnow() + timedelta(hours=1)
        session.execute(
            update(OutboxItem).where(OutboxItem.id == waiting).values(next_attempt_at=later)
        )
    with session_scope(app.sessions) as session:
        resent = find_stalled(session, timedelta(minutes=5))
    assert [(sid, stage) for sid, stage in resent if stage != Stage.CONSENT] == [
        (sent, Stage.DELIVER)
    ]  # (their consent is not logged: through_render skips it)
    mailer = Counting(OutboxMailer(app.settings.resolved_outbox_dir))
    assert send_letters(app.sessions, [sent], mailer) == [(sent, None)]
    assert state_counts(app, [sent]) == {"delivered": 1} and mailer.count == 0
