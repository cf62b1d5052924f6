"""The local MP directory: versioned imports of constituencies, MPs and postcodes, and lookups.

An import builds a complete new version and switches to it in the same transaction, so a failed
import leaves the previous version in place and readers never see half a directory.
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import insert, select, update
from sqlalchemy.orm import Session

from schemas.submission import normalise_postcode
from workers.models import Constituency, DirectoryVersion, Member, Postcode

BATCH = 5_000


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
        member = None
        if member_id:
            member = {
                "member_id": int(member_id),
                "name": _pick(row, "mp_name"),
                "party": _pick(row, "party"),
                "email": _pick(row, "email") or None,
            }
        yield constituency, member


def postcode_rows(path: Path) -> Iterator[dict[str, Any]]:
    """Postcode rows from an ONSPD-style CSV (sample layout or the real ONSPD column names)."""
    for row in _read_csv(path):
        raw = _pick(row, "postcode", "pcds", "pcd")
        if not raw:
            continue
        status = _pick(row, "status").lower()
        terminated = status == "terminated" or bool(_pick(row, "date_terminated", "doterm"))
        yield {
            "postcode": normalise_postcode(raw),
            "gss_code": _pick(row, "pcon24cd", "pcon") or None,
            "terminated": terminated,
        }


def _insert_batched(
    session: Session, model: type[Any], rows: Iterable[dict[str, Any]], version_id: int
) -> int:
    count, batch = 0, []
    for row in rows:
        batch.append({**row, "version_id": version_id})
        if len(batch) >= BATCH:
            session.execute(insert(model), batch)
            count, batch = count + len(batch), []
    if batch:
        session.execute(insert(model), batch)
        count += len(batch)
    return count


def import_directory(
    session: Session,
    members_csv: Path,
    postcode_csvs: Iterable[Path],
    source: str,
    on_postcode_batch: Callable[[int], None] | None = None,
) -> ImportCounts:
    """Build a new directory version from CSV files and make it current (caller commits)."""
    version = DirectoryVersion(source=source, is_current=False)
    session.add(version)
    session.flush()

    constituencies, members = [], {}
    for constituency, member in member_rows(members_csv):
        constituencies.append(constituency)
        if member is not None:
            members[member["member_id"]] = member
    n_const = _insert_batched(session, Constituency, constituencies, version.id)
    n_members = _insert_batched(session, Member, members.values(), version.id)

    seen: set[str] = set()

    def unique_postcodes() -> Iterator[dict[str, Any]]:
        for path in postcode_csvs:
            for row in postcode_rows(path):
                if row["postcode"] not in seen:
                    seen.add(row["postcode"])
                    yield row

    n_postcodes = _insert_batched(session, Postcode, unique_postcodes(), version.id)
    if on_postcode_batch is not None:
        on_postcode_batch(n_postcodes)

    session.execute(update(DirectoryVersion).values(is_current=False))
    version.is_current = True
    session.flush()
    return ImportCounts(version.id, n_const, n_members, n_postcodes)


def current_version_id(session: Session) -> int | None:
    return session.scalar(
        select(DirectoryVersion.id)
        .where(DirectoryVersion.is_current.is_(True))
        .order_by(DirectoryVersion.id.desc())
        .limit(1)
    )
