"""MP resolution: postcode → constituency → sitting MP, from the current local directory."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy.orm import Session

from workers.directory import current_version_id
from workers.models import Constituency, Member, Postcode, State, Submission
from workers.stages import Stage
from workers.transitions import advance

POSTCODE_FIELD = "supporter.postcode"


@dataclass(frozen=True)
class Found:
    version_id: int
    constituency: Constituency
    member: Member


@dataclass(frozen=True)
class NotFound:
    """The supporter's input cannot be resolved: a rejection they can act on."""

    message: str


@dataclass(frozen=True)
class Unreachable:
    """The seat exists but its MP cannot be written to: a failure an operator can explain."""

    reason: str


def lookup(session: Session, postcode: str) -> Found | NotFound | Unreachable:
    version_id = current_version_id(session)
    if version_id is None:
        return Unreachable("No MP directory has been imported.")
    row = session.get(Postcode, (version_id, postcode))
    if row is None:
        return NotFound("We could not find this postcode. Please check it and try again.")
    if row.terminated:
        return NotFound("This postcode is no longer in use. Please enter your current postcode.")
    if row.gss_code is None:
        return NotFound("This postcode is not in a UK parliamentary constituency.")
    seat = session.get(Constituency, (version_id, row.gss_code))
    if seat is None:
        return Unreachable(f"Constituency {row.gss_code} is missing from the directory.")
    member = session.get(Member, (version_id, seat.member_id)) if seat.member_id else None
    if member is None:
        return Unreachable(f"The seat of {seat.name} is vacant.")
    if not member.email:
        return Unreachable(f"{member.name}, MP for {seat.name}, has no email address on record.")
    return Found(version_id, seat, member)


def resolve(session: Session, submission_id: str) -> list[Stage]:
    submission = session.get(Submission, submission_id)
    if submission is None or submission.state != State.VALIDATED or submission.payload is None:
        return []
    result = lookup(session, submission.payload["supporter"]["postcode"])
    if isinstance(result, NotFound):
        advance(
            session,
            submission,
            State.REJECTED,
            detail="postcode",
            rejection={POSTCODE_FIELD: result.message},
        )
        return []
    if isinstance(result, Unreachable):
        advance(
            session, submission, State.FAILED, detail=result.reason, failure_reason=result.reason
        )
        return []
    advance(
        session,
        submission,
        State.RESOLVED,
        detail=f"{result.constituency.gss_code} member {result.member.member_id}",
        directory_version_id=result.version_id,
        constituency_code=result.constituency.gss_code,
        member_id=result.member.member_id,
    )
    return [Stage.RENDER]
