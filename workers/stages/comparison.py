"""Comparison: how much of a letter is the supporter's own words, and how many letters to the
same MP are near-identical to it (offices filter those).

Between resolution (which names the MP) and rendering. The letter's share of its own words
against the campaign's draft, its MinHash signature and its bands (:mod:`workers.letters.
originality`) are stored in the database (``letter_prints``, ``letter_bands``), so every worker
gives the same answer and the index survives restarts. A campaign whose ``similar_letters``
policy is ``hold`` sends a letter to review once more than ``hold_after`` letters to the same MP
within ``hold_hours`` are at least ``threshold`` alike; an operator releases or rejects it
(:func:`release`, :func:`reject`). The same supporter writing again is a duplicate submission,
refused at intake, not a near-identical letter.

Letters compared in one group do not see each other (they are written together): a hold counts
what was stored before, which is as exact as a threshold "more than N a day" needs.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, insert, select
from sqlalchemy.orm import Session

from schemas.campaign import CampaignDefinition, SimilarLetters
from workers.database.models import (
    LETTER_BANDS,
    LETTER_PRINTS,
    SUBMISSIONS,
    State,
    utcnow,
)
from workers.database.transitions import (
    AlreadyMoved,
    Apply,
    At,
    advance,
    done,
    move,
    one,
    read_one,
    submission_read,
    writes_of,
)
from workers.letters import originality
from workers.letters.definitions import get_definition
from workers.stages.stage import Stage

# Letters to the same MP compared with, newest first; letters to any MP sharing a band counted.
MOST_COMPARED = 200
MOST_COUNTED = 1_000

_READ = (
    submission_read("payload", "member_id")
    .add_columns(LETTER_PRINTS.c.decision)
    .outerjoin(LETTER_PRINTS, LETTER_PRINTS.c.submission_id == SUBMISSIONS.c.id)
)
_STORE_PRINT = insert(LETTER_PRINTS)
_STORE_BAND = insert(LETTER_BANDS)


def letter_body(definition: CampaignDefinition, payload: dict[str, Any]) -> str:
    """The words the supporter sends: their edit where the campaign allows it, else the draft."""
    if "body" in definition.editable:
        return str(payload["letter"]["body"])
    return definition.draft_body


def plan(session: Session, submission_id: str) -> Apply[list[Stage]]:
    """Compare a resolved submission's letter: its fingerprint, and on to rendering or review."""
    submission = read_one(session, _READ, submission_id)
    if submission is None or submission.state != State.RESOLVED or submission.payload is None:
        return done([])
    definition = get_definition(session, submission.campaign_slug, submission.definition_sha256)
    if definition is None:
        reason = "campaign no longer in the database"
        return move(submission, State.FAILED, reason, failure_reason=reason)
    if submission.decision is not None:  # compared by an attempt whose move was lost
        return _moved(submission, submission.decision, None, [])
    rules = definition.similar_letters
    words = originality.words(letter_body(definition, submission.payload))
    sig = originality.signature(words)
    now = utcnow()
    similar, recent = _similar_to_mp(session, submission.member_id, sig, rules, now)
    bands = originality.bands(sig)
    anywhere = _sharing_a_band(session, bands, now - timedelta(days=rules.window_days))
    hold = rules.policy == "hold" and recent > rules.hold_after
    decision = "hold" if hold else "send"
    row = {
        "submission_id": submission_id,
        "campaign_slug": submission.campaign_slug,
        "member_id": submission.member_id,
        "created_at": now,
        "own_words": originality.template(definition.draft_body).share_of(words),
        "signature": originality.pack(sig),
        "similar": similar,
        "similar_recent": recent,
        "similar_anywhere": anywhere,
        "decision": decision,
    }
    band_rows = [{"band": b, "submission_id": submission_id, "created_at": now} for b in bands]
    return _moved(submission, decision, row, band_rows)


def _moved(
    submission: Any, decision: str, row: dict[str, Any] | None, bands: list[dict[str, Any]]
) -> Apply[list[Stage]]:
    def write(session: Session) -> list[Stage]:
        if decision == "hold":
            advance(session, submission, State.IN_REVIEW, "near-identical to letters to this MP")
        else:
            advance(session, submission, State.COMPARED)
        writes = writes_of(session)
        if row is not None:
            writes.insert(_STORE_PRINT, row)
            for band in bands:
                writes.insert(_STORE_BAND, band)
        return [] if decision == "hold" else [Stage.RENDER]

    return write


def _similar_to_mp(
    session: Session,
    member_id: int | None,
    sig: tuple[int, ...],
    rules: SimilarLetters,
    now: datetime,
) -> tuple[int, int]:
    """Letters to the same MP at least ``rules.threshold`` alike: within the window, and within
    the hold's hours."""
    if member_id is None:
        return 0, 0
    since, recent_since = (
        now - timedelta(days=rules.window_days),
        now - timedelta(hours=rules.hold_hours),
    )
    rows = session.execute(
        select(LETTER_PRINTS.c.signature, LETTER_PRINTS.c.created_at)
        .where(LETTER_PRINTS.c.member_id == member_id, LETTER_PRINTS.c.created_at >= since)
        .order_by(LETTER_PRINTS.c.created_at.desc())
        .limit(MOST_COMPARED)
    ).all()
    alike = [
        created
        for packed, created in rows
        if originality.similarity(sig, originality.unpack(packed)) >= rules.threshold
    ]
    return len(alike), sum(1 for created in alike if created >= recent_since)


def _sharing_a_band(session: Session, bands: list[int], since: datetime) -> int:
    """Letters to any MP within the window that share a band with this one (candidates of
    locality-sensitive hashing), counted up to MOST_COUNTED band matches."""
    matches = (
        select(LETTER_BANDS.c.submission_id)
        .where(LETTER_BANDS.c.band.in_(bands), LETTER_BANDS.c.created_at >= since)
        .limit(MOST_COUNTED)
        .subquery()
    )
    return session.scalar(select(func.count(func.distinct(matches.c.submission_id)))) or 0


def release(session: Session, submission_id: str) -> bool:
    """An operator sends a letter held for review on to rendering (the caller sends it after
    the commit). False if it was not in review."""
    try:
        advance(session, At(submission_id, State.IN_REVIEW), State.COMPARED, "released")
    except AlreadyMoved:
        return False
    return True


def reject(session: Session, submission_id: str, reason: str) -> bool:
    """An operator rejects a letter held for review; the supporter is told ``reason``."""
    try:
        advance(
            session,
            At(submission_id, State.IN_REVIEW),
            State.REJECTED,
            "rejected on review",
            rejection={"letter.body": reason[:500]},
        )
    except AlreadyMoved:
        return False
    return True


def compare(session: Session, submission_id: str) -> list[Stage]:
    """Compare a resolved submission's letter; returns the stages to send it on to."""
    return one(session, submission_id, plan)
