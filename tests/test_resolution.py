"""Finding the right MP for real UK postcodes, and every hard case, on SQLite and PostgreSQL.

The directory is imported from the real data in ../shared/data with the project's own import.
"""

from __future__ import annotations

import csv
import shutil
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event, select, update

from schemas.postcode import check_format
from tests.conftest import make_settings, new_pg_database
from tests.factories import submission
from tests.services import PostgresCluster
from tests.test_stages import get, step, store
from workers.database.engine import session_scope
from workers.database.models import (
    DirectoryVersion,
    Member,
    State,
    Submission,
    SubmissionEvent,
    utcnow,
)
from workers.database.transitions import run_group
from workers.letters.definitions import update_definition
from workers.mp.directory import import_directory, set_dissolved
from workers.mp.lookup import DirectoryMissing, lookup_local, lookup_local_many
from workers.pipeline.app import App, set_app
from workers.pipeline.intake import accept
from workers.pipeline.reconciler import find_stalled
from workers.pipeline.runtime import prepare
from workers.stages.resolution import plan as resolution_plan
from workers.stages.resolution import resolve
from workers.stages.stage import Stage
from workers.stages.validation import validate

SLUG = "political-prisoners"
MPS = "constituencies_2024_current_mps.csv"
POSTCODE_FILES = ("postcodes_onspd_seed_sample.csv", "postcodes_gb_sample.csv")


def northern_ireland_postcodes(shared_data: Path, path: Path) -> Path:
    """The shared postcode files have none in Northern Ireland: one synthetic BT postcode per
    NI seat (test-only, never shipped), so that every one of the 650 seats can be resolved."""
    with (shared_data / MPS).open() as fh:
        seats = [r["ons_code"] for r in csv.DictReader(fh) if r["country"] == "Northern Ireland"]
    with path.open("w", newline="") as fh:
        out = csv.writer(fh)
        out.writerow(["pcds", "pcon", "doterm"])  # the real ONSPD column names
        for n, code in enumerate(seats, start=1):
            out.writerow([f"BT{n} 9ZZ", code, ""])
    return path


def mp_file(shared_data: Path) -> dict[str, dict[str, str]]:
    with (shared_data / MPS).open() as fh:
        return {row["ons_code"]: row for row in csv.DictReader(fh)}


def build_uk(url: str, shared_data: Path, tmp_path: Path) -> None:
    """Migrate, load the sample campaign, import the real UK directory; a campaign that writes to
    every MP (non-geographic postcodes accepted, nobody excluded)."""
    application = App.from_settings(make_settings(tmp_path, database_url=url))
    prepare(application)
    ni = northern_ireland_postcodes(shared_data, tmp_path / "ni.csv")
    with session_scope(application.sessions) as session:
        import_directory(
            session,
            shared_data / MPS,
            [*(shared_data / name for name in POSTCODE_FILES), ni],
            source="shared data",
        )
        update_definition(session, SLUG, targets={"non_geographic": "accept"})
    application.engine.dispose()


@pytest.fixture(scope="module")
def uk_sqlite(
    sqlite_template: Path, shared_data: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    base = tmp_path_factory.mktemp("uk-sqlite")
    shutil.copy(sqlite_template, base / "uk.sqlite3")
    build_uk(f"sqlite:///{base / 'uk.sqlite3'}", shared_data, base)
    return base / "uk.sqlite3"


@pytest.fixture(scope="module")
def uk_postgresql(
    pg_cluster: PostgresCluster,
    pg_template: str,
    shared_data: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> str:
    url = new_pg_database(pg_cluster, pg_template)
    build_uk(url, shared_data, tmp_path_factory.mktemp("uk-pg"))
    return url.rsplit("/", 1)[1]


@pytest.fixture(params=["sqlite", "postgresql"])
def uk(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[App]:
    """A fresh copy of a database with the real UK directory, for each test and backend."""
    if request.param == "sqlite":
        shutil.copy(request.getfixturevalue("uk_sqlite"), tmp_path / "uk.sqlite3")
        url = f"sqlite:///{tmp_path / 'uk.sqlite3'}"
    else:
        cluster = request.getfixturevalue("pg_cluster")
        url = new_pg_database(cluster, request.getfixturevalue("uk_postgresql"))
    application = App.from_settings(make_settings(tmp_path, database_url=url))
    set_app(application)
    yield application
    set_app(None)
    application.engine.dispose()


def set_targets(app: App, **targets: Any) -> None:
    with session_scope(app.sessions) as session:
        update_definition(session, SLUG, targets=targets)


def run_through_resolution(app: App, postcodes: list[str]) -> dict[str, Submission]:
    """Each postcode as a submission through intake, validation and resolution."""
    out: dict[str, Submission] = {}
    for start in range(0, len(postcodes), 400):
        with session_scope(app.sessions) as session:
            ids = {
                pc: accept(session, submission(supporter__postcode=pc), app.secret).submission_id
                for pc in postcodes[start : start + 400]
            }
            for sid in ids.values():
                validate(session, sid)
                resolve(session, sid)
            session.flush()
            for pc, sid in ids.items():
                row = session.get(Submission, sid)
                assert row is not None
                out[pc] = row
    return out


@pytest.mark.thorough
def test_every_live_postcode_in_the_shared_files_resolves_to_its_constituency(
    uk: App, shared_data: Path
) -> None:
    expected: dict[str, str] = {}
    for name in POSTCODE_FILES:
        with (shared_data / name).open() as fh:
            for row in csv.DictReader(fh):
                if row.get("status", "live") == "live" and row["pcon24cd"] != "L99999999":
                    expected.setdefault(row["postcode"], row["pcon24cd"])
    assert len(expected) > 6000
    mps = mp_file(shared_data)
    # Supporters type postcodes in every form: lower case, no space.
    results = run_through_resolution(uk, [pc.lower().replace(" ", "") for pc in expected])
    wrong = {}
    for postcode, code in expected.items():
        row = results[postcode.lower().replace(" ", "")]
        # The four MPs with no email: the seat and MP are found, the supporter is told why no
        # letter can go (the campaign's fallback; see the 650-seat test below).
        state = "resolved" if mps[code]["email"] else "rejected"
        if (row.state, row.constituency_code) != (state, code):
            wrong[postcode] = (row.state, row.constituency_code, row.rejection)
        elif row.member_id != int(mps[code]["member_id"]):
            wrong[postcode] = ("wrong MP", row.member_id)
    assert wrong == {}


def test_each_of_the_650_constituencies_resolves_to_its_mp(uk: App, shared_data: Path) -> None:
    mps = mp_file(shared_data)
    assert len(mps) == 650
    one_postcode: dict[str, str] = {}
    with (shared_data / "postcodes_gb_sample.csv").open() as fh:
        for row in csv.DictReader(fh):
            one_postcode.setdefault(row["pcon24cd"], row["postcode"])
    for n, (code, _row) in enumerate(
        (c, r) for c, r in mps.items() if r["country"] == "Northern Ireland"
    ):
        one_postcode[code] = f"BT{n + 1} 9ZZ"
    assert set(one_postcode) == set(mps)

    results = run_through_resolution(uk, [one_postcode[code] for code in mps])
    outcomes: dict[str, int] = {}
    for code, row in mps.items():
        sub = results[one_postcode[code]]
        assert sub.constituency_code == code
        if row["email"]:
            assert sub.state == State.RESOLVED, (code, sub.rejection)
            assert sub.member_id == int(row["member_id"])
            assert sub.recipient == {
                "member_id": int(row["member_id"]),
                "name": row["mp_name"],
                "email": row["email"],
                "constituency": row["constituency_name"],
            }
        else:  # the four MPs with no email: never a guessed address
            assert sub.state == State.REJECTED
            assert row["mp_name"] in sub.rejection["member"]  # type: ignore[index]
            assert "House of Commons, London SW1A 0AA" in sub.rejection["member"]  # type: ignore[index]
        outcomes[sub.state] = outcomes.get(sub.state, 0) + 1
    assert outcomes == {"resolved": 646, "rejected": 4}


@pytest.mark.parametrize(
    ("postcode", "code", "fragment"),
    [
        ("hello", "", "not a UK postcode"),
        ("SW1A 1AA", "postcode:unknown", "could not find this postcode"),  # not in the files
        ("ab1 0aa", "postcode:terminated", "no longer in use"),
        ("SE1 9ZZ", "postcode:terminated", "no longer in use"),
        ("JE2 4WD", "", "Jersey is a Crown dependency"),
        ("GY1 1AA", "", "Guernsey is a Crown dependency"),
        ("IM1 1AA", "", "Isle of Man is a Crown dependency"),
        ("BFPO 801", "", "British Forces Post Office"),
        ("BF1 4FB", "", "British Forces Post Office"),
        ("GIR 0AA", "", "PO box or an organisation's mail"),
        ("STHL 1ZZ", "", "British Overseas Territory"),
        ("ZZ99 3VZ", "", "not in a UK parliamentary constituency"),
    ],
)
def test_postcodes_with_no_mp_get_a_specific_answer(
    uk: App, postcode: str, code: str, fragment: str
) -> None:
    sub = run_through_resolution(uk, [postcode])[postcode]
    assert sub.state == State.REJECTED
    assert fragment in (sub.rejection or {})["supporter.postcode"]
    if code:  # refused at resolution (the format was fine): the reason code is in the history
        with session_scope(uk.sessions) as session:
            details = session.scalars(
                select(SubmissionEvent.detail).where(SubmissionEvent.submission_id == sub.id)
            ).all()
        assert code in details


def test_a_non_geographic_postcode_follows_the_campaign_setting(uk: App) -> None:
    accepted = run_through_resolution(uk, ["SE1P 5ZZ"])["SE1P 5ZZ"]
    assert (accepted.state, accepted.constituency_code) == ("resolved", "E14001085")
    set_targets(uk, non_geographic="reject")
    refused = run_through_resolution(uk, ["se1p5zz"])["se1p5zz"]
    assert refused.state == State.REJECTED
    assert "PO box" in (refused.rejection or {})["supporter.postcode"]


def test_an_excluded_target_tells_the_supporter_the_campaigns_alternative(uk: App) -> None:
    set_targets(
        uk,
        excluded_parties=["Speaker"],
        excluded_message="{mp} is the Speaker and stays neutral. Write to the Foreign Secretary.",
    )
    # PR7 postcodes are in Chorley, the Speaker's seat.
    chorley = run_through_resolution(uk, ["PR7 6FR"])["PR7 6FR"]
    assert chorley.state == State.REJECTED
    assert (chorley.rejection or {})["member"] == (
        "Sir Lindsay Hoyle is the Speaker and stays neutral. Write to the Foreign Secretary."
    )
    set_targets(uk, excluded_member_ids=[4357])  # by member id: Aberdeen North's MP
    assert run_through_resolution(uk, ["AB10 1AB"])["AB10 1AB"].state == State.RESOLVED
    north = run_through_resolution(uk, ["AB10 1PE"])["AB10 1PE"]
    assert north.state == State.REJECTED and "not taking part" in (north.rejection or {})["member"]


def vacate(app: App, member_id: int) -> None:
    """A by-election: the seat is vacant in a new directory version."""
    with session_scope(app.sessions) as session:
        set_dissolved(session, False, source="by-election")
        from workers.database.models import Constituency
        from workers.mp.directory import current_version_id

        session.execute(
            update(Constituency)
            .where(Constituency.version_id == current_version_id(session))
            .where(Constituency.member_id == member_id)
            .values(member_id=None)
        )


def test_a_vacant_seat_holds_the_letter_until_a_new_directory_has_an_mp(uk: App) -> None:
    vacate(uk, 4357)  # Aberdeen North
    sid = store(uk, submission(supporter__postcode="AB10 1PE"))
    step(uk, validate, sid)
    assert step(uk, resolve, sid) == []
    assert get(uk, sid).state == State.HELD
    with session_scope(uk.sessions) as session:  # nothing changed: the reconciler leaves it
        assert (sid, Stage.RESOLVE) not in find_stalled(session, timedelta(seconds=0))
    with session_scope(uk.sessions) as session:  # the by-election result: a new version
        set_dissolved(session, False, source="by-election result")
        from workers.database.models import Constituency
        from workers.mp.directory import current_version_id

        session.execute(
            update(Constituency)
            .where(Constituency.version_id == current_version_id(session))
            .where(Constituency.gss_code == "S14000060")
            .values(member_id=4357)
        )
    with session_scope(uk.sessions) as session:
        assert (sid, Stage.RESOLVE) in find_stalled(session, timedelta(seconds=0))
    assert step(uk, resolve, sid) == [Stage.COMPARE]
    assert [e.state for e in get(uk, sid).events] == ["received", "validated", "held", "resolved"]


def test_a_vacant_seat_is_rejected_when_the_campaign_says_so(uk: App) -> None:
    set_targets(uk, vacant_seat="reject")
    vacate(uk, 4357)
    sub = run_through_resolution(uk, ["AB10 1PE"])["AB10 1PE"]
    assert sub.state == State.REJECTED
    assert "Aberdeen North is vacant" in (sub.rejection or {})["member"]


def test_a_held_letter_is_rejected_after_the_campaigns_hold_period(uk: App) -> None:
    set_targets(uk, hold_days=30)
    vacate(uk, 4357)
    sid = store(uk, submission(supporter__postcode="AB10 1PE"))
    step(uk, validate, sid)
    step(uk, resolve, sid)
    step(uk, resolve, sid)  # looked at again, still vacant: still held, no new event
    assert [e.state for e in get(uk, sid).events] == ["received", "validated", "held"]
    with session_scope(uk.sessions) as session:
        session.execute(
            update(SubmissionEvent)
            .where(SubmissionEvent.submission_id == sid, SubmissionEvent.state == State.HELD)
            .values(at=utcnow() - timedelta(days=31))
        )
    step(uk, resolve, sid)
    sub = get(uk, sid)
    assert sub.state == State.REJECTED
    assert "held your letter for 30 days" in (sub.rejection or {})["member"]


def test_a_dissolved_parliament_holds_every_letter_until_it_meets_again(uk: App) -> None:
    with session_scope(uk.sessions) as session:
        set_dissolved(session, True, source="dissolution")
    sid = store(uk, submission(supporter__postcode="M1 1AD"))
    step(uk, validate, sid)
    step(uk, resolve, sid)
    assert get(uk, sid).state == State.HELD
    set_targets(uk, vacant_seat="reject")
    other = run_through_resolution(uk, ["AB10 1AB"])["AB10 1AB"]
    assert "Parliament has been dissolved" in (other.rejection or {})["member"]
    with session_scope(uk.sessions) as session:
        set_dissolved(session, False, source="new parliament")
    step(uk, resolve, sid)
    assert get(uk, sid).state == State.RESOLVED


def test_an_mp_without_email_can_be_held_until_the_directory_has_one(uk: App) -> None:
    set_targets(uk, no_email="hold")
    sid = store(uk, submission(supporter__postcode="PR2 2ZB"))  # Preston: no email listed
    step(uk, validate, sid)
    step(uk, resolve, sid)
    sub = get(uk, sid)
    assert (sub.state, sub.constituency_code, sub.member_id) == ("held", "E14001433", 473)
    with session_scope(uk.sessions) as session:
        session.execute(
            update(Member)
            .where(Member.name == "Sir Mark Hendrick")
            .values(email="mark.hendrick.mp@parliament.uk")
        )
    step(uk, resolve, sid)
    assert get(uk, sid).recipient["email"] == "mark.hendrick.mp@parliament.uk"  # type: ignore[index]


def _resolve_group(app: App, ids: list[str]) -> list[Any]:
    """Resolution's plan for ``ids`` as one stage message runs it (one transaction)."""
    return run_group(app.sessions, ids, lambda session, sid: resolution_plan(session, sid))


def _lookups(app: App) -> list[str]:
    """The directory lookups the engine runs from now on (their SQL), listed as they run."""
    seen: list[str] = []

    @event.listens_for(app.engine, "before_cursor_execute")
    def _count(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if "directory_versions AS version" in statement:
            seen.append(statement)

    return seen


HARD_CASES = ["SW1A 1AA", "ab1 0aa", "SE1 9ZZ", "JE2 4WD", "BFPO 801", "ZZ99 3VZ", "hello"]


def test_a_group_is_resolved_with_one_lookup_as_each_alone_would_be(
    uk: App, shared_data: Path
) -> None:
    with (shared_data / "postcodes_gb_sample.csv").open() as fh:
        listed = [row["postcode"] for _, row in zip(range(40), csv.DictReader(fh), strict=False)]
    postcodes = [*listed, *HARD_CASES, "BT1 9ZZ", listed[0].lower()]  # last: lower case
    alone = run_through_resolution(uk, postcodes)
    with session_scope(uk.sessions) as session:
        ids = [accept(session, submission(supporter__postcode=pc), uk.secret).submission_id
               for pc in postcodes]  # fmt: skip
        for sid in ids:
            validate(session, sid)
        # Not validated, with a payload that is not a submission: left alone, harming nobody.
        raw = accept(session, {"campaign": SLUG, "junk": [1]}, uk.secret).submission_id
    lookups = _lookups(uk)
    outcomes = _resolve_group(uk, [*ids, raw])
    assert [error for _, _, error in outcomes] == [None] * (len(ids) + 1)
    assert len(lookups) == 1 and " IN " in lookups[0]  # one statement for the whole group
    for postcode, sid in zip(postcodes, ids, strict=True):
        grouped, single = get(uk, sid), alone[postcode]
        assert (grouped.state, grouped.member_id, grouped.constituency_code) == (
            single.state,
            single.member_id,
            single.constituency_code,
        ), postcode
        assert grouped.rejection == single.rejection and grouped.recipient == single.recipient
    assert get(uk, raw).state == State.RECEIVED


def test_the_lookup_for_many_postcodes_answers_as_the_lookup_for_one(
    uk: App, shared_data: Path
) -> None:
    with (shared_data / "postcodes_gb_sample.csv").open() as fh:
        listed = [check_format(row["postcode"])[0] for row in csv.DictReader(fh)]
    postcodes = {*listed, *(check_format(pc)[0] for pc in HARD_CASES[:-1]), "BT1 9ZZ"}
    with session_scope(uk.sessions) as session:
        one = {pc: lookup_local(session, pc) for pc in postcodes}
        many = lookup_local_many(session, postcodes)
    assert many == {pc: answer for pc, answer in one.items() if answer is not None}
    assert len(many) > 600


def test_without_a_directory_each_submission_of_a_group_waits_for_one(uk: App) -> None:
    ids = [store(uk, submission(supporter__postcode=pc)) for pc in ("SW1A 2AA", "SE1 7PB")]
    for sid in ids:
        step(uk, validate, sid)
    with session_scope(uk.sessions) as session:
        session.execute(update(DirectoryVersion).values(is_current=False))
    for group in (ids, ids[:1]):  # in a group and alone
        errors = [error for _, _, error in _resolve_group(uk, group)]
        assert all(isinstance(error, DirectoryMissing) for error in errors)
    assert [get(uk, sid).state for sid in ids] == [State.VALIDATED] * 2
    with session_scope(uk.sessions) as session:  # an operator imports one: they go on
        session.execute(update(DirectoryVersion).values(is_current=True))
    assert [error for _, _, error in _resolve_group(uk, ids)] == [None, None]
    assert all(get(uk, sid).state in (State.RESOLVED, State.REJECTED) for sid in ids)


def test_a_broken_payload_in_a_group_fails_alone_and_its_neighbours_resolve(
    uk: App, shared_data: Path
) -> None:
    with (shared_data / "postcodes_gb_sample.csv").open() as fh:
        listed = next(csv.DictReader(fh))["postcode"]
    ids = [store(uk, submission(supporter__postcode=listed)) for _ in range(3)]
    for sid in ids:
        step(uk, validate, sid)
    with session_scope(uk.sessions) as session:  # stored data damaged after validation
        session.execute(update(Submission).where(Submission.id == ids[1]).values(payload={}))
    lookups = _lookups(uk)
    outcomes = {sid: error for sid, _, error in _resolve_group(uk, ids)}
    assert isinstance(outcomes[ids[1]], KeyError)
    assert outcomes[ids[0]] is None and outcomes[ids[2]] is None
    assert len(lookups) == 1  # the neighbours' lookup was made once, for the group
    assert [get(uk, sid).state for sid in ids] == [State.RESOLVED, State.VALIDATED, State.RESOLVED]
