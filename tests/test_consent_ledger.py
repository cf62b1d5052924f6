"""The consent ledger and supporter rights, on SQLite and PostgreSQL: events, the hash chain,
append-only enforcement, withdrawal, export, erasure, retention, receipts and the CRM export."""

from __future__ import annotations

import csv
import hashlib
import io
import itertools
import json
import threading
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from sqlalchemy import create_engine, event, select, text, update
from sqlalchemy.exc import DatabaseError

from tests.factories import send_letter, submission
from tests.test_stages import POLICY, get, step, store, through_render
from workers.cli import main
from workers.database.engine import session_scope
from workers.database.models import (
    ConsentEvent,
    InboundMessage,
    Letter,
    State,
    Submission,
    utcnow,
)
from workers.database.transitions import AlreadyMoved
from workers.letters.definitions import update_definition
from workers.letters.mail import OutboxMailer
from workers.pipeline.actors import outbox_for
from workers.pipeline.app import App
from workers.privacy.hashing import supporter_hash
from workers.privacy.ledger import HASHED, current_preferences, event_hash, verify
from workers.privacy.rights import (
    consent_csv,
    consent_receipt,
    erase_supporter,
    export_supporter,
    run_retention,
    withdraw,
)
from workers.stages.consent import log_consent
from workers.stages.validation import validate

EMAIL = "amira.haddad@example.com"


def logged(app: App, payload: dict[str, Any] | None = None) -> str:
    sid = store(app, payload or submission())
    step(app, validate, sid)
    with session_scope(app.sessions) as session:
        log_consent(session, sid, app.secret)
    return sid


def events(app: App, sid: str | None = None) -> list[ConsentEvent]:
    with session_scope(app.sessions) as session:
        query = select(ConsentEvent).order_by(ConsentEvent.id)
        if sid is not None:
            query = query.where(ConsentEvent.submission_id == sid)
        return list(session.scalars(query))


def delivered(app: App, tmp_path: Path, payload: dict[str, Any] | None = None) -> str:
    sid = through_render(app, payload or submission())
    with session_scope(app.sessions) as session:
        log_consent(session, sid, app.secret)
    send_letter(app.sessions, sid, OutboxMailer(app.settings.resolved_outbox_dir), POLICY)
    assert get(app, sid).state == State.DELIVERED
    return sid


def raw(app: App, sql: str) -> None:
    """A statement behind the application's back, on its own connection."""
    engine = create_engine(app.settings.resolved_database_url)
    try:
        with engine.begin() as conn:
            conn.execute(text(sql))
    finally:
        engine.dispose()


def test_an_event_per_channel_with_the_exact_wording_and_the_mp_notice(app: App) -> None:
    sid = logged(app)
    rows = events(app, sid)
    by_channel = {e.channel: e for e in rows}
    assert set(by_channel) == {"email", "phone", "sms", "post", "mp_notice"}
    email = by_channel["email"]
    assert (email.event_type, email.choice, email.lawful_basis) == (
        "preference",
        "granted",
        "consent",
    )
    assert email.wording == (
        "Yes, I'd like to receive updates about campaigns and fundraising by email."
    )
    assert email.wording_version == "2024-03-contact-v2"
    assert email.wording_sha256 == hashlib.sha256(email.wording.encode()).hexdigest()
    assert email.privacy_notice_version == "2024-03"
    assert email.source_url == "https://campaign.example.org/political-prisoners"
    assert email.user_agent == "Mozilla/5.0 (test)"
    assert email.ip_hash is not None and "203.0.113.7" not in email.ip_hash
    assert email.recorded_at.utcoffset() == timedelta(0)
    assert email.supporter_hash == supporter_hash(app.secret, "Amira.Haddad@example.com ")
    assert (by_channel["phone"].choice, by_channel["sms"].choice) == ("refused", "not_asked")
    notice = by_channel["mp_notice"]
    assert notice.event_type == "mp_notice" and "sent to your MP" in (notice.wording or "")
    # Logged twice: one set of events.
    with session_scope(app.sessions) as session:
        assert log_consent(session, sid, app.secret) == 0
    assert len(events(app, sid)) == 5


def test_the_chain_links_every_event_and_verify_walks_it(app: App) -> None:
    for _ in range(3):
        logged(app)
    rows = events(app)
    assert rows[0].prev_hash == "0" * 64
    assert all(b.prev_hash == a.hash for a, b in itertools.pairwise(rows))
    with session_scope(app.sessions) as session:
        result = verify(session)
    assert result.intact and result.events == 15 and result.head == rows[-1].hash
    out = CliRunner().invoke(main, ["consent", "verify"])
    assert out.exit_code == 0 and "intact: 15 events" in out.stdout


def test_the_database_refuses_update_delete_and_truncate(app: App) -> None:
    logged(app)
    for sql in (
        "UPDATE consent_events SET choice = 'granted'",
        "DELETE FROM consent_events",
    ):
        with pytest.raises(DatabaseError, match="append-only"):
            raw(app, sql)
    if app.engine.dialect.name == "postgresql":
        with pytest.raises(DatabaseError, match="append-only"):
            raw(app, "TRUNCATE consent_events")
    assert len(events(app)) == 5


def tamper(app: App, sql: str) -> None:
    """Edit the ledger as someone with the database owner's rights could."""
    if app.engine.dialect.name == "postgresql":
        raw(
            app,
            "ALTER TABLE consent_events DISABLE TRIGGER consent_events_append_only;"
            f"{sql};"
            "ALTER TABLE consent_events ENABLE TRIGGER consent_events_append_only",
        )
    else:
        raw(app, "DROP TRIGGER IF EXISTS consent_events_no_update")
        raw(app, "DROP TRIGGER IF EXISTS consent_events_no_delete")
        raw(app, sql)


def test_an_edit_behind_the_applications_back_breaks_the_chain(app: App) -> None:
    logged(app)
    logged(app)
    target = events(app)[6]  # the second submission's phone choice
    tamper(app, f"UPDATE consent_events SET choice = 'granted' WHERE id = {target.id}")  # noqa: S608
    with session_scope(app.sessions) as session:
        result = verify(session)
    assert (result.broken_at, result.events) == (target.id, 6)
    assert "content" in (result.reason or "")
    out = CliRunner().invoke(main, ["consent", "verify"])
    assert out.exit_code == 1 and f"BROKEN at event {target.id}" in out.stdout


def test_a_chain_rewritten_and_hashed_again_is_found_by_a_head_kept_elsewhere(app: App) -> None:
    """Someone with the database's rights edits an event and hashes the chain again: the walk
    alone cannot tell; the head printed before, kept outside the database, can."""
    logged(app)
    recorded = CliRunner().invoke(main, ["consent", "verify"]).stdout.split("head ")[1].strip()
    rows = events(app)
    tamper(app, f"UPDATE consent_events SET choice = 'granted' WHERE id = {rows[1].id}")  # noqa: S608
    previous = "0" * 64
    for row in events(app):  # every hash made again, as the ledger makes them
        new = event_hash(previous, {name: getattr(row, name) for name in HASHED})
        rehash = f"UPDATE consent_events SET prev_hash = '{previous}', hash = '{new}'"  # noqa: S608
        tamper(app, f"{rehash} WHERE id = {row.id}")
        previous = new
    assert CliRunner().invoke(main, ["consent", "verify"]).exit_code == 0  # it walks fine
    found = CliRunner().invoke(main, ["consent", "verify", "--head", recorded])
    assert found.exit_code == 1
    said = f"the head recorded earlier ({recorded}) is not in it: rewritten or cut since"
    assert found.stdout == f"BROKEN: {said}\n"
    assert CliRunner().invoke(main, ["consent", "verify", "--head", previous]).exit_code == 0


def test_a_deleted_event_breaks_the_chain_at_the_next_one(app: App) -> None:
    logged(app)
    rows = events(app)
    tamper(app, f"DELETE FROM consent_events WHERE id = {rows[2].id}")  # noqa: S608
    with session_scope(app.sessions) as session:
        result = verify(session)
    assert result.broken_at == rows[3].id and "link" in (result.reason or "")


def test_withdrawal_is_a_new_event_and_the_latest_choice_wins(app: App) -> None:
    logged(app)
    who = supporter_hash(app.secret, EMAIL)
    with session_scope(app.sessions) as session:
        assert current_preferences(session, who)["email"]["choice"] == "granted"
        assert "sms" not in current_preferences(session, who)  # never asked
        withdraw(session, app.secret, EMAIL, ["email"], source="unsubscribe link")
    with session_scope(app.sessions) as session:
        now = current_preferences(session, who)
    assert now["email"]["choice"] == "refused"
    assert now["post"]["choice"] == "granted"
    # A later form that did not ask about email changes nothing; one that did, wins.
    logged(app, submission(contact_preferences__email="not_asked"))
    with session_scope(app.sessions) as session:
        assert current_preferences(session, who)["email"]["choice"] == "refused"
    logged(app, submission(contact_preferences__email="granted"))
    with session_scope(app.sessions) as session:
        assert current_preferences(session, who)["email"]["choice"] == "granted"
        assert verify(session).intact
    out = CliRunner().invoke(main, ["consent", "withdraw", EMAIL, "--channel", "post"])
    assert out.exit_code == 0 and "1 withdrawal" in out.stdout


def _at_once(*calls: Any) -> list[BaseException]:
    """Run each call on a thread of its own, all at once; the errors they raised."""
    errors: list[BaseException] = []

    def run(call: Any) -> None:
        try:
            call()
        except BaseException as exc:  # reported to the caller
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(call,)) for call in calls]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors


def test_concurrent_logging_keeps_one_chain(app: App) -> None:
    ids = [store(app, submission()) for _ in range(24)]
    for sid in ids:
        step(app, validate, sid)

    def work(chunk: list[str]) -> None:
        for sid in chunk:
            with session_scope(app.sessions) as session:
                log_consent(session, sid, app.secret)

    errors = _at_once(*(partial(work, ids[i::4]) for i in range(4)))
    assert errors == []
    with session_scope(app.sessions) as session:
        result = verify(session)
    assert result.intact and result.events == 24 * 5


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_consent_groups_resolution_groups_and_the_reconciler_at_once_never_deadlock(
    app: App,
) -> None:
    """Threads log consent for overlapping groups (the ledger's lock), resolve the same
    submissions (row locks) and run the reconciler's marking, all at once, on PostgreSQL: no
    transaction meets a deadlock, and the chain holds one set of events per submission."""
    import random

    from workers.database.transitions import run_group
    from workers.pipeline.reconciler import find_stalled
    from workers.stages.consent import plan as consent_plan
    from workers.stages.resolution import plan as resolution_plan

    ids = [store(app, submission()) for _ in range(120)]
    for sid in ids:
        step(app, validate, sid)
    order = app.settings.resolution_order
    errors: list[BaseException] = []
    rounds = 12

    def consent_groups(seed: int) -> None:
        shuffled = random.Random(seed).sample(ids, len(ids))
        for start in range(0, len(shuffled), 6):
            group = shuffled[start : start + 6]
            for _, _, error in run_group(
                app.sessions, group, lambda s, sid: consent_plan(s, sid, app.secret)
            ):
                if error is not None and not isinstance(error, AlreadyMoved):  # another's
                    errors.append(error)

    def resolution_groups(seed: int) -> None:
        chooser = random.Random(seed)
        for _ in range(rounds):
            group = chooser.sample(ids, 8)
            plan = lambda s, sid: resolution_plan(s, sid, order, app.live_sources)  # noqa: E731
            for _, _, error in run_group(app.sessions, group, plan):
                if error is not None and not isinstance(error, AlreadyMoved):
                    errors.append(error)

    def reconciler() -> None:
        for _ in range(rounds):
            with session_scope(app.sessions) as session:
                find_stalled(session, timedelta(0))

    with session_scope(app.sessions) as session:
        before = session.scalar(
            text("SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()")
        )
    errors += _at_once(
        *(partial(consent_groups, i) for i in range(4)),
        *(partial(resolution_groups, 10 + i) for i in range(2)),
        reconciler,
        reconciler,
    )
    assert errors == []
    for sid in ids:  # whatever no group reached
        with session_scope(app.sessions) as session:
            log_consent(session, sid, app.secret)
    with session_scope(app.sessions) as session:
        result = verify(session)
        session.execute(text("SELECT pg_stat_force_next_flush()"))
        after = session.scalar(
            text("SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()")
        )
    assert result.intact and result.events == 120 * 5
    assert after == before


def test_withdrawals_while_consent_is_logged_keep_one_chain(app: App) -> None:
    """An operator's withdrawal appends with no write before it: it must read the chain's head
    inside the write lock too, or a consent logged at the same moment forks the chain."""
    ids = [store(app, submission()) for _ in range(24)]
    for sid in ids:
        step(app, validate, sid)

    def log() -> None:
        for sid in ids:
            with session_scope(app.sessions) as session:
                log_consent(session, sid, app.secret)

    def withdraw_some(worker: int) -> None:
        for i in range(24):
            with session_scope(app.sessions) as session:
                withdraw(session, app.secret, f"w{worker}-{i}@example.com", ["email"])

    errors = _at_once(log, *(partial(withdraw_some, w) for w in range(3)))
    assert errors == []
    with session_scope(app.sessions) as session:
        result = verify(session)
    assert result.intact and result.events == 24 * 5 + 3 * 24


def test_many_submissions_logged_in_one_transaction_read_the_head_once(app: App) -> None:
    ids = [store(app, submission()) for _ in range(6)]
    for sid in ids:
        step(app, validate, sid)
    heads: list[str] = []

    def count(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        if "ORDER BY consent_events.id DESC" in statement:
            heads.append(statement)

    event.listen(app.engine, "before_cursor_execute", count)
    try:
        with session_scope(app.sessions) as session:  # as the stages' group commit does
            assert [log_consent(session, sid, app.secret) for sid in ids] == [5] * 6
        with session_scope(app.sessions) as session:  # a new transaction reads it again
            assert log_consent(session, store(app, submission()), app.secret) == 0
            withdraw(session, app.secret, "someone@example.com", ["email"])
    finally:
        event.remove(app.engine, "before_cursor_execute", count)
    assert len(heads) == 2
    with session_scope(app.sessions) as session:
        result = verify(session)
    assert result.intact and result.events == 6 * 5 + 1


def test_supporter_export_has_everything_held(app: App, tmp_path: Path) -> None:
    sid = delivered(app, tmp_path)
    other = delivered(app, tmp_path, submission(supporter__email="someone.else@example.com"))
    with session_scope(app.sessions) as session:
        data = export_supporter(session, app.secret, EMAIL)
    assert [s["id"] for s in data["submissions"]] == [sid]
    first = data["submissions"][0]
    assert first["details"]["supporter"]["address_lines"] == ["12 Mill Lane", "Millbrook"]
    assert first["letter"]["body"].startswith("Dear Alex Rivers,")
    assert first["delivery"]["status"] == "sent" and first["mp"]["name"] == "Alex Rivers"
    assert [h["state"] for h in first["history"]][-1] == "delivered"
    assert len(data["consent"]["events"]) == 5 and data["consent"]["current"]["email"]
    out = CliRunner().invoke(main, ["supporter", "export", EMAIL])
    assert json.loads(out.stdout)["submissions"][0]["id"] == sid
    assert other not in out.stdout


def everything_stored(app: App) -> str:
    """Every row of every table but the public reference data (the MP directory, campaigns,
    cached postcode lookups), as text: what a search of the database for a person finds."""
    from workers.database.models import Base

    public = {"postcodes", "constituencies", "members", "directory_versions", "campaigns"}
    with session_scope(app.sessions) as session:
        tables = [t for t in Base.metadata.sorted_tables if t.name not in public | {"lookup_cache"}]
        return "\n".join(repr(tuple(row)) for t in tables for row in session.execute(select(t)))


def test_erasure_removes_personal_details_everywhere_and_keeps_the_proof(
    app: App, tmp_path: Path
) -> None:
    long = "Dear Alex Rivers,\n\n" + "I write about the purple hippogriff. " * 120
    sent = delivered(app, tmp_path, submission(letter__body=long))  # over one page: overflow
    outbox = app.settings.resolved_outbox_dir
    assert (outbox / f"{sent}.eml").exists()
    queued = store(app, submission(supporter__email="AMIRA.HADDAD@example.com"))  # not yet run
    stored = everything_stored(app)
    for detail in ("Amira Haddad", "12 Mill Lane", EMAIL, "+44 20 7946 0000", "stand with"):
        assert detail in stored
    before = len(events(app))

    with session_scope(app.sessions) as session:  # a reply quoting their letter, held
        held = b"> Amira Haddad, 12 Mill Lane\r\n" * 40
        session.add(InboundMessage(source="smtp", recipient="r@x", raw=held, submission_id=sent))
    app.settings.mail_backend = "smtp"  # changed since: the file outbox's copies go all the same
    out = CliRunner().invoke(main, ["supporter", "erase", EMAIL, "--yes"])
    assert out.exit_code == 0, out.output
    report = json.loads(out.stdout)
    assert report == {
        "submissions": 2,
        "stopped_before_sending": 1,
        "letters_scrubbed": 1,
        "outbox_files_removed": 1,
        "consent_events_kept": before,
        "consent_events_added": 5,
    }
    stored = everything_stored(app)
    # ("Millbrook" is also the fictional constituency's name, which stays.)
    for detail in ("Amira", "Haddad", "Mill Lane", "amira", "20 7946 0000", "DM1 1AA"):
        assert detail.lower() not in stored.lower(), detail
    assert not (outbox / f"{sent}.eml").exists()
    assert get(app, sent).state == State.DELIVERED  # a letter already sent stays sent
    assert get(app, queued).state == State.WITHDRAWN
    assert step(app, validate, queued) == []  # its queued message now does nothing
    with session_scope(app.sessions) as session:
        assert verify(session).intact
        letter = session.get(Letter, sent)
        assert letter is not None and letter.body_text is None
        assert letter.to_email == "alex.rivers.mp@mp.example.org"  # the delivery facts stay
        prefs = current_preferences(session, supporter_hash(app.secret, EMAIL))
    assert {p["choice"] for p in prefs.values()} == {"refused"}
    assert len(events(app)) == before + 5
    database = app.settings.resolved_database_url
    if database.startswith("sqlite"):  # nor in the file's free space or its write-ahead log
        path = Path(database.removeprefix("sqlite:///"))
        files = b"".join(f.read_bytes() for f in path.parent.glob(f"{path.name}*"))
        assert b"Amira Haddad" not in files and b"12 Mill Lane" not in files
        assert b"purple hippogriff" not in files


def age(app: App, sid: str, days: float) -> None:
    """The submission reached its final state ``days`` ago."""
    with session_scope(app.sessions) as session:
        session.execute(
            update(Submission)
            .where(Submission.id == sid)
            .values(updated_at=utcnow() - timedelta(days=days))
        )


def test_retention_scrubs_bodies_and_addresses_on_each_campaigns_schedule(
    app: App, tmp_path: Path
) -> None:
    old, recent = delivered(app, tmp_path), delivered(app, tmp_path)
    calls = submission(supporter__email="call@example.com", contact_preferences__phone="granted")
    called = delivered(app, tmp_path, calls)
    texts = submission(supporter__email="sms@example.com", contact_preferences__phone="granted")
    withdrawn = delivered(app, tmp_path, texts)
    with session_scope(app.sessions) as session:  # they no longer agree to calls
        withdraw(session, app.secret, "sms@example.com", ["phone"], source="test")
    rejected = store(app, submission(supporter__email="not an email"))
    step(app, validate, rejected)
    refusing = submission(
        supporter__email="no@example.com",
        contact_preferences__email="refused",
        contact_preferences__post="refused",
    )
    no_mp = logged(app, refusing)  # its consent recorded; then no letter went
    with session_scope(app.sessions) as session:
        session.execute(update(Submission).where(Submission.id == no_mp).values(state="rejected"))
    unconfirmed = store(app, submission())
    with session_scope(app.sessions) as session:  # never confirmed by its sender
        session.execute(
            update(Submission).where(Submission.id == unconfirmed).values(state=State.EXPIRED)
        )
    for sid in (old, called, withdrawn):
        age(app, sid, 29)
    age(app, recent, 27)
    age(app, rejected, 8)
    age(app, no_mp, 8)
    age(app, unconfirmed, 8)
    out = CliRunner().invoke(main, ["retention", "run"])
    assert json.loads(out.stdout) == {
        "scrubbed": {"delivered": 3, "rejected": 2, "expired": 1},
        "expired_lookups": 0,
    }
    scrubbed = get(app, old)
    assert scrubbed.payload is not None and scrubbed.scrubbed_at is not None
    assert scrubbed.payload["supporter"]["address_lines"] == []
    assert scrubbed.payload["supporter"]["postcode"] == "DM1"
    assert scrubbed.payload["letter"]["body"] == ""
    assert scrubbed.payload["letter"]["subject"] == ""  # their words, as the body
    # Their consent recorded: the name and email stay (a late reply is forwarded to them), the
    # phone only while they agree to calls or texts (a withdrawal since counts).
    assert scrubbed.payload["supporter"]["email"] == EMAIL
    assert scrubbed.payload["supporter"]["name"] == "Amira Haddad"
    phones = {sid: "phone" in (get(app, sid).payload or {})["supporter"] for sid in (old, called)}
    assert phones == {old: False, called: True}
    assert "phone" not in (get(app, withdrawn).payload or {})["supporter"]
    with session_scope(app.sessions) as session:  # no longer: the phone kept goes at once
        withdraw(session, app.secret, "call@example.com", ["phone"], source="test")
    assert "phone" not in (get(app, called).payload or {})["supporter"]
    # No consent recorded, or no letter went and no contact agreed: nothing of them is kept.
    for never in (rejected, unconfirmed, no_mp):
        kept = get(app, never)
        assert kept.scrubbed_at is not None and "supporter" not in (kept.payload or {})
    with session_scope(app.sessions) as session:
        assert session.get(Letter, old).body_text is None  # type: ignore[union-attr]
        assert session.get(Letter, recent).body_text is not None  # type: ignore[union-attr]
    assert not (app.settings.resolved_outbox_dir / f"{old}.eml").exists()
    # Idempotent: nothing more to do; a campaign with a shorter period catches the recent one.
    with session_scope(app.sessions) as session:
        assert run_retention(session) == {}
        update_definition(session, "political-prisoners", retention={"delivered_days": 1})
    with session_scope(app.sessions) as session:
        assert run_retention(session) == {"delivered": 1}


def test_a_consent_receipt_follows_the_kantara_specification(app: App) -> None:
    logged(app)
    with session_scope(app.sessions) as session:
        receipt = consent_receipt(session, app.secret, EMAIL)
        again = consent_receipt(session, app.secret, EMAIL)
        assert consent_receipt(session, app.secret, "nobody@example.com") is None
    assert receipt is not None and again == receipt
    required = {
        "version",
        "jurisdiction",
        "consentTimestamp",
        "collectionMethod",
        "consentReceiptID",
        "language",
        "piiPrincipalId",
        "piiControllers",
        "policyUrl",
        "services",
        "sensitive",
        "spiCat",
    }
    assert required <= set(receipt)
    assert (receipt["version"], receipt["jurisdiction"]) == ("KI-CR-v1.1.0", "GB")
    assert receipt["piiPrincipalId"] == EMAIL and receipt["sensitive"] is False
    assert receipt["policyUrl"] == "https://campaign.example.org/privacy"
    controller = receipt["piiControllers"][0]
    assert controller["piiController"] == "Example Solidarity Campaign"
    assert controller["email"] == "privacy@campaign.example.org"
    updates, letter = receipt["services"]
    channels = [p["piiCategory"][0] for p in updates["purposes"]]
    assert channels == ["Contact: email address", "Contact: postal address"]  # the granted ones
    assert all(p["consentType"] == "EXPLICIT" for p in updates["purposes"])
    [notice] = letter["purposes"]  # told, not asked: their details go to the MP with the letter
    assert (notice["consentType"], notice["lawfulBasis"]) == ("IMPLIED", "legitimate_interests")
    assert letter["purposes"][0]["thirdPartyDisclosure"] is True
    out = CliRunner().invoke(main, ["consent", "receipt", EMAIL])
    assert json.loads(out.stdout)["consentReceiptID"] == receipt["consentReceiptID"]


def test_consent_export_is_a_csv_for_a_crm(app: App, tmp_path: Path) -> None:
    logged(app)
    logged(app, submission(supporter__email="bob@example.com", supporter__name="Bob Smith"))
    with session_scope(app.sessions) as session:
        erase_supporter(session, app.secret, "bob@example.com", outbox_for(app)[0])
    with session_scope(app.sessions) as session:
        rows = list(csv.DictReader(io.StringIO("".join(consent_csv(session)))))
    by_email = {r["email"]: r for r in rows}
    amira = by_email[EMAIL]
    assert (amira["name"], amira["consent_email"], amira["consent_phone"]) == (
        "Amira Haddad",
        "granted",
        "refused",
    )
    assert (amira["consent_sms"], amira["consent_post"]) == ("not_asked", "granted")
    erased = by_email[""]  # Bob: known only by his pseudonymous id now, every channel refused
    assert {erased[f"consent_{c}"] for c in ("email", "phone", "sms", "post")} == {"refused"}
    target = tmp_path / "consent.csv"
    out = CliRunner().invoke(main, ["consent", "export", "-o", str(target)])
    assert out.exit_code == 0 and target.read_text().startswith("supporter_id,email,name")


@pytest.mark.parametrize(
    "name",
    ['=HYPERLINK("http://x")', "+1+1", "-2+3", "@SUM(A1)", " =cmd|' /C calc'!A0"],
)
def test_consent_export_cells_never_start_a_formula(app: App, name: str) -> None:
    logged(app, submission(supporter__email="=1+1@example.com", supporter__name="Ada"))
    logged(app, submission(supporter__email="eve@example.com", supporter__name=name))
    with session_scope(app.sessions) as session:
        rows = list(csv.reader(io.StringIO("".join(consent_csv(session)))))
    for row in rows[1:]:
        for cell in row:
            assert not cell.lstrip(" ").startswith(("=", "+", "-", "@", "\t", "\r")), row
    assert any(cell == "'" + name.strip() for row in rows for cell in row)
    assert any(cell == "'=1+1@example.com" for row in rows for cell in row)


def test_exports_never_crash_on_text_stored_before_surrogates_were_refused(
    app: App, tmp_path: Path
) -> None:
    sid = logged(app, submission(supporter__email="old@example.com"))
    with session_scope(app.sessions) as session:
        sub = session.get(Submission, sid)
        assert sub is not None and sub.payload is not None
        supporter = {**sub.payload["supporter"], "name": "A\ud800"}
        sub.payload = {**sub.payload, "supporter": supporter}
    runner = CliRunner()
    exported = runner.invoke(main, ["supporter", "export", "old@example.com"])
    assert exported.exit_code == 0, exported.output
    assert "A\ufffd" in exported.stdout
    target = tmp_path / "consent.csv"
    csv_out = runner.invoke(main, ["consent", "export", "-o", str(target)])
    assert csv_out.exit_code == 0, csv_out.output
    assert "A\ufffd" in target.read_text(encoding="utf-8")


def test_an_events_hash_is_pinned_so_stored_chains_stay_verifiable() -> None:
    # The canonical form (sorted keys, no spaces, UTF-8 as it is, times in ISO 8601) is what
    # every stored chain was hashed with: a change to it must fail here, not in `consent verify`.
    from datetime import UTC, datetime

    from workers.privacy.ledger import GENESIS, event_hash

    fields = {
        "submission_id": "s-1", "supporter_hash": "ab" * 32, "event_type": "preference",
        "campaign_slug": "political-prisoners", "channel": "email", "choice": "yes",
        "wording_version": "v1", "wording": "Email me — Zoë\u2019s updates",
        "wording_sha256": "cd" * 32, "lawful_basis": "consent",
        "privacy_notice_version": "2026-01", "source_url": None, "user_agent": "Mozilla/5.0",
        "ip_hash": None,
        "recorded_at": datetime(2026, 12, 6, 23, 0, 1, 123456, tzinfo=UTC),
    }  # fmt: skip
    expected = "0bc77a4332d5aa241d3b25c8230edbd1de9997aa20f1db2c31466d5fadaab52e"
    assert event_hash(GENESIS, fields) == expected


def test_a_groups_events_go_in_one_statement_and_take_their_ids_in_order(app: App) -> None:
    """PostgreSQL: one multi-row INSERT, not one per event; its serial ids follow the events'
    order, so the chain verify walks by id is the one the hashes were written in."""
    from workers.privacy.ledger import append

    inserts: list[str] = []

    def count(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        if statement.startswith("INSERT INTO consent_events"):
            inserts.append(statement)

    rows = [
        {
            "submission_id": f"s{n:03d}",
            "supporter_hash": "h" * 64,
            "event_type": "preference",
            "campaign_slug": "sample",
            "channel": "email",
            "choice": "granted",
            "wording_version": "1",
            "wording": f"wording {n}",
            "wording_sha256": "w" * 64,
            "lawful_basis": "consent",
            "recorded_at": utcnow(),
        }
        for n in reversed(range(120))  # ids that do not sort like the rows' other columns
    ]
    event.listen(app.engine, "before_cursor_execute", count)
    try:
        with session_scope(app.sessions) as session:
            assert append(session, rows) == 120
    finally:
        event.remove(app.engine, "before_cursor_execute", count)
    if app.engine.dialect.name == "postgresql":
        assert len(inserts) == 1
    with session_scope(app.sessions) as session:
        written = session.scalars(select(ConsentEvent.wording).order_by(ConsentEvent.id)).all()
        assert written == [row["wording"] for row in rows]
        assert verify(session).intact


def test_a_failed_statements_error_names_none_of_its_values(app: App) -> None:
    """Its text goes to the failures table, the logs and a retried message: no values in it."""
    with pytest.raises(DatabaseError) as failed, session_scope(app.sessions) as session:
        session.execute(
            text("SELECT id FROM submissions WHERE id = :who AND no_such_column = 1"),
            {"who": "Amira Haddad, 12 Mill Lane"},
        )
    assert "no_such_column" in str(failed.value) and "Amira" not in str(failed.value)


def test_erasure_takes_the_text_of_failures_and_half_written_copies_too(
    app: App, tmp_path: Path
) -> None:
    from workers.database.models import Failure
    from workers.privacy.rights import FAILURE_TEXT_GONE

    sid = delivered(app, tmp_path)
    folder = app.settings.resolved_outbox_dir
    (folder / f"{sid}.tmp123-456").write_text("Amira Haddad")  # a worker stopped mid-write
    with session_scope(app.sessions) as session:
        for message_id, about, said in (("m1", sid, "Amira Haddad"), ("m2", "another", "kept")):
            session.add(
                Failure(
                    message_id=message_id,
                    queue_name="dearmp.render",
                    actor_name="render_submission",
                    submission_id=about,
                    exception_type="builtins.ValueError",
                    exception_message=f"{said}, 12 Mill Lane",
                    traceback=said,
                )
            )
    with session_scope(app.sessions) as session:
        erase_supporter(session, app.secret, EMAIL, outbox_for(app)[0], folder)
    with session_scope(app.sessions) as session:
        texts = {f.message_id: (f.exception_message, f.traceback) for f in session.scalars(
            select(Failure))}  # fmt: skip
    assert texts == {
        "m1": (FAILURE_TEXT_GONE, FAILURE_TEXT_GONE),
        "m2": ("kept, 12 Mill Lane", "kept"),
    }
    assert not list(folder.glob(f"{sid}.*"))


def test_retention_skips_what_waits_with_its_own_reason_not_an_erasure_request(
    app: App, tmp_path: Path
) -> None:
    from workers.database.models import OutboxItem
    from workers.privacy.rights import RETENTION_OVER

    sid = delivered(app, tmp_path)
    with session_scope(app.sessions) as session:
        session.add(OutboxItem(submission_id=sid, key="survey", kind="survey"))
    age(app, sid, 29)
    with session_scope(app.sessions) as session:
        assert run_retention(session) == {"delivered": 1}
    with session_scope(app.sessions) as session:
        item = session.scalars(select(OutboxItem).where(OutboxItem.kind == "survey")).one()
        assert (item.status, item.error) == ("skipped", RETENTION_OVER)


def test_exporting_an_address_nothing_is_held_about_says_so_and_exits_1(app: App) -> None:
    """A misspelt address in a subject access request must not look like a real, empty answer."""
    logged(app)
    runner = CliRunner()
    for extra in ([], ["--json"]):
        out = runner.invoke(main, ["supporter", "export", "amira.hadad@example.com", *extra])
        assert out.exit_code == 1 and out.stdout == ""
        assert out.stderr == "nothing is held about that address: nothing to export\n"
    found = runner.invoke(main, ["supporter", "export", EMAIL, "--json"])
    assert found.exit_code == 0 and json.loads(found.stdout)["submissions"]


def test_a_second_erasure_changes_nothing_and_one_after_a_return_erases_the_new_details(
    app: App, tmp_path: Path
) -> None:
    from workers.database.models import InboundMessage

    sid = delivered(app, tmp_path)
    runner = CliRunner()
    first = runner.invoke(main, ["supporter", "erase", EMAIL, "--yes", "--json"])
    assert first.exit_code == 0, first.output
    assert json.loads(first.stdout)["letters_scrubbed"] == 1
    before = len(events(app))
    with session_scope(app.sessions) as session:  # a reply to their letter, held since
        held = InboundMessage(source="smtp", recipient="r@x", raw=b"Dear Amira", submission_id=sid)
        session.add(held)
        session.flush()
        held_id = held.id

    again = runner.invoke(main, ["supporter", "erase", EMAIL, "--yes", "--json"])
    assert again.exit_code == 1 and again.stdout == ""
    assert again.stderr == "that supporter was erased already: nothing new to erase\n"
    with session_scope(app.sessions) as session:  # what reached them since is gone all the same
        assert session.get(InboundMessage, held_id).raw is None  # type: ignore[union-attr]
    stored = everything_stored(app)
    with session_scope(app.sessions) as session:  # and by the function itself
        report = erase_supporter(session, app.secret, EMAIL, outbox_for(app)[0])
    assert report.as_dict() == {
        "submissions": 0,
        "stopped_before_sending": 0,
        "letters_scrubbed": 0,
        "outbox_files_removed": 0,
        "consent_events_kept": before,
        "consent_events_added": 0,
    }
    assert len(events(app)) == before and everything_stored(app) == stored
    assert runner.invoke(main, ["consent", "verify"]).exit_code == 0

    # They came back: their new submission is erased, the one erased before left as it was.
    back = logged(app)
    assert "Amira Haddad" in everything_stored(app)
    with_new = len(events(app))
    out = runner.invoke(main, ["supporter", "erase", EMAIL, "--yes", "--json"])
    assert out.exit_code == 0, out.output
    assert json.loads(out.stdout)["submissions"] == 1
    assert json.loads(out.stdout)["consent_events_added"] == 5
    assert len(events(app)) == with_new + 5
    assert get(app, back).erased_at is not None
    assert "amira" not in everything_stored(app).lower()
    assert runner.invoke(main, ["consent", "verify"]).exit_code == 0


def test_the_ledger_keeps_the_page_that_asked_without_its_query_or_credentials(app: App) -> None:
    """The ledger outlives erasure: a page address's query (?ref=their address) or login part
    would be the supporter's details kept for ever."""
    url = "https://me:pw@campaign.example.org/political-prisoners?ref=amira%40example.com#form"
    sid = logged(app, submission(source_url=url))
    kept = {event.source_url for event in events(app, sid)}
    assert kept == {"https://campaign.example.org/political-prisoners"}
    for unreadable, page in (
        ("http://[x/p?email=amira%40example.com", "http://[x/p"),
        ("http://me@[x/p", None),
    ):  # a URL urlsplit cannot read: consent is recorded all the same
        sid = logged(app, submission(source_url=unreadable, supporter__email="b@example.com"))
        assert {event.source_url for event in events(app, sid)} == {page}


def test_truncating_the_write_ahead_log_waits_for_a_reader_a_moment_only(
    app: App, tmp_path: Path
) -> None:
    """A reader holding the log keeps the checkpoint out: writers wait two seconds at most,
    and the operator is told the log still holds the old pages."""
    import sqlite3

    from workers.database.engine import forget_old_pages

    database = app.settings.resolved_database_url
    if not database.startswith("sqlite"):
        assert forget_old_pages(app.engine)  # PostgreSQL: nothing to do
        return
    logged(app)  # something in the log
    reader = sqlite3.connect(database.removeprefix("sqlite:///"), isolation_level=None)
    try:
        reader.execute("BEGIN")
        reader.execute("SELECT count(*) FROM consent_events").fetchone()  # a snapshot held
        logged(app, submission(supporter__email="b@example.com"))  # written after it
        assert forget_old_pages(app.engine, wait_ms=100) is False
        erased = CliRunner().invoke(main, ["supporter", "erase", EMAIL, "--yes"])
        assert erased.exit_code == 0 and "write-ahead log" in erased.stderr
    finally:
        reader.close()
    assert forget_old_pages(app.engine, wait_ms=100) is True
