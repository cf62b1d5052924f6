"""The local MP directory: versioned imports of constituencies, MPs and postcodes. An import
builds a complete new version and switches to it in one transaction: readers never see half a
directory. Postcode files are streamed (``COPY`` on PostgreSQL, batches on SQLite), and
``progress`` is told how many bytes have been read."""

from __future__ import annotations

import codecs
import csv
import io
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import cache
from itertools import islice
from pathlib import Path
from typing import Any, cast

from sqlalchemy import Integer, delete, func, insert, literal, select, text, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from schemas.postcode import POSTCODE_RE, PostcodeProblem, check_format
from schemas.submission import single_line
from workers.database.models import Constituency, DirectoryVersion, Member, Postcode
from workers.mp.live_sources import MAX_INTEGER, MembersApi, office_email
from workers.wording import counted

BATCH = 5_000
CHUNK = 1 << 20
Progress = Callable[[int], None]

POSTCODE_COLUMNS = ("pcds", "postcode", "pcd")
CONSTITUENCY_COLUMNS = ("pcon24cd", "pcon")
TERMINATED_COLUMNS = ("doterm", "date_terminated")


class DirectoryError(Exception):
    """An import that cannot be used; nothing was changed."""


@dataclass(frozen=True)
class ImportCounts:
    version_id: int
    constituencies: int
    members: int
    postcodes: int
    skipped: int = 0  # rows of the postcode files without a postcode we can store
    first_skipped: str | None = None  # the first of them: file, line and value


@dataclass
class Skipped:
    """Postcode rows left out, their postcode not one we can store (not a postcode, or a BFPO
    number longer than the column), and where the first one was."""

    rows: int = 0
    first: str | None = None

    def add(self, name: str, line: int, value: str) -> None:
        self.rows += 1
        if self.first is None:
            self.first = f"{name} line {line}: {value[:20]!r}"


def _line_ends(text: str, after_cr: bool) -> int:
    """How many line ends ``text`` holds (LF, CRLF or a lone CR, as text read with
    ``newline=""`` splits lines), ``after_cr`` if the text before it ended with a CR."""
    return (
        text.count("\n")
        + text.count("\r")
        - text.count("\r\n")
        - (after_cr and text.startswith("\n"))
    )


def _not_utf8(path: Path) -> DirectoryError:
    """The refusal of a file that is not UTF-8, naming the line of its first byte that is not:
    the file is read again (text is decoded a block at a time, ahead of the lines parsed)."""
    decoder = codecs.getincrementaldecoder("utf-8-sig")()
    line, after_cr = 1, False
    with path.open("rb") as fh:
        while chunk := fh.read(CHUNK):
            try:
                text = decoder.decode(chunk)
            except UnicodeDecodeError as exc:
                line += _line_ends(exc.object[: exc.start].decode(), after_cr)
                return DirectoryError(
                    f"{path.name} line {line}: not UTF-8 text (byte {exc.object[exc.start]:#04x}); "
                    "save the file as UTF-8"
                )
            line += _line_ends(text, after_cr)
            after_cr = text.endswith("\r") or (after_cr and not text)
    return DirectoryError(f"{path.name}: not UTF-8 text; save the file as UTF-8")


def _records(path: Path, progress: Progress | None = None) -> Iterator[tuple[int, list[str]]]:
    """(line number, values) of each row of a CSV file, its header first; blank lines are passed
    over. Lines may end in LF, CRLF or a lone CR (read with ``newline=""``, as the csv module
    asks). A row shorter than the header is padded with empty values (spreadsheets leave out
    trailing empty fields), and empty fields beyond the header are dropped (a trailing comma).
    Refused, naming the line: text that is not UTF-8, a field beyond the csv module's limit, a
    value beyond the header's columns. ``progress`` is told the bytes read."""
    with path.open("rb") as fh:
        text = io.TextIOWrapper(fh, encoding="utf-8-sig", errors="strict", newline="")
        reader = csv.reader(text)
        width: int | None = None
        told = 0
        while True:
            line = reader.line_num + 1
            try:
                values = next(reader)
            except StopIteration:
                break
            except UnicodeDecodeError:
                raise _not_utf8(path) from None
            except csv.Error as exc:
                said = str(exc)
                if "field limit" in said:
                    said = f"a field is longer than {csv.field_size_limit()} characters"
                raise DirectoryError(f"{path.name} line {line}: {said}") from None
            if progress is not None and (read := fh.tell()) - told >= CHUNK:
                progress(read - told)
                told = read
            if not values:
                continue
            if width is None:
                width = len(values)
            elif len(values) < width:
                values += [""] * (width - len(values))
            elif len(values) > width:
                beyond = next((n for n in range(width, len(values)) if values[n].strip()), None)
                if beyond is not None:
                    raise DirectoryError(
                        f"{path.name} line {line} has {counted(len(values), 'field')}, the "
                        f"header {width}, and field {beyond + 1} is not empty: "
                        f"{values[beyond][:20]!r}"
                    )
                del values[width:]
            yield line, values
        if progress is not None:
            progress(fh.tell() - told)


@cache
def _one_line_check(label: str, limit: int) -> Callable[[Any], str | None]:
    return cast(Callable[[Any], "str | None"], single_line(label, limit, min_len=0).check)


def _length(column: Any) -> int:
    """The length of a model's string column (:mod:`workers.database.models`)."""
    return int(column.type.length)


def _one_line(name: str, line: int, label: str, value: str, limit: int) -> str:
    """``value`` without the whitespace around it (a trailing tab, as spreadsheets leave), refused
    (``name line N: label ...``) if it holds a control character (a line break would split a
    header or a printed line) or is longer than ``limit``, its column's :func:`_length`: checked
    here, so that SQLite (which stores any length) and PostgreSQL answer alike."""
    try:
        return _one_line_check(label, limit)(value.strip()) or ""
    except ValueError as exc:
        raise DirectoryError(f"{name} line {line}: {str(exc).rstrip('.')}") from None


def _api_text(where: str, label: str, value: str, limit: int) -> str:
    """A text the Members API gave, checked as a file's (:func:`_one_line`): outside input."""
    try:
        return _one_line_check(label, limit)(value.strip()) or ""
    except ValueError as exc:
        raise DirectoryError(f"{where}: {str(exc).rstrip('.')}") from None


def _pick(row: dict[str, str], *names: str) -> tuple[str, str]:
    """The first of the columns ``names`` with a value: its name and value (or the first name
    and "")."""
    for name in names:
        if row.get(name, "").strip():
            return name, row[name]
    return names[0], ""


def read_members(path: Path, version_id: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The constituencies and members of a CSV in the constituencies-with-MPs layout; refused,
    naming the line and column, for anything that could not be stored as it is or would send a
    letter astray (a seat or a member id listed twice)."""
    records = _records(path)
    header = [h.strip() for h in next(records, (1, []))[1]]
    constituencies: list[dict[str, Any]] = []
    members: list[dict[str, Any]] = []
    seat_lines: dict[str, int] = {}
    member_seats: dict[int, tuple[int, dict[str, Any]]] = {}
    for line, values in records:
        where = f"{path.name} line {line}"
        row = dict(zip(header, values, strict=True))
        given = _pick(row, "member_id")[1].strip()
        if given and not (given.isascii() and given.isdigit()):
            raise DirectoryError(f"{where}: a member_id is not a number: {given[:20]!r}")
        if given and (len(given) > len(str(MAX_INTEGER)) or int(given) > MAX_INTEGER):
            raise DirectoryError(f"{where}: member_id is too large: {given[:20]!r}")
        member_id = int(given) if given else None
        gss_code = _one_line(
            path.name, line, *_pick(row, "ons_code", "pcon24cd"), _length(Constituency.gss_code)
        )
        name = _one_line(
            path.name, line, *_pick(row, "constituency_name"), _length(Constituency.name)
        )
        country = _one_line(path.name, line, *_pick(row, "country"), _length(Constituency.country))
        constituency = {
            "version_id": version_id,
            "gss_code": gss_code,
            "name": name,
            "country": country,
            "member_id": member_id,
        }
        if not gss_code or not name:
            raise DirectoryError(f"{where}: no ons_code or constituency_name")
        if gss_code in seat_lines:
            raise DirectoryError(
                f"{where}: ons_code {gss_code} is listed twice (also line {seat_lines[gss_code]})"
            )
        seat_lines[gss_code] = line
        constituencies.append(constituency)
        email = _pick(row, "email")[1].strip()
        address = office_email(email) if email else None
        if email and address is None:
            raise DirectoryError(
                f"{where}: the MP's email for {name} is not an address a letter can go to: "
                f"{email[:80]!r}"
            )
        if member_id is None:
            continue
        if member_id in member_seats:
            other_line, other = member_seats[member_id]
            raise DirectoryError(
                f"{where}: member_id {member_id} is the MP of two seats: {gss_code} {name!r} "
                f"and {other['gss_code']} {other['name']!r} (line {other_line})"
            )
        member_seats[member_id] = (line, constituency)
        phone = _one_line(path.name, line, *_pick(row, "phone"), _length(Member.phone))
        members.append(
            {
                "version_id": version_id,
                "member_id": member_id,
                "name": _one_line(path.name, line, *_pick(row, "mp_name"), _length(Member.name)),
                "party": _one_line(path.name, line, *_pick(row, "party"), _length(Member.party)),
                "email": address,
                "phone": phone or None,
            }
        )
    return constituencies, members


@dataclass(frozen=True)
class PostcodeLayout:
    """Where the columns we need are in a postcode CSV's header, and the constituency column's
    name (for messages)."""

    postcode: int
    constituency: int
    terminated: int | None
    status: int | None
    constituency_name: str

    @classmethod
    def from_header(cls, header: list[str], name: str) -> PostcodeLayout:
        columns = [h.strip().lower() for h in header]

        def find(names: Sequence[str]) -> int | None:
            return next((columns.index(n) for n in names if n in columns), None)

        postcode, constituency = find(POSTCODE_COLUMNS), find(CONSTITUENCY_COLUMNS)
        if postcode is None or constituency is None:
            raise DirectoryError(
                f"{name}: needs a postcode column ({', '.join(POSTCODE_COLUMNS)}) and a "
                f"constituency column ({', '.join(CONSTITUENCY_COLUMNS)})"
            )
        terminated, status = find(TERMINATED_COLUMNS), find(("status",))
        return cls(postcode, constituency, terminated, status, columns[constituency])

    def row(self, name: str, line: int, values: list[str]) -> dict[str, Any] | None:
        """The row to store, or None if its postcode is not one we can store: not a postcode
        (the intake would refuse it before any lookup: :func:`schemas.postcode.check_format`), or
        longer than the column (a BFPO number: the intake refuses it too)."""
        postcode = values[self.postcode]
        # The ONSPD's pcds is canonical already: stored as it is. fullmatch, not match: "$" would
        # let a trailing line break through.
        if not POSTCODE_RE.fullmatch(postcode):
            postcode, problem = check_format(postcode)
            if problem is not None and problem.code in NOT_POSTCODES:
                return None
            if len(postcode) > POSTCODE_LENGTH:  # "BFPO 1234": no lookup asks for it
                return None
        gss_code = _one_line(
            name, line, self.constituency_name, values[self.constituency], POSTCODE_GSS_LENGTH
        )
        terminated = bool(self.terminated is not None and values[self.terminated].strip())
        if self.status is not None and values[self.status].strip().lower() == "terminated":
            terminated = True
        return {"postcode": postcode, "gss_code": gss_code or None, "terminated": terminated}


NOT_POSTCODES = (PostcodeProblem.MISSING, PostcodeProblem.NOT_A_POSTCODE)
POSTCODE_LENGTH = _length(Postcode.postcode)
POSTCODE_GSS_LENGTH = _length(Postcode.gss_code)


def postcode_rows(
    path: Path, version_id: int, progress: Progress, skipped: Skipped
) -> Iterator[dict[str, Any]]:
    """The rows to store of a postcode file (the same on both databases), streamed; rows
    without a postcode we can store are counted in ``skipped``."""
    records = _records(path, progress)
    layout = PostcodeLayout.from_header(next(records, (1, []))[1], path.name)
    name = path.name
    for line, values in records:
        row = layout.row(name, line, values)
        if row is None:
            skipped.add(name, line, values[layout.postcode])
        else:
            row["version_id"] = version_id
            yield row


def _postcodes_sqlite(session: Session, rows: Iterator[dict[str, Any]], first: bool) -> None:
    stmt = insert(Postcode)
    if not first:  # later files add only postcodes the earlier ones lack
        stmt = stmt.prefix_with("OR IGNORE")
    while batch := list(islice(rows, BATCH)):
        session.execute(stmt, batch)


def _postcodes_postgresql(session: Session, rows: Iterator[dict[str, Any]], first: bool) -> None:
    """COPY the checked rows into a staging table, then into the postcodes."""
    session.execute(
        text(
            "CREATE TEMP TABLE dearmp_postcode_stage "
            "(version_id integer, postcode text, gss_code text, terminated boolean) ON COMMIT DROP"
        )
    )
    cursor = session.connection().connection.driver_connection.cursor()  # type: ignore[union-attr]
    columns = "version_id, postcode, gss_code, terminated"
    with cursor.copy(f"COPY dearmp_postcode_stage ({columns}) FROM STDIN") as copy:
        for row in rows:
            copy.write_row((row["version_id"], row["postcode"], row["gss_code"], row["terminated"]))
    # Later files add only postcodes the earlier ones lack; the first is not checked (faster):
    # a repeat in it is an error.
    conflict = "" if first else " ON CONFLICT DO NOTHING"
    session.execute(
        text(
            f"INSERT INTO postcodes ({columns}) "  # noqa: S608 (no value is formatted in)
            f"SELECT {columns} FROM dearmp_postcode_stage{conflict}"
        )
    )
    session.execute(text("DROP TABLE dearmp_postcode_stage"))


def current_version(session: Session) -> DirectoryVersion | None:
    return session.scalars(
        select(DirectoryVersion)
        .where(DirectoryVersion.is_current.is_(True))
        .order_by(DirectoryVersion.id.desc())
        .limit(1)
    ).first()


def example_postcode(session: Session) -> str | None:
    """A live postcode of the current directory whose MP has an email address, for a page to
    suggest."""
    version = current_version_id(session)
    if version is None:
        return None
    return session.scalar(
        select(Postcode.postcode)
        .join(
            Constituency,
            (Constituency.version_id == Postcode.version_id)
            & (Constituency.gss_code == Postcode.gss_code),
        )
        .join(
            Member,
            (Member.version_id == Constituency.version_id)
            & (Member.member_id == Constituency.member_id),
        )
        .where(
            Postcode.version_id == version,
            Postcode.terminated.is_(False),
            Member.email.is_not(None),
        )
        .order_by(Postcode.postcode)
        .limit(1)
    )


def current_version_id(session: Session) -> int | None:
    version = current_version(session)
    return version.id if version is not None else None


def _copy_members(session: Session, source_id: int, version_id: int) -> None:
    for model in (Constituency, Member):
        columns = [c.name for c in model.__table__.columns if c.name != "version_id"]
        session.execute(
            insert(model).from_select(
                ["version_id", *columns],
                select(
                    literal(version_id, Integer), *[model.__table__.c[c] for c in columns]
                ).where(model.__table__.c.version_id == source_id),
            )
        )


def _new_version(session: Session, source: str, **values: Any) -> DirectoryVersion:
    """A new version, not current yet (:func:`_switch_to`)."""
    version = DirectoryVersion(source=source[:200], is_current=False, **values)
    session.add(version)
    session.flush()
    return version


def _switch_to(session: Session, version: DirectoryVersion) -> None:
    session.execute(update(DirectoryVersion).values(is_current=False))
    version.is_current = True
    session.flush()


def _count(session: Session, model: type[Any], version_id: int) -> int:
    query = select(func.count()).select_from(model).where(model.version_id == version_id)
    return int(session.scalar(query) or 0)


def import_directory(
    session: Session,
    members_csv: Path | None,
    postcode_csvs: Sequence[Path],
    source: str,
    progress: Progress | None = None,
) -> ImportCounts:
    """Build a new directory version and make it current (the caller commits). Without
    ``members_csv`` the current constituencies and MPs are carried over; without postcode files
    the new version uses the current version's postcodes."""
    postgresql = session.get_bind().dialect.name == "postgresql"
    previous = current_version(session)
    if previous is None and (members_csv is None or not postcode_csvs):
        raise DirectoryError("the first import needs both an MP file and a postcode file")
    version = _new_version(session, source)
    if members_csv is not None:
        constituencies, members = read_members(members_csv, version.id)
        if not constituencies:
            raise DirectoryError(f"{members_csv.name} has no constituencies")
        session.execute(insert(Constituency), constituencies)
        if members:
            session.execute(insert(Member), members)
    else:
        assert previous is not None
        _copy_members(session, previous.id, version.id)
    skipped = Skipped()
    if postcode_csvs:
        load = _postcodes_postgresql if postgresql else _postcodes_sqlite
        for n, path in enumerate(postcode_csvs):
            rows = postcode_rows(path, version.id, progress or (lambda _: None), skipped)
            try:
                with session.begin_nested():
                    load(session, rows, n == 0)
            except IntegrityError as exc:
                raise DirectoryError(f"{path.name} lists a postcode twice") from exc
        version.postcodes_version_id = version.id
        if _count(session, Postcode, version.id) == 0:
            raise DirectoryError("the postcode files hold no postcodes")
    else:
        assert previous is not None
        version.postcodes_version_id = previous.postcodes_version_id
    _switch_to(session, version)
    if postgresql:
        # Fresh statistics: else the planner may pick a far slower plan until autovacuum runs.
        session.execute(text("ANALYZE postcodes, constituencies, members"))
    return ImportCounts(
        version.id,
        _count(session, Constituency, version.id),
        _count(session, Member, version.id),
        _count(session, Postcode, version.postcodes_version_id or version.id),
        skipped.rows,
        skipped.first,
    )


def set_dissolved(session: Session, dissolved: bool, source: str) -> int:
    """A new version like the current one with Parliament dissolved (or meeting again)."""
    previous = current_version(session)
    if previous is None:
        raise DirectoryError("no directory has been imported")
    version = _new_version(
        session, source, postcodes_version_id=previous.postcodes_version_id, dissolved=dissolved
    )
    _copy_members(session, previous.id, version.id)
    _switch_to(session, version)
    return version.id


def prune(session: Session, keep: int = 2) -> list[int]:
    """Delete all but the newest ``keep`` versions, and postcode sets no kept version uses."""
    ids = list(session.scalars(select(DirectoryVersion.id).order_by(DirectoryVersion.id.desc())))
    kept, dropped = ids[:keep], ids[keep:]
    current = current_version_id(session)
    if current is not None and current not in kept:
        kept.append(current)
        dropped.remove(current)
    in_use = set(
        session.scalars(
            select(DirectoryVersion.postcodes_version_id).where(DirectoryVersion.id.in_(kept))
        )
    )
    # A version whose postcodes are still used by a kept one stays as an empty shell.
    gone = [v for v in dropped if v not in in_use]
    for model, versions in ((Constituency, dropped), (Member, dropped), (Postcode, gone)):
        if versions:
            session.execute(delete(model).where(model.version_id.in_(versions)))
    if gone:
        session.execute(delete(DirectoryVersion).where(DirectoryVersion.id.in_(gone)))
    return gone


def _seat_key(name: str) -> str:
    return " ".join(name.casefold().replace("&", "and").split())


def sync_members(session: Session, members_api: MembersApi, source: str) -> dict[str, Any]:
    """Refresh MPs and their emails from the Members API into a new current version; what
    changed. The API's seats carry no ONS code: members are matched by member id, newcomers by
    seat name. Emails come only from the API's contact records, never guessed. Every seat is
    left vacant only when the API lists no sitting member (a dissolution), never when those it
    lists match no seat; a dissolved directory stays dissolved."""
    # Every network call before the transaction begins (650 look-ups take minutes).
    sitting = {member_id: rest for member_id, *rest in members_api.current_members()}
    contacts = {member_id: members_api.contact(member_id) for member_id in sitting}
    previous = current_version(session)
    if previous is None:
        raise DirectoryError("no directory has been imported: import one before syncing")
    seats = list(
        session.scalars(select(Constituency).where(Constituency.version_id == previous.id))
    )
    old_emails = dict(
        session.execute(
            select(Member.member_id, Member.email).where(Member.version_id == previous.id)
        ).all()
    )
    by_seat = {_seat_key(seat): member_id for member_id, (_, _, seat) in sitting.items()}

    # Parliament dissolved stays so until `directory dissolve --off`.
    version = _new_version(
        session,
        source,
        postcodes_version_id=previous.postcodes_version_id,
        dissolved=previous.dissolved,
    )
    changes: dict[str, list[Any]] = {"new_members": [], "vacancies": [], "changed_emails": []}
    constituencies, members = [], []
    for seat in seats:
        member_id = seat.member_id if seat.member_id in sitting else None
        if member_id is None:
            member_id = by_seat.get(_seat_key(seat.name))
        row = {c.name: getattr(seat, c.name) for c in Constituency.__table__.columns}
        constituencies.append({**row, "version_id": version.id, "member_id": member_id})
        if member_id is None:
            if seat.member_id is not None:
                changes["vacancies"].append({"constituency": seat.name, "gss_code": seat.gss_code})
            continue
        name, party, _ = sitting[member_id]
        email, phone = contacts[member_id]
        where = f"the Members API's member {member_id}"
        members.append(
            {
                "version_id": version.id,
                "member_id": member_id,
                "name": _api_text(where, "name", name, _length(Member.name)),
                "party": _api_text(where, "party", party, _length(Member.party)),
                "email": email,
                "phone": _api_text(where, "phone", phone or "", _length(Member.phone)) or None,
            }
        )
        if member_id != seat.member_id:
            changes["new_members"].append(
                {"constituency": seat.name, "gss_code": seat.gss_code, "member": name}
            )
        elif member_id in old_emails and old_emails[member_id] != email:
            changes["changed_emails"].append(
                {"member": name, "old": old_emails[member_id], "new": email}
            )
    if sitting and seats and not members:  # no one sits only if the API says so (a dissolution)
        raise DirectoryError(
            f"the Members API's {counted(len(sitting), 'sitting member')} match none of the "
            f"{counted(len(seats), 'seat')} by member id or seat name: every seat would be vacant"
        )
    session.execute(insert(Constituency), constituencies)
    if members:
        session.execute(insert(Member), members)
    version.changes = changes
    _switch_to(session, version)
    return {"version_id": version.id, **changes}
