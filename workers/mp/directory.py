"""The local MP directory: versioned imports of constituencies, MPs and postcodes. An import
builds a complete new version and switches to it in one transaction: readers never see half a
directory. Postcode files are streamed (``COPY`` on PostgreSQL, batches on SQLite), and
``progress`` is told how many bytes have been read."""

from __future__ import annotations

import csv
import io
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

from sqlalchemy import Integer, delete, func, insert, literal, select, text, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from schemas.postcode import normalise_postcode
from workers.database.models import Constituency, DirectoryVersion, Member, Postcode
from workers.mp.live_sources import MembersApi, office_email

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


def _pick(row: dict[str, str], *names: str) -> str:
    for name in names:
        if row.get(name):
            return row[name].strip()
    return ""


def member_rows(
    path: Path, version_id: int
) -> Iterator[tuple[dict[str, Any], dict[str, Any] | None]]:
    """(constituency, member or None) per row of a CSV in the constituencies-with-MPs layout."""
    with path.open(newline="", encoding="utf-8-sig") as fh:
        for row in csv.DictReader(fh):
            given = _pick(row, "member_id")
            if given and not (given.isascii() and given.isdigit()):
                raise DirectoryError(f"{path.name}: a member_id is not a number: {given[:20]!r}")
            member_id = int(given) if given else None
            constituency = {
                "version_id": version_id,
                "gss_code": _pick(row, "ons_code", "pcon24cd"),
                "name": _pick(row, "constituency_name"),
                "country": _pick(row, "country"),
                "member_id": member_id,
            }
            if not constituency["gss_code"] or not constituency["name"]:
                raise DirectoryError(f"{path.name}: a row has no ons_code or constituency_name")
            member, email = None, _pick(row, "email")
            address = office_email(email) if email else None
            if email and address is None:
                raise DirectoryError(
                    f"{path.name}: the MP's email for {constituency['name']} is not an address "
                    f"a letter can go to: {email[:80]!r}"
                )
            if member_id is not None:
                member = {
                    "version_id": version_id,
                    "member_id": member_id,
                    "name": _pick(row, "mp_name"),
                    "party": _pick(row, "party"),
                    "email": address,
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


def _header(path: Path) -> list[str]:
    with path.open(newline="", encoding="utf-8-sig") as fh:
        return next(csv.reader(fh), [])


def _postcodes_sqlite(
    session: Session, path: Path, version_id: int, progress: Progress, first: bool
) -> None:
    layout = PostcodeLayout.from_header(_header(path), path.name)
    stmt = insert(Postcode)
    if not first:  # later files add only postcodes the earlier ones lack
        stmt = stmt.prefix_with("OR IGNORE")
    with path.open("rb") as fh:
        reader = csv.reader(io.TextIOWrapper(fh, encoding="utf-8-sig", newline=""))
        next(reader, None)
        rows = (row for row in map(layout.row, reader) if row is not None)
        told = 0
        while batch := [{**row, "version_id": version_id} for row in islice(rows, BATCH)]:
            session.execute(stmt, batch)
            progress(fh.tell() - told)
            told = fh.tell()
        progress(fh.tell() - told)


def _postcodes_postgresql(
    session: Session, path: Path, version_id: int, progress: Progress, first: bool
) -> None:
    """COPY the file's bytes into a staging table; PostgreSQL parses the CSV, SQL normalises it."""
    header = _header(path)
    layout = PostcodeLayout.from_header(header, path.name)
    columns = ", ".join(f"c{i} text" for i in range(len(header)))
    session.execute(text(f"CREATE TEMP TABLE dearmp_postcode_stage ({columns}) ON COMMIT DROP"))
    cursor = session.connection().connection.driver_connection.cursor()  # type: ignore[union-attr]
    with cursor.copy("COPY dearmp_postcode_stage FROM STDIN (FORMAT csv, HEADER true)") as copy:
        with path.open("rb") as fh:
            if fh.read(3) != b"\xef\xbb\xbf":  # a byte order mark is skipped
                fh.seek(0)
            while chunk := fh.read(CHUNK):
                copy.write(chunk)
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
        # Later files add only postcodes the earlier ones lack; the first is not checked (faster):
        # a repeat in it is an error.
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
        rows = list(member_rows(members_csv, version.id))
        if not rows:
            raise DirectoryError(f"{members_csv.name} has no constituencies")
        session.execute(insert(Constituency), [constituency for constituency, _ in rows])
        members = {member["member_id"]: member for _, member in rows if member is not None}
        if members:
            session.execute(insert(Member), list(members.values()))
    else:
        assert previous is not None
        _copy_members(session, previous.id, version.id)
    if postcode_csvs:
        load = _postcodes_postgresql if postgresql else _postcodes_sqlite
        for n, path in enumerate(postcode_csvs):
            try:
                with session.begin_nested():
                    load(session, path, version.id, progress or (lambda _: None), n == 0)
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
    seat name. Emails come only from the API's contact records, never guessed."""
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

    version = _new_version(session, source, postcodes_version_id=previous.postcodes_version_id)
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
        elif member_id in old_emails and old_emails[member_id] != email:
            changes["changed_emails"].append(
                {"member": name, "old": old_emails[member_id], "new": email}
            )
    session.execute(insert(Constituency), constituencies)
    if members:
        session.execute(insert(Member), members)
    version.changes = changes
    _switch_to(session, version)
    return {"version_id": version.id, **changes}
