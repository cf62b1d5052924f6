"""After a letter is sent: bounces, automatic replies, MPs' replies relayed to the supporter,
address health, the "did your MP reply?" survey and the report. The actors run on dramatiq's
StubBroker with the outbox backend; each test runs on SQLite and on PostgreSQL."""

from __future__ import annotations

import email
import email.policy
import hashlib
import hmac
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import dramatiq
import pytest
from sqlalchemy import select, update

from tests import mail_samples as samples
from tests.conftest import ApiClient, drain, make_settings, serving
from tests.factories import submission
from tests.test_consent_ledger import everything_stored
from tests.test_stages import step, through_render
from workers.database.engine import session_scope
from workers.database.models import (
    AddressHealth,
    Campaign,
    InboundMessage,
    Letter,
    LetterEvent,
    LetterPrint,
    OutboxItem,
    Submission,
    utcnow,
)
from workers.letters.definitions import update_definition
from workers.letters.outcomes import report, resend_bounced
from workers.mp import health
from workers.outbox import sending as outbox_sending
from workers.outbox.sending import Kind
from workers.pipeline.actors import outbox_for
from workers.pipeline.app import App, set_app
from workers.pipeline.dispatch import dispatch_groups
from workers.pipeline.runtime import state_counts, submit
from workers.privacy.rights import erase_supporter
from workers.receiving.store import store
from workers.stages import inbound, survey
from workers.stages.delivery import LetterChannel
from workers.stages.rendering import render
from workers.stages.stage import Deferred, Stage
from workers.web.api import create_app

BOUNCES = "bounces.campaign.example.org"
REPLIES = "replies.campaign.example.org"
SUPPORTER = "amira.haddad@example.com"


@pytest.fixture
def app(db_url: str, tmp_path: Path) -> Iterator[App]:
    """The App with a bounce and a reply domain, and a Mailgun signing key."""
    with serving(
        make_settings(
            tmp_path,
            database_url=db_url,
            bounce_domain=BOUNCES,
            reply_domain=REPLIES,
            mailgun_signing_key="mailgun-key",
        )
    ) as application:
        yield application


def deliver(
    app: App, broker: Any, worker: dramatiq.Worker, n: int = 1, **changes: Any
) -> list[str]:
    ids = [submit(app, broker, submission(**changes))[0] for _ in range(n)]
    drain(broker, worker)
    assert state_counts(app, ids) == {"delivered": n}
    return ids


def letter_of(app: App, sid: str) -> Letter:
    with session_scope(app.sessions) as session:
        letter = session.get(Letter, sid)
        assert letter is not None
        session.expunge(letter)
        return letter


def bounce_of(app: App, sid: str) -> tuple[str, bytes]:
    """The letter's return address, and the DSN Postfix sends to it when the MP's server
    refuses the letter."""
    letter = letter_of(app, sid)
    rcpt = app.returns.bounce(sid)
    assert rcpt is not None
    return rcpt, samples.postfix_dsn(letter.message_id, letter.to_email, rcpt)


def receive(app: App, broker: Any, worker: dramatiq.Worker, rcpt: str, raw: bytes) -> str:
    """What `dearmp inbound` does with a message: store it, then send it to the inbound stage."""
    [inbound_id] = store(app.sessions, "smtp", [rcpt], raw)
    dispatch_groups(broker, {Stage.INBOUND: [inbound_id]})
    drain(broker, worker)
    return inbound_id


def inbound_row(app: App, inbound_id: str) -> InboundMessage:
    with session_scope(app.sessions) as session:
        row = session.get(InboundMessage, inbound_id)
        assert row is not None
        session.expunge(row)
        return row


def events(app: App, sid: str) -> list[tuple[str, str | None]]:
    with session_scope(app.sessions) as session:
        return [
            (e.kind, e.status)
            for e in session.scalars(
                select(LetterEvent).where(LetterEvent.submission_id == sid).order_by(LetterEvent.id)
            )
        ]


def outbox(app: App, prefix: str = "notice-") -> list[email.message.EmailMessage]:
    folder = app.settings.resolved_outbox_dir
    return [
        email.message_from_bytes(p.read_bytes(), policy=email.policy.default)  # type: ignore[misc]
        for p in sorted(folder.glob(f"{prefix}*.eml"))
    ]


def test_a_letters_envelope_sender_is_its_own_return_address(
    app: App, stub_broker: Any, stub_worker: dramatiq.Worker
) -> None:
    sent: list[Any] = []
    original = app.mailer.send
    app.mailer.send = lambda mail: sent.append(mail) or original(mail)  # type: ignore[method-assign]
    [sid] = deliver(app, stub_broker, stub_worker)
    token = app.returns.read(sent[0].sender)
    assert token is not None and (token.purpose, token.object_id) == ("b", sid)
    assert sent[0].sender.endswith("@" + BOUNCES)
    assert letter_of(app, sid).reply_to == SUPPORTER  # replies = "direct"
    assert b"\r\nFrom: " in sent[0].data and BOUNCES.encode() not in sent[0].data


def test_a_permanent_bounce_returns_the_letter_and_tells_the_supporter_once(
    app: App, stub_broker: Any, stub_worker: dramatiq.Worker
) -> None:
    [sid] = deliver(app, stub_broker, stub_worker)
    letter = letter_of(app, sid)
    rcpt, raw = bounce_of(app, sid)
    first = receive(app, stub_broker, stub_worker, rcpt, raw)
    assert state_counts(app, [sid]) == {"bounced": 1}
    assert events(app, sid) == [("bounce", "5.1.1")]
    row = inbound_row(app, first)
    assert (row.status, row.kind, row.submission_id, row.raw) == ("done", "bounce", sid, None)
    # The same server bounces it again (a second copy, another format): recorded, told once.
    receive(
        app,
        stub_broker,
        stub_worker,
        rcpt,
        samples.gmail_dsn(letter.message_id, letter.to_email, rcpt),
    )
    assert [k for k, _ in events(app, sid)] == ["bounce", "bounce"]
    [notice] = outbox(app)
    assert notice["To"] == SUPPORTER
    assert "was returned" in notice["Subject"]
    assert notice["Auto-Submitted"] == "auto-generated"
    assert "members.parliament.uk/member/" in notice.get_content()
    with session_scope(app.sessions) as session:
        failure = session.scalar(select(Submission.failure_reason).where(Submission.id == sid))
    assert failure and "Recipient address rejected" in failure


def test_an_inbound_message_acted_on_twice_acts_once(
    app: App, stub_broker: Any, stub_worker: dramatiq.Worker
) -> None:
    [sid] = deliver(app, stub_broker, stub_worker)
    letter = letter_of(app, sid)
    rcpt = app.returns.bounce(sid)
    assert rcpt is not None
    [inbound_id] = store(
        app.sessions, "smtp", [rcpt], samples.exim_plain(letter.message_id, letter.to_email, rcpt)
    )
    policy = inbound.InboundPolicy.from_settings(app.settings)
    with session_scope(app.sessions) as session:
        assert (
            len(inbound.process(session, inbound_id, app.returns, policy, outbox_for(app)[0])) == 1
        )
    with session_scope(app.sessions) as session:
        assert inbound.process(session, inbound_id, app.returns, policy, outbox_for(app)[0]) == []
    assert events(app, sid) == [("bounce", "5.1.1")]


def test_forged_misdirected_and_looping_mail_acts_on_no_letter(
    app: App, stub_broker: Any, stub_worker: dramatiq.Worker
) -> None:
    a, b = deliver(app, stub_broker, stub_worker, n=2)
    letter_a, letter_b = letter_of(app, a), letter_of(app, b)
    rcpt_a = app.returns.bounce(a)
    assert rcpt_a is not None
    local = rcpt_a.split("@")[0]
    forged = local[:20] + ("a" if local[20] != "a" else "b") + local[21:] + "@" + BOUNCES
    cases = {
        "forged token": (
            forged,
            samples.postfix_dsn(letter_a.message_id, letter_a.to_email, forged),
        ),
        # A's genuine address, with a bounce of B's letter: it names A, and is not A's letter.
        "another letter": (
            rcpt_a,
            samples.postfix_dsn(letter_b.message_id, letter_b.to_email, rcpt_a),
        ),
        "loop": (
            rcpt_a,
            b"Received: x\r\n" * 50
            + samples.postfix_dsn(letter_a.message_id, letter_a.to_email, rcpt_a),
        ),
        "broken": (rcpt_a, b"\x00\x01Content-Type: multipart/report; boundary=\r\n\r\n--\r\n"),
    }
    notice_address = app.returns.notice("3f1e6c1a-8a54-4d3e-9a55-0c1f2e3d4b5a")
    assert notice_address is not None
    cases["a notice's bounce"] = (
        notice_address,
        samples.postfix_dsn("<notice-x@campaign.example.org>", SUPPORTER, notice_address),
    )
    outcomes = {}
    for name, (rcpt, raw) in cases.items():
        row = inbound_row(app, receive(app, stub_broker, stub_worker, rcpt, raw))
        outcomes[name] = (row.status, row.reason, row.raw)
    assert {name: status for name, (status, _, _) in outcomes.items()} == dict.fromkeys(
        cases, "dropped"
    )
    assert all(reason for _, reason, _ in outcomes.values())
    assert all(raw is None for _, _, raw in outcomes.values())  # nothing kept
    assert state_counts(app, [a, b]) == {"delivered": 2}
    assert events(app, a) == events(app, b) == []
    assert outbox(app) == []


def test_delays_confirmations_and_automatic_replies_are_recorded_and_change_nothing(
    app: App, stub_broker: Any, stub_worker: dramatiq.Worker
) -> None:
    [sid] = deliver(app, stub_broker, stub_worker)
    letter = letter_of(app, sid)
    rcpt = app.returns.bounce(sid)
    assert rcpt is not None
    receive(
        app,
        stub_broker,
        stub_worker,
        rcpt,
        samples.exim_delay(letter.message_id, letter.to_email, rcpt),
    )
    receive(
        app,
        stub_broker,
        stub_worker,
        rcpt,
        samples.exchange_automatic_reply(letter.message_id, letter.to_email, rcpt),
    )
    receive(
        app,
        stub_broker,
        stub_worker,
        rcpt,
        samples.rfc3834_auto_reply(letter.message_id, letter.to_email, rcpt),
    )
    assert events(app, sid) == [("delay", "4.3.0"), ("auto_reply", None), ("auto_reply", None)]
    assert state_counts(app, [sid]) == {"delivered": 1}
    assert outbox(app) == []  # an automatic reply is never answered


def test_an_address_that_keeps_bouncing_is_failing_and_holds_new_letters_until_it_is_ok(
    app: App, stub_broker: Any, stub_worker: dramatiq.Worker
) -> None:
    ids = deliver(app, stub_broker, stub_worker, n=3)
    for sid in ids:
        receive(app, stub_broker, stub_worker, *bounce_of(app, sid))
    address = letter_of(app, ids[0]).to_email
    with session_scope(app.sessions) as session:
        row = session.get(AddressHealth, address.lower())
        assert row is not None and row.status == "failing" and row.bounces == 3
        assert health.failing_count(session) == 1
    held = submit(app, stub_broker, submission())[0]
    drain(stub_broker, stub_worker)
    assert state_counts(app, [held]) == {"held": 1}
    with ApiClient(create_app(lambda: app, stub_broker)) as client:
        outcome = client.get(f"/v1/submissions/{held}").json()["outcome"]
    assert "your MP" in outcome and "until your constituency has an MP" not in outcome  # it has
    with session_scope(app.sessions) as session:
        assert health.mark_ok(session, address)
        member_id = session.scalar(select(Submission.member_id).where(Submission.id == held))
        assert member_id is not None
        assert health.held_for(session, member_id) == [held]
    dispatch_groups(stub_broker, {Stage.RESOLVE: [held]})
    drain(stub_broker, stub_worker)
    assert state_counts(app, [held]) == {"delivered": 1}


def returned(app: App, broker: Any, worker: dramatiq.Worker) -> tuple[str, int]:
    """A letter delivered, then returned for good: its submission and its MP."""
    [sid] = deliver(app, broker, worker)
    receive(app, broker, worker, *bounce_of(app, sid))
    with session_scope(app.sessions) as session:
        member_id = session.scalar(select(Submission.member_id).where(Submission.id == sid))
    assert member_id is not None
    return sid, member_id


def test_an_operator_resends_returned_letters_to_a_corrected_address_once(
    app: App, stub_broker: Any, stub_worker: dramatiq.Worker
) -> None:
    sid, member_id = returned(app, stub_broker, stub_worker)
    with session_scope(app.sessions) as session:
        with pytest.raises(ValueError, match="not an email address"):
            resend_bounced(session, member_id, "not an address")
        # The rule of every address a letter goes to: one its letter could not be written to
        # (each would fail) is refused here, not accepted and then failed letter by letter.
        with pytest.raises(ValueError, match="not an email address: Letters with accents"):
            resend_bounced(session, member_id, "zoë@parliament.example")
        assert resend_bounced(session, member_id, "new.office@parliament.example") == [sid]
    with session_scope(app.sessions) as session:
        assert resend_bounced(session, member_id, "new.office@parliament.example") == []
    dispatch_groups(stub_broker, {Stage.RENDER: [sid]})
    drain(stub_broker, stub_worker)
    assert state_counts(app, [sid]) == {"delivered": 1}
    assert letter_of(app, sid).to_email == "new.office@parliament.example"
    assert [k for k, _ in events(app, sid)] == ["bounce"]  # the history stays


def test_the_returned_letter_of_a_supporter_erased_since_is_never_sent_again(
    app: App, stub_broker: Any, stub_worker: dramatiq.Worker
) -> None:
    _, member_id = returned(app, stub_broker, stub_worker)
    with session_scope(app.sessions) as session:
        erase_supporter(session, app.secret, SUPPORTER, outbox_for(app)[0])
    with session_scope(app.sessions) as session:
        assert resend_bounced(session, member_id, "new.office@parliament.example") == []


def relay(app: App) -> None:
    with session_scope(app.sessions) as session:
        update_definition(session, "political-prisoners", replies="relay")


def test_a_relayed_reply_reaches_the_supporter_once_and_its_text_is_not_kept(
    app: App, stub_broker: Any, stub_worker: dramatiq.Worker
) -> None:
    relay(app)
    [sid] = deliver(app, stub_broker, stub_worker)
    letter = letter_of(app, sid)
    assert letter.reply_to == app.returns.reply(sid)
    reply_to = letter.reply_to
    assert reply_to is not None
    first = receive(
        app,
        stub_broker,
        stub_worker,
        reply_to,
        samples.human_reply(letter.message_id, letter.to_email, reply_to),
    )
    [forward] = outbox(app)
    assert forward["To"] == SUPPORTER
    assert forward["Reply-To"] == letter.to_email
    assert (
        forward["From"].addresses[0].addr_spec == "letters@campaign.example.org"
    )  # the campaign's domain
    assert "replied to your letter" in forward.get_content()
    assert "I have raised this with the minister" in forward.get_content()
    assert "letter.pdf" not in forward.as_string()
    assert inbound_row(app, first).raw is None  # forwarded: the text is gone
    assert events(app, sid) == [("reply", None)]
    # An automatic reply to the relay address is recorded, never forwarded.
    receive(
        app,
        stub_broker,
        stub_worker,
        reply_to,
        samples.rfc3834_auto_reply(letter.message_id, letter.to_email, reply_to),
    )
    assert len(outbox(app)) == 1
    assert [k for k, _ in events(app, sid)] == ["reply", "auto_reply"]


def test_forwards_per_letter_are_capped(
    app: App, stub_broker: Any, stub_worker: dramatiq.Worker
) -> None:
    relay(app)
    [sid] = deliver(app, stub_broker, stub_worker)
    letter = letter_of(app, sid)
    reply_to = letter.reply_to
    assert reply_to is not None
    cap = app.settings.forwards_per_letter
    last = ""
    for n in range(cap + 2):
        last = receive(
            app,
            stub_broker,
            stub_worker,
            reply_to,
            samples.human_reply(letter.message_id, letter.to_email, reply_to, f"reply {n}"),
        )
    assert len(outbox(app)) == cap
    row = inbound_row(app, last)
    assert row.reason == "forward cap reached: not forwarded" and row.raw is None


def test_did_your_mp_reply_asks_once_reminds_once_and_records_the_answer_by_button(
    app: App, stub_broker: Any, stub_worker: dramatiq.Worker
) -> None:
    relay(app)  # replies come back through DearMP, to each letter's reply address
    answered, reminded, replied = deliver(app, stub_broker, stub_worker, n=3)
    letter = letter_of(app, replied)
    reply_to, return_path = app.returns.reply(replied), app.returns.bounce(reminded)
    assert reply_to is not None and return_path is not None
    human = samples.human_reply(letter.message_id, letter.to_email, reply_to)
    receive(app, stub_broker, stub_worker, reply_to, human)
    # The same words to a return address, where mail systems write: no reply from the MP.
    other = letter_of(app, reminded)
    spoof = samples.human_reply(other.message_id, other.to_email, return_path)
    receive(app, stub_broker, stub_worker, return_path, spoof)
    with session_scope(app.sessions) as session:
        assert survey.due(session) == []  # fourteen days have not passed
        session.execute(
            update(OutboxItem)
            .where(OutboxItem.kind == "letter")
            .values(sent_at=utcnow() - timedelta(days=15))
        )
    with session_scope(app.sessions) as session:  # a campaign in sandbox mode asks nothing
        session.execute(update(Campaign).values(mode="sandbox"))
        assert survey.due(session) == []
        session.execute(update(Campaign).values(mode="live"))
    with session_scope(app.sessions) as session:
        queued = survey.due(session)
        assert len(queued) == 2  # not the letter whose MP replied
    dispatch_groups(stub_broker, {Stage.OUTBOX: queued})
    drain(stub_broker, stub_worker)
    mails = [m for m in outbox(app) if "Did " in m["Subject"]]  # (and the reply, forwarded)
    assert len(mails) == 2
    with session_scope(app.sessions) as session:
        assert survey.due(session) == []  # asked once
    links = {
        sid: survey.links(app.settings.public_url, app.secret, sid) for sid in (answered, reminded)
    }
    texts = " ".join(m.get_content() for m in mails)
    assert all(link in texts for sid in links for link in links[sid].values())
    with ApiClient(create_app(lambda: app, stub_broker)) as client:
        path = links[answered]["yes"].removeprefix(app.settings.public_url)
        page = client.get(path)  # what a link scanner does: nothing is recorded
        assert page.status_code == 200 and "Record my answer" in page.text
        assert events(app, answered) == []
        assert client.post(path).status_code == 200
        assert events(app, answered) == [("survey", None)]
        forged = path.replace(path.split("/")[3], answered + ".AAAA")
        assert client.post(forged).status_code == 404
        assert client.post(path.replace("/yes", "/maybe")).status_code == 404
    with session_scope(app.sessions) as session:
        session.execute(update(OutboxItem).values(sent_at=utcnow() - timedelta(days=8)))
    with session_scope(app.sessions) as session:
        [reminder] = survey.due(session)  # only the letter not answered
        assert session.get(OutboxItem, reminder).submission_id == reminded  # type: ignore[union-attr]
    rows = {(r.campaign, r.member_id): r for r in _report(app)}
    total = rows[("political-prisoners", None)]
    assert (total.delivered, total.replied, total.survey["yes"]) == (3, 1, 1)


def _report(app: App) -> list[Any]:
    with session_scope(app.sessions) as session:
        return report(session)


def mailgun_body(
    event: dict[str, Any], key: bytes = b"mailgun-key", age: float = 0, sending: int = 0
) -> dict[str, Any]:
    """Mailgun's body for ``event``, signed: each sending of one event has a token of its own."""
    timestamp = str(int(time.time() - age))
    token = hashlib.sha256(f"{sending}{json.dumps(event)}".encode()).hexdigest()[:50]
    signature = hmac.new(key, (timestamp + token).encode(), hashlib.sha256).hexdigest()
    return {
        "signature": {"timestamp": timestamp, "token": token, "signature": signature},
        "event-data": event,
    }


def test_mailgun_events_are_verified_stored_once_and_return_the_letter(
    app: App, stub_broker: Any, stub_worker: dramatiq.Worker
) -> None:
    [sid] = deliver(app, stub_broker, stub_worker)
    letter = letter_of(app, sid)
    event = {
        "id": "G9Bn5sl1TC6nu79C8C0bwg",
        "event": "failed",
        "severity": "permanent",
        "recipient": letter.to_email,
        "delivery-status": {
            "code": 550,
            "enhanced-code": "5.1.1",
            "message": f"5.1.1 <{letter.to_email}> no such user",
        },
        "message": {"headers": {"message-id": letter.message_id.strip("<>")}},
    }
    with ApiClient(create_app(lambda: app, stub_broker)) as client:
        assert (
            client.post("/v1/webhooks/mailgun", json=mailgun_body(event, b"wrong")).status_code
            == 406
        )
        assert (
            client.post("/v1/webhooks/mailgun", json=mailgun_body(event, age=3600)).status_code
            == 406
        )
        assert client.post("/v1/webhooks/mailgun", json={"event-data": event}).status_code == 422
        assert state_counts(app, [sid]) == {"delivered": 1}
        body = mailgun_body(event)
        assert client.post("/v1/webhooks/mailgun", json=body).json() == {"stored": True}
        again = mailgun_body(event, sending=1)  # Mailgun sends it again, signed again
        assert client.post("/v1/webhooks/mailgun", json=again).json() == {"stored": False}
        drain(stub_broker, stub_worker)
        assert state_counts(app, [sid]) == {"bounced": 1}
        assert events(app, sid) == [("bounce", "5.1.1")]
        # An event about a message that is not one of our letters is stored and dropped.
        stray = event | {"id": "other", "message": {"headers": {"message-id": "nope@x"}}}
        assert client.post("/v1/webhooks/mailgun", json=mailgun_body(stray)).status_code == 200
        drain(stub_broker, stub_worker)
    with session_scope(app.sessions) as session:
        rows = session.scalars(
            select(InboundMessage).where(InboundMessage.source == "mailgun")
        ).all()
        assert sorted(r.status for r in rows) == ["done", "dropped"]
        assert all(letter.to_email.encode() not in (r.raw or b"") for r in rows)


def test_erasure_removes_what_came_back_and_export_shows_its_facts(
    app: App, stub_broker: Any, stub_worker: dramatiq.Worker
) -> None:
    from workers.privacy.rights import export_supporter

    relay(app)
    [sid] = deliver(app, stub_broker, stub_worker)
    letter = letter_of(app, sid)
    reply_to = letter.reply_to
    assert reply_to is not None
    raw = samples.human_reply(letter.message_id, letter.to_email, reply_to)
    [inbound_id] = store(app.sessions, "smtp", [reply_to], raw)
    policy = inbound.InboundPolicy.from_settings(app.settings)
    with session_scope(app.sessions) as session:  # acted on; the forward not sent yet
        [notice_id] = inbound.process(session, inbound_id, app.returns, policy, outbox_for(app)[0])
    assert inbound_row(app, inbound_id).raw == raw
    with session_scope(app.sessions) as session:
        exported = export_supporter(session, app.secret, SUPPORTER)
    [entry] = exported["submissions"]
    assert [e["event"] for e in entry["after_sent"]] == ["reply"]
    assert entry["notices"] == [{"kind": "forward", "status": "pending", "sent_at": None}]
    with session_scope(app.sessions) as session:
        erase_supporter(
            session, app.secret, SUPPORTER, outbox_for(app)[0], app.settings.resolved_outbox_dir
        )
    assert inbound_row(app, inbound_id).raw is None
    with session_scope(app.sessions) as session:
        notice = session.get(OutboxItem, notice_id)
        assert notice is not None and notice.status == "skipped"
    dispatch_groups(stub_broker, {Stage.OUTBOX: [notice_id]})
    drain(stub_broker, stub_worker)
    assert outbox(app) == []  # nothing goes to an erased supporter


def test_the_operators_commands_report_release_and_resend(
    app: App, stub_broker: Any, stub_worker: dramatiq.Worker
) -> None:
    from click.testing import CliRunner

    from workers.cli import main

    [sid] = deliver(app, stub_broker, stub_worker)
    letter = letter_of(app, sid)
    receive(app, stub_broker, stub_worker, *bounce_of(app, sid))
    runner = CliRunner()
    rows = json.loads(runner.invoke(main, ["replies", "report", "--json"]).stdout)
    total = next(r for r in rows if r["member_id"] is None)
    assert (total["delivered"], total["bounced"]) == (1, 1)
    assert "politi" in runner.invoke(main, ["replies", "report"]).stdout  # a narrow table

    not_failing = runner.invoke(main, ["directory", "address", letter.to_email, "--ok"])
    assert not_failing.exit_code == 1 and "nor marked failing" in not_failing.output
    with session_scope(app.sessions) as session:
        session.add(AddressHealth(email=letter.to_email.lower(), member_id=None, status="failing"))
    assert letter.to_email.lower() in runner.invoke(main, ["directory", "status"]).stdout
    released = runner.invoke(main, ["directory", "address", letter.to_email, "--ok"])
    assert released.exit_code == 0, released.output

    with session_scope(app.sessions) as session:
        member_id = session.scalar(select(Submission.member_id).where(Submission.id == sid))
    args = ["replies", "resend-bounced", "--member", str(member_id), "--to"]
    bad = runner.invoke(main, [*args, "nobody"])
    assert bad.exit_code == 1 and "not an email address" in bad.output
    dry = runner.invoke(main, [*args, "new.office@parliament.example", "--dry-run"])
    assert "would resend 1" in dry.stdout and state_counts(app, [sid]) == {"bounced": 1}
    resent = runner.invoke(main, [*args, "new.office@parliament.example", "--yes"])
    assert "resending 1" in resent.stdout
    drain(stub_broker, stub_worker)
    assert state_counts(app, [sid]) == {"delivered": 1}

    zone = runner.invoke(main, ["dns", "--mx", "mx.campaign.example.org"]).stdout
    assert "_dmarc.campaign.example.org. IN TXT" in zone
    assert f"{BOUNCES}. IN MX 10 mx.campaign.example.org." in zone
    assert f"{REPLIES}. IN MX 10 mx.campaign.example.org." in zone
    assert runner.invoke(main, ["dns", "--campaign", "nope"]).exit_code == 1


def test_dns_publishes_the_dkim_public_key_of_the_configured_private_key(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    from workers.letters.dns import records

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    settings = make_settings(
        tmp_path, dkim_private_key=pem.decode(), dkim_selector="dearmp", bounce_domain=BOUNCES
    )
    found = {(r.name, r.type): r.value for r in records(settings, ["campaign.example.org"])}
    value = found[("dearmp._domainkey.campaign.example.org", "TXT")]
    der = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    import base64

    assert value == f"v=DKIM1; k=rsa; p={base64.b64encode(der).decode()}"
    assert (BOUNCES, "TXT") in found  # SPF where the envelope sender is checked
    assert ("campaign.example.org", "TXT") not in found


def test_a_new_directory_address_releases_the_letters_held_for_a_failing_one(
    app: App, stub_broker: Any, stub_worker: dramatiq.Worker, tmp_path: Path
) -> None:
    from config.settings import CONFIG_DIR
    from workers.mp.directory import import_directory
    from workers.pipeline.reconciler import reconcile_once

    old = "alex.rivers.mp@mp.example.org"  # the MP for DM1 1AA in the sample directory
    with session_scope(app.sessions) as session:
        session.add(AddressHealth(email=old, member_id=990001, status="failing"))
    held = submit(app, stub_broker, submission())[0]
    drain(stub_broker, stub_worker)
    assert state_counts(app, [held]) == {"held": 1}
    members = tmp_path / "mps.csv"
    members.write_text(
        (CONFIG_DIR / "sample" / "mps.csv").read_text().replace(old, "alex.rivers@new.example.org")
    )
    with session_scope(app.sessions) as session:
        import_directory(session, members, [], "the MP's office moved")
    assert reconcile_once(app.sessions, stub_broker, timedelta(0)) >= 1
    drain(stub_broker, stub_worker)
    assert state_counts(app, [held]) == {"delivered": 1}
    assert letter_of(app, held).to_email == "alex.rivers@new.example.org"


def test_notices_are_signed_for_the_campaigns_domain(tmp_path: Path) -> None:
    import dkim

    from tests.services import dkim_dns, dkim_keys
    from workers.letters import notices
    from workers.letters.mail import DkimSigner

    sender = notices.Sender("Campaign", "letters@campaign.example.org")
    message = notices.bounce_notice(
        "3f1e6c1a-8a54-4d3e-9a55-0c1f2e3d4b5a", sender, SUPPORTER, "Jane Smith", 1, utcnow()
    )
    signer = DkimSigner("dearmp", dkim_keys()[0])
    mail = notices.outgoing(message, "n-x@" + BOUNCES, signer)
    assert dkim.verify(mail.data, dnsfunc=dkim_dns)
    assert b"d=campaign.example.org" in mail.data
    assert mail.sender == "n-x@" + BOUNCES and mail.recipients == [SUPPORTER]


def test_the_reconciler_sends_on_what_was_stored_while_redis_was_away(
    app: App, stub_broker: Any, stub_worker: dramatiq.Worker
) -> None:
    from workers.pipeline.reconciler import reconcile_once

    [sid] = deliver(app, stub_broker, stub_worker)
    rcpt, raw = bounce_of(app, sid)
    [stored] = store(app.sessions, "smtp", [rcpt], raw)  # its message to the queue was lost
    assert reconcile_once(app.sessions, stub_broker, timedelta(0)) == 1
    drain(stub_broker, stub_worker)
    assert inbound_row(app, stored).status == "done"
    assert state_counts(app, [sid]) == {"bounced": 1}
    assert len(outbox(app)) == 1  # the notice the inbound stage queued went too
    # A notice whose sender died mid-send is taken back after the lease, and sent once.
    with session_scope(app.sessions) as session:
        notice = session.scalars(select(OutboxItem).where(OutboxItem.kind != "letter")).one()
        notice.status, notice.claimed_at = "sending", utcnow() - timedelta(hours=1)
    assert reconcile_once(app.sessions, stub_broker, timedelta(0)) == 1
    drain(stub_broker, stub_worker)
    with session_scope(app.sessions) as session:
        assert (
            session.scalars(select(OutboxItem.status).where(OutboxItem.kind != "letter")).one()
            == "sent"
        )
    assert len(outbox(app)) == 1  # the same file: the same bytes, the same Message-ID


def test_dearmp_inbound_needs_a_domain_to_receive_for(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from workers.cli import main

    plain = App.from_settings(make_settings(tmp_path))
    set_app(plain)
    try:
        result = CliRunner().invoke(main, ["inbound"])
    finally:
        set_app(None)
        plain.engine.dispose()
    assert result.exit_code == 1 and "DEARMP_BOUNCE_DOMAIN" in result.output


@pytest.mark.smtp
def test_dearmp_run_receives_bounces_in_the_same_process(app: App, stub_broker: Any) -> None:
    import smtplib

    from tests.services import free_port, wait_for
    from workers.pipeline.runtime import running_pipeline

    app.settings.inbound_port = free_port()
    with running_pipeline(app, stub_broker, 4):
        sid = submit(app, stub_broker, submission())[0]
        assert wait_for(lambda: state_counts(app, [sid]) == {"delivered": 1}, 30)
        letter = letter_of(app, sid)
        rcpt = app.returns.bounce(sid)
        assert rcpt is not None
        with smtplib.SMTP("127.0.0.1", app.settings.inbound_port, timeout=30) as smtp:
            smtp.sendmail("<>", [rcpt], samples.gmail_dsn(letter.message_id, letter.to_email, rcpt))
        assert wait_for(lambda: state_counts(app, [sid]) == {"bounced": 1}, 30)


def _digest_made(app: App, broker: Any, worker: dramatiq.Worker) -> tuple[list[str], str]:
    """Three copies of the draft, one after another, to a campaign that puts them in digests
    after the first, and the MP's digest of the last two made: the three ids and the digest's."""
    from schemas.campaign import SimilarLetters
    from workers.letters.definitions import get_definition
    from workers.stages import digests

    with session_scope(app.sessions) as session:
        rules = SimilarLetters(policy="digest", hold_after=0)
        update_definition(session, "political-prisoners", similar_letters=rules)
        draft = get_definition(session, "political-prisoners").draft_body  # type: ignore[union-attr]
    # One after another: letters compared in one group do not see each other.
    ids = []
    for i in range(3):
        one = submission(letter__body=draft, supporter__email=f"digest{i}@example.com")
        ids.append(submit(app, broker, one)[0])
        drain(broker, worker)
    assert state_counts(app, ids) == {"delivered": 1, "in_digest": 2}
    with session_scope(app.sessions) as session:
        [made] = digests.build_due(session, force=True)
    return ids, made


def _digest_delivered(app: App, broker: Any, worker: dramatiq.Worker) -> tuple[list[str], str]:
    """:func:`_digest_made`, and the digest sent."""
    ids, made = _digest_made(app, broker, worker)
    dispatch_groups(broker, {Stage.DELIVER: [made]})
    drain(broker, worker)
    assert state_counts(app, ids) == {"delivered": 3}
    return ids, made


def test_a_bounce_of_an_mps_digest_returns_every_letter_in_it(
    app: App, stub_broker: Any, stub_worker: dramatiq.Worker
) -> None:
    from workers.stages import digests

    ids, made = _digest_delivered(app, stub_broker, stub_worker)
    lead = ids[1]  # the digest's envelope: its first letter's return address
    rcpt = app.returns.bounce(lead)
    assert rcpt is not None
    letter = letter_of(app, lead)
    dsn = samples.postfix_dsn(f"<digest-{made}@campaign.example.org>", letter.to_email, rcpt)
    [inbound_id] = store(app.sessions, "smtp", [rcpt], dsn)
    policy = inbound.InboundPolicy.from_settings(app.settings)
    with session_scope(app.sessions) as session:
        notices = inbound.process(session, inbound_id, app.returns, policy, outbox_for(app)[0])
    assert len(notices) == 2  # each supporter whose letter was in it is told
    assert state_counts(app, ids) == {"delivered": 1, "bounced": 2}
    with session_scope(app.sessions) as session:  # sent again, each on its own
        member_id = session.get(Submission, lead).member_id  # type: ignore[union-attr]
        assert len(resend_bounced(session, member_id, "new.office@mp.example.org")) == 2
        assert digests.mates(session, lead) == []  # a later bounce returns it alone


def test_a_bounce_of_a_digest_whose_first_supporter_was_erased_returns_the_others(
    app: App, stub_broker: Any, stub_worker: dramatiq.Worker
) -> None:
    """The digest's envelope names its first letter; that supporter erased since, the bounce
    still returns every letter that went in it (the erased one without telling anyone)."""
    ids, made = _digest_delivered(app, stub_broker, stub_worker)
    lead = ids[1]
    rcpt = app.returns.bounce(lead)
    assert rcpt is not None
    to_email = letter_of(app, lead).to_email
    with session_scope(app.sessions) as session:
        erase_supporter(session, app.secret, "digest1@example.com", outbox_for(app)[0])
    with session_scope(app.sessions) as session:  # its fingerprint gone, its digest recorded
        kept = session.get(LetterPrint, lead)
        assert kept is not None and (kept.signature, kept.digest_id) == (None, made)
    dsn = samples.postfix_dsn(f"<digest-{made}@campaign.example.org>", to_email, rcpt)
    [inbound_id] = store(app.sessions, "smtp", [rcpt], dsn)
    policy = inbound.InboundPolicy.from_settings(app.settings)
    with session_scope(app.sessions) as session:
        notices = inbound.process(session, inbound_id, app.returns, policy, outbox_for(app)[0])
    assert inbound_row(app, inbound_id).status == "done"
    assert state_counts(app, ids[1:]) == {"bounced": 2}
    assert len(notices) == 1  # the erased supporter is not told: no one to tell


def test_erasure_keeps_of_a_servers_words_about_the_letter_only_their_status(
    app: App, stub_broker: Any, stub_worker: dramatiq.Worker
) -> None:
    """A refusal can quote the letter's sender or words: after erasure, what the database keeps
    of every server's answer about the letter is its status."""
    [sid] = deliver(app, stub_broker, stub_worker, letter__subject="Tom's exclusion")
    rcpt, dsn = bounce_of(app, sid)
    letter = letter_of(app, sid)
    # An office's automatic reply repeats the letter's subject, which the supporter wrote.
    ooo = samples.exchange_automatic_reply(letter.message_id, letter.to_email, rcpt)
    receive(app, stub_broker, stub_worker, rcpt, ooo.replace(b"Please act", b"Tom's exclusion"))
    quoting = dsn.replace(b"Recipient address rejected", b"From Amira Haddad")
    receive(app, stub_broker, stub_worker, rcpt, quoting)
    assert state_counts(app, [sid]) == {"bounced": 1}
    assert "From Amira Haddad" in everything_stored(app)
    assert "Automatic reply: Tom's exclusion" in everything_stored(app)
    with session_scope(app.sessions) as session:  # and words of ours: they stay
        session.add(LetterEvent(submission_id=sid, kind="survey", detail="yes", at=utcnow()))
    with session_scope(app.sessions) as session:
        erase_supporter(session, app.secret, SUPPORTER, outbox_for(app)[0])
        found = session.scalars(select(LetterEvent).where(LetterEvent.submission_id == sid))
        [ooo_event, event, survey] = sorted(found, key=lambda e: e.kind)
        assert (survey.kind, survey.detail) == ("survey", "yes")
        assert (ooo_event.kind, ooo_event.detail) == ("auto_reply", "(erased)")
        bounced = session.get(Submission, sid)
        assert bounced is not None and bounced.failure_reason is not None
        assert (event.detail, bounced.failure_reason[:9]) == ("550 5.1.1 (erased)", "550 5.1.1")
    assert "Amira" not in everything_stored(app) and "Tom's" not in everything_stored(app)
    with session_scope(app.sessions) as session:  # a second erasure changes nothing
        erase_supporter(session, app.secret, SUPPORTER, outbox_for(app)[0])
    assert "Amira" not in everything_stored(app)


def test_a_mailgun_report_of_an_mps_digest_returns_every_letter_in_it(
    app: App, stub_broker: Any, stub_worker: dramatiq.Worker
) -> None:
    ids, made = _digest_delivered(app, stub_broker, stub_worker)
    to = letter_of(app, ids[1]).to_email
    event = {
        "id": "digest-event",
        "event": "failed",
        "severity": "permanent",
        "recipient": to,
        "delivery-status": {"code": 550, "enhanced-code": "5.1.1", "message": "no such user"},
        "message": {"headers": {"message-id": f"digest-{made}@campaign.example.org"}},
    }
    with ApiClient(create_app(lambda: app, stub_broker)) as client:
        assert client.post("/v1/webhooks/mailgun", json=mailgun_body(event)).json() == {
            "stored": True
        }
        drain(stub_broker, stub_worker)
    assert state_counts(app, ids) == {"delivered": 1, "bounced": 2}


def _sent_unmoved(app: App, item_id: str) -> dict[str, Kind]:
    """Send the item as the outbox does, but stop after its sent mark, before its kind's move
    (a worker killed there, or one still sending the rest of its group); the outbox's kinds."""
    every_kind, timing = outbox_for(app)
    unmoved = {name: replace(kind, done=None) for name, kind in every_kind.items()}
    with session_scope(app.sessions) as session:
        assert outbox_sending.send_group(session, [item_id], app.mailer, unmoved, timing) == [
            (item_id, None)
        ]
    return every_kind


def _moved_late(app: App, item_id: str, every_kind: dict[str, Kind]) -> None:
    """The sender's move of its group, made late (or the reconciler's resend of it)."""
    with session_scope(app.sessions) as session:
        outbox_sending.send_group(session, [item_id], app.mailer, every_kind, outbox_for(app)[1])


def test_a_bounce_acted_on_before_its_letters_move_to_delivered_still_returns_it(
    app: App,
) -> None:
    """A relay on the same host returns a refused letter within milliseconds, while the worker
    that sent it may still be sending the rest of its group: the bounce makes the letter's
    move first (the outbox's record says it was sent), then returns it."""
    sid = through_render(app, submission())
    every_kind = _sent_unmoved(app, sid)
    assert state_counts(app, [sid]) == {"rendered": 1}
    rcpt, dsn = bounce_of(app, sid)
    [inbound_id] = store(app.sessions, "smtp", [rcpt], dsn)
    policy = inbound.InboundPolicy.from_settings(app.settings)
    with session_scope(app.sessions) as session:
        assert len(inbound.process(session, inbound_id, app.returns, policy, every_kind)) == 1
    assert state_counts(app, [sid]) == {"bounced": 1}
    assert inbound_row(app, inbound_id).status == "done"
    _moved_late(app, sid, every_kind)  # changes nothing
    assert state_counts(app, [sid]) == {"bounced": 1}


def test_a_bounce_of_a_digest_acted_on_before_its_letters_move_returns_them_all(
    app: App, stub_broker: Any, stub_worker: dramatiq.Worker
) -> None:
    ids, made = _digest_made(app, stub_broker, stub_worker)
    every_kind = _sent_unmoved(app, made)
    assert state_counts(app, ids) == {"delivered": 1, "in_digest": 2}
    lead = ids[1]
    rcpt = app.returns.bounce(lead)
    assert rcpt is not None
    letter = letter_of(app, lead)
    dsn = samples.postfix_dsn(f"<digest-{made}@campaign.example.org>", letter.to_email, rcpt)
    [inbound_id] = store(app.sessions, "smtp", [rcpt], dsn)
    policy = inbound.InboundPolicy.from_settings(app.settings)
    with session_scope(app.sessions) as session:
        assert len(inbound.process(session, inbound_id, app.returns, policy, every_kind)) == 2
    assert state_counts(app, ids) == {"delivered": 1, "bounced": 2}


class SecondWaits:
    """The App's mailer, holding its second email until ``go`` (a sender in mid-group)."""

    def __init__(self, mailer: Any) -> None:
        self.mailer, self.name, self.calls = mailer, mailer.name, 0
        self.reached, self.go = threading.Event(), threading.Event()

    def waiting(self) -> float:
        return 0.0

    def send(self, mail: Any) -> object:
        self.calls += 1
        if self.calls == 2:
            self.reached.set()
            assert self.go.wait(60)
        return self.mailer.send(mail)


def test_a_sender_ending_late_leaves_a_returned_letter_made_anew_to_be_sent(app: App) -> None:
    """A group's first letter bounces while its sender is still sending the second, and an
    operator resends it to a corrected address at once (its item made anew): the sender's move
    of its group, made after, does not mark the new letter delivered before it is sent."""
    first, second = sorted(
        through_render(app, submission(supporter__email=f"s{i}@example.com")) for i in range(2)
    )
    every_kind, timing = outbox_for(app)
    mailer = SecondWaits(app.mailer)
    holding = {**every_kind, "letter": replace(every_kind["letter"], channel=LetterChannel(mailer))}

    def send() -> None:
        with session_scope(app.sessions) as session:
            outbox_sending.send_group(session, [first, second], app.mailer, holding, timing)

    sender = threading.Thread(target=send)
    sender.start()
    try:
        assert mailer.reached.wait(60)
        rcpt, dsn = bounce_of(app, first)
        [inbound_id] = store(app.sessions, "smtp", [rcpt], dsn)
        policy = inbound.InboundPolicy.from_settings(app.settings)
        with session_scope(app.sessions) as session:
            inbound.process(session, inbound_id, app.returns, policy, every_kind)
        assert state_counts(app, [first]) == {"bounced": 1}
        with session_scope(app.sessions) as session:
            member_id = session.get(Submission, first).member_id  # type: ignore[union-attr]
            assert resend_bounced(session, member_id, "new.office@mp.example.org") == [first]
        assert step(app, render, first) == [Stage.DELIVER]
    finally:
        mailer.go.set()
        sender.join(60)
    assert state_counts(app, [first, second]) == {"rendered": 1, "delivered": 1}
    with session_scope(app.sessions) as session:
        outbox_sending.send_group(session, [first], app.mailer, every_kind, timing)
    assert state_counts(app, [first]) == {"delivered": 1}
    assert letter_of(app, first).to_email == "new.office@mp.example.org"


def test_an_erasure_after_a_server_took_the_letter_does_not_call_it_stopped(app: App) -> None:
    """Erased between the server's answer and the letter's move: the report does not say it
    was stopped before sending, and it is delivered."""
    sid = through_render(app, submission(supporter__email=SUPPORTER))
    every_kind = _sent_unmoved(app, sid)
    with session_scope(app.sessions) as session:
        report = erase_supporter(session, app.secret, SUPPORTER, outbox_for(app)[0])
    assert (report.submissions, report.stopped_before_sending) == (1, 0)
    assert state_counts(app, [sid]) == {"delivered": 1}  # moved on as the sender would
    _moved_late(app, sid, every_kind)  # nothing to do
    assert state_counts(app, [sid]) == {"delivered": 1}


def test_an_erasure_after_a_server_took_the_digest_does_not_call_its_letters_stopped(
    app: App, stub_broker: Any, stub_worker: dramatiq.Worker
) -> None:
    ids, made = _digest_made(app, stub_broker, stub_worker)
    every_kind = _sent_unmoved(app, made)
    with session_scope(app.sessions) as session:
        email = session.get(Submission, ids[1]).payload["supporter"]["email"]  # type: ignore[union-attr]
        report = erase_supporter(session, app.secret, email, outbox_for(app)[0])
    assert report.stopped_before_sending == 0
    assert state_counts(app, ids) == {"delivered": 3}  # moved on as the sender would
    _moved_late(app, made, every_kind)  # nothing to do
    assert state_counts(app, ids) == {"delivered": 3}


def test_a_bounce_while_its_letter_is_being_sent_waits_for_the_sent_mark(app: App) -> None:
    """Its letter claimed and with the server (or its worker dead before the sent mark): the
    bounce is not dropped, nor counted as a failure; it waits, then returns the letter."""
    sid = through_render(app, submission())
    with session_scope(app.sessions) as session:
        session.execute(
            update(OutboxItem)
            .where(OutboxItem.id == sid)
            .values(status="sending", claimed_at=utcnow(), attempts=1)
        )
    rcpt, dsn = bounce_of(app, sid)
    [inbound_id] = store(app.sessions, "smtp", [rcpt], dsn)
    policy = inbound.InboundPolicy.from_settings(app.settings)
    every_kind = outbox_for(app)[0]
    with pytest.raises(Deferred):
        inbound.process_counted(app.sessions, inbound_id, app.returns, policy, every_kind)
    row = inbound_row(app, inbound_id)
    assert (row.status, row.attempts) == ("received", 0)
    # Its delayed message is the one to come: the reconciler's copy only after it.
    assert row.dispatched_at > utcnow().replace(tzinfo=row.dispatched_at.tzinfo)
    with session_scope(app.sessions) as session:  # the server took it: the sent mark
        session.execute(
            update(OutboxItem).where(OutboxItem.id == sid).values(status="sent", sent_at=utcnow())
        )
    assert (
        len(inbound.process_counted(app.sessions, inbound_id, app.returns, policy, every_kind)) == 1
    )
    assert state_counts(app, [sid]) == {"bounced": 1}


def test_an_erasure_while_one_letter_is_with_its_server_still_moves_on_another_sent(
    app: App,
) -> None:
    """One of the supporter's letters sent (its move still to come), another claimed and with
    its server: the first is delivered; the second is withdrawn (a retry of it would send an
    erased letter) but not counted as stopped before sending, as it may have gone."""
    sent, claimed = (through_render(app, submission(supporter__email=SUPPORTER)) for _ in range(2))
    every_kind = _sent_unmoved(app, sent)
    with session_scope(app.sessions) as session:
        session.execute(
            update(OutboxItem)
            .where(OutboxItem.id == claimed)
            .values(status="sending", claimed_at=utcnow(), attempts=1)
        )
    with session_scope(app.sessions) as session:
        report = erase_supporter(session, app.secret, SUPPORTER, every_kind)
    assert (report.submissions, report.stopped_before_sending) == (2, 0)
    assert state_counts(app, [sent]) == {"delivered": 1}
    assert state_counts(app, [claimed]) == {"withdrawn": 1}
