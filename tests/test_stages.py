"""Each stage as a plain function on SQLite and PostgreSQL: its outcome, and idempotency."""

from __future__ import annotations

import shutil
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import delete, func, select, update

from tests.factories import send_letter, submission
from workers.database.engine import session_scope
from workers.database.models import (
    ConsentEvent,
    Letter,
    Member,
    OutboxItem,
    State,
    Submission,
    SubmissionEvent,
    utcnow,
)
from workers.database.transitions import run_group
from workers.letters.mail import OutboxMailer, Outgoing
from workers.pipeline.app import App
from workers.pipeline.intake import accept
from workers.pipeline.reconciler import find_stalled
from workers.stages.comparison import compare
from workers.stages.consent import log_consent
from workers.stages.delivery import DeliveryPolicy
from workers.stages.rendering import plan as rendering_plan
from workers.stages.rendering import render
from workers.stages.resolution import resolve
from workers.stages.stage import Stage
from workers.stages.validation import validate

POLICY = DeliveryPolicy()
POLICY_3 = DeliveryPolicy(max_attempts=3)


def store(app: App, payload: Any) -> str:
    with session_scope(app.sessions) as session:
        return accept(session, payload, app.secret).submission_id


def step(app: App, fn: Any, submission_id: str, *args: Any) -> list[Stage]:
    with session_scope(app.sessions) as session:
        result: list[Stage] = fn(session, submission_id, *args)
        return result


def get(app: App, submission_id: str) -> Submission:
    with session_scope(app.sessions) as session:
        sub = session.get(Submission, submission_id)
        assert sub is not None
        _ = sub.events  # load the history before the session closes
        return sub


def through_render(app: App, payload: Any) -> str:
    sid = store(app, payload)
    assert step(app, validate, sid) == [Stage.RESOLVE, Stage.CONSENT]
    assert step(app, resolve, sid) == [Stage.COMPARE]
    assert step(app, compare, sid) == [Stage.RENDER]
    assert step(app, render, sid) == [Stage.DELIVER]
    return sid


def test_same_idempotency_key_gives_one_submission(app: App) -> None:
    payload = submission()
    first, second = store(app, payload), store(app, dict(payload))
    assert first == second
    with session_scope(app.sessions) as session:
        assert session.scalar(select(func.count()).select_from(Submission)) == 1


def test_intake_keeps_only_a_keyed_hash_of_the_client_ip(app: App) -> None:
    sub = get(app, store(app, submission()))
    assert sub.payload is not None and sub.payload["client_ip"] is None
    assert sub.client_ip_hash and "203.0.113.7" not in sub.client_ip_hash


def test_bad_input_becomes_a_rejection_with_reasons_per_field(app: App) -> None:
    sid = store(app, submission(supporter__email="nope", supporter__postcode="12345"))
    assert step(app, validate, sid) == []
    sub = get(app, sid)
    assert sub.state == State.REJECTED
    assert sub.rejection is not None
    assert set(sub.rejection) == {"supporter.email", "supporter.postcode"}
    assert [e.state for e in sub.events] == ["received", "rejected"]


def test_campaign_rules_reject_unknown_campaign_long_body_and_stale_wording(app: App) -> None:
    cases = {
        "campaign": submission(campaign="no-such-campaign"),
        "letter.body": submission(letter__body="x" * 5001),
        "contact_preferences.wording_version": submission(
            contact_preferences__wording_version="old"
        ),
    }
    for field, payload in cases.items():
        sid = store(app, payload)
        step(app, validate, sid)
        rejection = get(app, sid).rejection
        assert rejection is not None and field in rejection, (field, rejection)


def test_validation_twice_has_no_second_effect(app: App) -> None:
    sid = store(app, submission())
    assert step(app, validate, sid) == [Stage.RESOLVE, Stage.CONSENT]
    assert step(app, validate, sid) == []
    assert [e.state for e in get(app, sid).events] == ["received", "validated"]


def test_resolution_finds_the_mp_and_records_the_directory_version(app: App) -> None:
    sid = store(app, submission(supporter__postcode="dm5 4df"))
    step(app, validate, sid)
    assert step(app, resolve, sid) == [Stage.COMPARE]
    sub = get(app, sid)
    assert (sub.state, sub.constituency_code, sub.member_id) == ("resolved", "W07900005", 990005)
    assert sub.directory_version_id is not None
    assert step(app, resolve, sid) == []


def test_unknown_and_terminated_postcodes_are_rejected_with_a_message(app: App) -> None:
    for postcode, fragment in (("DM9 9XX", "could not find"), ("DM1 9ZZ", "no longer in use")):
        sid = store(app, submission(supporter__postcode=postcode))
        step(app, validate, sid)
        step(app, resolve, sid)
        step(app, compare, sid)
        sub = get(app, sid)
        assert sub.state == State.REJECTED
        assert sub.rejection is not None and fragment in sub.rejection["supporter.postcode"]


def test_an_mp_without_email_gets_the_official_contact_route_not_a_guess(app: App) -> None:
    with session_scope(app.sessions) as session:
        for member in session.scalars(select(Member).where(Member.member_id == 990001)):
            member.email = None
    sid = store(app, submission(supporter__postcode="DM1 1AA"))
    step(app, validate, sid)
    step(app, resolve, sid)
    step(app, compare, sid)
    sub = get(app, sid)
    assert sub.state == State.REJECTED
    message = (sub.rejection or {})["member"]
    assert "Alex Rivers" in message and "House of Commons, London SW1A 0AA" in message


def test_rendering_stores_the_letter_once(app: App) -> None:
    sid = through_render(app, submission())
    with session_scope(app.sessions) as session:
        letter = session.get(Letter, sid)
        assert letter is not None
        first_hash = letter.content_sha256
        assert letter.body_text is not None and letter.body_text.startswith("Dear Alex Rivers,")
    # A second render message finds the state moved on and changes nothing.
    assert step(app, render, sid) == []
    with session_scope(app.sessions) as session:
        assert session.scalar(select(func.count()).select_from(Letter)) == 1
        letter = session.get(Letter, sid)
        assert letter is not None and letter.content_sha256 == first_hash


@pytest.mark.parametrize("group", [1, 3])
def test_a_stored_letter_to_send_again_moves_on_as_it_is_with_a_new_item(
    app: App, group: int
) -> None:
    """A returned letter sent again (``replies resend-bounced``) keeps its text; its outbox
    item goes, and rendering writes a new one with the move to rendered."""
    ids = []
    for i in range(group):
        sid = store(app, submission(supporter__email=f"s{i}@example.com"))
        step(app, validate, sid)
        step(app, resolve, sid)
        step(app, compare, sid)
        ids.append(sid)
    for sid in ids:
        step(app, render, sid)
    with session_scope(app.sessions) as session:  # back to compared, the letter kept
        session.execute(update(Submission).values(state=State.COMPARED.value))
        session.execute(delete(OutboxItem))
        stored = {sid: session.get(Letter, sid).content_sha256 for sid in ids}  # type: ignore[union-attr]

    def plan(session: Any, submission_id: str) -> Any:
        return rendering_plan(session, submission_id)

    outcomes = run_group(app.sessions, ids, plan)
    assert sorted((sid, then) for sid, then, _ in outcomes) == sorted(
        (sid, [Stage.DELIVER]) for sid in ids
    )
    with session_scope(app.sessions) as session:
        assert session.scalar(select(func.count()).select_from(Letter)) == group
        assert {sid: session.get(Letter, sid).content_sha256 for sid in ids} == stored  # type: ignore[union-attr]
        assert {i.status for i in session.scalars(select(OutboxItem))} == {"pending"}
    assert {get(app, sid).state for sid in ids} == {State.RENDERED}


def test_delivery_sends_once_however_often_it_runs(app: App, tmp_path: Path) -> None:
    sid = through_render(app, submission())
    outbox = OutboxMailer(tmp_path / "once")
    for _ in range(3):
        send_letter(app.sessions, sid, outbox, POLICY)
    assert len(list((tmp_path / "once").glob("*.eml"))) == 1
    with session_scope(app.sessions) as session:
        delivery = session.get(OutboxItem, sid)
        assert delivery is not None
        assert (delivery.status, delivery.attempts) == ("sent", 1)
    sub = get(app, sid)
    assert [e.state for e in sub.events] == [
        "received",
        "validated",
        "resolved",
        "compared",
        "rendered",
        "delivered",
    ]


def test_the_outbox_makes_its_folder_whenever_it_is_missing(tmp_path: Path) -> None:
    outbox = OutboxMailer(tmp_path / "a" / "b")
    mail = Outgoing("from@example.org", ["to@example.org"], b"Subject: x\r\n\r\nbody\r\n", "<m1@x>")
    assert outbox.send(mail) == "written m1.eml"
    assert outbox.send(mail) == "written m1.eml"  # twice: one file
    shutil.rmtree(tmp_path / "a")  # an operator cleared it while the worker runs
    outbox.send(mail)
    assert [p.name for p in (tmp_path / "a" / "b").iterdir()] == ["m1.eml"]
    assert (tmp_path / "a" / "b" / "m1.eml").read_bytes() == mail.data


def test_a_live_claim_blocks_a_second_sender(app: App, tmp_path: Path) -> None:
    sid = through_render(app, submission())
    with session_scope(app.sessions) as session:
        delivery = session.get(OutboxItem, sid)
        assert delivery is not None
        delivery.status, delivery.claimed_at = "sending", utcnow()
    send_letter(app.sessions, sid, OutboxMailer(tmp_path / "blocked"), POLICY)
    assert not (tmp_path / "blocked").exists()
    # Once the claim is older than the lease (the sender died), the letter is taken over.
    with session_scope(app.sessions) as session:
        delivery = session.get(OutboxItem, sid)
        assert delivery is not None
        delivery.claimed_at = utcnow() - timedelta(seconds=301)
    send_letter(app.sessions, sid, OutboxMailer(tmp_path / "blocked"), POLICY)
    assert len(list((tmp_path / "blocked").glob("*.eml"))) == 1


def test_consent_is_logged_once_per_channel_plus_the_mp_notice(app: App) -> None:
    sid = store(app, submission())
    step(app, validate, sid)
    with session_scope(app.sessions) as session:
        assert log_consent(session, sid, app.secret) == 5
    with session_scope(app.sessions) as session:
        assert log_consent(session, sid, app.secret) == 0
        events = session.scalars(select(ConsentEvent).where(ConsentEvent.submission_id == sid))
        by_channel = {e.channel: e.choice for e in events}
    assert by_channel == {
        "email": "granted",
        "phone": "refused",
        "sms": "not_asked",
        "post": "granted",
        "mp_notice": "informed",
    }


def test_consent_is_not_logged_for_a_rejected_submission(app: App) -> None:
    sid = store(app, submission(supporter__email="nope"))
    step(app, validate, sid)
    with session_scope(app.sessions) as session:
        assert log_consent(session, sid, app.secret) == 0


def test_reconciler_resends_what_stopped_moving_and_nothing_else(app: App) -> None:
    stuck = store(app, submission())
    moving = store(app, submission())
    step(app, validate, moving)  # dispatched just now: not due
    with session_scope(app.sessions) as session:
        sub = session.get(Submission, stuck)
        assert sub is not None
        sub.dispatched_at = utcnow() - timedelta(minutes=5)
    with session_scope(app.sessions) as session:
        due = find_stalled(session, timedelta(minutes=2))
    assert due == [(stuck, Stage.VALIDATE)]
    with session_scope(app.sessions) as session:
        assert find_stalled(session, timedelta(minutes=2)) == []  # dispatched again: clock reset


def test_reconciler_finds_unlogged_consent(app: App) -> None:
    sid = store(app, submission())
    step(app, validate, sid)
    with session_scope(app.sessions) as session:
        sub = session.get(Submission, sid)
        assert sub is not None
        sub.dispatched_at = utcnow() - timedelta(minutes=5)
    with session_scope(app.sessions) as session:
        due = set(find_stalled(session, timedelta(minutes=2)))
    assert due == {(sid, Stage.RESOLVE), (sid, Stage.CONSENT)}


def test_history_records_each_transition_with_a_time(app: App) -> None:
    sid = through_render(app, submission())
    with session_scope(app.sessions) as session:
        times = session.scalars(
            select(SubmissionEvent.at).where(SubmissionEvent.submission_id == sid)
        ).all()
    assert len(times) == 5 and times == sorted(times)
