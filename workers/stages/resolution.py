"""MP resolution: find a submission's MP (:mod:`workers.mp.lookup`: the local directory, the
live sources, or both, per ``DEARMP_RESOLUTION_ORDER``), and what to do when there is none to
email: each campaign's decision (:class:`schemas.campaign.Targets`), always a recorded outcome.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from schemas.campaign import Targets
from schemas.postcode import PostcodeProblem, Problem, check_format, is_non_geographic, problem
from workers.database.engine import session_scope
from workers.database.models import State, Submission, SubmissionEvent, utcnow
from workers.database.transitions import (
    WITH_PAYLOAD,
    AlreadyMoved,
    Apply,
    Current,
    current,
    done,
    group_of,
    move,
    one,
    rowcount,
)
from workers.letters.definitions import get_definition
from workers.mp.live_sources import LiveSources
from workers.mp.lookup import (
    LOOKUP_MANY,
    Answer,
    Found,
    Unreachable,
    Vacant,
    find,
    lookup_local_many,
    prefetch,
)
from workers.stages.stage import Stage
from workers.wording import counted

POSTCODE_FIELD = "supporter.postcode"
MEMBER_FIELD = "member"


def fill(template: str, **values: str) -> str:
    """Substitute ``{name}`` placeholders, and nothing else (no attribute access, no code)."""
    return re.sub(r"\{(\w+)\}", lambda m: values.get(m.group(1), m.group(0)), template)


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
    contact = "House of Commons, London SW1A 0AA"  # the official route, never a guess
    if answer.member.phone:
        contact += f", or by phone on {answer.member.phone}"
    values = {"mp": answer.member.name, "constituency": answer.seat.name, "contact": contact}
    if answer.member.member_id in targets.excluded_member_ids or (
        answer.member.party in targets.excluded_parties
    ):
        return Refuse(MEMBER_FIELD, fill(targets.excluded_message, **values), "excluded")
    if not answer.member.email:
        if targets.no_email == "hold":
            return Hold(f"no email for member {answer.member.member_id}")
        return Refuse(MEMBER_FIELD, fill(targets.no_email_message, **values), "no_email")
    return answer


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
        submission = current(session, submission_id, WITH_PAYLOAD)
        if submission is None or submission.payload is None:
            return
        postcode, bad = check_format(submission.payload["supporter"]["postcode"])
    if bad is None:
        prefetch(sessions, postcode, order, live)


def _group_answers(session: Session, order: str) -> dict[str, Answer] | None:
    """The local directory's answers for the postcodes of every submission of the group
    ``session`` is resolving, looked up with one statement the first time (None alone)."""
    group = group_of(session)
    if group is None or order == "live":
        return None
    answers: dict[str, Answer] | None = group.read.get(LOOKUP_MANY)
    if answers is None:
        postcodes = set()
        for sid in group.ids:
            try:  # a payload that is not a submission is left to its own plan's error
                postcode = _postcode(current(session, sid, WITH_PAYLOAD))
            except (KeyError, TypeError):
                continue
            normalised, bad = check_format(postcode) if postcode else ("", None)
            if bad is None and normalised:
                postcodes.add(normalised)
        answers = group.read[LOOKUP_MANY] = lookup_local_many(session, postcodes)
    return answers


def _postcode(submission: Any) -> str | None:
    """The supporter's postcode of a submission there is an MP to find for (validated, or held
    for one), else None."""
    if submission is None or submission.state not in (State.VALIDATED, State.HELD):
        return None
    return None if submission.payload is None else str(submission.payload["supporter"]["postcode"])


def plan(
    session: Session, submission_id: str, order: str = "local", live: LiveSources | None = None
) -> Apply[list[Stage]]:
    """Find the supporter's MP: what to write, and the stages to send it on to."""
    submission = current(session, submission_id, WITH_PAYLOAD)
    postcode = _postcode(submission)
    if postcode is None:
        return done([])
    definition = get_definition(session, submission.campaign_slug, submission.definition_sha256)
    targets = definition.targets if definition is not None else Targets()
    answer = find(session, postcode, order, live, _group_answers(session, order))
    outcome = decide(targets, postcode, answer)
    if isinstance(outcome, Found) and outcome.member.failing:
        # Letters to this address have been coming back: hold until it is mended.
        outcome = Hold(f"address failing for member {outcome.member.member_id}")
    # Which seat and MP the supporter would have written to, kept even when no letter goes.
    seat_fields: dict[str, Any] = {}
    if isinstance(answer, Found | Vacant):
        seat_fields = {"constituency_code": answer.seat.gss_code, "resolved_via": answer.via}
        seat_fields["directory_version_id"] = answer.version_id
    if isinstance(answer, Found):
        seat_fields["member_id"] = answer.member.member_id

    if isinstance(outcome, Hold):
        held_since = session.scalar(
            select(func.min(SubmissionEvent.at)).where(
                SubmissionEvent.submission_id == submission.id, SubmissionEvent.state == State.HELD
            )
        )
        if held_since is None:
            return move(submission, State.HELD, outcome.reason, **seat_fields)
        if utcnow() - held_since < timedelta(days=targets.hold_days):
            version_id = seat_fields.get("directory_version_id")
            return lambda s: _still_held(s, submission, version_id)
        message = (
            f"We held your letter for {counted(targets.hold_days, 'day')}, but there is still "
            "no MP to send it to."
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
        then=[Stage.COMPARE],
        **seat_fields,  # the answer's: outcome is it
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
    return one(session, submission_id, lambda s, sid: plan(s, sid, order, live))
