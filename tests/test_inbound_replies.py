"""What comes back to a letter cannot be turned against its supporter: replies not plausibly
from the MP's office are held for an operator, a reply is forwarded once however often it
arrives and never past the cap (under concurrency too), a message or notice that always raises
ends, an office's acknowledgement is not a reply, only a mail system's report to the return
address returns a letter, a notice's lease is the configured one, and a resent letter is a new
message. Each test runs on SQLite and on PostgreSQL."""

from __future__ import annotations

import base64
import json
import sqlite3
import threading
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import dramatiq
import pytest
from click.testing import CliRunner
from sqlalchemy import func, select, update
from sqlalchemy.exc import OperationalError

from tests import mail_samples as samples
from tests.conftest import drain, make_settings, serving
from tests.test_after_sent import (
    BOUNCES,
    REPLIES,
    SUPPORTER,
    bounce_of,
    deliver,
    events,
    inbound_row,
    letter_of,
    outbox,
    receive,
    relay,
)
from tests.test_outbox import no_wait, send_item
from workers.cli import main
from workers.database.engine import session_scope
from workers.database.models import AddressHealth, InboundMessage, OutboxItem, Submission, utcnow
from workers.letters.outcomes import report, resend_bounced
from workers.mp import health
from workers.outbox import sending as outbox_sending
from workers.pipeline.actors import outbox_for
from workers.pipeline.app import App
from workers.pipeline.dispatch import dispatch_groups
from workers.pipeline.reconciler import find_after_sent, reconcile_once
from workers.pipeline.runtime import state_counts
from workers.receiving.classify import acknowledgement, automated, classify, reply_origin
from workers.receiving.store import store
from workers.stages import inbound, survey
from workers.stages.stage import Deferred, Stage

MP = "jane.smith.mp@parliament.example"


@pytest.fixture
def app(db_url: str, tmp_path: Path) -> Iterator[App]:
    """The App with a bounce and a reply domain, a DKIM key, and a notice lease of a minute."""
    from tests.services import dkim_keys

    settings = make_settings(
        tmp_path,
        database_url=db_url,
        bounce_domain=BOUNCES,
        reply_domain=REPLIES,
        dkim_private_key=dkim_keys()[0].decode(),
        dkim_selector="dearmp",
        delivery_lease_seconds=60,
    )
    with serving(settings) as application:
        yield application


def relayed_letter(app: App, broker: Any, worker: dramatiq.Worker) -> tuple[str, Any, str]:
    relay(app)
    [sid] = deliver(app, broker, worker)
    letter = letter_of(app, sid)
    assert letter.reply_to is not None
    return sid, letter, letter.reply_to


def phishing(
    to: str, sender: str = '"Jane Smith MP" <jane.smith@parliament-office.example>'
) -> bytes:
    return (
        f"From: {sender}\r\nTo: {to}\r\nReply-To: <refunds@collect.example>\r\n"
        "Subject: RE: Please act\r\nMessage-ID: <phish-1@collect.example>\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n\r\n"
        "Your campaign donation failed: confirm your card at https://collect.example/pay\r\n"
    ).encode()


# -- 3. the reply relay is not a phishing channel --------------------------------------------


def test_a_reply_not_from_the_mps_domain_is_held_for_an_operator_who_releases_or_drops_it(
    app: App, stub_broker: Any, stub_worker: dramatiq.Worker
) -> None:
    sid, _, reply_to = relayed_letter(app, stub_broker, stub_worker)
    first = receive(app, stub_broker, stub_worker, reply_to, phishing(reply_to))
    second = receive(
        app, stub_broker, stub_worker, reply_to, phishing(reply_to).replace(b"phish-1", b"phish-2")
    )
    assert outbox(app) == []  # nothing reached the supporter
    assert events(app, sid) == []  # and nothing counts as the MP's reply
    row = inbound_row(app, first)
    assert row.status == "held" and row.raw is not None
    assert row.reason == "held: the sender is not on the MP's domain"
    runner = CliRunner()
    listed = runner.invoke(main, ["replies", "held"])
    assert listed.exit_code == 0 and first in listed.stdout and second in listed.stdout
    assert len(json.loads(runner.invoke(main, ["replies", "held", "--json"]).stdout)) == 2

    released = runner.invoke(main, ["replies", "release", first, "--yes"])
    assert released.exit_code == 0, released.output
    assert "forwarding it to the supporter" in released.stdout
    drain(stub_broker, stub_worker)
    [forward] = outbox(app)
    assert forward["To"] == SUPPORTER
    assert events(app, sid) == [("reply", None)]
    assert runner.invoke(main, ["replies", "release", first, "--yes"]).exit_code == 1  # once

    dropped = runner.invoke(main, ["replies", "drop", second, "--yes"])
    assert dropped.exit_code == 0 and "dropped" in dropped.stdout
    assert inbound_row(app, second).status == "dropped" and inbound_row(app, second).raw is None
    for command in ("release", "drop"):
        unknown = runner.invoke(main, ["replies", command, "no-such-id"])
        assert unknown.exit_code == 1 and "no held reply" in unknown.output
    assert "no replies held" in runner.invoke(main, ["replies", "held"]).stdout
    assert len(outbox(app)) == 1


def test_erasure_removes_a_held_replys_text(
    app: App, stub_broker: Any, stub_worker: dramatiq.Worker
) -> None:
    from workers.privacy.rights import erase_supporter

    _, _, reply_to = relayed_letter(app, stub_broker, stub_worker)
    held = receive(app, stub_broker, stub_worker, reply_to, phishing(reply_to))
    assert inbound_row(app, held).raw is not None
    with session_scope(app.sessions) as session:
        erase_supporter(
            session, app.secret, SUPPORTER, outbox_for(app)[0], app.settings.resolved_outbox_dir
        )
    assert inbound_row(app, held).raw is None


RELAY = "mx.campaign.example.org"


def test_held_replies_are_listed_and_shown_with_their_sender_subject_and_our_relays_results(
    app: App, stub_broker: Any, stub_worker: dramatiq.Worker
) -> None:
    app.settings.inbound_authserv_id = RELAY
    _, _, reply_to = relayed_letter(app, stub_broker, stub_worker)
    tricky = "=?utf-8?b?" + base64.b64encode(b"Refund\r\nX-Injected: yes\x1b[31m").decode() + "?="
    raw = (
        f"Authentication-Results: {RELAY}; dmarc=fail header.from=parliament-office.example\r\n"
        "Authentication-Results: mail.collect.example; dmarc=pass"
        " header.from=parliament.example\r\n"
        + phishing(reply_to).decode().replace("RE: Please act", tricky)
        + "\x1b]0;owned\x07 and more\r\n"
    ).encode()
    held = receive(app, stub_broker, stub_worker, reply_to, raw)
    runner = CliRunner()
    listed = runner.invoke(main, ["replies", "held"])
    assert listed.exit_code == 0, listed.output
    assert 'From: "Jane Smith MP" <jane.smith@parliament-office.example>' in listed.stdout
    assert "Subject: Refund X-Injected: yes[31m" in listed.stdout  # one line, no escape
    assert f"Authentication-Results: {RELAY}; dmarc=fail" in listed.stdout
    assert "collect.example; dmarc=pass" not in listed.stdout  # not our relay's: not shown
    assert "\x1b" not in listed.stdout
    [row] = json.loads(runner.invoke(main, ["replies", "held", "--json"]).stdout)
    assert row["id"] == held and row["subject"] == "Refund X-Injected: yes[31m"
    assert row["from"] == '"Jane Smith MP" <jane.smith@parliament-office.example>'
    assert row["authentication"] == [f"{RELAY}; dmarc=fail header.from=parliament-office.example"]
    shown = runner.invoke(main, ["replies", "show", held])
    assert shown.exit_code == 0, shown.output
    assert "status: held" in shown.stdout and "reason: held: the sender is not" in shown.stdout
    assert "confirm your card at https://collect.example/pay" in shown.stdout
    assert "\x1b" not in shown.stdout and "\x07" not in shown.stdout
    # What was acted on is no operator's to read.
    genuine = receive(
        app, stub_broker, stub_worker, reply_to, bounce_of(app, row["submission_id"])[1]
    )
    for unknown in (genuine, "no-such-id"):
        refused = runner.invoke(main, ["replies", "show", unknown])
        assert refused.exit_code == 1 and "no held, failed or postmaster" in refused.output


def test_held_replies_per_letter_are_capped_beyond_it_dropped_with_their_text(
    app: App, stub_broker: Any, stub_worker: dramatiq.Worker
) -> None:
    app.settings.forwards_per_letter = 1  # held at once: twice that
    sid, _, reply_to = relayed_letter(app, stub_broker, stub_worker)

    def arrives(n: int) -> str:
        raw = phishing(reply_to).replace(b"phish-1", f"phish-{n}".encode())
        return receive(app, stub_broker, stub_worker, reply_to, raw)

    first, second, third = arrives(1), arrives(2), arrives(3)
    assert [inbound_row(app, i).status for i in (first, second)] == ["held", "held"]
    row = inbound_row(app, third)
    assert (row.status, row.raw, row.submission_id) == ("dropped", None, sid)
    assert row.reason == (
        "not held: 2 replies to this letter are held already (the sender is not on the MP's domain)"
    )
    # The operator drops one: there is room for the next.
    assert CliRunner().invoke(main, ["replies", "drop", first, "--yes"]).exit_code == 0
    assert inbound_row(app, arrives(4)).status == "held"
    assert outbox(app) == [] and events(app, sid) == []


def test_the_held_cap_holds_under_concurrent_replies(
    app: App, stub_broker: Any, stub_worker: dramatiq.Worker
) -> None:
    app.settings.forwards_per_letter = 1
    sid, _, reply_to = relayed_letter(app, stub_broker, stub_worker)
    raws = [phishing(reply_to).replace(b"phish-1", f"phish-{n}".encode()) for n in range(10)]
    _at_once(app, [store(app.sessions, "smtp", [reply_to], raw)[0] for raw in raws])
    with session_scope(app.sessions) as session:
        statuses = session.scalars(
            select(InboundMessage.status).where(InboundMessage.submission_id == sid)
        ).all()
    assert sorted(statuses) == ["dropped"] * 8 + ["held"] * 2


def test_mail_to_the_postmaster_and_failed_messages_are_listed_shown_and_dropped(
    app: App, stub_broker: Any, stub_worker: dramatiq.Worker, monkeypatch: pytest.MonkeyPatch
) -> None:
    raw = (
        b"From: =?utf-8?q?Postmaster_at_a_list?= <pm@list.example>\r\n"
        b"Subject: Your bounces\r\n\r\nYou send too many bounces.\r\n"
    )
    assert store(app.sessions, "smtp", [f"postmaster@{BOUNCES}"], raw) == []
    runner = CliRunner()
    listed = runner.invoke(main, ["replies", "postmaster"])
    assert listed.exit_code == 0, listed.output
    [row] = json.loads(runner.invoke(main, ["replies", "postmaster", "--json"]).stdout)
    assert row["from"] == "Postmaster at a list <pm@list.example>"
    assert row["subject"] == "Your bounces" and row["id"] in listed.stdout
    shown = runner.invoke(main, ["replies", "show", row["id"]])
    assert "status: dropped" in shown.stdout and "You send too many bounces." in shown.stdout
    dropped = runner.invoke(main, ["replies", "drop", row["id"], "--yes"])
    assert dropped.exit_code == 0, dropped.output
    assert inbound_row(app, row["id"]).raw is None
    assert "no mail to the postmaster" in runner.invoke(main, ["replies", "postmaster"]).stdout
    assert "its text is deleted" in runner.invoke(main, ["replies", "show", row["id"]]).stdout
    assert runner.invoke(main, ["replies", "drop", row["id"], "--yes"]).exit_code == 1  # once

    # A message that failed keeps its text for the operator to read, and to drop.
    def unreadable(raw: bytes) -> Any:
        raise LookupError("unknown encoding: unknown-8bit")

    monkeypatch.setattr(inbound, "classify", unreadable)
    [sid] = deliver(app, stub_broker, stub_worker)
    failed = receive(app, stub_broker, stub_worker, *bounce_of(app, sid))
    assert inbound_row(app, failed).status == "failed"
    shown = runner.invoke(main, ["replies", "show", failed])
    assert "status: failed" in shown.stdout and "gave up after 3 failed attempts" in shown.stdout
    assert "Delivery Status Notification" in shown.stdout or "5.1.1" in shown.stdout
    assert runner.invoke(main, ["replies", "drop", failed, "--yes"]).exit_code == 0
    assert inbound_row(app, failed).raw is None


def test_retention_deletes_the_text_no_letters_retention_would(
    app: App, stub_broker: Any, stub_worker: dramatiq.Worker
) -> None:
    from workers.privacy.rights import INBOUND_UNLINKED, run_retention

    old_postmaster = store(app.sessions, "smtp", ["postmaster"], b"Subject: old\r\n\r\nold\r\n")
    new_postmaster = store(app.sessions, "smtp", ["postmaster"], b"Subject: new\r\n\r\nnew\r\n")
    assert old_postmaster == new_postmaster == []
    sid, _, reply_to = relayed_letter(app, stub_broker, stub_worker)
    held = receive(app, stub_broker, stub_worker, reply_to, phishing(reply_to))
    waiting = store(app.sessions, "smtp", ["r-forged@" + REPLIES], b"Subject: x\r\n\r\n")
    with session_scope(app.sessions) as session:
        rows = {r.raw: r.id for r in session.scalars(select(InboundMessage))}
        long_ago = utcnow() - timedelta(days=91)
        session.execute(
            update(InboundMessage)
            .where(InboundMessage.id != rows[b"Subject: new\r\n\r\nnew\r\n"])
            .values(received_at=long_ago)
        )
    with session_scope(app.sessions) as session:
        assert run_retention(session) == {INBOUND_UNLINKED: 1}
    texts = {r: inbound_row(app, i).raw for r, i in rows.items()}
    assert texts[b"Subject: old\r\n\r\nold\r\n"] is None
    assert texts[b"Subject: new\r\n\r\nnew\r\n"] is not None  # within 90 days
    assert inbound_row(app, held).raw is not None  # its letter's retention deletes it
    assert inbound_row(app, waiting[0]).raw is not None  # still to be processed
    with session_scope(app.sessions) as session:
        assert run_retention(session) == {}
    # A letter scrubbed, a reply to it held later: past the period, its text goes too.
    with session_scope(app.sessions) as session:
        session.execute(update(Submission).where(Submission.id == sid).values(scrubbed_at=utcnow()))
        assert run_retention(session) == {INBOUND_UNLINKED: 1}
    assert inbound_row(app, held).raw is None


def authenticated(sender: str, *results: str) -> bytes:
    """A reply from ``sender`` with Authentication-Results headers, topmost first."""
    headers = "".join(f"Authentication-Results: {r}\r\n" for r in results)
    return (
        f"{headers}Received: from mail.parliament.example by mx.campaign.example.org\r\n"
        f"From: Jane Smith MP <{sender}>\r\nTo: r-x@{REPLIES}\r\nSubject: Re: Please act\r\n"
        "Message-ID: <a@parliament.example>\r\n\r\nThank you for writing.\r\n"
    ).encode()


def test_only_the_relays_own_authentication_results_vouch_for_a_reply() -> None:
    ours = {"mx.campaign.example.org"}
    good = (
        "mx.campaign.example.org; dkim=pass header.d=parliament.example;"
        " dmarc=pass (p=reject) header.from=parliament.example"
    )
    forged = "mx.campaign.example.org; dmarc=pass header.from=parliament.example"
    failed = (
        "mx.campaign.example.org; dkim=fail header.d=parliament.example;"
        " dmarc=fail header.from=parliament.example"
    )
    theirs = "mail.collect.example; dmarc=pass header.from=parliament.example"
    # Without a relay configured, the sender's domain is all there is to go by.
    assert reply_origin(authenticated(MP), MP, set()) is None
    assert reply_origin(authenticated("office@mail.parliament.example"), MP, set()) is None
    assert reply_origin(authenticated("jane@parliament.example.net"), MP, set()) is not None
    assert reply_origin(authenticated("jane@example"), MP, set()) is not None
    # A display name holding another address: every address must be on the MP's domain.
    trick = phishing("r-x@" + REPLIES, f'"{MP}" <refunds@collect.example>')
    assert reply_origin(trick, MP, set()) is not None
    trick = phishing("r-x@" + REPLIES, f'"refunds@collect.example" <{MP}>')
    assert reply_origin(trick, MP, set()) is not None
    # With our relay's authserv-id, its own topmost header must show a pass for the domain.
    assert reply_origin(authenticated(MP, good), MP, ours) is None
    assert reply_origin(authenticated(MP), MP, ours) is not None
    assert reply_origin(authenticated(MP, theirs), MP, ours) is not None  # anyone can write one
    # Every header with our id above the first Received must pass: a failing one of ours is
    # not outvoted.
    assert reply_origin(authenticated(MP, failed, forged), MP, ours) is not None
    assert reply_origin(authenticated(MP, forged, failed), MP, ours) is not None
    assert reply_origin(authenticated("x@collect.example", good), MP, ours) is not None


def below_received(raw: bytes, *results: str) -> bytes:
    """``raw`` with Authentication-Results headers under its first Received: as a sender
    writes them, before our relay adds its Received on top."""
    head, received, rest = raw.partition(b"\r\nFrom: ")
    assert received
    written = "".join(f"Authentication-Results: {r}\r\n" for r in results).encode()
    return head + b"\r\n" + written + b"From: " + rest


def test_authentication_results_the_sender_wrote_with_our_id_are_not_believed() -> None:
    """The authserv-id is usually the MX's public name: anyone can write a header with it.
    Only those above the first Received (added by our relay when it received the message) are
    the relay's."""
    ours = {"mx.campaign.example.org"}
    good = "mx.campaign.example.org; dmarc=pass header.from=parliament.example"
    failed = "mx.campaign.example.org; dmarc=fail header.from=parliament.example"
    # A forged pass below the Received, and nothing from the relay: held.
    assert reply_origin(below_received(authenticated(MP), good), MP, ours) is not None
    # A forged pass below does not outvote the relay's fail above...
    assert reply_origin(below_received(authenticated(MP, failed), good), MP, ours) is not None
    # ...and a forged fail below does not spoil the relay's pass above.
    assert reply_origin(below_received(authenticated(MP, good), failed), MP, ours) is None
    # With no Received at all, the message came through no relay: nothing of ours vouches.
    no_relay = authenticated(MP, good).replace(
        b"Received: from mail.parliament.example by mx.campaign.example.org\r\n", b""
    )
    assert b"Received" not in no_relay
    assert reply_origin(no_relay, MP, ours) is not None


@pytest.mark.parametrize(
    "mp", ["jane.smith.mp@gmail.com", "Jane.Smith@btinternet.com", "office@yahoo.fr"]
)
def test_on_a_shared_mail_service_only_the_mps_own_address_is_from_the_office(mp: str) -> None:
    domain = mp.rsplit("@", 1)[1]
    assert reply_origin(authenticated(mp), mp, set()) is None
    assert reply_origin(authenticated(mp.lower()), mp, set()) is None
    assert reply_origin(authenticated(f"refunds@{domain}"), mp, set()) == (
        "the MP's address is on a shared mail service and the sender is not it"
    )
    assert reply_origin(authenticated(f"x@mail.{domain}"), mp, set()) is not None
    # With the relay's results too, a DMARC pass for the service's domain is not enough.
    ours = {"mx.campaign.example.org"}
    passed = f"mx.campaign.example.org; dmarc=pass header.from={domain}"
    assert reply_origin(authenticated(mp, passed), mp, ours) is None
    assert reply_origin(authenticated(f"refunds@{domain}", passed), mp, ours) is not None


def test_with_the_relay_configured_a_reply_it_did_not_vouch_for_is_held(
    app: App, stub_broker: Any, stub_worker: dramatiq.Worker
) -> None:
    app.settings.inbound_authserv_id = "mx.campaign.example.org"
    sid, letter, reply_to = relayed_letter(app, stub_broker, stub_worker)
    domain = letter.to_email.rsplit("@", 1)[1]
    raw = samples.human_reply(letter.message_id, letter.to_email, reply_to)
    spoofed = receive(app, stub_broker, stub_worker, reply_to, raw)
    assert inbound_row(app, spoofed).status == "held"
    vouched = (
        f"Authentication-Results: mx.campaign.example.org; dmarc=pass header.from={domain}\r\n"
        "Received: from mail.parliament.example by mx.campaign.example.org\r\n"
    )
    genuine = receive(
        app,
        stub_broker,
        stub_worker,
        reply_to,
        vouched.encode() + raw.replace(b"<reply-", b"<reply-genuine-"),
    )
    assert inbound_row(app, genuine).status == "done"
    assert len(outbox(app)) == 1 and events(app, sid) == [("reply", None)]
    # The same header written by the sender (below the relay's Received) vouches for nothing.
    forged = receive(
        app,
        stub_broker,
        stub_worker,
        reply_to,
        b"Received: from mail.collect.example by mx.campaign.example.org\r\n"
        + vouched.encode()
        + raw.replace(b"<reply-", b"<reply-forged-"),
    )
    assert inbound_row(app, forged).status == "held"
    assert len(outbox(app)) == 1


# -- 5. once per Message-ID, and a cap that holds under concurrency ----------------------------


def test_the_same_reply_arriving_in_two_smtp_sessions_is_forwarded_once(
    app: App, stub_broker: Any, stub_worker: dramatiq.Worker
) -> None:
    _, letter, reply_to = relayed_letter(app, stub_broker, stub_worker)
    raw = samples.human_reply(letter.message_id, letter.to_email, reply_to)
    receive(app, stub_broker, stub_worker, reply_to, raw)
    again = receive(app, stub_broker, stub_worker, reply_to, b"Received: a retry\r\n" + raw)
    assert len(outbox(app)) == 1
    assert inbound_row(app, again).reason == "the same reply was forwarded already: not forwarded"


def _at_once(app: App, ids: list[str]) -> None:
    """Each stored message processed by a thread of its own, all starting together."""
    policy = inbound.InboundPolicy.from_settings(app.settings)
    start = threading.Barrier(len(ids))
    errors: list[BaseException] = []

    def work(inbound_id: str) -> None:
        start.wait()
        try:
            inbound.process_counted(
                app.sessions, inbound_id, app.returns, policy, outbox_for(app)[0]
            )
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in ids]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []


def _forwards(app: App, sid: str) -> int:
    with session_scope(app.sessions) as session:
        count = session.scalar(
            select(func.count()).where(
                OutboxItem.submission_id == sid, OutboxItem.kind == "forward"
            )
        )
    return int(count or 0)


def test_the_forward_cap_and_once_per_message_id_hold_under_concurrent_replies(
    app: App, stub_broker: Any, stub_worker: dramatiq.Worker
) -> None:
    sid, letter, reply_to = relayed_letter(app, stub_broker, stub_worker)
    cap = app.settings.forwards_per_letter
    raws = [
        samples.human_reply(letter.message_id, letter.to_email, reply_to, f"reply {n}")
        for n in range(cap + 11)
    ]
    ids = [store(app.sessions, "smtp", [reply_to], raw)[0] for raw in raws]
    _at_once(app, ids)
    assert _forwards(app, sid) == cap
    # One reply, stored by six SMTP sessions at once (an MTA's retries), on another letter.
    other, letter, reply_to = relayed_letter(app, stub_broker, stub_worker)
    raw = samples.human_reply(letter.message_id, letter.to_email, reply_to, "once")
    _at_once(app, [store(app.sessions, "smtp", [reply_to], raw)[0] for _ in range(6)])
    assert _forwards(app, other) == 1


# -- 6. what always raises ends ----------------------------------------------------------------


def test_a_notice_that_always_raises_fails_after_its_attempts_and_is_not_resent(
    app: App, stub_broker: Any, stub_worker: dramatiq.Worker, monkeypatch: pytest.MonkeyPatch
) -> None:
    from workers.letters import notices as writing

    def unreadable(*args: Any, **kwargs: Any) -> Any:
        raise LookupError("unknown encoding: x-no-such")

    monkeypatch.setattr(writing, "bounce_notice", unreadable)
    [sid] = deliver(app, stub_broker, stub_worker)
    rcpt, raw = bounce_of(app, sid)
    [inbound_id] = store(app.sessions, "smtp", [rcpt], raw)
    policy = inbound.InboundPolicy.from_settings(app.settings)
    [notice_id] = inbound.process_counted(
        app.sessions, inbound_id, app.returns, policy, outbox_for(app)[0]
    )
    sending = no_wait(app)
    for _ in range(sending.max_attempts - 1):
        with pytest.raises(Deferred) as waits:  # tried again when due, costing no retry
            send_item(app, notice_id, app.mailer, sending)
        assert isinstance(waits.value.__cause__, LookupError)
        with session_scope(app.sessions) as session:
            assert [n for n, _ in find_after_sent(session, timedelta(0))] == [notice_id]
    send_item(app, notice_id, app.mailer, sending)
    with session_scope(app.sessions) as session:
        notice = session.get(OutboxItem, notice_id)
        assert notice is not None and notice.status == "failed"
        n = sending.max_attempts
        assert notice.error == (
            f"gave up after {n} failed attempts: LookupError: unknown encoding: x-no-such"
        )
        assert (notice.failures, notice.attempts) == (n, n)
        assert find_after_sent(session, timedelta(0)) == []  # never resent
    assert reconcile_once(app.sessions, stub_broker, timedelta(0)) == 0
    assert outbox(app) == []


def test_an_inbound_message_that_always_raises_fails_after_max_dead_letters(
    app: App, stub_broker: Any, stub_worker: dramatiq.Worker, monkeypatch: pytest.MonkeyPatch
) -> None:
    def unreadable(raw: bytes) -> Any:
        raise LookupError("unknown encoding: unknown-8bit")

    monkeypatch.setattr(inbound, "classify", unreadable)
    [sid] = deliver(app, stub_broker, stub_worker)
    [inbound_id] = store(app.sessions, "smtp", [bounce_of(app, sid)[0]], b"Subject: x\r\n\r\n")
    policy = inbound.InboundPolicy.from_settings(app.settings)
    for _ in range(app.settings.max_dead_letters - 1):
        with pytest.raises(LookupError):
            inbound.process_counted(
                app.sessions, inbound_id, app.returns, policy, outbox_for(app)[0]
            )
        assert inbound_row(app, inbound_id).status == "received"
    assert (
        inbound.process_counted(app.sessions, inbound_id, app.returns, policy, outbox_for(app)[0])
        == []
    )
    row = inbound_row(app, inbound_id)
    assert (row.status, row.attempts) == ("failed", app.settings.max_dead_letters)
    assert row.raw == b"Subject: x\r\n\r\n"  # kept for the operator, until retention
    assert row.reason == (
        "gave up after 3 failed attempts: LookupError: unknown encoding: unknown-8bit"
    )
    assert reconcile_once(app.sessions, stub_broker, timedelta(0)) == 0
    assert state_counts(app, [sid]) == {"delivered": 1}


def database_locked() -> OperationalError:
    """What SQLAlchemy raises when SQLite's lock (or PostgreSQL's lock timeout) runs out."""
    return OperationalError("UPDATE inbound_messages", {}, sqlite3.OperationalError("locked"))


def test_passing_database_trouble_is_not_counted_against_an_inbound_message(
    app: App, stub_broker: Any, stub_worker: dramatiq.Worker, monkeypatch: pytest.MonkeyPatch
) -> None:
    def locked(raw: bytes) -> Any:
        raise database_locked()

    with monkeypatch.context() as patched:
        patched.setattr(inbound, "classify", locked)
        [sid] = deliver(app, stub_broker, stub_worker)
        rcpt, raw = bounce_of(app, sid)
        [inbound_id] = store(app.sessions, "smtp", [rcpt], raw)
        policy = inbound.InboundPolicy.from_settings(app.settings)
        for _ in range(app.settings.max_dead_letters + 2):
            with pytest.raises(OperationalError):
                inbound.process_counted(
                    app.sessions, inbound_id, app.returns, policy, outbox_for(app)[0]
                )
        row = inbound_row(app, inbound_id)
        assert (row.status, row.attempts, row.raw) == ("received", 0, raw)
    # The database is back: the reply is acted on as if nothing had happened.
    assert (
        inbound.process_counted(app.sessions, inbound_id, app.returns, policy, outbox_for(app)[0])
        != []
    )
    assert inbound_row(app, inbound_id).status == "done"
    assert state_counts(app, [sid]) == {"bounced": 1}


def test_a_failures_reason_has_no_address_in_it(
    app: App, stub_broker: Any, stub_worker: dramatiq.Worker, monkeypatch: pytest.MonkeyPatch
) -> None:
    def unreadable(raw: bytes) -> Any:
        raise ValueError("no charset for <jane.doe@example.org> in SW1A 1AA")

    monkeypatch.setattr(inbound, "classify", unreadable)
    [sid] = deliver(app, stub_broker, stub_worker)
    [inbound_id] = store(app.sessions, "smtp", [bounce_of(app, sid)[0]], b"Subject: x\r\n\r\n")
    policy = inbound.InboundPolicy.from_settings(app.settings)
    for _ in range(app.settings.max_dead_letters - 1):
        with pytest.raises(ValueError):
            inbound.process_counted(
                app.sessions, inbound_id, app.returns, policy, outbox_for(app)[0]
            )
    inbound.process_counted(app.sessions, inbound_id, app.returns, policy, outbox_for(app)[0])
    assert inbound_row(app, inbound_id).reason == (
        "gave up after 3 failed attempts: ValueError: no charset for <[email]> in [postcode]"
    )


def _pending_bounce_notice(app: App, broker: Any, worker: dramatiq.Worker) -> str:
    """A bounce's notice to the supporter, queued and not yet sent."""
    [sid] = deliver(app, broker, worker)
    rcpt, raw = bounce_of(app, sid)
    [inbound_id] = store(app.sessions, "smtp", [rcpt], raw)
    policy = inbound.InboundPolicy.from_settings(app.settings)
    [notice_id] = inbound.process_counted(
        app.sessions, inbound_id, app.returns, policy, outbox_for(app)[0]
    )
    return notice_id


def _sending(app: App) -> outbox_sending.OutboxPolicy:
    return no_wait(app)


def _notice(app: App, notice_id: str) -> OutboxItem:
    with session_scope(app.sessions) as session:
        notice = session.get(OutboxItem, notice_id)
        assert notice is not None
        session.expunge(notice)
        return notice


def test_passing_database_trouble_is_not_counted_against_a_notice(
    app: App, stub_broker: Any, stub_worker: dramatiq.Worker, monkeypatch: pytest.MonkeyPatch
) -> None:
    from workers.letters import notices as writing

    notice_id = _pending_bounce_notice(app, stub_broker, stub_worker)

    def locked(*args: Any, **kwargs: Any) -> Any:
        raise database_locked()

    with monkeypatch.context() as patched:
        patched.setattr(writing, "bounce_notice", locked)
        for _ in range(app.settings.max_dead_letters + 2):
            with pytest.raises(Deferred) as waits:  # a moment's wait, no dramatiq retry
                send_item(app, notice_id, app.mailer, _sending(app))
            assert isinstance(waits.value.__cause__, OperationalError)
            notice = _notice(app, notice_id)
            assert (notice.status, notice.failures) == ("pending", 0)
    send_item(app, notice_id, app.mailer, _sending(app))
    assert _notice(app, notice_id).status == "sent"
    assert len(outbox(app)) == 1


def test_a_notice_that_cannot_be_written_is_skipped_with_the_address_masked(
    app: App, stub_broker: Any, stub_worker: dramatiq.Worker, monkeypatch: pytest.MonkeyPatch
) -> None:
    from workers.letters import notices as writing

    def refused(*args: Any, **kwargs: Any) -> Any:
        raise ValueError("invalid address 'jane doe@example.org'")

    monkeypatch.setattr(writing, "bounce_notice", refused)
    notice_id = _pending_bounce_notice(app, stub_broker, stub_worker)
    send_item(app, notice_id, app.mailer, _sending(app))
    notice = _notice(app, notice_id)
    assert notice.status == "skipped"
    assert notice.error == "cannot be written as email: invalid address 'jane [email]'"


class Scripted:
    """A mail server that answers as told, then as the App's own mailer does."""

    name = "scripted"

    def __init__(self, app: App, *answers: Exception) -> None:
        self.app, self.answers = app, list(answers)

    def send(self, mail: Any) -> str:
        if self.answers:
            raise self.answers.pop(0)
        return self.app.mailer.send(mail)

    def waiting(self) -> float:
        return 0.0

    def close(self) -> None:
        pass


def test_a_notices_refusals_and_errors_each_count_as_a_failed_attempt(
    app: App, stub_broker: Any, stub_worker: dramatiq.Worker
) -> None:
    from workers.letters.mail import TransientDeliveryError

    notice_id = _pending_bounce_notice(app, stub_broker, stub_worker)
    busy = [TransientDeliveryError("451 4.3.2 try later")] * 3
    mailer = Scripted(app, *busy, RuntimeError("connection reset to <jane@example.org>"))
    for expected in (TransientDeliveryError,) * 3 + (RuntimeError,):
        with pytest.raises(Deferred) as waits:  # each waits for its backoff, costing no retry
            send_item(app, notice_id, mailer, _sending(app))
        assert isinstance(waits.value.__cause__, expected)
    notice = _notice(app, notice_id)
    assert (notice.status, notice.attempts, notice.failures) == ("pending", 4, 4)
    assert notice.error == "RuntimeError: connection reset to <[email]>"
    send_item(app, notice_id, mailer, _sending(app))
    assert _notice(app, notice_id).status == "sent"


class Killed(BaseException):
    """The worker process dies in the middle of handing the notice over."""


class Dying:
    name = "dying"

    def __init__(self) -> None:
        self.sent = 0

    def send(self, mail: Any) -> str:
        self.sent += 1
        raise Killed

    def waiting(self) -> float:
        return 0.0

    def close(self) -> None:
        pass


def test_a_notice_whose_worker_stops_every_time_ends_failed(
    app: App, stub_broker: Any, stub_worker: dramatiq.Worker
) -> None:
    notice_id = _pending_bounce_notice(app, stub_broker, stub_worker)
    dying = Dying()
    lapsed = utcnow() - timedelta(seconds=app.settings.delivery_lease_seconds + 1)
    for _ in range(10):
        try:
            send_item(app, notice_id, dying, _sending(app))
        except Killed:
            with session_scope(app.sessions) as session:  # its claim lapses
                session.execute(
                    update(OutboxItem).where(OutboxItem.id == notice_id).values(claimed_at=lapsed)
                )
            continue
        break
    notice = _notice(app, notice_id)
    n = _sending(app).max_attempts
    assert dying.sent == n
    assert (notice.status, notice.failures) == ("failed", n)
    assert notice.error == f"gave up after {n} failed attempts: the worker sending it stopped"
    with session_scope(app.sessions) as session:
        assert find_after_sent(session, timedelta(0)) == []  # never resent


# -- 13. an office's acknowledgement is not a reply ----------------------------------------------

ACKNOWLEDGEMENTS = [
    "Thank you for contacting the office of Jane Smith MP. This email is to confirm that we "
    "have received your message. Due to the high volume of correspondence we receive, we aim "
    "to respond within 15 working days. Please note that Jane can only act on behalf of her "
    "constituents; if you have not done so already, please reply with your full postal address.",
    "Thank you for your email to Sir Alex Rivers MP. Your email has been received and will be "
    "dealt with as soon as possible. If your matter is urgent, please call 020 7219 0000.",
]
# Words only a machine writes: automatic replies, whatever their headers.
AUTOMATED = [
    "Thank you for getting in touch. This is an automated response: the office receives a large "
    "number of emails and we will reply to constituents in turn.",
    "Dear constituent,\nThanks for your email. Please do not reply to this email.\nThe office",
]
# A substantive reply that reads like an acknowledgement: a form reply on the subject.
FORM_REPLY = (
    "Thank you for contacting me about the climate bill. I have received a large number of "
    "emails on this subject, so I hope you will forgive a reply to all of them. I share your "
    "concern: I will vote for the bill at its second reading next week.\nJane Smith MP"
)
REPLIES_THAT_THANK = [
    "Dear Sam,\nThank you for contacting me about the detention of political prisoners. I share "
    "your concern and have written to the Foreign Secretary. I will let you know when I receive "
    "a response.\nKind regards,\nJane Smith MP",
    "Dear Sam,\nThank you for your email. I have received your letter and raised the case with "
    "the minister this morning; I will write again as soon as I hear back.\nJane",
    "Thank you for contacting the office of Jane Smith MP about this case. Jane has asked me to "
    "reply on her behalf: she met the ambassador last week and pressed for the release.\n"
    "Caseworker to Jane Smith MP",
]


def _office_mail(words: str) -> bytes:
    quoted = "\r\n\r\nOn Wed, 2 Dec 2026, Campaign wrote:\r\n> We have received your email\r\n"
    return (
        f"From: Office of Jane Smith MP <{MP}>\r\nTo: b-x@{BOUNCES}\r\nSubject: RE: Please act\r\n"
        "Message-ID: <m@parliament.example>\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
        + words.replace("\n", "\r\n")
        + quoted
    ).encode()


@pytest.mark.parametrize("words", [*ACKNOWLEDGEMENTS, FORM_REPLY])
def test_what_reads_like_an_acknowledgement_is_one_not_an_automatic_reply(words: str) -> None:
    """Only a guess from the words: a form reply reads the same, so it is not a machine's."""
    assert acknowledgement(" ".join(words.split())) and not automated(words)
    assert classify(_office_mail(words)).kind == "acknowledgement"


@pytest.mark.parametrize("words", AUTOMATED)
def test_words_only_a_machine_writes_make_an_automatic_reply(words: str) -> None:
    assert automated(" ".join(words.split()))
    assert classify(_office_mail(words)).kind == "auto_reply"


def _office_reply(words: str, letter: Any, message_id: str, sender: str = "") -> bytes:
    """``words`` from the letter's MP (or ``sender``) to its reply address."""
    return (
        _office_mail(words)
        .replace(f"b-x@{BOUNCES}".encode(), letter.reply_to.encode())
        .replace(b"<m@parliament.example>", message_id.encode())
        .replace(MP.encode(), (sender or letter.to_email).encode())
    )


def test_a_form_reply_read_as_an_acknowledgement_still_reaches_the_supporter(
    app: App, stub_broker: Any, stub_worker: dramatiq.Worker
) -> None:
    """Forwarded like a reply where replies are relayed, its text deleted once sent; it counts
    as an acknowledgement, so the survey still asks. A machine's automatic reply is not
    forwarded."""
    sid, letter, reply_to = relayed_letter(app, stub_broker, stub_worker)
    form = receive(
        app, stub_broker, stub_worker, reply_to, _office_reply(FORM_REPLY, letter, "<f@p>")
    )
    row = inbound_row(app, form)
    assert (row.status, row.kind, row.raw) == ("done", "acknowledgement", None)
    [forward] = outbox(app)
    assert forward["To"] == SUPPORTER
    assert "I will vote for the bill" in forward.get_content()
    machine = receive(
        app, stub_broker, stub_worker, reply_to, _office_reply(AUTOMATED[0], letter, "<a@p>")
    )
    assert inbound_row(app, machine).kind == "auto_reply"
    assert len(outbox(app)) == 1
    assert events(app, sid) == [("auto_reply", None), ("auto_reply", None)]
    with session_scope(app.sessions) as session:
        from workers.database.models import OutboxItem

        session.execute(
            update(OutboxItem)
            .where(OutboxItem.kind == "letter")
            .values(sent_at=utcnow() - timedelta(days=15))
        )
    with session_scope(app.sessions) as session:
        assert len(survey.due(session)) == 1


def test_an_acknowledgement_not_from_the_office_is_held_like_a_reply(
    app: App, stub_broker: Any, stub_worker: dramatiq.Worker
) -> None:
    _, letter, reply_to = relayed_letter(app, stub_broker, stub_worker)
    raw = _office_reply(ACKNOWLEDGEMENTS[0], letter, "<h@p>", "office@collect.example")
    held = receive(app, stub_broker, stub_worker, reply_to, raw)
    row = inbound_row(app, held)
    assert (row.status, row.kind) == ("held", "acknowledgement") and row.raw is not None
    assert outbox(app) == []


@pytest.mark.parametrize("words", REPLIES_THAT_THANK)
def test_a_persons_reply_that_thanks_the_constituent_is_still_a_reply(words: str) -> None:
    assert classify(_office_mail(words)).kind == "reply"


def test_an_acknowledgement_does_not_stop_the_survey(
    app: App, stub_broker: Any, stub_worker: dramatiq.Worker
) -> None:
    [sid] = deliver(app, stub_broker, stub_worker)
    rcpt = app.returns.bounce(sid)
    assert rcpt is not None
    receive(app, stub_broker, stub_worker, rcpt, _office_mail(ACKNOWLEDGEMENTS[0]))
    assert events(app, sid) == [("auto_reply", None)]
    with session_scope(app.sessions) as session:
        from workers.database.models import OutboxItem

        session.execute(
            update(OutboxItem)
            .where(OutboxItem.kind == "letter")
            .values(sent_at=utcnow() - timedelta(days=15))
        )
    with session_scope(app.sessions) as session:
        assert len(survey.due(session)) == 1


# -- 14. a person's "Undeliverable" returns nothing ---------------------------------------------


def _handwritten_undeliverable(to: str) -> bytes:
    return (
        f"From: A Stranger <someone@stranger.example>\r\nTo: {to}\r\n"
        "Subject: Undeliverable: Please act\r\nMessage-ID: <u@stranger.example>\r\n\r\n"
        "Delivery has failed to these recipients:\r\n\r\n"
        "Remote Server returned '550 5.1.1 RESOLVER.ADR.RecipNotFound; not found'\r\n"
    ).encode()


def test_a_handwritten_undeliverable_returns_no_letter_and_marks_no_address_failing(
    app: App, stub_broker: Any, stub_worker: dramatiq.Worker
) -> None:
    relay(app)
    ids = deliver(app, stub_broker, stub_worker, n=app.settings.failing_after_bounces)
    for sid in ids:
        letter = letter_of(app, sid)
        assert letter.reply_to is not None
        receive(app, stub_broker, stub_worker, letter.reply_to, _handwritten_undeliverable(MP))
        rcpt = app.returns.bounce(sid)
        assert rcpt is not None
        receive(app, stub_broker, stub_worker, rcpt, _handwritten_undeliverable(rcpt))
        # A genuine-looking delivery report, sent by whoever knows the reply address.
        report_raw = samples.postfix_dsn(letter.message_id, letter.to_email, letter.reply_to)
        dropped = receive(app, stub_broker, stub_worker, letter.reply_to, report_raw)
        assert inbound_row(app, dropped).reason == "a delivery report sent to the reply address"
    assert state_counts(app, ids) == {"delivered": len(ids)}
    assert all("bounce" not in [k for k, _ in events(app, sid)] for sid in ids)
    with session_scope(app.sessions) as session:
        assert session.scalars(select(AddressHealth)).all() == []
    assert classify(_handwritten_undeliverable(MP)).kind == "reply"


# -- 16. a notice's lease is DEARMP_DELIVERY_LEASE_SECONDS --------------------------------------


def test_a_notice_whose_sender_died_is_taken_over_after_the_configured_lease(
    app: App, stub_broker: Any, stub_worker: dramatiq.Worker
) -> None:
    [sid] = deliver(app, stub_broker, stub_worker)
    receive(app, stub_broker, stub_worker, *bounce_of(app, sid))
    with session_scope(app.sessions) as session:
        notice = session.scalars(select(OutboxItem).where(OutboxItem.kind != "letter")).one()
        assert notice.status == "sent"
        # Its worker was killed two minutes into sending: past the 60 s lease, within 300 s.
        notice.status, notice.claimed_at = "sending", utcnow() - timedelta(minutes=2)
        notice.dispatched_at = utcnow() - timedelta(minutes=2)
    result = CliRunner().invoke(main, ["reconcile", "--once"])
    assert result.exit_code == 0 and "resent 1" in result.stdout, result.output
    drain(stub_broker, stub_worker)
    with session_scope(app.sessions) as session:
        assert (
            session.scalars(select(OutboxItem.status).where(OutboxItem.kind != "letter")).one()
            == "sent"
        )


# -- 17. a resent letter is a new message -------------------------------------------------------


def test_a_resent_letter_is_a_new_signed_message_a_late_report_on_the_old_one_cannot_return(
    app: App, stub_broker: Any, stub_worker: dramatiq.Worker
) -> None:
    import dkim

    from tests.services import dkim_dns

    [sid] = deliver(app, stub_broker, stub_worker)
    old = letter_of(app, sid)
    late = samples.postfix_dsn(old.message_id, old.to_email, app.returns.bounce(sid) or "")
    receive(app, stub_broker, stub_worker, *bounce_of(app, sid))
    assert state_counts(app, [sid]) == {"bounced": 1}
    with session_scope(app.sessions) as session:
        member_id = session.scalar(select(Submission.member_id).where(Submission.id == sid))
        assert member_id is not None
        resend_bounced(session, member_id, "new.office@parliament.example", signer=app.signer)
    dispatch_groups(stub_broker, {Stage.RENDER: [sid]})
    drain(stub_broker, stub_worker)
    assert state_counts(app, [sid]) == {"delivered": 1}
    new = letter_of(app, sid)
    assert new.to_email == "new.office@parliament.example"
    assert new.message_id != old.message_id and new.dkim_signature != old.dkim_signature
    [sent] = outbox(app, sid)
    assert sent["Message-ID"].strip() == new.message_id and sent["To"].endswith(
        "<new.office@parliament.example>"
    )
    assert dkim.verify(sent.as_bytes(), dnsfunc=dkim_dns)
    # The old address's server reports on the returned letter again, late.
    dropped = receive(app, stub_broker, stub_worker, app.returns.bounce(sid) or "", late)
    assert inbound_row(app, dropped).status == "dropped"
    assert state_counts(app, [sid]) == {"delivered": 1}
    with session_scope(app.sessions) as session:
        [total, _] = sorted(report(session), key=lambda r: r.member_id is not None)
    assert (total.delivered, total.bounced) == (1, 0)


def test_returns_to_the_old_address_do_not_count_against_the_new_one(
    app: App, stub_broker: Any, stub_worker: dramatiq.Worker
) -> None:
    ids = deliver(app, stub_broker, stub_worker, n=app.settings.failing_after_bounces)
    for sid in ids:
        receive(app, stub_broker, stub_worker, *bounce_of(app, sid))
    with session_scope(app.sessions) as session:
        member_id = session.scalar(select(Submission.member_id).where(Submission.id == ids[0]))
        assert member_id is not None
        resend_bounced(session, member_id, "new.office@parliament.example", signer=app.signer)
    dispatch_groups(stub_broker, {Stage.RENDER: ids})
    drain(stub_broker, stub_worker)
    assert state_counts(app, ids) == {"delivered": len(ids)}
    receive(app, stub_broker, stub_worker, *bounce_of(app, ids[0]))  # one return, new address
    assert state_counts(app, ids) == {"delivered": len(ids) - 1, "bounced": 1}
    with session_scope(app.sessions) as session:
        assert not health.is_failing(session, "new.office@parliament.example")
