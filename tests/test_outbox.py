"""The outbox: every email to a supporter (confirmations and their reminders, bounce notices,
forwarded replies, surveys and their reminders) claimed, sent once, retried with backoff, given
up with its reason masked, and taken over after the lease, one way for every kind; on SQLite
and PostgreSQL."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import dramatiq
import pytest
from alembic import command
from click.testing import CliRunner
from dramatiq.common import dq_name
from sqlalchemy import create_engine, select, text, update
from sqlalchemy.exc import OperationalError
from structlog.testing import capture_logs

from schemas.messages import stage_payload
from tests import mail_samples as samples
from tests.conftest import drain, make_settings, serving
from tests.factories import submission
from tests.test_after_sent import BOUNCES, REPLIES, SUPPORTER, deliver, letter_of, relay
from workers.cli import main as cli
from workers.database.engine import alembic_config, session_scope
from workers.database.models import InboundMessage, OutboxItem, State, Submission, utcnow
from workers.letters.definitions import update_definition
from workers.letters.mail import (
    OUT_OF_STEP_WAIT,
    Mailer,
    Outgoing,
    PermanentDeliveryError,
    TransientDeliveryError,
)
from workers.outbox import sending as outbox
from workers.outbox.kinds import KINDS
from workers.pipeline.actors import WORK, outbox_for, run_stage
from workers.pipeline.app import App
from workers.pipeline.intake import accept
from workers.pipeline.reconciler import find_after_sent, reconcile_once
from workers.privacy.rights import erase_supporter
from workers.receiving.store import store
from workers.stages import inbound
from workers.stages.confirmation import ConfirmationPolicy, notify
from workers.stages.stage import Deferred, Stage


def no_wait(app: App) -> outbox.OutboxPolicy:
    """The App's outbox policy without the backoff: each attempt due at once."""
    return replace(outbox_for(app)[1], first_backoff=0)


def send_item(
    app: App, item_id: str, mailer: Mailer | None = None, policy: outbox.OutboxPolicy | None = None
) -> None:
    """What the outbox stage does with one item."""
    every_kind, default = outbox_for(app)
    with session_scope(app.sessions) as session:
        outbox.send(session, item_id, mailer or app.mailer, every_kind, policy or default)


class Recorder:
    """A mail server that answers as told (raising each error in turn), then takes everything."""

    name = "recorder"

    def __init__(self, *answers: BaseException) -> None:
        self.answers = list(answers)
        self.sent: list[Outgoing] = []

    def send(self, mail: Outgoing) -> str:
        if self.answers:
            raise self.answers.pop(0)
        self.sent.append(mail)
        return "250 ok"

    def waiting(self) -> float:
        return 0.0

    def close(self) -> None:
        pass


@pytest.fixture
def app(db_url: str, tmp_path: Path) -> Iterator[App]:
    """The App with a bounce and a reply domain (unsigned: a resend is byte for byte the same)."""
    with serving(
        make_settings(
            tmp_path,
            database_url=db_url,
            bounce_domain=BOUNCES,
            reply_domain=REPLIES,
            delivery_lease_seconds=60,
        )
    ) as application:
        yield application


def unconfirmed(app: App) -> str:
    with session_scope(app.sessions) as session:
        update_definition(session, "political-prisoners", confirmation=True)
        return accept(session, submission(), app.secret, state=State.UNCONFIRMED).submission_id


def confirmation(app: App) -> str:
    """An unconfirmed submission's confirmation, queued."""
    sid = unconfirmed(app)
    with session_scope(app.sessions) as session:
        [item_id] = notify(session, sid, ConfirmationPolicy())
    return item_id


def every_kind(app: App, broker: Any, worker: dramatiq.Worker) -> dict[str, str]:
    """One item of each key, queued and not sent: {key: item id}."""
    relay(app)
    replied, asked = deliver(app, broker, worker, n=2)
    letter = letter_of(app, replied)
    assert letter.reply_to is not None
    raw = samples.human_reply(letter.message_id, letter.to_email, letter.reply_to)
    [inbound_id] = store(app.sessions, "smtp", [letter.reply_to], raw)
    policy = inbound.InboundPolicy.from_settings(app.settings)
    [forward] = inbound.process_counted(
        app.sessions, inbound_id, app.returns, policy, outbox_for(app)[0]
    )
    confirm = confirmation(app)
    with session_scope(app.sessions) as session:
        queued = {
            key: outbox.enqueue(session, sid, key, kind)
            for sid, key, kind in (
                (replied, "bounce", "bounce"),
                (asked, "survey", "survey"),
                (asked, "survey-reminder", "survey"),
                (session.get(OutboxItem, confirm).submission_id, "reminder", "confirm"),  # type: ignore[union-attr]
            )
        }
    items = {key: item_id for key, item_id in queued.items() if item_id is not None}
    return items | {"forward": forward, "confirm": confirm}


def item(app: App, item_id: str) -> OutboxItem:
    with session_scope(app.sessions) as session:
        row = session.get(OutboxItem, item_id)
        assert row is not None
        session.expunge(row)
        return row


def due(app: App, now: datetime | None = None) -> list[str]:
    with session_scope(app.sessions) as session:
        lease = timedelta(seconds=app.settings.delivery_lease_seconds)
        return [i for i, _ in find_after_sent(session, timedelta(0), now=now, lease=lease)]


def test_one_item_of_each_kind_is_sent_once_and_a_second_message_sends_nothing(
    app: App, stub_broker: Any, stub_worker: dramatiq.Worker
) -> None:
    items = every_kind(app, stub_broker, stub_worker)
    assert sorted(items) == [
        "bounce", "confirm", "forward", "reminder", "survey", "survey-reminder"
    ]  # fmt: skip
    with session_scope(app.sessions) as session:  # enqueued again: nothing more to send
        assert (
            outbox.enqueue(session, item(app, items["bounce"]).submission_id, "bounce", "x") is None
        )
    mailer = Recorder()
    for item_id in items.values():
        send_item(app, item_id, mailer)
        send_item(app, item_id, mailer)  # a duplicate message, or a second worker after it
    assert len(mailer.sent) == len({m.message_id for m in mailer.sent}) == 6
    assert {item(app, i).status for i in items.values()} == {"sent"}
    assert all(m.sender.endswith("@" + BOUNCES) for m in mailer.sent)  # envelopes: bounce domain
    assert due(app, utcnow() + timedelta(days=1)) == []


def test_a_confirmation_is_claimed_and_sent_once_with_two_messages_at_once(app: App) -> None:
    sid = unconfirmed(app)
    policy = ConfirmationPolicy()
    handing_over, second_done = threading.Event(), threading.Event()

    class Slow(Recorder):
        def send(self, mail: Outgoing) -> str:
            handing_over.set()
            second_done.wait(10)  # the other message runs while the server answers
            return super().send(mail)

    def message(mailer: Recorder) -> None:
        with session_scope(app.sessions) as session:
            queued = notify(session, sid, policy)
        for item_id in queued:
            send_item(app, item_id, mailer)

    first, second = Slow(), Recorder()
    worker = threading.Thread(target=message, args=(first,))
    worker.start()
    assert handing_over.wait(10)
    message(second)
    second_done.set()
    worker.join(10)
    assert (len(first.sent), len(second.sent)) == (1, 0)
    with session_scope(app.sessions) as session:
        assert session.scalars(
            select(OutboxItem.status).where(OutboxItem.kind != "letter")
        ).all() == ["sent"]


class Killed(BaseException):
    """The worker process dies while the mail server has the email."""


def test_a_lapsed_claim_is_taken_over_and_the_same_bytes_go_again(
    app: App, stub_broker: Any, stub_worker: dramatiq.Worker
) -> None:
    for item_id in every_kind(app, stub_broker, stub_worker).values():
        dying, mailer = Recorder(Killed()), Recorder()
        with pytest.raises(Killed):
            send_item(app, item_id, dying)
        written = Recorder()
        send_item(app, item_id, written)  # its claim is live: nothing is sent
        assert (written.sent, item(app, item_id).status) == ([], "sending")
        with session_scope(app.sessions) as session:  # the lease lapses
            lapsed = utcnow() - timedelta(seconds=61)
            session.execute(
                update(OutboxItem).where(OutboxItem.id == item_id).values(claimed_at=lapsed)
            )
        assert item_id in due(app)
        first = compose(app, item_id)
        with capture_logs() as logs:
            send_item(app, item_id, mailer)
        taken_over = [e for e in logs if e["event"] == "outbox_claim_taken_over"]
        assert [(e["outbox_id"], e["log_level"]) for e in taken_over] == [(item_id, "warning")]
        [mail] = mailer.sent
        assert mail.data == first.data and mail.message_id == first.message_id
        taken = item(app, item_id)
        assert (taken.status, taken.attempts, taken.failures) == ("sent", 2, 1)


def compose(app: App, item_id: str) -> Outgoing:
    composers, _ = outbox_for(app)
    with session_scope(app.sessions) as session:
        row = session.get(OutboxItem, item_id)
        assert row is not None
        mail = composers[row.kind].compose(session, row)
    assert not isinstance(mail, str)
    return mail


def test_a_passing_refusal_backs_off_and_is_tried_again_when_due(app: App) -> None:
    item_id = confirmation(app)
    mailer = Recorder(
        TransientDeliveryError("451 4.7.1 greylisted"), TransientDeliveryError("421 busy")
    )
    policy = outbox_for(app)[1]
    with pytest.raises(Deferred) as raised:
        send_item(app, item_id, mailer)
    assert raised.value.seconds == policy.first_backoff  # its next message comes then
    waiting = item(app, item_id)
    assert (waiting.status, waiting.failures) == ("pending", 1)
    assert waiting.next_attempt_at is not None
    assert waiting.next_attempt_at > utcnow() + timedelta(seconds=policy.first_backoff - 5)
    with pytest.raises(Deferred) as early:  # a message before it is due sends nothing: it waits
        send_item(app, item_id, mailer)
    assert policy.first_backoff - 5 < early.value.seconds <= policy.first_backoff
    assert (mailer.sent, item(app, item_id).attempts) == ([], 1)
    assert due(app) == []
    assert due(app, waiting.next_attempt_at + timedelta(seconds=1)) == [item_id]
    with session_scope(app.sessions) as session:
        session.execute(update(OutboxItem).values(next_attempt_at=utcnow()))
    with pytest.raises(Deferred) as raised:
        send_item(app, item_id, mailer)
    assert raised.value.seconds == 2 * policy.first_backoff  # doubled
    with session_scope(app.sessions) as session:
        session.execute(update(OutboxItem).values(next_attempt_at=utcnow()))
    send_item(app, item_id, mailer)
    assert len(mailer.sent) == 1 and item(app, item_id).status == "sent"
    assert policy.backoff(30) == timedelta(seconds=policy.max_backoff)  # capped


def test_an_item_is_given_up_after_its_attempts_with_its_reason_masked_and_never_resent(
    app: App, stub_broker: Any
) -> None:
    item_id = confirmation(app)
    policy = replace(no_wait(app), max_attempts=3)
    full = "452 4.2.2 mailbox of <amira.haddad@example.com> in SW1A 1AA is full"
    mailer = Recorder(*(TransientDeliveryError(full) for _ in range(3)))
    for _ in range(2):
        with pytest.raises(Deferred):
            send_item(app, item_id, mailer, policy)
    send_item(app, item_id, mailer, policy)  # the last: given up, nothing raised
    failed = item(app, item_id)
    assert (failed.status, failed.failures) == ("failed", 3)
    assert failed.error == (
        "gave up after 3 failed attempts: TransientDeliveryError: "
        "452 4.2.2 mailbox of <[email]> in [postcode] is full"
    )
    assert due(app, utcnow() + timedelta(days=1)) == []
    with session_scope(app.sessions) as session:  # nor is the confirmation queued again
        session.execute(update(Submission).values(dispatched_at=utcnow() - timedelta(hours=1)))
    assert reconcile_once(app.sessions, stub_broker, timedelta(minutes=2)) == 0
    with session_scope(app.sessions) as session:
        assert notify(session, failed.submission_id, ConfirmationPolicy()) == []
    send_item(app, item_id, Recorder())
    assert item(app, item_id).status == "failed"
    # A permanent refusal ends it at once, its reason masked too.
    other = confirmation(app)
    refused = PermanentDeliveryError("550 5.1.1 <amira.haddad@example.com>: no such user")
    send_item(app, other, Recorder(refused))
    ended = item(app, other)
    assert (ended.status, ended.error) == ("failed", "550 5.1.1 <[email]>: no such user")


def test_erasure_ends_the_supporters_pending_items_and_nothing_is_sent(
    app: App, stub_broker: Any, stub_worker: dramatiq.Worker
) -> None:
    items = every_kind(app, stub_broker, stub_worker)
    with session_scope(app.sessions) as session:
        erase_supporter(
            session, app.secret, SUPPORTER, outbox_for(app)[0], app.settings.resolved_outbox_dir
        )
    mailer = Recorder()
    for item_id in items.values():
        erased = item(app, item_id)
        assert (erased.status, erased.error) == ("skipped", "erased at the supporter's request")
        send_item(app, item_id, mailer)
    assert mailer.sent == [] and due(app) == []


def test_the_migration_carries_sent_confirmations_and_notices_down_and_up(
    app: App, stub_broker: Any, stub_worker: dramatiq.Worker
) -> None:
    items = every_kind(app, stub_broker, stub_worker)
    send_item(app, items["confirm"], Recorder())
    url = app.settings.resolved_database_url
    app.engine.dispose()
    config = alembic_config(url)
    command.downgrade(config, "0013")
    engine = create_engine(url)
    with engine.connect() as conn:
        sent = "SELECT count(*) FROM submissions WHERE confirmation_sent_at IS NOT NULL"
        assert conn.scalar(text(sent)) == 1
        kinds = conn.scalars(text("SELECT kind FROM notices ORDER BY kind")).all()
        assert kinds == ["bounce", "forward", "survey", "survey"]
        # The letters' items were their delivery rows before 0016.
        letters = conn.execute(text("SELECT submission_id, status FROM deliveries")).all()
        assert len(letters) == 2 and {status for _, status in letters} == {"sent"}
    engine.dispose()
    command.upgrade(config, "head")
    with session_scope(app.sessions) as session:
        rows = session.execute(
            select(OutboxItem.key, OutboxItem.status).where(OutboxItem.kind != "letter")
        ).all()
        back = session.execute(
            select(OutboxItem.id, OutboxItem.status).where(OutboxItem.kind == "letter")
        ).all()
    assert sorted(back) == sorted(letters)  # and back: each letter's item has its submission's id
    keyed = {("forward" if key.startswith("forward:") else key, status) for key, status in rows}
    assert keyed == {
        ("confirm", "sent"),  # the unsent reminder is queued again by the reconciler when due
        ("bounce", "pending"),
        ("forward", "pending"),
        ("survey", "pending"),
        ("survey-reminder", "pending"),
    }


def test_health_and_the_metrics_count_every_kind_alike(
    app: App, stub_broker: Any, stub_worker: dramatiq.Worker
) -> None:
    every_kind(app, stub_broker, stub_worker)
    late, lease = timedelta(minutes=5), timedelta(seconds=app.settings.delivery_lease_seconds)
    with session_scope(app.sessions) as session:
        counts = outbox.counts(session)
        assert counts.pop(("letter", "sent")) == 2  # the letters went
        assert counts == {
            ("confirm", "pending"): 2,
            ("bounce", "pending"): 1,
            ("forward", "pending"): 1,
            ("survey", "pending"): 2,
        }
        assert outbox.overdue(session, utcnow(), late, lease) == 0
        # No worker sent them: `dearmp health` says so once they are late.
        assert outbox.overdue(session, utcnow() + timedelta(minutes=6), late, lease) == 6
    assert set(KINDS) == set(outbox_for(app)[0])


class Hanging(Recorder):
    """A mail server that hangs until let go, then answers with ``answer`` (None: takes it)."""

    def __init__(self, answer: BaseException | None) -> None:
        super().__init__()
        self.answer = answer
        self.asked, self.let_go = threading.Event(), threading.Event()

    def send(self, mail: Outgoing) -> str:
        self.asked.set()
        assert self.let_go.wait(20)
        if self.answer is not None:
            raise self.answer
        return super().send(mail)


def fields(row: OutboxItem) -> tuple[Any, ...]:
    return (
        row.status, row.attempts, row.failures, row.error, row.sent_at, row.next_attempt_at,
        row.claimed_at,
    )  # fmt: skip


def hung_then_taken_over(
    app: App,
    item_id: str,
    late: BaseException | None,
    policy: outbox.OutboxPolicy,
    second: Recorder,
) -> list[BaseException]:
    """A first worker claims the item and hangs in the mail server past its lease; a second
    takes the item over and tries it (``second``); then the first's answer comes (``late``),
    and changes nothing. What the first raised."""
    first, raised = Hanging(late), []

    def run() -> None:
        try:
            send_item(app, item_id, first, policy)
        except BaseException as exc:
            raised.append(exc)

    worker = threading.Thread(target=run)
    worker.start()
    assert first.asked.wait(20)
    time.sleep(policy.lease_seconds + 0.2)  # its lease lapses
    try:
        send_item(app, item_id, second, policy)
    except Deferred:
        pass
    before = fields(item(app, item_id))
    first.let_go.set()
    worker.join(20)
    assert not worker.is_alive()
    assert fields(item(app, item_id)) == before  # the first's answer changed nothing
    return raised


@pytest.mark.parametrize(
    "late",
    [
        None,
        TransientDeliveryError("451 4.3.2 try later"),
        TransientDeliveryError("delivery paused", retry_after=60, ours=True),
        PermanentDeliveryError("550 5.1.1 no such user"),
        RuntimeError("connection reset"),
    ],
    ids=["sent", "passing", "ours", "permanent", "error"],
)
def test_a_late_answer_to_a_worker_whose_claim_was_taken_over_changes_nothing(
    app: App, late: BaseException | None
) -> None:
    item_id = confirmation(app)
    policy = replace(no_wait(app), lease_seconds=1)
    second = Recorder()
    raised = hung_then_taken_over(app, item_id, late, policy, second)
    assert raised == []  # the claim is lost: nothing to retry
    assert len(second.sent) == 1
    sent = item(app, item_id)
    # The second's send stands: the first's lapse counted once, and nothing more.
    assert (sent.status, sent.attempts, sent.failures, sent.error) == ("sent", 2, 1, None)
    send_item(app, item_id, Recorder())  # never sent a third time
    assert due(app, utcnow() + timedelta(days=1)) == []


def test_a_late_failure_does_not_revive_an_item_given_up_meanwhile(app: App) -> None:
    item_id = confirmation(app)
    policy = replace(no_wait(app), lease_seconds=1, max_attempts=2)
    second = Recorder(TransientDeliveryError("452 4.2.2 mailbox full"))
    hung_then_taken_over(app, item_id, TransientDeliveryError("451 later"), policy, second)
    given_up = item(app, item_id)
    assert (given_up.status, given_up.failures) == ("failed", 2)
    assert given_up.error is not None and "mailbox full" in given_up.error
    assert due(app, utcnow() + timedelta(days=1)) == []


def test_a_forward_whose_claim_was_taken_over_keeps_nothing_twice(
    app: App, stub_broker: Any, stub_worker: dramatiq.Worker
) -> None:
    """The kind's ``done`` (a forward forgets the reply's text) runs once, for the send that
    stands; a late failure after it changes nothing."""
    forward = every_kind(app, stub_broker, stub_worker)["forward"]
    policy = replace(no_wait(app), lease_seconds=1)
    second = Recorder()
    hung_then_taken_over(app, forward, RuntimeError("reset"), policy, second)
    assert len(second.sent) == 1 and item(app, forward).status == "sent"
    with session_scope(app.sessions) as session:
        inbound_id = item(app, forward).inbound_id
        assert session.get(InboundMessage, inbound_id).raw is None  # type: ignore[union-attr]


class Paused(Recorder):
    """The relay refuses us (our login, our set-up): every worker waits this long."""

    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.seconds = seconds

    def waiting(self) -> float:
        return self.seconds


def test_while_the_relay_refuses_us_nothing_is_claimed_and_no_attempt_is_counted(
    app: App,
) -> None:
    item_id = confirmation(app)
    policy = outbox_for(app)[1]
    # Known before claiming: the item is not claimed, and waits.
    with pytest.raises(Deferred) as paused:
        send_item(app, item_id, Paused(120.0))
    assert paused.value.seconds == 120.0
    untouched = item(app, item_id)
    assert (untouched.status, untouched.attempts, untouched.failures) == ("pending", 0, 0)
    # Not due before the pause ends: nothing else (a duplicate, the reconciler) sends it sooner.
    assert untouched.next_attempt_at is not None and untouched.next_attempt_at > utcnow()
    with session_scope(app.sessions) as session:  # its wait is over
        session.execute(update(OutboxItem).values(next_attempt_at=utcnow()))
    # Learnt while sending (the relay paused, every session busy): the claim is given back,
    # uncounted, however often: the email is never given up for our side's outage.
    for n in range(policy.max_attempts + 2):
        ours = TransientDeliveryError(
            "delivery paused: 535 5.7.8 bad credentials for <amira.haddad@example.com>",
            retry_after=None if n % 2 else 90.0,
            ours=True,
        )
        with pytest.raises(Deferred) as waits:
            send_item(app, item_id, Recorder(ours))
        assert waits.value.seconds == (OUT_OF_STEP_WAIT if n % 2 else 90.0)
        waiting = item(app, item_id)
        assert (waiting.status, waiting.failures) == ("pending", 0)
        assert waiting.error is not None and "<[email]>" in waiting.error
        assert waiting.next_attempt_at is not None and waiting.next_attempt_at > utcnow()
        with session_scope(app.sessions) as session:  # its wait is over
            session.execute(update(OutboxItem).values(next_attempt_at=utcnow()))
    mailer = Recorder()
    send_item(app, item_id, mailer)
    sent = item(app, item_id)
    assert (len(mailer.sent), sent.status, sent.failures) == (1, "sent", 0)


def test_an_item_due_within_a_second_is_claimed_and_a_later_one_waits_for_its_time(
    app: App,
) -> None:
    item_id = confirmation(app)
    with session_scope(app.sessions) as session:
        soon = utcnow() + timedelta(seconds=0.5)  # a deferred message arriving a moment early
        session.execute(update(OutboxItem).values(next_attempt_at=soon))
    mailer = Recorder()
    send_item(app, item_id, mailer)
    assert len(mailer.sent) == 1
    other = confirmation(app)
    with session_scope(app.sessions) as session:
        later = utcnow() + timedelta(seconds=40)
        session.execute(
            update(OutboxItem).where(OutboxItem.id == other).values(next_attempt_at=later)
        )
    with pytest.raises(Deferred) as waits:
        send_item(app, other, mailer)
    assert 35 < waits.value.seconds <= 40 and len(mailer.sent) == 1


def delayed(broker: Any) -> list[dramatiq.Message[Any]]:
    """The outbox's messages waiting for their time."""
    queue = broker.queues[dq_name(Stage.OUTBOX.queue)]
    return [dramatiq.Message.decode(raw) for raw in list(queue.queue)]


def nowhere(moved: list[tuple[str, list[Stage]]]) -> None:
    """Where the stage sends on what it moved on: it moves nothing on."""
    assert not moved


def test_the_actor_sends_the_next_attempt_when_due_as_a_fresh_message_costing_no_retry(
    app: App, stub_broker: Any
) -> None:
    item_id = confirmation(app)
    policy = outbox_for(app)[1]
    app.mailer = Recorder(TransientDeliveryError("451 4.7.1 greylisted"))
    raw = stage_payload([item_id])
    started = time.time() * 1000
    run_stage(Stage.OUTBOX, raw, WORK[Stage.OUTBOX], app, stub_broker, nowhere)  # no raise
    [message] = delayed(stub_broker)
    assert message.args[0] == raw and "retries" not in message.options
    eta = message.options["eta"] - started
    assert policy.first_backoff * 1000 - 1000 < eta < policy.first_backoff * 1000 + 5000
    assert item(app, item_id).failures == 1
    # Passing database trouble: not counted, a moment's wait, no retry of dramatiq's.
    with session_scope(app.sessions) as session:
        session.execute(update(OutboxItem).values(next_attempt_at=None))
    app.mailer = Recorder(OperationalError("UPDATE", {}, Exception("database is locked")))
    run_stage(Stage.OUTBOX, raw, WORK[Stage.OUTBOX], app, stub_broker, nowhere)
    assert len(delayed(stub_broker)) == 2
    waiting = item(app, item_id)
    assert (waiting.status, waiting.failures) == ("pending", 1)


def test_the_outbox_kinds_are_built_once_per_app(app: App) -> None:
    assert outbox_for(app)[0] is outbox_for(app)[0]


def test_given_up_items_are_listed_and_retried_by_an_operator(
    app: App, stub_broker: Any, stub_worker: dramatiq.Worker
) -> None:
    items = every_kind(app, stub_broker, stub_worker)
    runner = CliRunner()
    none = runner.invoke(cli, ["outbox", "retry"])
    assert none.exit_code == 1 and "no given-up item to retry" in none.stderr
    refused = PermanentDeliveryError("554 5.7.1 <amira.haddad@example.com>: denied [/b] [mx1]")
    for item_id in items.values():
        send_item(app, item_id, Recorder(refused))
    listed = runner.invoke(cli, ["outbox", "list", "--status", "failed", "--json"])
    assert listed.exit_code == 0, listed.output
    rows = json.loads(listed.stdout)
    assert sorted(row["id"] for row in rows) == sorted(items.values())
    assert {(row["status"], row["error"]) for row in rows} == {
        ("failed", "554 5.7.1 <[email]>: denied [/b] [mx1]")
    }
    assert {row["kind"] for row in rows} == set(KINDS) - {
        "webhook",
        "letter",
        "digest",
        "digested",
    }  # test_webhooks.py, test_smtp.py; the digest's: test_comparison.py
    table = runner.invoke(cli, ["outbox", "list"])  # a server's words are never rich markup
    assert table.exit_code == 0 and "denied [/b] [mx1]" in table.stdout
    dry = runner.invoke(cli, ["outbox", "retry", "--kind", "forward", "--dry-run"])
    assert dry.exit_code == 0 and "would retry 1" in dry.stdout
    assert item(app, items["forward"]).status == "failed"  # nothing changed
    done = runner.invoke(cli, ["outbox", "retry", "--kind", "forward", "--yes"])
    assert done.exit_code == 0 and "retried 1" in done.stdout
    done = runner.invoke(cli, ["outbox", "retry", "--yes"])
    assert done.exit_code == 0 and "retried 5" in done.stdout
    drain(stub_broker, stub_worker)
    for item_id in items.values():  # a given-up forward kept the reply's text: it goes too
        sent = item(app, item_id)
        assert (sent.status, sent.failures, sent.error) == ("sent", 0, None)
    again = runner.invoke(cli, ["outbox", "retry", "--yes"])
    assert again.exit_code == 1 and "no given-up item to retry" in again.stderr


class DatabaseDropping(Recorder):
    """A server that takes every email while PostgreSQL ends each connection to the database
    (and, ``shut``, lets none be made until the test opens it again): a failover or a restart
    at the moment it answered."""

    def __init__(self, app: App, shut: bool = False) -> None:
        super().__init__()
        url = app.engine.url
        self.name_of_database = url.database
        self.admin = create_engine(url.set(database="postgres"), isolation_level="AUTOCOMMIT")
        self.shut = shut

    def send(self, mail: Outgoing) -> str:
        with self.admin.connect() as admin:
            if self.shut:
                admin.execute(
                    text(f'ALTER DATABASE "{self.name_of_database}" ALLOW_CONNECTIONS false')
                )
            admin.execute(
                text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE datname = :name AND pid <> pg_backend_pid()"
                ),
                {"name": self.name_of_database},
            )
        return super().send(mail)

    def open(self) -> None:
        with self.admin.connect() as admin:
            admin.execute(text(f'ALTER DATABASE "{self.name_of_database}" ALLOW_CONNECTIONS true'))
        self.admin.dispose()


def as_workers_connect(app: App) -> None:
    """The app's engine as worker processes make it: no ping before each use of a connection."""
    from workers.database.engine import make_engine, make_sessionmaker

    app.engine = make_engine(
        app.engine.url.render_as_string(hide_password=False), pool_pre_ping=False
    )
    app.sessions = make_sessionmaker(app.engine)


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_a_sent_mark_is_written_again_when_the_database_drops_as_the_server_answers(
    app: App,
) -> None:
    """Once on its dead connection was all it had: the item was left sending, and the lease's
    takeover sent the email a second time."""
    as_workers_connect(app)
    item_id = confirmation(app)
    dropping = DatabaseDropping(app)
    with capture_logs() as logs, session_scope(app.sessions) as session:
        outbox.send(session, item_id, dropping, *outbox_for(app))
    assert item(app, item_id).status == "sent" and len(dropping.sent) == 1
    assert "outbox_mark_retried" in [e["event"] for e in logs]
    dropping.open()


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_with_the_database_gone_after_a_send_the_rest_of_the_group_is_not_sent(
    app: App, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The mark could not be written in its patience: the next email of the group went anyway,
    to stay unmarked and go again after the lease. Now the group stops at the first."""
    monkeypatch.setattr(outbox, "MARK_PATIENCE", 0.5)
    as_workers_connect(app)
    first, second = sorted([confirmation(app), confirmation(app)])
    dropping = DatabaseDropping(app, shut=True)
    try:
        with session_scope(app.sessions) as session:
            outcomes = dict(outbox.send_group(session, [first, second], dropping, *outbox_for(app)))
    finally:
        dropping.open()
    assert len(dropping.sent) == 1
    assert all(outcomes[one] is not None for one in (first, second))
    app.engine.dispose()
    assert item(app, first).status == item(app, second).status == "sending"  # the lease's now


def test_a_sent_mark_written_again_after_its_commit_went_through_is_still_marked(
    app: App,
) -> None:
    """The mark's commit went through as its connection dropped: written again it matched
    nothing and was read as a claim lost (its submission's move left to the reconciler)."""
    item_id = confirmation(app)
    claim = utcnow()
    with session_scope(app.sessions) as session:
        session.execute(
            update(OutboxItem)
            .where(OutboxItem.id == item_id)
            .values(status="sending", claimed_at=claim)
        )
    params = {"b_id": item_id, "b_mine": claim, "v_sent_at": utcnow(), "v_response": "250 ok"}
    with session_scope(app.sessions) as session:
        assert outbox._write_mark(session, params)
        assert outbox._write_mark(session, params)  # again: the same mark
        later = {**params, "b_mine": claim + timedelta(seconds=1)}
        assert not outbox._write_mark(session, later)  # another claim's: not ours to mark
    assert item(app, item_id).status == "sent"
