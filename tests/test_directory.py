"""Directory imports through the command line, on SQLite and PostgreSQL (where postcodes go
through COPY): versions, atomic switching, the real ONSPD column names, failed imports, pruning."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from click.testing import CliRunner
from sqlalchemy import func, select

from workers.cli import main
from workers.database.engine import session_scope
from workers.database.models import Constituency, DirectoryVersion, Member, Postcode
from workers.mp.directory import current_version
from workers.mp.lookup import Found, lookup_local
from workers.pipeline.app import App

MPS = "constituencies_2024_current_mps.csv"
# The real ONSPD's first columns, in its order; the project reads pcds, pcon and doterm.
ONSPD_HEADER = ["pcd", "pcd2", "pcds", "dointr", "doterm", "oscty", "ced", "oslaua", "osward"]


def as_onspd(shared_data: Path, path: Path) -> Path:
    """The ONSPD seed sample rewritten with the real ONSPD column names (pcd is 7 wide)."""
    with (shared_data / "postcodes_onspd_seed_sample.csv").open() as src, path.open("w") as out:
        writer = csv.writer(out)
        writer.writerow([*ONSPD_HEADER, "pcon", "lat", "long"])
        for row in csv.DictReader(src):
            outward, inward = row["postcode"].split(" ")
            writer.writerow(
                [
                    f"{outward:<4}{inward}",
                    f"{outward:<5}{inward}",
                    row["postcode"],
                    row["date_introduced"],
                    row["date_terminated"],
                    "E99999999",
                    "",
                    "",
                    "",
                    row["pcon24cd"],
                    row["latitude"],
                    row["longitude"],
                ]
            )
    return path


def run(*args: str) -> str:
    result = CliRunner().invoke(main, ["directory", *args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.stdout


def count(app: App, model: type, version_id: int) -> int:
    with session_scope(app.sessions) as session:
        return int(
            session.scalar(
                select(func.count()).select_from(model).where(model.version_id == version_id)
            )
            or 0
        )


def current(app: App) -> DirectoryVersion:
    with session_scope(app.sessions) as session:
        version = current_version(session)
        assert version is not None
        return version


def test_import_the_real_onspd_layout_and_mp_file(
    app: App, shared_data: Path, tmp_path: Path
) -> None:
    onspd = as_onspd(shared_data, tmp_path / "ONSPD_NOV_2025_UK.csv")
    out = run("import", "--members", str(shared_data / MPS), "--postcodes", str(onspd))
    assert "650 constituencies, 650 members, 8048 postcodes" in out
    version = current(app)
    assert version.postcodes_version_id == version.id
    with session_scope(app.sessions) as session:
        terminated = session.scalar(
            select(func.count())
            .select_from(Postcode)
            .where(Postcode.version_id == version.id, Postcode.terminated.is_(True))
        )
        assert terminated == 3811
        found = lookup_local(session, "AB10 1AB")
        assert isinstance(found, Found) and found.seat.name == "Aberdeen South"
        empty = session.get(Postcode, (version.id, "AB11 3AG"))  # the row with no pcon
        assert empty is not None and empty.gss_code is None


def test_a_reimport_is_a_new_version_and_the_switch_is_atomic(
    app: App, shared_data: Path, tmp_path: Path
) -> None:
    before = current(app)  # the sample directory
    run(
        "import",
        "--members",
        str(shared_data / MPS),
        "--postcodes",
        str(shared_data / "postcodes_gb_sample.csv"),
    )
    first = current(app)
    assert first.id != before.id and count(app, Postcode, first.id) == 1896
    assert count(app, Postcode, before.id) > 0  # the old version is still whole

    # Only the MPs: the new version shares the postcodes instead of copying 2.7 million rows.
    run("import", "--members", str(shared_data / MPS))
    mps_only = current(app)
    assert mps_only.postcodes_version_id == first.id
    assert count(app, Constituency, mps_only.id) == 650
    with session_scope(app.sessions) as session:
        assert isinstance(lookup_local(session, "GU12 4LW"), Found)

    # Prune: the shared postcode set stays while a kept version uses it. A dry run first.
    assert "would delete versions:" in run("prune", "--keep", "1", "--dry-run")
    assert count(app, Postcode, before.id) > 0  # nothing deleted
    run("prune", "--keep", "1", "--yes")
    assert count(app, Postcode, first.id) == 1896
    assert count(app, Postcode, before.id) == 0


def test_a_failed_import_leaves_the_current_directory_in_place(
    app: App, shared_data: Path, tmp_path: Path
) -> None:
    before = current(app)
    wrong_columns = tmp_path / "wrong.csv"
    wrong_columns.write_text("postcode_only\nAB10 1AB\n")
    result = CliRunner().invoke(main, ["directory", "import", "--postcodes", str(wrong_columns)])
    assert result.exit_code != 0 and "current directory is unchanged" in result.output

    # A file that breaks half-way through (a ragged row deep in the file).
    broken = tmp_path / "broken.csv"
    lines = (shared_data / "postcodes_onspd_seed_sample.csv").read_text().splitlines()
    broken.write_text("\n".join([*lines[:6000], '"AB10 1AB,unterminated', *lines[6000:]]) + "\n")
    result = CliRunner().invoke(
        main,
        ["directory", "import", "--members", str(shared_data / MPS), "--postcodes", str(broken)],
    )
    assert result.exit_code != 0
    after = current(app)
    assert after.id == before.id
    with session_scope(app.sessions) as session:
        assert session.scalar(select(func.count()).select_from(DirectoryVersion)) == 1
        assert isinstance(lookup_local(session, "DM1 1AA"), Found)


def test_dissolve_and_status(app: App) -> None:
    assert "nothing changed" in run("dissolve", "--dry-run")
    assert not current(app).dissolved
    assert "dissolved" in run("dissolve", "--yes")
    assert current(app).dissolved
    assert "sits" in run("dissolve", "--off", "--yes")
    assert not current(app).dissolved
    status = run("status")
    assert "dissolved" in status and "sample" in status


def test_a_postcode_listed_twice_in_one_file_is_refused_on_both_databases(
    app: App, shared_data: Path, tmp_path: Path
) -> None:
    """The first file's repeat is an error (the same on PostgreSQL's COPY as on SQLite), while a
    later file may repeat what an earlier one holds: it adds only the postcodes they lack."""
    before = current(app)
    lines = (shared_data / "postcodes_onspd_seed_sample.csv").read_text().splitlines()
    twice = tmp_path / "twice.csv"
    twice.write_text("\n".join([*lines, lines[1]]) + "\n")
    members = str(shared_data / MPS)
    result = CliRunner().invoke(
        main, ["directory", "import", "--members", members, "--postcodes", str(twice)]
    )
    assert result.exit_code != 0 and "twice.csv lists a postcode twice" in result.output
    assert current(app).id == before.id
    sample = str(shared_data / "postcodes_onspd_seed_sample.csv")
    run("import", "--members", members, "--postcodes", sample, "--postcodes", sample)
    version = current(app)
    assert count(app, Postcode, version.id) == len(lines) - 1


@pytest.mark.parametrize(
    ("email", "member_id", "said"),
    [
        ("office@parliament.uk\x07", "5173", "the MP's email for Aldershot is not an address"),
        ("two words@parliament.uk", "5173", "the MP's email for Aldershot is not an address"),
        ("alex.baker.mp@parliament.uk", "51 73", "a member_id is not a number: '51 73'"),
        ("alex.baker.mp@parliament.uk", "5173²", "a member_id is not a number: '5173²'"),
    ],
)
def test_an_mp_file_with_an_email_or_member_id_that_cannot_work_is_refused(
    app: App, shared_data: Path, tmp_path: Path, email: str, member_id: str, said: str
) -> None:
    """The operator's file is outside input too: refused with one line naming the row."""
    before = current(app)
    with (shared_data / MPS).open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    rows[0] |= {"email": email, "member_id": member_id}
    bad = tmp_path / "mps.csv"
    with bad.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    result = CliRunner().invoke(main, ["directory", "import", "--members", str(bad)])
    assert result.exit_code == 1, result.output
    assert f"mps.csv line 2: {said}" in result.output and "unchanged" in result.output
    assert current(app).id == before.id


# The layout of the MP file (constituencies_2024_current_mps.csv), for small hand-made files.
MP_HEADER = (
    "ons_code,constituency_name,country,region,designation,member_id,twfy_person_id,mp_name,"
    "mp_full_title,party,email,email_is_parliamentary,ge2024_winner_name,"
    "ge2024_winner_member_id,ge2024_result,mp_changed_since_ge2024"
)


def mp_line(
    gss: str = "E1",
    seat: str = "A",
    member: str = "1",
    name: str = "A",
    party: str = "Ind",
    email: str = "a@mp.example.org",
) -> str:
    fields = [gss, seat, "England", "F", "B", member, "", name, "A MP", party, email, "false"]
    return ",".join(f'"{f}"' for f in [*fields, "", "", "", ""]) + "\n"


def refused(args: list[str], said: str) -> None:
    """One line on stderr naming what is wrong, exit 1, and the current directory unchanged."""
    result = CliRunner().invoke(main, ["directory", "import", *args])
    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error")]
    assert len(errors) == 1 and said in errors[0], result.stderr
    assert errors[0].endswith("(the current directory is unchanged)"), result.stderr


@pytest.mark.parametrize(
    ("content", "said"),
    [
        # Two seats with one MP: a letter for one seat would go to the other's MP.
        (
            mp_line("E1", "A", "1") + mp_line("E2", "B", "1", "B", email="b@mp.example.org"),
            "mps.csv line 3: member_id 1 is the MP of two seats: E2 'B' and E1 'A' (line 2)",
        ),
        (
            mp_line("E1", "A", "1") + mp_line("E1", "B", "2", "B", email="b@mp.example.org"),
            "mps.csv line 3: ons_code E1 is listed twice (also line 2)",
        ),
        (mp_line(member="9" * 23), "mps.csv line 2: member_id is too large: '99999999999999999999"),
        (mp_line(member="9" * 5000), "mps.csv line 2: member_id is too large"),
        (mp_line(member=str(2**31)), "mps.csv line 2: member_id is too large: '2147483648'"),
        (mp_line(seat="A" * 200_000), "mps.csv line 2: a field is longer than 131072 characters"),
        (mp_line(name="Evil\r\nBcc: x@evil.org"), "mps.csv line 2: mp_name must be on one line"),
        (mp_line(party="Ind\x1b[31m"), "mps.csv line 2: party must be on one line"),
        (mp_line(seat="Oldwick\r\nNorth"), "mps.csv line 2: constituency_name must be on one"),
        (mp_line(seat="A\x00B"), "mps.csv line 2: constituency_name must be on one line"),
        (mp_line(gss="E\u20281"), "mps.csv line 2: ons_code must be on one line"),
        (mp_line(name="Alex\tBaker"), "mps.csv line 2: mp_name must be on one line"),
        (mp_line(party="P" * 101), "mps.csv line 2: party must be at most 100 characters"),
        (mp_line(name="N" * 201), "mps.csv line 2: mp_name must be at most 200 characters"),
        (mp_line(gss="E1490000199999"), "mps.csv line 2: ons_code must be at most 9 characters"),
        (
            mp_line() + mp_line("E2", "B", "2", "B", email="b@mp.example.org")[:-1] + ',"",x\n',
            "mps.csv line 3 has 18 fields, the header 16, and field 18 is not empty: 'x'",
        ),
    ],
    ids=[
        "member-twice",
        "seat-twice",
        "member-id-23-digits",
        "member-id-5000-digits",
        "member-id-beyond-integer",
        "field-200k",
        "crlf-name",
        "escape-party",
        "crlf-seat",
        "nul-seat",
        "line-separator-code",
        "tab-in-name",
        "party-101",
        "name-201",
        "code-14",
        "value-beyond-header",
    ],
)
def test_an_mp_file_that_cannot_be_stored_as_it_is_is_refused_on_both_databases(
    app: App, tmp_path: Path, content: str, said: str
) -> None:
    """What the database would refuse (PostgreSQL: a value longer than its column, a number
    beyond its integer) or store wrongly (a NUL, a line break in a name that goes into letters,
    one member for two seats) is refused at import, with the file's line and field, alike on
    SQLite and PostgreSQL."""
    before = current(app)
    bad = tmp_path / "mps.csv"
    bad.write_text(MP_HEADER + "\n" + content, newline="")
    refused(["--members", str(bad)], said)
    assert current(app).id == before.id


def test_a_file_that_is_not_utf8_is_refused_naming_its_line(app: App, tmp_path: Path) -> None:
    before = current(app)
    members = tmp_path / "mps.csv"
    members.write_bytes(
        (MP_HEADER + "\n" + mp_line()).encode() + mp_line(seat="Ynys M\xf4n").encode("latin-1")
    )
    refused(["--members", str(members)], "mps.csv line 3: not UTF-8 text (byte 0xf4)")
    postcodes = tmp_path / "p.csv"
    postcodes.write_bytes(b"pcds,pcon\nDM1 1AA,E14900001\nDM1 1AB,E1\xf4\n")
    refused(["--postcodes", str(postcodes)], "p.csv line 3: not UTF-8 text (byte 0xf4)")
    # Deep in a file (past the first block read), and with lone CR line ends.
    deep = "pcds,pcon\r" + "X,E14900001\r" * 3000
    postcodes.write_bytes(deep.encode() + "DM1 1AB,Ynys M\xf4n\r".encode("latin-1"))
    refused(["--postcodes", str(postcodes)], "p.csv line 3002: not UTF-8 text (byte 0xf4)")
    assert current(app).id == before.id


def excel(rows: list[list[str]], shape: str, end: str) -> str:
    """``rows`` as spreadsheets save them: ``ragged``, each row without its trailing empty fields
    (old Excel); ``trailing-comma``, each row after the header with one more, empty, field; lines
    ended by ``end`` (a lone CR: Excel's "CSV (Macintosh)")."""
    lines = []
    for n, row in enumerate(rows):
        fields = [f'"{f}"' if "," in f else f for f in row]
        if shape == "ragged":
            while fields and not fields[-1]:
                fields.pop()
        elif n:
            fields.append("")
        lines.append(",".join(fields) + end)
    return "".join(lines)


@pytest.mark.parametrize(
    ("shape", "end"),
    [("ragged", "\n"), ("ragged", "\r"), ("trailing-comma", "\r\n"), ("trailing-comma", "\r")],
    ids=["ragged-lf", "ragged-cr", "trailing-comma-crlf", "trailing-comma-cr"],
)
def test_files_as_spreadsheets_save_them_import_on_both_databases(
    app: App, shared_data: Path, tmp_path: Path, shape: str, end: str
) -> None:
    """Rows shorter than the header (their missing fields are empty), an empty field beyond it,
    lone CR line ends, and a tab or space around a name: files that imported before, and do."""
    with (shared_data / MPS).open(newline="") as fh:
        rows = list(csv.reader(fh))
    for row in rows[1:]:
        row[12:] = ["", "", "", ""]  # the 2024 result's columns, not read: trailing and empty
    rows[1][7] = "Alex Baker\t"
    rows[1][1] = " Aldershot "
    members = tmp_path / "mps.csv"
    members.write_text(excel(rows, shape, end), newline="")
    postcodes = tmp_path / "p.csv"
    postcodes.write_text(
        excel(
            [
                ["pcds", "pcon", "doterm"],
                ["DM1 1AA", "E14900001", ""],
                ["DM1 1AB", "E14900001", "202001"],
            ],
            shape,
            end,
        ),
        newline="",
    )
    out = run("import", "--members", str(members), "--postcodes", str(postcodes))
    assert "650 constituencies, 650 members, 2 postcodes" in out
    version = current(app)
    with session_scope(app.sessions) as session:
        seat = session.get(Constituency, (version.id, "E14001063"))
        assert seat is not None and seat.name == "Aldershot"
        member = session.get(Member, (version.id, 5173))
        assert member is not None and member.name == "Alex Baker"
        assert [
            (p.postcode, p.gss_code, p.terminated)
            for p in session.scalars(
                select(Postcode)
                .where(Postcode.version_id == version.id)
                .order_by(Postcode.postcode)
            )
        ] == [("DM1 1AA", "E14900001", False), ("DM1 1AB", "E14900001", True)]


def test_postcodes_are_stored_as_lookups_ask_for_them(app: App, tmp_path: Path) -> None:
    """A canonical postcode (the ONSPD's pcds) is stored as it is; any other (a line break or
    spaces around it, lower case, no space) as the intake normalises it."""
    postcodes = tmp_path / "p.csv"
    postcodes.write_text(
        'pcds,pcon\n"DM1 1AA\n",E14900001\n dm1 1ab ,E14900001\nDM11AD,E14900001\n'
        "DM1 1AE,E14900001\n"
    )
    run("import", "--postcodes", str(postcodes))
    version = current(app)
    with session_scope(app.sessions) as session:
        stored = session.scalars(select(Postcode.postcode).where(Postcode.version_id == version.id))
        assert sorted(stored) == ["DM1 1AA", "DM1 1AB", "DM1 1AD", "DM1 1AE"]


@pytest.mark.parametrize(
    ("content", "said"),
    [
        (
            "pcds,pcon\nDM1 1AA,E14900001,,\nDM1 1AB,E14900001,, x\n",
            "p.csv line 3 has 4 fields, the header 2, and field 4 is not empty: ' x'",
        ),
        ('pcds,pcon\nDM1 1AA,E14900001\nDM1 1AB,"E1\x00"\n', "p.csv line 3: pcon must be on one"),
        ("pcds,pcon\nDM1 1AA,E149000019999\n", "p.csv line 2: pcon must be at most 9 characters"),
        ('pcds,pcon\n"' + "A" * 200_000 + '",E1\n', "p.csv line 2: a field is longer than 131072"),
    ],
    ids=["value-beyond-header", "nul-code", "code-14", "field-200k"],
)
def test_a_postcode_file_that_cannot_be_stored_as_it_is_is_refused_on_both_databases(
    app: App, tmp_path: Path, content: str, said: str
) -> None:
    """A value beyond the header's columns, NULs and over-long codes: one line naming the file's
    line and column, the same from SQLite's batches as from PostgreSQL's COPY."""
    before = current(app)
    bad = tmp_path / "p.csv"
    bad.write_text(content, newline="")
    refused(["--postcodes", str(bad)], said)
    assert current(app).id == before.id


def test_rows_that_are_not_postcodes_are_skipped_and_counted(app: App, tmp_path: Path) -> None:
    """A row the intake could never ask for (it refuses such a postcode before any lookup) is left
    out and counted, with the first one shown: one odd row must not stop a 2.7 million row import.
    A file of nothing else holds no postcodes and is refused."""
    before = current(app)
    junk = tmp_path / "junk.csv"
    junk.write_text("pcds,pcon\nX,E14900001\n!!!!! !!!,E14900001\n")
    refused(["--postcodes", str(junk)], "the postcode files hold no postcodes")
    assert current(app).id == before.id

    mixed = tmp_path / "mixed.csv"
    # BFPO 1234 is a postcode (a BFPO number) but longer than the column: not one we can store.
    mixed.write_text("pcds,pcon\ndm11aa,E14900001\nX,E14900001\nBFPO 1234,E14900001\n\n")
    out = run("import", "--postcodes", str(mixed))
    assert "1 postcode" in out
    assert (
        "skipped 2 rows that are not postcodes we can store (the first: mixed.csv line 3: 'X')"
    ) in out
    version = current(app)
    assert count(app, Postcode, version.id) == 1
    with session_scope(app.sessions) as session:
        assert isinstance(lookup_local(session, "DM1 1AA"), Found)
