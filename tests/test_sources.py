"""Live sources through requests against local HTTP servers: postcodes.io answering with the
recorded real responses in ../shared/data/postcodes_io_responses, and a Members API shaped by its
published OpenAPI description (../shared/data/members_api_openapi_v1.json), fed from the real MP
file. Nothing touches the network.
"""

from __future__ import annotations

import csv
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import dramatiq
import pytest
from click.testing import CliRunner
from sqlalchemy import func, select, update

from tests.factories import submission
from tests.services import HttpStub, free_port
from tests.test_failures import dead_letter_record
from tests.test_stages import get, step, store
from workers.cli import main
from workers.database.engine import session_scope
from workers.database.models import Constituency, LookupCache, Member, State
from workers.mp.directory import current_version, sync_members
from workers.mp.live_sources import JsonApi, LiveSources, MembersApi, PostcodesIo, SourceUnavailable
from workers.mp.lookup import lookup_live
from workers.pipeline.app import App
from workers.pipeline.dispatch import stage_message
from workers.stages.comparison import compare
from workers.stages.resolution import resolve
from workers.stages.stage import Stage
from workers.stages.validation import validate

MPS = "constituencies_2024_current_mps.csv"


def recorded_postcodes_io(shared_data: Path, port: int = 0) -> HttpStub:
    answers: dict[str, tuple[int, dict[str, str], Any]] = {}
    for path in (shared_data / "postcodes_io_responses").glob("*.json"):
        exchange = json.loads(path.read_text())
        if exchange["request"]["method"] == "GET":
            response = exchange["response"]
            answers[exchange["request"]["path"]] = (response["status"], {}, response["body"])

    def route(path: str) -> tuple[int, dict[str, str], Any]:
        return answers.get(path, (404, {}, {"status": 404, "error": "Postcode not found"}))

    return HttpStub(route, port=port).start()


class FakeParliament:
    """The Members API's routes we use, answering from the real MP file (mutable per test)."""

    def __init__(self, shared_data: Path) -> None:
        with (shared_data / MPS).open() as fh:
            rows = list(csv.DictReader(fh))
        self.members: dict[int, dict[str, Any]] = {
            int(r["member_id"]): {
                "name": r["mp_name"],
                "party": r["party"],
                "seat": r["constituency_name"],
                "email": r["email"] or None,
            }
            for r in rows
        }
        seat_of = {r["ons_code"]: r["constituency_name"] for r in rows}
        self.seat_of_postcode: dict[str, str] = {}
        for name in ("postcodes_onspd_seed_sample.csv", "postcodes_gb_sample.csv"):
            with (shared_data / name).open() as fh:
                for row in csv.DictReader(fh):
                    if row["pcon24cd"] in seat_of:
                        self.seat_of_postcode[row["postcode"]] = seat_of[row["pcon24cd"]]

    def member_item(self, member_id: int) -> dict[str, Any]:
        m = self.members[member_id]
        return {
            "value": {
                "id": member_id,
                "nameListAs": m["name"],
                "nameDisplayAs": m["name"],
                "nameFullTitle": f"{m['name']} MP",
                "latestParty": {"id": 1, "name": m["party"]},
                "latestHouseMembership": {
                    "membershipFrom": m["seat"],
                    "membershipFromId": 4000 + member_id % 1000,
                    "house": 1,
                    "membershipStatus": {"statusIsActive": True},
                },
            },
            "links": [{"rel": "self", "href": f"/Members/{member_id}", "method": "GET"}],
        }

    def route(self, path: str) -> tuple[int, dict[str, str], Any]:
        url = urlsplit(path)
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        if url.path == "/api/Members/Search":
            if "Location" in query:
                seat = self.seat_of_postcode.get(query["Location"])
                ids = [i for i, m in self.members.items() if seat and m["seat"] == seat]
            else:
                ids = sorted(self.members)
            skip, take = int(query.get("skip", 0)), int(query.get("take", 20))
            page = [self.member_item(i) for i in ids[skip : skip + take]]
            return 200, {}, {"items": page, "totalResults": len(ids), "skip": skip, "take": take}
        if url.path.startswith("/api/Members/") and url.path.endswith("/Contact"):
            member_id = int(url.path.split("/")[3])
            if member_id not in self.members:
                return 404, {}, {}
            email = self.members[member_id]["email"]
            value = [
                {
                    "type": "Parliamentary office",
                    "typeId": 1,
                    "isPreferred": False,
                    "line1": "House of Commons",
                    "line2": "London",
                    "postcode": "SW1A 0AA",
                    "phone": "020 7219 3000",
                    "email": email,
                },
                {"type": "Website", "typeId": 7, "isWebAddress": True, "line1": "https://x"},
            ]
            return 200, {}, {"value": value, "links": []}
        return 404, {}, {}


@pytest.fixture
def postcodes_io(shared_data: Path) -> Iterator[HttpStub]:
    stub = recorded_postcodes_io(shared_data)
    yield stub
    stub.stop()


@pytest.fixture
def parliament(shared_data: Path) -> Iterator[tuple[FakeParliament, HttpStub]]:
    fake = FakeParliament(shared_data)
    stub = HttpStub(fake.route).start()
    yield fake, stub
    stub.stop()


def sources(
    postcodes_url: str, members_url: str, ttl: float = 3600, sleep: Any = None
) -> LiveSources:
    def api(url: str) -> JsonApi:
        return JsonApi(
            url, timeout=2, attempts=3, backoff=0.01, max_wait=5, sleep=sleep or time.sleep
        )

    return LiveSources(PostcodesIo(api(postcodes_url)), MembersApi(api(members_url)), ttl)


@pytest.fixture
def live(postcodes_io: HttpStub, parliament: tuple[FakeParliament, HttpStub]) -> LiveSources:
    return sources(postcodes_io.url, parliament[1].url)


def resolved(app: App, postcode: str, order: str, live: LiveSources) -> Any:
    sid = store(app, submission(supporter__postcode=postcode))
    step(app, validate, sid)
    step(app, resolve, sid, order, live)
    return get(app, sid)


def test_live_resolution_finds_the_constituency_and_the_mps_email(
    app: App, live: LiveSources
) -> None:
    sub = resolved(app, "ab101ab", "live", live)
    assert (sub.state, sub.constituency_code, sub.resolved_via) == ("resolved", "S14000061", "live")
    assert sub.recipient == {
        "member_id": 5450,
        "name": "Douglas Lumsden",
        "email": "douglas.lumsden.mp@parliament.uk",
        "constituency": "Aberdeen South",
    }
    assert step(app, resolve, sub.id, "live", live) == []  # twice: no second effect


@pytest.mark.parametrize(
    ("postcode", "fragment"),
    [("SE1 9ZZ", "no longer in use"), ("AB10 9ZZ", "could not find")],
)
def test_live_answers_for_postcodes_with_no_mp(
    app: App, live: LiveSources, postcode: str, fragment: str
) -> None:
    sub = resolved(app, postcode, "live", live)
    assert sub.state == State.REJECTED
    assert fragment in (sub.rejection or {})["supporter.postcode"]


def test_live_answers_for_jersey_and_a_non_geographic_postcode(app: App, live: LiveSources) -> None:
    with session_scope(app.sessions) as session:
        jersey = lookup_live(session, live, "JE2 4WD")  # pseudo-code L99999999: no MP
        assert "Jersey is a Crown dependency" in getattr(jersey, "message", "")
        se1p = lookup_live(session, live, "SE1P 5ZZ")
        assert getattr(se1p, "seat", None) is not None
        assert se1p.seat.gss_code == "E14001085"  # type: ignore[union-attr]


def test_local_first_with_live_fallback_for_postcodes_the_directory_lacks(
    app: App, live: LiveSources, postcodes_io: HttpStub
) -> None:
    local = resolved(app, "DM1 1AA", "local,live", live)
    assert (local.resolved_via, local.constituency_code) == ("local", "E14900001")
    assert postcodes_io.requests == []
    fallback = resolved(app, "M1 1AD", "local,live", live)
    assert (fallback.state, fallback.resolved_via) == ("resolved", "live")
    assert fallback.constituency_code == "E14001352"  # Manchester Central
    assert fallback.recipient["name"] == "Lucy Powell"  # type: ignore[index]


def test_answers_are_cached_with_a_time_to_live(
    app: App, postcodes_io: HttpStub, parliament: tuple[FakeParliament, HttpStub]
) -> None:
    live = sources(postcodes_io.url, parliament[1].url, ttl=3600)
    resolved(app, "AB10 1AB", "live", live)
    resolved(app, "AB10 1AB", "live", live)
    assert postcodes_io.requests == ["/postcodes/AB10%201AB"]
    with session_scope(app.sessions) as session:
        assert session.scalar(select(func.count()).select_from(LookupCache)) == 2
        session.execute(update(LookupCache).values(expires_at=LookupCache.fetched_at))
    resolved(app, "AB10 1AB", "live", live)
    assert len(postcodes_io.requests) == 2


def test_the_retention_job_deletes_cached_answers_past_their_time_to_live(
    app: App, postcodes_io: HttpStub, parliament: tuple[FakeParliament, HttpStub]
) -> None:
    live = sources(postcodes_io.url, parliament[1].url, ttl=3600)
    resolved(app, "AB10 1AB", "live", live)
    out = CliRunner().invoke(main, ["retention", "run"])
    assert json.loads(out.stdout)["expired_lookups"] == 0  # still fresh: kept
    with session_scope(app.sessions) as session:
        session.execute(update(LookupCache).values(expires_at=LookupCache.fetched_at))
    out = CliRunner().invoke(main, ["retention", "run"])
    assert json.loads(out.stdout)["expired_lookups"] == 2
    with session_scope(app.sessions) as session:
        assert session.scalar(select(func.count()).select_from(LookupCache)) == 0


def test_5xx_is_retried_with_backoff(live: LiveSources, postcodes_io: HttpStub) -> None:
    postcodes_io.script = [(503, {}, {}), (502, {}, b"bad gateway")]
    assert live.postcodes.lookup("AB10 1AB").gss_code == "S14000061"
    assert len(postcodes_io.requests) == 3


def test_retry_after_is_honoured_and_a_long_one_goes_back_to_the_queue(
    postcodes_io: HttpStub, parliament: tuple[FakeParliament, HttpStub]
) -> None:
    waits: list[float] = []
    live = sources(postcodes_io.url, parliament[1].url, sleep=waits.append)
    postcodes_io.script = [(429, {"Retry-After": "2"}, {"error": "slow down"})]
    assert live.postcodes.lookup("AB10 1AB").status == "found"
    assert waits == [2.0]
    postcodes_io.script = [(429, {"Retry-After": "3600"}, {"error": "slow down"})]
    with pytest.raises(SourceUnavailable, match="wait 3600"):
        live.postcodes.lookup("AB10 1AB")
    assert waits == [2.0]  # gave up at once instead of sleeping an hour in a worker thread


def test_connection_errors_are_retried_then_reported(tmp_path: Path) -> None:
    waits: list[float] = []
    dead = f"http://127.0.0.1:{free_port()}"
    api = JsonApi(dead, timeout=1, attempts=3, backoff=0.5, sleep=waits.append)
    with pytest.raises(SourceUnavailable, match="after 3 tries: ConnectionError"):
        PostcodesIo(api).lookup("AB10 1AB")
    assert waits == [0.5, 1.0]


def test_an_outage_never_loses_a_submission_it_ends_in_the_dead_letter_queue(
    app: App, stub_broker: Any, stub_worker: dramatiq.Worker, parliament: Any
) -> None:
    app.settings.resolution_order = "live"
    app.live_sources = sources(f"http://127.0.0.1:{free_port()}", parliament[1].url)
    sid = store(app, submission(supporter__postcode="AB10 1AB"))
    step(app, validate, sid)
    fast = stage_message(Stage.RESOLVE, sid).copy(
        options={"max_retries": 1, "min_backoff": 10, "max_backoff": 20}
    )
    stub_broker.enqueue(fast)
    row = dead_letter_record(app, fast.message_id)
    assert row is not None and row.dead_lettered_at is not None
    assert row.exception_type == "workers.mp.live_sources.SourceUnavailable"
    assert "unavailable after 3 tries" in row.exception_message
    assert get(app, sid).state == State.VALIDATED  # still there, for a requeue or the reconciler


def imported(app: App, shared_data: Path) -> Any:
    """The real MPs' file and the GB postcode sample imported: the version it made."""
    from workers.mp.directory import import_directory

    with session_scope(app.sessions) as session:
        import_directory(
            session, shared_data / MPS, [shared_data / "postcodes_gb_sample.csv"], "mp file"
        )
        before = current_version(session)
        assert before is not None
        return before


def test_directory_sync_reports_new_mps_vacancies_and_changed_emails(
    app: App, shared_data: Path, parliament: tuple[FakeParliament, HttpStub]
) -> None:
    fake, stub = parliament
    before = imported(app, shared_data)
    # Since the file: Aberdeen North's MP stood down (vacant), Chorley has a new MP, and
    # Aberdeen South's MP has a new address.
    del fake.members[4357]
    del fake.members[467]
    fake.members[9999] = {
        "name": "Pat Newcomer",
        "party": "Independent",
        "seat": "Chorley",
        "email": "pat.newcomer.mp@parliament.uk",
    }
    fake.members[5450]["email"] = "office@douglaslumsden.example"
    with session_scope(app.sessions) as session:
        report = sync_members(session, MembersApi(JsonApi(stub.url, attempts=1)), "Members API")
    assert report["vacancies"] == [{"constituency": "Aberdeen North", "gss_code": "S14000060"}]
    assert report["new_members"] == [
        {"constituency": "Chorley", "gss_code": "E14001170", "member": "Pat Newcomer"}
    ]
    assert report["changed_emails"] == [
        {
            "member": "Douglas Lumsden",
            "old": "douglas.lumsden.mp@parliament.uk",
            "new": "office@douglaslumsden.example",
        }
    ]
    with session_scope(app.sessions) as session:
        after = current_version(session)
        assert after is not None and after.id == report["version_id"] != before.id
        assert after.postcodes_version_id == before.postcodes_version_id  # postcodes shared
        assert after.changes == {k: v for k, v in report.items() if k != "version_id"}
        assert (
            session.scalar(
                select(func.count()).select_from(Member).where(Member.version_id == after.id)
            )
            == 649  # 650 seats, one vacant
        )
        no_email = session.scalar(
            select(func.count())
            .select_from(Member)
            .where(Member.version_id == after.id, Member.email.is_(None))
        )
        assert no_email == 4  # the four with none listed still have none: nothing guessed
        chorley = session.get(Constituency, (after.id, "E14001170"))
        assert chorley is not None and chorley.member_id == 9999
    # A supporter in Chorley now reaches the new MP, from the local directory.
    sub = get(app, store(app, submission(supporter__postcode="PR7 6FR")))
    step(app, validate, sub.id)
    step(app, resolve, sub.id)
    assert get(app, sub.id).recipient["name"] == "Pat Newcomer"  # type: ignore[index]


def test_live_answers_are_fetched_before_the_resolution_transaction(
    app: App, live: LiveSources, postcodes_io: HttpStub
) -> None:
    from workers.stages.resolution import warm_live

    sid = store(app, submission(supporter__postcode="AB10 1AB"))
    step(app, validate, sid)
    warm_live(app.sessions, sid, "live", live)
    assert postcodes_io.requests == ["/postcodes/AB10%201AB"]
    postcodes_io.stop()  # the transaction below must not need the network
    step(app, resolve, sid, "live", live)
    step(app, compare, sid)
    assert get(app, sid).recipient["name"] == "Douglas Lumsden"  # type: ignore[index]
    # A postcode the local directory knows is not looked up live at all.
    local = store(app, submission(supporter__postcode="DM1 1AA"))
    step(app, validate, local)
    warm_live(app.sessions, local, "local,live", live)
    assert postcodes_io.requests == ["/postcodes/AB10%201AB"]


@pytest.mark.parametrize(
    "listed",
    [
        "office@parliament.uk\r\nBcc: all@example.org",
        "two words@parliament.uk",
        "office\x00@parliament.uk",
        "<office@parliament.uk>",
        "office@parliament.uk@example.org",
        42,
    ],
)
def test_an_mps_email_from_the_members_api_that_is_no_address_is_passed_over(
    parliament: tuple[FakeParliament, HttpStub], listed: Any
) -> None:
    """Outside data is hostile: what is no address is no email (the campaign's rule for an MP
    without one applies), logged by member id without the value."""
    from structlog.testing import capture_logs

    fake, stub = parliament
    fake.members[5450]["email"] = listed
    with capture_logs() as logs:
        email, phone = MembersApi(JsonApi(stub.url, attempts=1)).contact(5450)
    assert email is None and phone == "020 7219 3000"
    assert [e for e in logs if e["event"] == "mp_email_refused"] == [
        {"event": "mp_email_refused", "member_id": 5450, "refused": 1, "log_level": "warning"}
    ]


@pytest.mark.parametrize("field", ["name", "party"])
def test_a_members_api_answer_in_a_shape_it_does_not_document_is_the_sources_outage(
    app: App, live: LiveSources, parliament: tuple[FakeParliament, HttpStub], field: str
) -> None:
    """Not text where text is documented: the source is unavailable (retried, or the local
    directory), never a crash of another kind and never an MP called 42."""
    fake, _ = parliament
    postcode = "AB10 1AB"  # Aberdeen South: member 5450
    fake.members[5450][field] = 42 if field == "name" else ["a", "list"]
    with pytest.raises(SourceUnavailable, match="in a shape it does not document"):
        live.warm(app.sessions, postcode)
    with session_scope(app.sessions) as session:  # nothing of it is kept
        assert session.scalar(select(func.count()).select_from(LookupCache).where(
            LookupCache.key == f"members:{postcode}")) == 0  # fmt: skip


def test_a_live_mps_name_is_kept_on_one_line_without_what_moves_a_terminal(
    app: App, live: LiveSources, parliament: tuple[FakeParliament, HttpStub]
) -> None:
    """A line break would fail every letter to that MP ("Dear ..." and ``To``); an escape
    sequence or a bidirectional override would reach ``show``, the console and the letter."""
    fake, _ = parliament
    fake.members[5450]["name"] = "Douglas\r\nBcc: all@x \x1b[2J\u202eLumsden"
    sub = resolved(app, "ab101ab", "live", live)
    assert sub.state == State.RESOLVED
    assert sub.recipient["name"] == "Douglas Bcc: all@x [2JLumsden"


@pytest.mark.parametrize(
    "code",
    ["S1400006100", "S14\n00061", 14000061, "E\u0661\u0664\u0660\u0660\u0660\u0660\u0660\u0661"],
)
def test_a_constituency_code_postcodes_io_does_not_document_is_its_outage(
    live: LiveSources, postcodes_io: HttpStub, app: App, code: Any
) -> None:
    found = {"status": 200, "result": {"codes": {"parliamentary_constituency": code}}}
    postcodes_io.script.append((200, {}, found))
    with pytest.raises(SourceUnavailable, match="in a shape it does not document"):
        live.warm(app.sessions, "AB10 1AB")


def test_directory_sync_refuses_a_member_name_a_letter_cannot_carry_and_changes_nothing(
    app: App, shared_data: Path, parliament: tuple[FakeParliament, HttpStub]
) -> None:
    """The Members API is outside input, as a file is: a line break in a name would fail every
    letter to that MP."""
    from workers.mp.directory import DirectoryError

    fake, stub = parliament
    before = imported(app, shared_data)
    fake.members[5450]["name"] = "Douglas Lumsden\r\nBcc: someone@example.org"
    with session_scope(app.sessions) as session, pytest.raises(DirectoryError) as refused:
        sync_members(session, MembersApi(JsonApi(stub.url, attempts=1)), "Members API")
    assert str(refused.value) == (
        "the Members API's member 5450: name must be on one line, without control characters"
    )
    with session_scope(app.sessions) as session:
        after = current_version(session)
        assert after is not None and after.id == before.id


def gzipped_whitespace(megabytes: int, then: Any) -> bytes:
    """A gzip body that decodes to ``megabytes`` MiB of JSON whitespace and then ``then``: a
    few KB on the wire."""
    import zlib

    packer = zlib.compressobj(9, zlib.DEFLATED, 31)
    pieces = [packer.compress(b" " * (1 << 20)) for _ in range(megabytes)]
    return b"".join([*pieces, packer.compress(json.dumps(then).encode()), packer.flush()])


def trickle(pieces: int, every: float) -> Iterator[bytes]:
    """A JSON body that comes a byte at a time, never ending in time."""
    yield b"["
    for _ in range(pieces):
        time.sleep(every)  # the server's pace, not the test's synchronisation
        yield b" "


def test_a_live_answer_is_read_capped_so_a_decompression_bomb_is_the_sources_outage(
    live: LiveSources, postcodes_io: HttpStub
) -> None:
    """2 MB of gzip once decoded to 2 GiB in memory: an answer is decoded a piece at a time and
    refused past 1 MiB (far more than any real answer), whatever it would have said."""
    good = {"status": 200, "result": {"codes": {"parliamentary_constituency": "S14000061"}}}
    bomb = gzipped_whitespace(8, good)
    assert len(bomb) < 64_000
    postcodes_io.script.append((200, {"Content-Encoding": "gzip"}, bomb))
    with pytest.raises(SourceUnavailable, match="an answer longer than 1,048,576 bytes"):
        live.postcodes.lookup("AB10 1AB")
    assert len(postcodes_io.requests) == 1  # an answer that size is not asked for again
    postcodes_io.script.append((200, {}, b'{"result": "' + b"x" * (2 << 20) + b'"}'))
    with pytest.raises(SourceUnavailable, match="longer than 1,048,576 bytes"):
        live.postcodes.lookup("AB10 1AB")
    assert live.postcodes.lookup("AB10 1AB").gss_code == "S14000061"  # an answer under it


def test_a_live_answer_trickling_in_holds_a_thread_no_longer_than_the_timeout(
    postcodes_io: HttpStub,
) -> None:
    """Each byte came before the read timeout, so a body dripping for ever held its thread for
    ever: the whole answer is read within the timeout."""
    api = JsonApi(postcodes_io.url, timeout=0.5, attempts=3, backoff=0.01)
    postcodes_io.script.append((200, {}, trickle(400, 0.05)))
    began = time.monotonic()
    with pytest.raises(SourceUnavailable, match=r"an answer not over in 0\.5 s"):
        PostcodesIo(api).lookup("AB10 1AB")
    assert time.monotonic() - began < 2.0  # the timeout, and a byte's wait at most
    assert len(postcodes_io.requests) == 1


@pytest.mark.parametrize("status", [301, 302, 307, 308])
def test_a_live_source_redirecting_is_its_outage_and_never_followed(
    live: LiveSources, postcodes_io: HttpStub, status: int
) -> None:
    """Followed, a redirect made DearMP ask any host the answer named (169.254.169.254)."""
    inside = HttpStub(lambda path: (200, {}, {"secret": "metadata"})).start()
    try:
        elsewhere = {"Location": f"{inside.url}/latest/meta-data/"}
        postcodes_io.script.append((status, elsewhere, b""))
        with pytest.raises(SourceUnavailable, match=f"answered HTTP {status}, a redirect"):
            live.postcodes.lookup("AB10 1AB")
        assert inside.requests == [] and len(postcodes_io.requests) == 1
    finally:
        inside.stop()


def cached_members(app: App, postcode: str) -> int:
    with session_scope(app.sessions) as session:
        return int(session.scalar(select(func.count()).select_from(LookupCache).where(
            LookupCache.key == f"members:{postcode}")) or 0)  # fmt: skip


def sync_cli(app: App, url: str) -> Any:
    """``dearmp directory sync`` against the Members API at ``url``."""
    app.settings.members_api_url = url
    return CliRunner().invoke(main, ["directory", "sync"])


def refused_in_one_line(result: Any, app: App, version_id: int, said: str) -> None:
    """The command said why in one line (no traceback), exited 1, and changed nothing."""
    assert result.exit_code == 1, result.output
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.output
    assert said in result.stderr and "(the current directory is unchanged)" in result.stderr
    with session_scope(app.sessions) as session:
        after = current_version(session)
        assert after is not None and after.id == version_id


@pytest.mark.parametrize(
    "answer",
    [
        {},
        {"items": None, "totalResults": 650},
        {"items": [], "totalResults": 1},  # none of the one it counts
        {"items": [], "totalResults": "0"},
        {"items": [], "totalResults": True},
        {"items": {"value": {}}, "totalResults": 1},
    ],
)
def test_a_member_search_in_a_shape_it_does_not_document_is_the_sources_outage_not_a_vacancy(
    app: App, live: LiveSources, parliament: tuple[FakeParliament, HttpStub], answer: Any
) -> None:
    """A 200 with no list of items once read as "nobody sits for this seat": the letter held,
    the vacancy cached for a day."""
    _, stub = parliament
    stub.script.append((200, {}, answer))
    with pytest.raises(SourceUnavailable, match="a member search in a shape it does not document"):
        live.warm(app.sessions, "AB10 1AB")
    assert cached_members(app, "AB10 1AB") == 0
    # The documented answer of a vacant seat is a vacancy.
    stub.script.append((200, {}, {"items": [], "totalResults": 0}))
    live.warm(app.sessions, "AB10 1AB")
    with session_scope(app.sessions) as session:
        assert live.member(session, "AB10 1AB") is None


@pytest.mark.parametrize("answer", [{}, {"items": None, "totalResults": 650}])
def test_directory_sync_refuses_an_answer_in_a_shape_it_does_not_document(
    app: App, shared_data: Path, parliament: tuple[FakeParliament, HttpStub], answer: Any
) -> None:
    """``{}`` once made a new current version with every seat vacant, and exit 0."""
    _, stub = parliament
    before = imported(app, shared_data)
    stub.route = lambda path: (200, {}, answer)
    result = sync_cli(app, stub.url)
    refused_in_one_line(result, app, before.id, "the member list in a shape it does not document")


def test_directory_sync_refuses_members_who_would_leave_every_seat_vacant(
    app: App, shared_data: Path, parliament: tuple[FakeParliament, HttpStub]
) -> None:
    """Members the API lists that match no seat (by member id or seat name) would leave every
    seat vacant: that is not the Commons, it is a wrong API."""
    fake, stub = parliament
    before = imported(app, shared_data)
    fake.members = {90_000 + n: {**m, "seat": f"Nowhere {n}"} for n, m in enumerate(
        fake.members.values())}  # fmt: skip
    result = sync_cli(app, stub.url)
    said = "the Members API's 650 sitting members match none of the 650 seats"
    refused_in_one_line(result, app, before.id, said)


def test_directory_sync_during_a_dissolution_leaves_every_seat_vacant_and_parliament_dissolved(
    app: App, shared_data: Path, parliament: tuple[FakeParliament, HttpStub]
) -> None:
    """The API saying, as documented, that no one sits (no items, totalResults 0) is a
    dissolution: taken, and a sync keeps the directory dissolved until ``dissolve --off``."""
    fake, stub = parliament
    imported(app, shared_data)
    assert CliRunner().invoke(main, ["directory", "dissolve", "--yes"]).exit_code == 0
    fake.members = {}
    result = sync_cli(app, stub.url)
    assert result.exit_code == 0, result.output
    assert "vacancies: 650" in result.stdout
    with session_scope(app.sessions) as session:
        after = current_version(session)
        assert after is not None and after.dissolved and after.source.startswith("Members API")
        assert session.scalar(select(func.count()).select_from(Member).where(
            Member.version_id == after.id)) == 0  # fmt: skip


@pytest.mark.parametrize(
    ("source", "member_id"),
    [
        ("members", b"Infinity"),
        ("members", b"NaN"),
        ("members", b"100000000000000000000"),  # SQLite's integer overflowed on writing it
        ("members", b"2147483648"),  # past PostgreSQL's integer
        ("members", b"0"),
        ("members", b"-5"),
        ("members", b"4000.5"),
        ("members", b'"4000"'),
        ("members", b"true"),
        ("members", b"null"),
        ("members", b"nested"),
        ("postcodes.io", b"nested"),
    ],
)
def test_a_member_id_out_of_range_or_json_too_deep_is_the_sources_outage(
    app: App,
    live: LiveSources,
    postcodes_io: HttpStub,
    parliament: tuple[FakeParliament, HttpStub],
    source: str,
    member_id: bytes,
) -> None:
    """OverflowError and RecursionError escaped the guard: the preview answered 500, the sync
    printed a traceback. A member id is a whole number from 1 to PostgreSQL's integer's most."""
    fake, stub = parliament
    if member_id == b"nested":
        answer = b"[" * 200_000 + b"]" * 200_000
    else:
        item = json.dumps({"items": [fake.member_item(5450)], "totalResults": 1}).encode()
        answer = item.replace(b'"id": 5450', b'"id": ' + member_id)
        assert answer != item
    (stub if source == "members" else postcodes_io).script.append((200, {}, answer))
    with pytest.raises(SourceUnavailable):
        live.warm(app.sessions, "AB10 1AB")
    assert cached_members(app, "AB10 1AB") == 0


def test_directory_sync_refuses_a_member_id_out_of_range_in_one_line(
    app: App, shared_data: Path, parliament: tuple[FakeParliament, HttpStub]
) -> None:
    fake, stub = parliament
    before = imported(app, shared_data)
    fake.members[10**20] = fake.members.pop(5450)
    result = sync_cli(app, stub.url)
    refused_in_one_line(result, app, before.id, "a member id that is not a whole number")
    stub.route = lambda path: (200, {}, b"[" * 200_000 + b"]" * 200_000)
    result = sync_cli(app, stub.url)
    refused_in_one_line(
        result, app, before.id, "answered 200 (no JSON we can read) for the member list"
    )


def test_directory_sync_stops_at_a_member_list_no_commons_has(
    app: App, shared_data: Path, parliament: tuple[FakeParliament, HttpStub]
) -> None:
    """A list that claimed 10**12 members, 20 new ones a page, was followed for 10,973 requests
    in 20 s and on; one whose pages repeat would never end either."""
    _, stub = parliament
    before = imported(app, shared_data)
    fresh = iter(range(10_000, 10**9))

    def endless(path: str) -> tuple[int, dict[str, str], Any]:
        items = [
            {"value": {"id": next(fresh), "nameDisplayAs": "Someone",
                       "latestHouseMembership": {"membershipFrom": "Nowhere"}}}
            for _ in range(20)
        ]  # fmt: skip
        return 200, {}, {"items": items, "totalResults": 10**12}

    stub.route = endless
    result = sync_cli(app, stub.url)
    refused_in_one_line(result, app, before.id, "lists 1,000,000,000,000 sitting members")
    assert len(stub.requests) == 1
    page = endless("")[2]
    stub.route = lambda path: (200, {}, {**page, "totalResults": 1999})
    stub.requests.clear()
    result = sync_cli(app, stub.url)
    refused_in_one_line(result, app, before.id, "page at 20 lists no member not listed before")
    assert len(stub.requests) == 2
