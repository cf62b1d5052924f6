"""Finding the MP for a postcode (postcode → constituency → sitting MP): from the current local
directory in one statement, or from the live sources (postcodes.io and the Members API), in the
order ``DEARMP_RESOLUTION_ORDER`` asks."""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import ColumnElement, Executable, bindparam, func, select
from sqlalchemy.orm import Session, sessionmaker

from schemas.postcode import (
    CROWN_DEPENDENCIES,
    CROWN_PSEUDO_CODES,
    PostcodeProblem,
    Problem,
    area,
    check_format,
    crown_dependency,
    problem,
)
from workers.database.engine import session_scope
from workers.database.models import (
    AddressHealth,
    Constituency,
    DirectoryVersion,
    Member,
    Postcode,
    table,
)
from workers.mp import health
from workers.mp.directory import current_version
from workers.mp.live_sources import LiveSources


class DirectoryMissing(Exception):
    """No MP directory has been imported: an operator must import one (then requeue)."""


@dataclass(frozen=True)
class Seat:
    gss_code: str
    name: str


@dataclass(frozen=True)
class Mp:
    member_id: int
    name: str
    party: str
    email: str | None
    phone: str | None
    # Letters to this address have been coming back (workers.mp.health): hold new ones.
    failing: bool = False


@dataclass(frozen=True)
class Found:
    seat: Seat
    member: Mp
    version_id: int | None
    via: str


@dataclass(frozen=True)
class Vacant:
    seat: Seat
    dissolved: bool
    version_id: int | None
    via: str


@dataclass(frozen=True)
class Unreachable:
    """The directory is inconsistent (a postcode's constituency is missing): an operator's case."""

    reason: str


Answer = Found | Vacant | Problem | Unreachable


def _no_seat(postcode: str, gss_code: str | None) -> Problem:
    if area(postcode) in CROWN_DEPENDENCIES:
        return crown_dependency(area(postcode))
    if gss_code in CROWN_PSEUDO_CODES:
        return crown_dependency(CROWN_PSEUDO_CODES[gss_code])
    return problem(PostcodeProblem.NO_CONSTITUENCY)


def _lookup_statement(many: bool = False) -> Executable:
    """One postcode's answer (``:postcode``), or with ``many`` every listed one's
    (``:postcodes``, the versions oldest first). On the tables, not the mapped classes: rows
    without the ORM's loading are faster."""
    version = table(DirectoryVersion).alias("version")
    postcode, seat, member = table(Postcode), table(Constituency), table(Member)
    address = table(AddressHealth)
    listed: ColumnElement[bool]
    if many:
        listed = postcode.c.postcode.in_(bindparam("postcodes", expanding=True))
    else:
        listed = postcode.c.postcode == bindparam("postcode")
    statement = (
        select(
            *([postcode.c.postcode] if many else []),
            version.c.id,
            version.c.dissolved,
            postcode.c.gss_code,
            postcode.c.terminated,
            seat.c.name,
            member.c.member_id,
            member.c.name,
            member.c.party,
            member.c.email,
            member.c.phone,
            address.c.status,
        )
        .select_from(version)
        .join(
            postcode,
            (postcode.c.version_id == version.c.postcodes_version_id) & listed,
        )
        .outerjoin(
            seat,
            (seat.c.version_id == version.c.id) & (seat.c.gss_code == postcode.c.gss_code),
        )
        .outerjoin(
            member,
            (member.c.version_id == version.c.id) & (member.c.member_id == seat.c.member_id),
        )
        .outerjoin(address, address.c.email == func.lower(member.c.email))
        .where(version.c.is_current.is_(True))
    )
    if many:
        return statement.order_by(version.c.id)
    return statement.order_by(version.c.id.desc()).limit(1)


# Built once: constructing a statement costs more than running it.
LOOKUP = _lookup_statement()
LOOKUP_MANY = _lookup_statement(many=True)


def lookup_local(session: Session, postcode: str) -> Answer | None:
    """The current directory's answer for a normalised postcode in one statement; None when it
    is not listed."""
    row = session.execute(LOOKUP, {"postcode": postcode}).first()
    if row is None:
        _check_directory(session)
        return None
    return _answer(postcode, row)


def lookup_local_many(session: Session, postcodes: Collection[str]) -> dict[str, Answer]:
    """:func:`lookup_local` for several normalised postcodes with one statement; a postcode
    the directory does not list is left out."""
    if not postcodes:
        return {}
    rows = session.execute(LOOKUP_MANY, {"postcodes": sorted(postcodes)}).all()
    if not rows:
        _check_directory(session)
    latest = {row[0]: row[1:] for row in rows}  # the versions come oldest first
    return {postcode: _answer(postcode, row) for postcode, row in latest.items()}


def _check_directory(session: Session) -> None:
    if current_version(session) is None:
        raise DirectoryMissing("No MP directory has been imported.")


def _answer(postcode: str, row: Sequence[Any]) -> Answer:
    """What a lookup row says of ``postcode``."""
    (version_id, dissolved, gss_code, terminated, seat_name) = row[:5]
    member_id, name, party, email, phone, health_status = row[5:]
    if terminated:
        return problem(PostcodeProblem.TERMINATED)
    if gss_code is None or gss_code in CROWN_PSEUDO_CODES or area(postcode) in CROWN_DEPENDENCIES:
        return _no_seat(postcode, gss_code)
    if seat_name is None:
        return Unreachable(f"Constituency {gss_code} is missing from directory {version_id}.")
    seat = Seat(gss_code, seat_name)
    if dissolved or member_id is None:
        return Vacant(seat, dissolved, version_id, "local")
    mp = Mp(member_id, name, party, email, phone, health_status == health.FAILING)
    return Found(seat, mp, version_id, "local")


# postcodes.io's answers that find no constituency.
_LIVE_PROBLEMS = {
    "terminated": PostcodeProblem.TERMINATED,
    "invalid": PostcodeProblem.NOT_A_POSTCODE,
}


def lookup_live(session: Session, live: LiveSources, postcode: str) -> Answer:
    answer = live.postcode(session, postcode)
    if answer.status != "found":
        return problem(_LIVE_PROBLEMS.get(answer.status, PostcodeProblem.UNKNOWN))
    if not answer.gss_code or answer.gss_code in CROWN_PSEUDO_CODES or not answer.constituency:
        return _no_seat(postcode, answer.gss_code)
    seat = Seat(answer.gss_code, answer.constituency)
    member = live.member(session, postcode)
    if member is None:
        return Vacant(seat, False, None, "live")
    failing = health.is_failing(session, member.email)
    mp = Mp(member.member_id, member.name, member.party, member.email, member.phone, failing)
    return Found(seat, mp, None, "live")


def prefetch(
    sessions: sessionmaker[Session], postcode: str, order: str, live: LiveSources | None
) -> None:
    """Before a transaction that will :func:`find` a normalised postcode: fetch what the live
    sources will be asked, when the local directory will not answer, into their cache with no
    transaction open, so that a slow source holds no database connection."""
    if live is None or order == "local":
        return
    if order != "live":
        with session_scope(sessions) as session:
            if lookup_local(session, postcode) is not None:
                return
    live.warm(sessions, postcode)


def find(
    session: Session,
    postcode: str,
    order: str,
    live: LiveSources | None,
    known: Mapping[str, Answer] | None = None,
) -> Answer:
    """The answer for a supporter's postcode from the sources in ``order``. ``known``: the local
    directory's answers already looked up (:func:`lookup_local_many`)."""
    normalised, format_problem = check_format(postcode)
    if format_problem is not None:
        return format_problem
    if order != "live":
        local = known.get(normalised) if known is not None else lookup_local(session, normalised)
        if local is not None:
            return local
    if order != "local" and live is not None:
        return lookup_live(session, live, normalised)
    return problem(PostcodeProblem.UNKNOWN)
