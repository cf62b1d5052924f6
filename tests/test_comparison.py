"""The comparison stage: each letter's share of own words and its near-identical letters to the
same MP, stored in the database; the headers an office sorts on; a campaign that holds
near-identical letters for review, released or rejected by an operator; erasure forgets the
fingerprint."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from email import message_from_bytes, policy
from typing import Any

import dramatiq
import pytest
from click.testing import CliRunner
from sqlalchemy import event, select

from schemas.campaign import SimilarLetters
from tests.conftest import drain
from tests.factories import submission
from tests.test_outbox import send_item
from tests.test_stages import get, step, store
from workers.cli import main
from workers.database.engine import session_scope
from workers.database.models import Letter, LetterPrint, PrintCount, State
from workers.database.transitions import run_group
from workers.letters import originality
from workers.letters.definitions import get_definition, update_definition
from workers.letters.mail.messages import letter_bytes
from workers.pipeline import actors
from workers.pipeline.app import App
from workers.pipeline.dispatch import stage_message
from workers.pipeline.runtime import state_counts, submit
from workers.stages import comparison
from workers.stages.comparison import compare, near_identical_anywhere
from workers.stages.rendering import render
from workers.stages.resolution import resolve
from workers.stages.stage import Deferred, Stage
from workers.stages.validation import validate

SLUG = "political-prisoners"
OWN = (
    "My grandmother was held for two years without charge and my family still carries what "
    "that did to her every single day of our lives."
)


def _draft(app: App) -> str:
    with session_scope(app.sessions) as session:
        definition = get_definition(session, SLUG)
        assert definition is not None
        return definition.draft_body


def _compared(app: App, body: str, email: str = "a@example.com", **changes: Any) -> str:
    sid = store(app, submission(letter__body=body, supporter__email=email, **changes))
    step(app, validate, sid)
    assert step(app, resolve, sid) == [Stage.COMPARE]
    return sid


def _print(app: App, sid: str) -> LetterPrint:
    with session_scope(app.sessions) as session:
        found = session.get(LetterPrint, sid)
        assert found is not None
        session.expunge(found)
        return found


def test_the_draft_as_it_is_scores_no_own_words_and_the_letter_says_so_in_its_headers(
    app: App,
) -> None:
    draft = _draft(app)
    sid = _compared(app, draft)
    assert step(app, compare, sid) == [Stage.RENDER]
    assert step(app, compare, sid) == []  # safe to run twice
    found = _print(app, sid)
    assert (found.own_words, found.decision, found.similar) == (0.0, "send", 0)
    assert originality.unpack(found.signature) == originality.signature(originality.words(draft))
    assert step(app, render, sid) == [Stage.DELIVER]
    with session_scope(app.sessions) as session:
        letter = session.get(Letter, sid)
        assert letter is not None and letter.own_words == 0
        email = message_from_bytes(letter_bytes(letter), policy=policy.SMTP)
    assert email["X-Own-Words"] == "0%"
    assert email["List-Id"] == (
        '"Example Solidarity Campaign: Stand with Palestinian political prisoners" '
        "<political-prisoners.campaign.example.org>"
    )


def test_a_paragraph_of_ones_own_scores_its_share_and_near_identical_letters_are_counted(
    app: App,
) -> None:
    draft = _draft(app)
    first = _compared(app, draft, "first@example.com")
    step(app, compare, first)
    own = _compared(app, f"{draft.strip()}\n\n{OWN}", "own@example.com")
    step(app, compare, own)
    share = _print(app, own).own_words
    added, total = len(originality.words(OWN)), len(originality.words(draft + " " + OWN))
    assert added / total <= share <= (added + 6) / total
    # The second copy of the draft finds the first (and the letter with its own paragraph is
    # not near-identical at 0.9).
    again = _compared(app, draft, "again@example.com")
    step(app, compare, again)
    assert (_print(app, again).similar, _print(app, again).similar_recent) == (1, 1)
    with session_scope(app.sessions) as session:  # every letter went to one MP
        assert near_identical_anywhere(session, SLUG, 0.9) == 0


def test_a_campaign_that_holds_near_identical_letters_sends_them_to_review_until_an_operator_acts(
    app: App, stub_broker: Any, stub_worker: dramatiq.Worker
) -> None:
    with session_scope(app.sessions) as session:
        update_definition(
            session, SLUG, similar_letters=SimilarLetters(policy="hold", hold_after=1)
        )
    draft = _draft(app)
    ids = []
    for i in range(4):  # one after another: each is compared with those stored before it
        ids.append(
            submit(
                app,
                stub_broker,
                submission(letter__body=draft, supporter__email=f"s{i}@example.com"),
            )[0]
        )
        drain(stub_broker, stub_worker)
    own = submit(app, stub_broker, submission(letter__body=f"{draft}\n\n{OWN}"))[0]
    drain(stub_broker, stub_worker)
    assert [get(app, sid).state for sid in ids] == ["delivered"] * 2 + ["in_review"] * 2
    assert get(app, own).state == State.DELIVERED  # in the supporter's own words: sent

    cli = CliRunner()
    listed = json.loads(cli.invoke(main, ["review", "list", "--json"]).stdout)
    assert [r["id"] for r in listed] == ids[2:] and listed[0]["similar_recent"] == 2
    released = cli.invoke(main, ["review", "release", ids[2], "--yes"])
    assert released.exit_code == 0 and "released 1 letter" in released.output
    again = cli.invoke(main, ["review", "release", ids[2], "--yes"])
    assert again.exit_code == 1 and "not in review" in again.output
    no_reason = cli.invoke(main, ["review", "reject", ids[3], "--reason", " "])
    assert no_reason.exit_code == 2
    reason = "Please write to your MP in your own words: identical letters are filtered."
    assert (
        cli.invoke(main, ["review", "reject", ids[3], "--reason", reason, "--yes"]).exit_code == 0
    )
    drain(stub_broker, stub_worker)
    assert state_counts(app, ids) == {"delivered": 3, "rejected": 1}
    assert get(app, ids[3]).rejection == {"letter.body": reason}  # what the supporter is told

    report = json.loads(cli.invoke(main, ["review", "report", SLUG, "--json"]).stdout)
    assert report["own_words"]["0-10%"] == 4 and sum(report["own_words"].values()) == 5
    assert report["per_mp"][0]["letters"] == 5 and report["per_mp"][0]["held"] == 2
    unknown = cli.invoke(main, ["review", "report", "nope"])
    assert unknown.exit_code == 1


def _counts(app: App) -> list[tuple[int, int]]:
    with session_scope(app.sessions) as session:
        return [tuple(r) for r in session.execute(select(PrintCount.member_id, PrintCount.letters))]


def test_erasure_forgets_the_letters_fingerprint_and_takes_it_off_its_count(app: App) -> None:
    from workers.privacy.rights import erase_supporter

    kept = _compared(app, _draft(app), "kept@example.com")
    sid = _compared(app, _draft(app), "erase.me@example.com")
    assert run_group(app.sessions, [kept, sid], comparison.plan)  # together: one count of two
    [(member, letters)] = _counts(app)
    assert letters == 2 and member == _print(app, sid).member_id
    with session_scope(app.sessions) as session:
        erase_supporter(session, app.secret, "erase.me@example.com", actors.outbox_for(app)[0])
    with session_scope(app.sessions) as session:
        assert session.get(LetterPrint, sid) is None
    assert _counts(app) == [(member, 1)]
    with session_scope(app.sessions) as session:
        erase_supporter(session, app.secret, "kept@example.com", actors.outbox_for(app)[0])
    assert _counts(app) == []  # a count that reaches nothing goes


def test_letters_counted_before_the_hold_window_or_the_comparison_window_are_not_recent(
    app: App,
) -> None:
    draft = _draft(app)
    first = _compared(app, draft, "first@example.com")
    step(app, compare, first)
    member = _print(app, first).member_id
    with session_scope(app.sessions) as session:  # the hour it was counted in, moved back
        [count] = session.scalars(select(PrintCount)).all()
        count.hour -= timedelta(hours=26)
    second = _compared(app, draft, "second@example.com")
    step(app, compare, second)
    assert (_print(app, second).similar, _print(app, second).similar_recent) == (1, 0)
    with session_scope(app.sessions) as session:
        for count in session.scalars(select(PrintCount)):
            count.hour -= timedelta(days=31)
    third = _compared(app, draft, "third@example.com")
    step(app, compare, third)
    assert (_print(app, third).similar, _print(app, third).similar_recent) == (0, 0)
    assert sorted(_counts(app)) == [(member, 1), (member, 1), (member, 1)]


def test_a_letter_is_compared_with_the_distinct_letters_its_mp_had_most(
    app: App, monkeypatch: pytest.MonkeyPatch
) -> None:
    draft = _draft(app)
    own = f"{draft.strip()}\n\n{OWN}"
    for i, body in enumerate([draft, draft, own, own, own]):
        step(app, compare, _compared(app, body, f"s{i}@example.com"))
    monkeypatch.setattr(comparison, "MOST_COMPARED", 1)  # only the letter sent most: not alike
    first = _compared(app, draft, "first@example.com")
    step(app, compare, first)
    assert (_print(app, first).similar, _print(app, first).similar_recent) == (0, 0)
    monkeypatch.setattr(comparison, "MOST_COMPARED", 2)
    second = _compared(app, draft, "second@example.com")
    step(app, compare, second)
    assert (_print(app, second).similar, _print(app, second).similar_recent) == (3, 3)
    with session_scope(app.sessions) as session:  # the counts of the others, an hour older
        for count in session.scalars(select(PrintCount)):
            count.hour -= timedelta(hours=1)
    step(app, compare, _compared(app, own, "new@example.com"))  # the newest count: not alike
    monkeypatch.setattr(comparison, "RECENT_COUNTS", 1)  # only the newest count is read
    third = _compared(app, draft, "third@example.com")
    step(app, compare, third)
    assert (_print(app, third).similar, _print(app, third).similar_recent) == (0, 0)


def test_a_groups_alike_moves_are_one_update_and_one_moved_meanwhile_sends_each_alone(
    app: App,
) -> None:
    ids = sorted(_compared(app, _draft(app), f"g{i}@example.com") for i in range(4))
    updates: list[str] = []

    def count(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if statement.startswith("UPDATE submissions"):
            updates.append(statement)

    event.listen(app.engine, "before_cursor_execute", count)
    try:
        assert all(
            error is None for _, _, error in run_group(app.sessions, ids[:2], comparison.plan)
        )
        assert len(updates) == 1 and " IN " in updates[0]  # the group's two moves: one UPDATE
        taken, raced = ids[3], []

        def racing(session: Any, submission_id: str) -> Any:
            write = comparison.plan(session, submission_id)
            if submission_id == taken and not raced:
                raced.append(submission_id)
                with session_scope(app.sessions) as other:  # another worker, in between
                    compare(other, submission_id)
            return write

        outcomes = {sid: error for sid, _, error in run_group(app.sessions, ids[2:], racing)}
    finally:
        event.remove(app.engine, "before_cursor_execute", count)
    assert outcomes == {ids[2]: None, taken: None}  # rolled back, then each alone
    assert {get(app, sid).state for sid in ids} == {State.COMPARED}
    assert [e.state for e in get(app, taken).events].count(State.COMPARED) == 1
    assert sum(letters for _, letters in _counts(app)) == 4  # each counted once


def test_the_comparison_runs_in_line_after_resolution_and_on_its_queue_when_it_cannot(
    app: App, stub_broker: Any, stub_worker: dramatiq.Worker, monkeypatch: pytest.MonkeyPatch
) -> None:
    sid = store(app, submission())
    step(app, validate, sid)
    ran: list[str] = []
    stub_broker.actors[Stage.COMPARE.actor].fn, original = (
        lambda message: ran.append("message"),
        stub_broker.actors[Stage.COMPARE.actor].fn,
    )
    stub_broker.enqueue(stage_message(Stage.RESOLVE, sid))
    stub_broker.join(Stage.RESOLVE.queue)
    stub_worker.join()
    assert State.COMPARED in [e.state for e in get(app, sid).events]
    assert ran == []  # compared by the worker that resolved it: no message to its queue

    def broken(session: Any, submission_id: str) -> Any:
        raise RuntimeError("the comparison cannot run here")

    other = store(app, submission(supporter__email="other@example.com"))
    step(app, validate, other)
    monkeypatch.setattr(comparison, "plan", broken)
    stub_broker.enqueue(stage_message(Stage.RESOLVE, other))
    stub_broker.join(Stage.RESOLVE.queue)
    stub_broker.join(Stage.COMPARE.queue)
    stub_worker.join()
    assert get(app, other).state == State.RESOLVED and ran == ["message"]  # sent on its queue

    def interrupted(app: App, ids: list[str], send_on: Any) -> Any:
        raise KeyboardInterrupt  # as dramatiq's time limit interrupts (not an Exception)

    monkeypatch.setitem(actors.WORK, Stage.COMPARE, interrupted)
    queued: list[tuple[str, list[Stage]]] = []
    with pytest.raises(KeyboardInterrupt):  # goes on, after the ids went to the queue
        actors.in_line(app, stub_broker, queued.extend)([(other, [Stage.COMPARE, Stage.RENDER])])
    assert queued == [(other, [Stage.RENDER]), (other, [Stage.COMPARE])]
    stub_broker.actors[Stage.COMPARE.actor].fn = original


def test_a_digest_campaign_sends_the_days_near_identical_letters_to_an_mp_as_one_email(
    app: App, stub_broker: Any, stub_worker: dramatiq.Worker
) -> None:
    """The common text once, then each constituent: name, postcode, their own words, their
    reply address; the letters delivered when it is sent, and each supporter told."""
    from workers.database.models import Digest, OutboxItem
    from workers.stages import digests

    rules = SimilarLetters(policy="digest", threshold=0.5, hold_after=1, digest_hour=23)
    with session_scope(app.sessions) as session:
        update_definition(session, SLUG, similar_letters=rules)
    draft = _draft(app).strip()
    added = ["I care for my neighbour.", "", "My cousin was held in Ofer.", "We marched in May."]
    ids = []
    for i, extra in enumerate(added):
        body = f"{draft}\n\n{extra}" if extra else draft
        payload = submission(letter__body=body, supporter__email=f"d{i}@example.com")
        payload["supporter"]["name"] = f"Supporter {i}"
        ids.append(submit(app, stub_broker, payload)[0])
        drain(stub_broker, stub_worker)
    assert [get(app, sid).state for sid in ids] == ["delivered"] * 2 + ["in_digest"] * 2
    assert json.loads(CliRunner().invoke(main, ["review", "list", "--json"]).stdout) == []

    with session_scope(app.sessions) as session:  # before its hour, nothing; once made, once
        early = datetime.now(UTC).replace(hour=22)
        assert digests.build_due(session, early) == []
    made = CliRunner().invoke(main, ["review", "digest", "--now"])
    assert made.exit_code == 0 and "1 digest made" in made.output
    assert CliRunner().invoke(main, ["review", "digest"]).exit_code == 1
    drain(stub_broker, stub_worker)
    assert [get(app, sid).state for sid in ids] == ["delivered"] * 4
    with session_scope(app.sessions) as session:
        digest = session.scalars(select(Digest)).one()
        assert digest.letters == 2
        letters = session.scalars(
            select(OutboxItem).where(OutboxItem.id.in_(ids[2:]))
        ).all()  # a letter item each, sent with the digest (the survey asks as for any)
        assert {(i.kind, i.status) for i in letters} == {("letter", "sent")}
        notices = session.scalars(select(OutboxItem.id).where(OutboxItem.kind == "digested"))
        told = list(notices)
    eml = app.settings.resolved_outbox_dir / f"digest-{digest.id}.eml"
    mail = message_from_bytes(eml.read_bytes(), policy=policy.SMTP)
    assert (
        mail["Subject"] == "2 constituents wrote to you: Stand with Palestinian political prisoners"
    )
    text = mail.get_body(("plain",)).get_content()  # type: ignore[union-attr]
    assert text.count(draft.splitlines()[0]) == 1  # the common text once
    assert "1. Supporter 2, " in text and "2. Supporter 3, " in text
    assert '"My cousin was held in Ofer"' in text and '"We marched in May"' in text
    assert "I care for my neighbour" not in text  # sent on its own, not in the digest
    assert text.count("Reply to: d2@example.com") == 1  # replies go to each supporter (direct)
    assert len(told) == 2
    from workers.pipeline.actors import outbox_for
    from workers.privacy.rights import erase_supporter

    with session_scope(app.sessions) as session:  # one of them erased since: not told, counted
        erase_supporter(session, app.secret, "d2@example.com", outbox_for(app)[0])
    for item_id in told:
        send_item(app, item_id)
    told_mail = list(app.settings.resolved_outbox_dir.glob("notice-*.eml"))
    assert len(told_mail) == 1
    told_text = message_from_bytes(told_mail[0].read_bytes(), policy=policy.SMTP).get_content()
    assert "in one email with the letter of 1 other constituent who wrote" in told_text
    report = json.loads(CliRunner().invoke(main, ["review", "report", SLUG, "--json"]).stdout)
    assert report["per_mp"][0]["digested"] == 2


def test_near_identical_letters_to_different_mps_are_counted_for_the_report(app: App) -> None:
    draft = _draft(app)
    ids = [
        _compared(app, draft, "x@example.com"),
        _compared(app, f"{draft}\n\nThank you.", "y@example.com", supporter__postcode="dm5 4df"),
        _compared(app, OWN * 3, "z@example.com", supporter__postcode="dm5 4df"),
    ]
    for sid in ids:
        step(app, compare, sid)
    assert get(app, ids[0]).member_id != get(app, ids[1]).member_id
    with session_scope(app.sessions) as session:
        assert near_identical_anywhere(session, SLUG, 0.9) == 2
        assert near_identical_anywhere(session, "nope", 0.9) == 0


def _waiting_for_a_digest(app: App, broker: Any, worker: dramatiq.Worker) -> list[str]:
    """Three copies of the draft, one after another, to a campaign that puts them in digests
    after the first: the ids of the two waiting for the MP's digest."""
    rules = SimilarLetters(policy="digest", hold_after=0, digest_hour=23)
    with session_scope(app.sessions) as session:
        update_definition(session, SLUG, similar_letters=rules)
    ids = []
    for i in range(3):
        ids.append(submit(app, broker, submission(supporter__email=f"w{i}@example.com"))[0])
        drain(broker, worker)
    assert [get(app, sid).state for sid in ids] == ["delivered", "in_digest", "in_digest"]
    return ids[1:]


def test_a_digest_waits_for_a_paused_campaign_and_goes_without_an_erased_supporter(
    app: App, stub_broker: Any, stub_worker: dramatiq.Worker
) -> None:
    from workers.database.models import OutboxItem
    from workers.privacy.rights import erase_supporter
    from workers.stages import digests, pauses

    waiting = _waiting_for_a_digest(app, stub_broker, stub_worker)
    with session_scope(app.sessions) as session:
        assert pauses.pause_campaign(session, SLUG)
        [made] = digests.build_due(session, force=True)
    with pytest.raises(Deferred, match="the campaign is paused"):  # it waits, uncounted
        send_item(app, made)
    with session_scope(app.sessions) as session:
        item = session.get(OutboxItem, made)
        assert item is not None and (item.status, item.failures) == ("pending", 0)
        assert item.error is None or "paused" in item.error
        # The digest's first supporter asks to be erased: the others' letters still go.
        erase_supporter(session, app.secret, "w1@example.com", actors.outbox_for(app)[0])
        assert pauses.resume_campaign(session, SLUG) == [made]  # the digest is due again
    send_item(app, made)
    assert [get(app, sid).state for sid in waiting] == ["withdrawn", "delivered"]
    sent = (app.settings.resolved_outbox_dir / f"digest-{made}.eml").read_text()
    assert "1 constituent wrote to you" in sent
    assert "w2@example.com" in sent and "w1@example.com" not in sent
    with session_scope(app.sessions) as session:  # its copy goes with the next erasure
        erase_supporter(
            session,
            app.secret,
            "w2@example.com",
            actors.outbox_for(app)[0],
            app.settings.resolved_outbox_dir,
        )
    assert not (app.settings.resolved_outbox_dir / f"digest-{made}.eml").exists()


def test_letters_rendered_in_sandbox_mode_go_in_a_sandbox_digest_of_their_own(
    app: App, stub_broker: Any, stub_worker: dramatiq.Worker
) -> None:
    """A campaign switched to live while trial letters wait for the digest: the MP's digest
    holds only the live letters, and the trial ones go to the sandbox, marked so (by where it
    goes, not by what a supporter may type)."""
    from workers.database.models import Digest
    from workers.stages import digests

    rules = SimilarLetters(policy="digest", hold_after=0, digest_hour=23)
    with session_scope(app.sessions) as session:
        update_definition(session, SLUG, similar_letters=rules)
    ids = []
    for i, mode in enumerate(["sandbox", None, None, "live", None, None]):
        if mode:
            assert CliRunner().invoke(main, ["campaigns", "mode", SLUG, mode]).exit_code == 0
        else:
            # A supporter's own subject cannot make a live letter look like a trial one.
            payload = submission(supporter__email=f"m{i}@example.com")
            payload["letter"]["subject"] = "[SANDBOX] Free them"
            ids.append(submit(app, stub_broker, payload)[0])
            drain(stub_broker, stub_worker)
    assert [get(app, sid).state for sid in ids] == ["delivered"] + ["in_digest"] * 3
    with session_scope(app.sessions) as session:
        made = digests.build_due(session, force=True)
        assert len(made) == 2
        by_address = {d.to_email: d.letters for d in session.scalars(select(Digest))}
    assert by_address == {app.settings.sandbox_address: 1, "alex.rivers.mp@mp.example.org": 2}
    for digest_id in made:
        send_item(app, digest_id)
    mails = {
        mail["To"].addresses[0].addr_spec: mail
        for mail in (
            message_from_bytes(eml.read_bytes(), policy=policy.SMTP)
            for eml in app.settings.resolved_outbox_dir.glob("digest-*.eml")
        )
    }
    trial, live = mails[app.settings.sandbox_address], mails["alex.rivers.mp@mp.example.org"]
    assert trial["Subject"].startswith("[SANDBOX] 1 constituent wrote to you")
    assert live["Subject"].startswith("2 constituents wrote to you")
    trial_text = trial.get_body(("plain",)).get_content()  # type: ignore[union-attr]
    live_text = live.get_body(("plain",)).get_content()  # type: ignore[union-attr]
    assert trial_text.startswith("[SANDBOX] Campaign") and "m2@example.com" in trial_text
    assert "m4@example.com" in live_text and "m5@example.com" in live_text
    assert "m2@example.com" not in live_text and "SANDBOX" not in live_text


def test_a_digest_given_up_is_reopened_with_its_letters_and_one_whose_move_was_lost_is_found(
    app: App, stub_broker: Any, stub_worker: dramatiq.Worker
) -> None:
    from sqlalchemy import update

    from tests.test_outbox import Recorder
    from workers.database.models import OutboxItem, Submission
    from workers.letters.mail import PermanentDeliveryError
    from workers.outbox import sending as outbox
    from workers.stages import digests
    from workers.stages.delivery import DeliveryPolicy

    waiting = _waiting_for_a_digest(app, stub_broker, stub_worker)
    with session_scope(app.sessions) as session:
        [made] = digests.build_due(session, force=True)
    refused = Recorder(PermanentDeliveryError("550 5.1.1 no such mailbox"))
    kind = digests.kind(refused, DeliveryPolicy(), None, None, app.returns)
    with session_scope(app.sessions) as session:
        outbox.send(session, made, refused, {digests.KIND: kind}, outbox.OutboxPolicy())
    assert [get(app, sid).state for sid in waiting] == ["failed", "failed"]
    cli = CliRunner()
    assert cli.invoke(main, ["outbox", "retry", "--yes"]).exit_code == 1  # not the outbox's
    reopened = json.loads(cli.invoke(main, ["deliveries", "reopen", "--yes", "--json"]).stdout)
    assert reopened["digests_reopened"] == [made] and reopened["reopened"] == []
    drain(stub_broker, stub_worker)
    assert [get(app, sid).state for sid in waiting] == ["delivered", "delivered"]
    with session_scope(app.sessions) as session:  # a worker stopped between the send and the move
        session.execute(
            update(Submission).where(Submission.id == waiting[0]).values(state="in_digest")
        )
        assert digests.stalled(session) == [made]
        session.execute(update(OutboxItem).where(OutboxItem.id == made).values(status="sent"))
    send_item(app, made)  # the outbox's repair makes the move again
    assert get(app, waiting[0]).state == "delivered"


def test_a_failing_address_cannot_be_paused(app: App) -> None:
    from workers.database.models import AddressHealth
    from workers.mp import health
    from workers.stages import pauses

    with session_scope(app.sessions) as session:
        failing = "office@mp.example.org"
        session.add(AddressHealth(email=failing, status=health.FAILING, reason="3 returned"))
    with session_scope(app.sessions) as session, pytest.raises(LookupError, match="failing"):
        pauses.pause_address(session, "Office@mp.example.org", "recess")


def test_the_notice_for_a_digest_of_one_speaks_of_no_others() -> None:
    from schemas.campaign import CampaignDefinition
    from tests.test_campaign_definition_checks import sample
    from workers.stages.digests import notice_text

    definition = CampaignDefinition.model_validate(sample())
    one, two = (notice_text(definition, "Alex Rivers", n).splitlines()[0] for n in (1, 2))
    assert "other" not in one and "gathers constituents' letters about" in one
    assert "with the letter of 1 other constituent who wrote about" in two
