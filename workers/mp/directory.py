"""The local MP directory: versioned imports of constituencies, MPs and postcodes.

An import builds a complete new version and switches to it in the same transaction, so readers
never see half a directory. Postcode files are streamed (PostgreSQL parses them with ``COPY``;
SQLite takes batches), and ``progress`` is told how many bytes have been read.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from sqlalchemy import Integer, delete, func, insert, literal, select, text, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from schemas.postcode import normalise_postcode
from workers.database.models import Constituency, DirectoryVersion, Member, Postcode
from workers.mp.live_sources import MembersApi

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


def _read_csv(path: Path) -> Iterator[dict[str, str]]:
    with path.open(newline="", encoding="utf-8-sig") as fh:
        yield from csv.DictReader(fh)


def _pick(row: dict[str, str], *names: str) -> str:
    for name in names:
        if row.get(name):
            return row[name].strip()
    return ""


def member_rows(path: Path) -> Iterator[tuple[dict[str, Any], dict[str, Any] | None]]:
    """(constituency, member or None) per row of a CSV in the constituencies-with-MPs layout."""
    for row in _read_csv(path):
        member_id = _pick(row, "member_id")
        constituency = {
            "gss_code": _pick(row, "ons_code", "pcon24cd"),
            "name": _pick(row, "constituency_name"),
            "country": _pick(row, "country"),
            "member_id": int(member_id) if member_id else None,
        }
        if not constituency["gss_code"] or not constituency["name"]:
            raise DirectoryError(f"{path.name}: a row has no ons_code or constituency_name")
        member = None
        if member_id:
            member = {
                "member_id": int(member_id),
                "name": _pick(row, "mp_name"),
                "party": _pick(row, "party"),
                "email": _pick(row, "email") or None,
                "phone": _pick(row, "phone") or None,
            }
        yield constituency, member


@dataclass(frozen=True)
class PostcodeLayout:
    """Where the three columns we need are in a postcode CSV's header."""

    postcode: int
    constituency: int
    terminated: int | None
    status: int | None

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
        return cls(postcode, constituency, find(TERMINATED_COLUMNS), find(("status",)))

    def row(self, values: list[str]) -> dict[str, Any] | None:
        raw = values[self.postcode].strip() if len(values) > self.postcode else ""
        if not raw:
            return None
        terminated = bool(self.terminated is not None and values[self.terminated].strip())
        if self.status is not None and values[self.status].strip().lower() == "terminated":
            terminated = True
        return {
            "postcode": normalise_postcode(raw),
            "gss_code": values[self.constituency].strip() or None,
            "terminated": terminated,
        }


class _CountingReader(io.RawIOBase):
    """A binary file that reports how many bytes have been read so far."""

    def __init__(self, fh: IO[bytes], progress: Progress | None) -> None:
        self.fh, self.progress = fh, progress

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        n = self.fh.readinto(buffer)  # type: ignore[attr-defined]
        if n and self.progress is not None:
            self.progress(n)
        return int(n or 0)


def _header(path: Path) -> list[str]:
    with path.open(newline="", encoding="utf-8-sig") as fh:
        return next(csv.reader(fh), [])


def _postcodes_sqlite(
    session: Session, path: Path, version_id: int, progress: Progress | None, first: bool
) -> None:
    layout = PostcodeLayout.from_header(_header(path), path.name)
    stmt = insert(Postcode)
    if not first:  # later files add only postcodes the earlier ones lack
        stmt = stmt.prefix_with("OR IGNORE")
    with path.open("rb") as raw:
        counted = io.BufferedReader(_CountingReader(raw, progress), CHUNK)
        reader = csv.reader(io.TextIOWrapper(counted, encoding="utf-8-sig", newline=""))
        next(reader, None)
        batch: list[dict[str, Any]] = []
        for values in reader:
            row = layout.row(values)
            if row is not None:
                batch.append({**row, "version_id": version_id})
            if len(batch) >= BATCH:
                session.execute(stmt, batch)
                batch = []
        if batch:
            session.execute(stmt, batch)


def _postcodes_postgresql(
    session: Session, path: Path, version_id: int, progress: Progress | None, first: bool
) -> None:
    """COPY the file's bytes into a staging table; PostgreSQL parses the CSV, SQL normalises it."""
    header = _header(path)
    layout = PostcodeLayout.from_header(header, path.name)
    columns = ", ".join(f"c{i} text" for i in range(len(header)))
    session.execute(text(f"CREATE TEMP TABLE dearmp_postcode_stage ({columns}) ON COMMIT DROP"))
    cursor = session.connection().connection.driver_connection.cursor()  # type: ignore[union-attr]
    with cursor.copy("COPY dearmp_postcode_stage FROM STDIN (FORMAT csv, HEADER true)") as copy:
        with path.open("rb") as fh:
            at_start = True
            while chunk := fh.read(CHUNK):
                if at_start and chunk.startswith(b"\xef\xbb\xbf"):
                    chunk = chunk[3:]
                at_start = False
                copy.write(chunk)
                if progress is not None:
                    progress(len(chunk))
    compact = f"replace(upper(c{layout.postcode}), ' ', '')"
    terminated = "false"
    if layout.terminated is not None:
        terminated = f"coalesce(trim(c{layout.terminated}), '') <> ''"
    if layout.status is not None:
        terminated += f" OR lower(trim(c{layout.status})) = 'terminated'"
    # Only integer column positions are formatted in; the values arrive as data.
    insert_sql = (
        "INSERT INTO postcodes (version_id, postcode, gss_code, terminated) "  # noqa: S608
        "SELECT :v, left(pc, length(pc) - 3) || ' ' || right(pc, 3), "
        f"nullif(trim(c{layout.constituency}), ''), {terminated} "
        f"FROM (SELECT {compact} AS pc, * FROM dearmp_postcode_stage) s "
        "WHERE length(pc) > 3" + ("" if first else " ON CONFLICT DO NOTHING")
        # Later files add only postcodes the earlier ones lack. (Checking the first file for
        # conflicts too would cost a third of the import; a repeat in it is an error.)
    )
    session.execute(text(insert_sql), {"v": version_id})
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
    found: str | None = session.scalar(
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
    return found


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


def _switch_to(session: Session, version: DirectoryVersion) -> None:
    session.execute(update(DirectoryVersion).values(is_current=False))
    version.is_current = True
    session.flush()


def _count(session: Session, model: type[Any], version_id: int) -> int:
    return int(
        session.scalar(
            select(func.count()).select_from(model).where(model.version_id == version_id)
        )
        or 0
    )


def import_directory(
    session: Session,
    members_csv: Path | None,
    postcode_csvs: Sequence[Path],
    source: str,
    progress: Progress | None = None,
) -> ImportCounts:
    """Build a new directory version and make it current (the caller commits).

    Without ``members_csv`` the current constituencies and MPs are carried over; without postcode
    files the new version uses the current version's postcodes.
    """
    previous = current_version(session)
    if previous is None and (members_csv is None or not postcode_csvs):
        raise DirectoryError("the first import needs both an MP file and a postcode file")
    version = DirectoryVersion(source=source[:200], is_current=False)
    session.add(version)
    session.flush()

    if members_csv is not None:
        constituencies, members = [], {}
        for constituency, member in member_rows(members_csv):
            constituencies.append({**constituency, "version_id": version.id})
            if member is not None:
                members[member["member_id"]] = {**member, "version_id": version.id}
        if not constituencies:
            raise DirectoryError(f"{members_csv.name} has no constituencies")
        session.execute(insert(Constituency), constituencies)
        if members:
            session.execute(insert(Member), list(members.values()))
    else:
        assert previous is not None
        _copy_members(session, previous.id, version.id)

    if postcode_csvs:
        load = _postcodes_postgresql
        if session.get_bind().dialect.name != "postgresql":
            load = _postcodes_sqlite
        for n, path in enumerate(postcode_csvs):
            try:
                with session.begin_nested():
                    load(session, path, version.id, progress, n == 0)
            except IntegrityError as exc:
                raise DirectoryError(f"{path.name} lists a postcode twice") from exc
        version.postcodes_version_id = version.id
        if _count(session, Postcode, version.id) == 0:
            raise DirectoryError("the postcode files hold no postcodes")
    else:
        assert previous is not None
        version.postcodes_version_id = previous.postcodes_version_id

    _switch_to(session, version)
    if session.get_bind().dialect.name == "postgresql":
        # Fresh statistics: else the planner may pick a far slower plan until autovacuum runs.
        session.execute(text("ANALYZE postcodes, constituencies, members"))
    return ImportCounts(
        version.id,
        _count(session, Constituency, version.id),
        _count(session, Member, version.id),
        _count(session, Postcode, version.postcodes_version_id or version.id),
    )


def set_dissolved(session: Session, dissolved: bool, source: str) -> int:
    """A new version like the current one with Parliament dissolved (or meeting again)."""
    previous = current_version(session)
    if previous is None:
        raise DirectoryError("no directory has been imported")
    version = DirectoryVersion(
        source=source,
        postcodes_version_id=previous.postcodes_version_id,
        dissolved=dissolved,
    )
    session.add(version)
    session.flush()
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
    for version_id in dropped:
        session.execute(delete(Constituency).where(Constituency.version_id == version_id))
        session.execute(delete(Member).where(Member.version_id == version_id))
        if version_id not in in_use:
            session.execute(delete(Postcode).where(Postcode.version_id == version_id))
    # A version whose postcodes are still used by a kept one stays as an empty shell.
    gone = [v for v in dropped if v not in in_use]
    if gone:
        session.execute(delete(DirectoryVersion).where(DirectoryVersion.id.in_(gone)))
    return gone


def _seat_key(name: str) -> str:
    return " ".join(name.casefold().replace("&", "and").split())


def sync_members(session: Session, members_api: MembersApi, source: str) -> dict[str, Any]:
    """Refresh MPs and their emails from the Members API into a new current version.

    The API's seats carry no ONS code: members are matched by member id, newcomers by seat name.
    Emails come only from the API's contact records, never guessed. Returns what changed.
    """
    # Every network call before the transaction begins (650 look-ups take minutes).
    sitting = {member_id: rest for member_id, *rest in members_api.current_members()}
    contacts = {member_id: members_api.contact(member_id) for member_id in sitting}
    previous = current_version(session)
    if previous is None:
        raise DirectoryError("no directory has been imported: import one before syncing")
    seats = list(
        session.scalars(select(Constituency).where(Constituency.version_id == previous.id))
    )
    old = {
        m.member_id: m
        for m in session.scalars(select(Member).where(Member.version_id == previous.id))
    }
    by_seat = {_seat_key(seat): member_id for member_id, (_, _, seat) in sitting.items()}

    version = DirectoryVersion(
        source=source[:200], postcodes_version_id=previous.postcodes_version_id
    )
    session.add(version)
    session.flush()
    changes: dict[str, list[dict[str, Any]]] = {
        "new_members": [],
        "vacancies": [],
        "changed_emails": [],
    }
    constituencies, members = [], []
    for seat in seats:
        member_id = seat.member_id if seat.member_id in sitting else None
        if member_id is None:
            member_id = by_seat.get(_seat_key(seat.name))
        constituencies.append(
            {
                "version_id": version.id,
                "gss_code": seat.gss_code,
                "name": seat.name,
                "country": seat.country,
                "member_id": member_id,
            }
        )
        if member_id is None:
            if seat.member_id is not None:
                changes["vacancies"].append({"constituency": seat.name, "gss_code": seat.gss_code})
            continue
        name, party, _ = sitting[member_id]
        email, phone = contacts[member_id]
        members.append(
            {
                "version_id": version.id,
                "member_id": member_id,
                "name": name,
                "party": party,
                "email": email,
                "phone": phone,
            }
        )
        if member_id != seat.member_id:
            changes["new_members"].append(
                {"constituency": seat.name, "gss_code": seat.gss_code, "member": name}
            )
        elif member_id in old and old[member_id].email != email:
            changes["changed_emails"].append(
                {"member": name, "old": old[member_id].email, "new": email}
            )
    session.execute(insert(Constituency), constituencies)
    if members:
        session.execute(insert(Member), members)
    version.changes = changes
    _switch_to(session, version)
    return {"version_id": version.id, **changes}
