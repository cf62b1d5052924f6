"""Comparison, between resolution and rendering: how much of a letter is the supporter's own
words, and how many letters to the same MP are near-identical to it (offices filter those).

Fingerprints are stored (``letter_prints``, counted by MP and hour in ``print_counts``) so every
worker gives the same answer. With the ``hold`` policy a letter goes to review once more than
``hold_after`` letters to its MP within ``hold_hours`` are alike (:func:`release`,
:func:`reject`); with ``digest`` it goes in the MP's daily digest (:mod:`workers.stages.digests`).
Letters compared in one group do not see each other: a hold counts what was stored before.
"""

from __future__ import annotations

from collections import Counter
from datetime import datetime, timedelta
from functools import cache
from typing import Any

from sqlalchemy import bindparam, case, delete, func, insert, select, true, union_all, update
from sqlalchemy.orm import Session

from schemas.campaign import CampaignDefinition, SimilarLetters
from workers.database.engine import dialect_insert
from workers.database.models import LETTER_PRINTS, PRINT_COUNTS, SUBMISSIONS, State, utcnow
from workers.database.transitions import (
    AlreadyMoved,
    Apply,
    At,
    advance,
    done,
    group_of,
    move,
    one,
    read_one,
    submission_read,
    writes_of,
)
from workers.letters import originality
from workers.letters.definitions import get_definition
from workers.stages.stage import Stage

_READ = (
    submission_read("payload", "member_id")
    .add_columns(LETTER_PRINTS.c.decision)
    .outerjoin(LETTER_PRINTS, LETTER_PRINTS.c.submission_id == SUBMISSIONS.c.id)
)
_STORE_PRINT = insert(LETTER_PRINTS)


def letter_body(definition: CampaignDefinition, payload: dict[str, Any]) -> str:
    """The words the supporter sends: their edit where the campaign allows it, else the draft,
    then their answers to the campaign's questions, as the letter has them."""
    letter = payload["letter"]
    body = str(letter["body"]) if "body" in definition.editable else definition.draft_body
    answers = [text for _, text in definition.answered(letter.get("answers") or {})]
    return "\n\n".join([body.strip(), *answers])


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
        return _moved(submission, submission.decision, None)
    rules = definition.similar_letters
    words = originality.words(letter_body(definition, submission.payload))
    template = originality.template(definition.draft_body)
    sig = template.signature_of(words)
    now, member_id = utcnow(), submission.member_id
    # Letters to the same MP at least ``rules.threshold`` alike: within the window, and within
    # the hold's hours.
    similar = recent = 0
    if member_id is not None:
        for other, count, within in _signatures(session, rules, now, member_id).get(member_id, ()):
            if originality.similarity(sig, other) >= rules.threshold:
                similar, recent = similar + count, recent + within
    # Near-identical to more letters to this MP than the campaign lets through on their own.
    decision = rules.policy if recent > rules.hold_after else "send"
    row = {
        "submission_id": submission_id,
        "campaign_slug": submission.campaign_slug,
        "member_id": member_id,
        "created_at": now,
        "own_words": template.share_of(words),
        "signature": originality.pack(sig),
        "similar": similar,
        "similar_recent": recent,
        "decision": decision,
    }
    return _moved(submission, decision, row)


def _moved(submission: Any, decision: str, row: dict[str, Any] | None) -> Apply[list[Stage]]:
    hold = decision == "hold"

    def write(session: Session) -> list[Stage]:
        detail = "near-identical to letters to this MP" if hold else None
        advance(session, submission, State.IN_REVIEW if hold else State.COMPARED, detail)
        if row is not None:
            writes = writes_of(session)
            writes.insert(_STORE_PRINT, row)
            if row["member_id"] is not None:
                writes.collect(_count, [_count_key(row)])
        return [] if hold else [Stage.RENDER]

    return write


# What a letter is compared with: of its MP's counts within the window, the RECENT_COUNTS
# newest (a bounded index scan however many letters the window holds), and of the distinct
# letters in them, the MOST_COMPARED sent most within the hold's hours, then the window.
RECENT_COUNTS = 1000
MOST_COMPARED = 100


@cache
def _counts_read(members: int) -> Any:
    """The statement that reads, for each of ``members`` MPs (``m0``...), its distinct letters
    sent most among its newest counts, with their letters and those within the hold's hours
    (``recent``); built once for each number of MPs."""
    counts = PRINT_COUNTS.c
    newest = union_all(
        *(
            select(
                select(counts.member_id, counts.signature, counts.hour, counts.letters)
                .where(counts.member_id == bindparam(f"m{i}"), counts.hour > bindparam("window"))
                .order_by(counts.hour.desc())
                .limit(bindparam("newest"))
                .subquery()
            )
            for i in range(members)
        )
    ).subquery()
    recent = case((newest.c.hour > bindparam("recent"), newest.c.letters), else_=0)
    totals = (
        select(
            newest.c.member_id,
            newest.c.signature,
            func.sum(newest.c.letters).label("letters"),
            func.sum(recent).label("recent"),
        )
        .group_by(newest.c.member_id, newest.c.signature)
        .subquery()
    )
    order = (totals.c.recent.desc(), totals.c.letters.desc(), totals.c.signature)
    ranked = select(
        totals,
        func.row_number().over(partition_by=totals.c.member_id, order_by=order).label("rank"),
    ).subquery()
    return select(ranked.c.member_id, ranked.c.signature, ranked.c.letters, ranked.c.recent).where(
        ranked.c.rank <= bindparam("most")
    )


def _count_key(row: dict[str, Any]) -> tuple[int, bytes, datetime]:
    """The count a letter's fingerprint adds to: its MP, its signature, its hour."""
    hour = row["created_at"].replace(minute=0, second=0, microsecond=0)
    return row["member_id"], row["signature"], hour


@cache
def _count_upsert(dialect: str) -> Any:
    upsert = dialect_insert(dialect, PRINT_COUNTS)
    return upsert.on_conflict_do_update(
        index_elements=["member_id", "signature", "hour"],
        set_={"letters": PRINT_COUNTS.c.letters + upsert.excluded.letters},
    )


def _count(session: Session, keys: list[tuple[int, bytes, datetime]]) -> None:
    """Add a group's letters to their counts: one statement, its rows in the order of their
    keys, so that two groups adding to the same counts lock them in the same order."""
    session.execute(
        _count_upsert(session.get_bind().dialect.name),
        [
            {"member_id": member, "signature": signature, "hour": hour, "letters": letters}
            for (member, signature, hour), letters in sorted(Counter(keys).items())
        ],
    )


def uncount(session: Session, submission_id: str) -> None:
    """Take an erased or scrubbed letter off its count (before its fingerprint is deleted)."""
    found = session.execute(
        select(
            LETTER_PRINTS.c.member_id, LETTER_PRINTS.c.signature, LETTER_PRINTS.c.created_at
        ).where(LETTER_PRINTS.c.submission_id == submission_id)
    ).first()
    if found is None or found.member_id is None or found.signature is None:
        return  # (None: taken off already)
    member, signature, hour = _count_key(found._asdict())
    key = (
        PRINT_COUNTS.c.member_id == member,
        PRINT_COUNTS.c.signature == signature,
        PRINT_COUNTS.c.hour == hour,
    )
    session.execute(update(PRINT_COUNTS).where(*key).values(letters=PRINT_COUNTS.c.letters - 1))
    session.execute(delete(PRINT_COUNTS).where(*key, PRINT_COUNTS.c.letters <= 0))


# By MP: each distinct signature, its letters, and those within the hold's hours.
_Signatures = dict[int, list[tuple[tuple[int, ...], int, int]]]


def _signatures(
    session: Session, rules: SimilarLetters, now: datetime, member_id: int
) -> _Signatures:
    """For the MPs the group's letters go to: the distinct signatures of the letters to them
    within the window, with how many letters have each and how many within the hold's hours
    (an hour that began before the window counts whole). One statement for the group."""
    group = group_of(session)
    key = ("comparison.signatures", rules.window_days, rules.hold_hours)
    found: _Signatures | None = group.read.get(key) if group else None
    if found is not None:
        return found
    ids = group.ids if group is not None else []
    members = {row.member_id for sid in ids if (row := read_one(session, _READ, sid)) is not None}
    members = (members - {None}) | {member_id}
    hour, ordered = timedelta(hours=1), sorted(members)
    rows = session.execute(
        _counts_read(len(ordered)),
        {
            **{f"m{i}": member for i, member in enumerate(ordered)},
            "window": now - timedelta(days=rules.window_days) - hour,
            "recent": now - timedelta(hours=rules.hold_hours) - hour,
            "newest": RECENT_COUNTS,
            "most": MOST_COMPARED,
        },
    )
    found = {}
    for member, packed, letters, within in rows:
        found.setdefault(member, []).append(
            (originality.unpack(packed), int(letters), int(within or 0))
        )
    if group is not None:
        group.read[key] = found
    return found


def near_identical_anywhere(
    session: Session, campaign: str, threshold: float, since: datetime | None = None
) -> int:
    """A campaign's letters (compared ``since``) near-identical to a letter to another MP:
    locality-sensitive hashing over its distinct signatures (each band a bucket; a bucket's
    signatures linked to its first when at least ``threshold`` alike), then the letters of
    clusters that reached two MPs."""
    letters: dict[bytes, tuple[set[int | None], int]] = {}
    window = LETTER_PRINTS.c.created_at >= since if since is not None else true()
    for packed, member_id, count in session.execute(
        select(LETTER_PRINTS.c.signature, LETTER_PRINTS.c.member_id, func.count())
        .where(
            LETTER_PRINTS.c.campaign_slug == campaign,
            LETTER_PRINTS.c.signature.is_not(None),
            window,
        )
        .group_by(LETTER_PRINTS.c.signature, LETTER_PRINTS.c.member_id)
    ):
        members, total = letters.get(packed, (set(), 0))
        letters[packed] = (members | {member_id}, total + count)
    signatures = [originality.unpack(packed) for packed in letters]
    parent = list(range(len(signatures)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    buckets: dict[int, int] = {}
    for i, sig in enumerate(signatures):
        for band in originality.bands(sig):
            first = buckets.setdefault(band, i)
            if first != i and originality.similarity(signatures[first], sig) >= threshold:
                parent[root(i)] = root(first)
    clusters: dict[int, tuple[set[int | None], int]] = {}
    for i, (members, total) in enumerate(letters.values()):
        seen, count = clusters.get(root(i), (set(), 0))
        clusters[root(i)] = (seen | members, count + total)
    return sum(count for members, count in clusters.values() if len(members) > 1)


def _reviewed(session: Session, submission_id: str, to: State, detail: str, **fields: Any) -> bool:
    """An operator's move of a letter held for review; False if it was not in review."""
    try:
        advance(session, At(submission_id, State.IN_REVIEW), to, detail, **fields)
    except AlreadyMoved:
        return False
    return True


def release(session: Session, submission_id: str) -> bool:
    """An operator sends a letter held for review on to rendering (the caller sends it after
    the commit). False if it was not in review."""
    return _reviewed(session, submission_id, State.COMPARED, "released")


def reject(session: Session, submission_id: str, reason: str) -> bool:
    """An operator rejects a letter held for review; the supporter is told ``reason``."""
    rejection = {"letter.body": reason[:500]}
    return _reviewed(
        session, submission_id, State.REJECTED, "rejected on review", rejection=rejection
    )


def compare(session: Session, submission_id: str) -> list[Stage]:
    """Compare a resolved submission's letter; returns the stages to send it on to."""
    return one(session, submission_id, plan)
