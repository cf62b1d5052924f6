"""MP resolution: postcode → constituency → sitting MP, and what to do when there is none to email.

Where the answer comes from is configurable (``DEARMP_RESOLUTION_ORDER``): the local directory,
the live sources (postcodes.io and the Members API), or the local directory first with the live
sources for postcodes it does not know. What happens with an MP who cannot simply be emailed is
each campaign's decision (:class:`schemas.campaign.Targets`); every case ends in a recorded outcome.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import Executable, bindparam, func, select, update
from sqlalchemy.orm import Session, aliased, sessionmaker

from schemas.campaign import Targets
from schemas.postcode import (
    CROWN_DEPENDENCIES,
    CROWN_PSEUDO_CODES,
    PostcodeProblem,
    Problem,
    area,
    check_format,
    crown_dependency,
    is_non_geographic,
    problem,
)
from workers.campaigns import get_definition
from workers.db import session_scope
from workers.directory import current_version
from workers.models import (
    Constituency,
    DirectoryVersion,
    Member,
    Postcode,
    State,
    Submission,
    SubmissionEvent,
    utcnow,
)
from workers.sources import LiveSources
from workers.stages import Stage
from workers.transitions import AlreadyMoved, Apply, Current, current, done, move, rowcount

POSTCODE_FIELD = "supporter.postcode"
MEMBER_FIELD = "member"
HOUSE_OF_COMMONS = "House of Commons, London SW1A 0AA"


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


def _lookup_statement() -> Executable:
    version = aliased(DirectoryVersion)
    return (
        select(
            version.id,
            version.dissolved,
            Postcode.gss_code,
            Postcode.terminated,
            Constituency.name,
            Member.member_id,
            Member.name,
            Member.party,
            Member.email,
            Member.phone,
        )
        .select_from(version)
        .join(
            Postcode,
            (Postcode.version_id == version.postcodes_version_id)
            & (Postcode.postcode == bindparam("postcode")),
        )
        .outerjoin(
            Constituency,
            (Constituency.version_id == version.id) & (Constituency.gss_code == Postcode.gss_code),
        )
        .outerjoin(
            Member,
            (Member.version_id == version.id) & (Member.member_id == Constituency.member_id),
        )
        .where(version.is_current.is_(True))
        .order_by(version.id.desc())
        .limit(1)
    )


# Built once: constructing the statement costs ten times more than running it.
LOOKUP = _lookup_statement()


def lookup_local(session: Session, postcode: str) -> Answer | None:
    """The current directory's answer for a normalised postcode; None when it is not listed.

    One statement, one round trip: the current version, the postcode, its seat and its MP.
    """
    row = session.execute(LOOKUP, {"postcode": postcode}).first()
    if row is None:
        if current_version(session) is None:
            raise DirectoryMissing("No MP directory has been imported.")
        return None
    version_id, dissolved, gss_code, terminated, seat_name, member_id, name, party, email, phone = (
        row
    )
    if terminated:
        return problem(PostcodeProblem.TERMINATED)
    if gss_code is None or gss_code in CROWN_PSEUDO_CODES or area(postcode) in CROWN_DEPENDENCIES:
        return _no_seat(postcode, gss_code)
    if seat_name is None:
        return Unreachable(f"Constituency {gss_code} is missing from directory {version_id}.")
    seat = Seat(gss_code, seat_name)
    if dissolved or member_id is None:
        return Vacant(seat, dissolved, version_id, "local")
    return Found(seat, Mp(member_id, name, party, email, phone), version_id, "local")


def lookup_live(session: Session, live: LiveSources, postcode: str) -> Answer:
    answer = live.postcode(session, postcode)
    if answer.status == "terminated":
        return problem(PostcodeProblem.TERMINATED)
    if answer.status == "invalid":
        return problem(PostcodeProblem.NOT_A_POSTCODE)
    if answer.status != "found":
        return problem(PostcodeProblem.UNKNOWN)
    if not answer.gss_code or answer.gss_code in CROWN_PSEUDO_CODES or not answer.constituency:
        return _no_seat(postcode, answer.gss_code)
    seat = Seat(answer.gss_code, answer.constituency)
    member = live.member(session, postcode)
    if member is None:
        return Vacant(seat, False, None, "live")
    mp = Mp(member.member_id, member.name, member.party, member.email, member.phone)
    return Found(seat, mp, None, "live")


def find(session: Session, postcode: str, order: str, live: LiveSources | None) -> Answer:
    """The answer for a supporter's postcode from the sources in ``order``."""
    normalised, format_problem = check_format(postcode)
    if format_problem is not None:
        return format_problem
    if order != "live":
        local = lookup_local(session, normalised)
        if local is not None:
            return local
    if order != "local" and live is not None:
        return lookup_live(session, live, normalised)
    return problem(PostcodeProblem.UNKNOWN)


def fill(template: str, **values: str) -> str:
    """Substitute ``{name}`` placeholders, and nothing else (no attribute access, no code)."""
    return re.sub(r"\{(\w+)\}", lambda m: values.get(m.group(1), m.group(0)), template)


def contact_route(member: Mp) -> str:
    route = HOUSE_OF_COMMONS
    return f"{route}, or by phone on {member.phone}" if member.phone else route


@dataclass(frozen=True)
class Hold:
    reason: str


@dataclass(frozen=True)
class Refuse:
    field: str
    message: str
    code: str


def decide(targets: Targets, postcode: str, answer: Answer) -> Found | Hold | Refuse | Unreachable:
    """What the campaign does with an answer: write, hold the letter, or tell the supporter."""
    if isinstance(answer, Problem):
        return Refuse(POSTCODE_FIELD, answer.message, f"postcode:{answer.code}")
    if isinstance(answer, Unreachable):
        return answer
    if isinstance(answer, Vacant):
        message = targets.dissolved_message if answer.dissolved else targets.vacant_message
        message = fill(message, constituency=answer.seat.name)
        if targets.vacant_seat == "hold":
            return Hold("dissolved" if answer.dissolved else f"vacant {answer.seat.gss_code}")
        return Refuse(MEMBER_FIELD, message, "dissolved" if answer.dissolved else "vacant")
    if targets.non_geographic == "reject" and is_non_geographic(postcode):
        return Refuse(
            POSTCODE_FIELD,
            problem(PostcodeProblem.NON_GEOGRAPHIC).message,
            f"postcode:{PostcodeProblem.NON_GEOGRAPHIC}",
        )
    values = {
        "mp": answer.member.name,
        "constituency": answer.seat.name,
        "contact": contact_route(answer.member),
    }
    if answer.member.member_id in targets.excluded_member_ids or (
        answer.member.party in targets.excluded_parties
    ):
        return Refuse(MEMBER_FIELD, fill(targets.excluded_message, **values), "excluded")
    if not answer.member.email:
        if targets.no_email == "hold":
            return Hold(f"no email for member {answer.member.member_id}")
        return Refuse(MEMBER_FIELD, fill(targets.no_email_message, **values), "no_email")
    return answer


def _held_since(session: Session, submission_id: str) -> timedelta | None:
    first = session.scalar(
        select(func.min(SubmissionEvent.at)).where(
            SubmissionEvent.submission_id == submission_id, SubmissionEvent.state == State.HELD
        )
    )
    if first is None:
        return None
    if first.tzinfo is None:  # SQLite hands back naive UTC from an aggregate
        first = first.replace(tzinfo=utcnow().tzinfo)
    return utcnow() - first


def _still_held(session: Session, submission: Current, version_id: int | None) -> list[Stage]:
    """Looked again, still nothing to write to: note the directory seen and the time, no event."""
    now = utcnow()
    result = session.execute(
        update(Submission)
        .where(Submission.id == submission.id, Submission.state == State.HELD)
        .values(directory_version_id=version_id, dispatched_at=now, updated_at=now)
        .execution_options(synchronize_session=False)
    )
    if rowcount(result) != 1:
        raise AlreadyMoved(submission.id)
    return []


def warm_live(
    sessions: sessionmaker[Session], submission_id: str, order: str, live: LiveSources | None
) -> None:
    """Before the resolution transaction: fetch what the live sources will be asked, if the
    local directory will not answer, so that no network call happens inside the transaction."""
    if live is None or order == "local":
        return
    with session_scope(sessions) as session:
        submission = current(session, submission_id, "payload")
        if submission is None or submission.payload is None:
            return
        postcode, bad = check_format(submission.payload["supporter"]["postcode"])
        if bad is not None or (order != "live" and lookup_local(session, postcode) is not None):
            return
    live.warm(sessions, postcode)


def plan(
    session: Session, submission_id: str, order: str = "local", live: LiveSources | None = None
) -> Apply[list[Stage]]:
    """Find the supporter's MP: what to write, and the stages to send it on to."""
    submission = current(session, submission_id, "payload")
    if (
        submission is None
        or submission.state not in (State.VALIDATED, State.HELD)
        or submission.payload is None
    ):
        return done([])
    definition = get_definition(session, submission.campaign_slug, submission.definition_sha256)
    targets = definition.targets if definition is not None else Targets()
    postcode = submission.payload["supporter"]["postcode"]
    answer = find(session, postcode, order, live)
    outcome = decide(targets, postcode, answer)
    # Which seat and MP the supporter would have written to, kept even when no letter goes.
    seat_fields: dict[str, Any] = {}
    if isinstance(answer, Found | Vacant):
        seat_fields = {"constituency_code": answer.seat.gss_code, "resolved_via": answer.via}
        seat_fields["directory_version_id"] = answer.version_id
    if isinstance(answer, Found):
        seat_fields["member_id"] = answer.member.member_id

    if isinstance(outcome, Hold):
        held_for = _held_since(session, submission.id)
        if held_for is None:
            return move(submission, State.HELD, outcome.reason, **seat_fields)
        if held_for < timedelta(days=targets.hold_days):
            version_id = seat_fields.get("directory_version_id")
            return lambda s: _still_held(s, submission, version_id)
        message = (
            f"We held your letter for {targets.hold_days} days, but there is still no MP "
            "to send it to."
        )
        outcome = Refuse(MEMBER_FIELD, message, "hold expired")

    if isinstance(outcome, Refuse):
        return move(
            submission,
            State.REJECTED,
            outcome.code,
            rejection={outcome.field: outcome.message},
            **(seat_fields if outcome.field == MEMBER_FIELD else {}),
        )
    if isinstance(outcome, Unreachable):
        return move(submission, State.FAILED, outcome.reason, failure_reason=outcome.reason)
    return move(
        submission,
        State.RESOLVED,
        f"{outcome.seat.gss_code} member {outcome.member.member_id} via {outcome.via}",
        then=[Stage.RENDER],
        directory_version_id=outcome.version_id,
        constituency_code=outcome.seat.gss_code,
        member_id=outcome.member.member_id,
        resolved_via=outcome.via,
        recipient={
            "member_id": outcome.member.member_id,
            "name": outcome.member.name,
            "email": outcome.member.email,
            "constituency": outcome.seat.name,
        },
    )


def resolve(
    session: Session, submission_id: str, order: str = "local", live: LiveSources | None = None
) -> list[Stage]:
    return plan(session, submission_id, order, live)(session)
