""" "Did your MP reply?": one email the campaign's ``survey.after_days`` after delivery when no
reply has been detected, and one reminder; the answer ("yes", "not_yet", "no") is an event on
the letter, the latest replacing any earlier. Links carry the submission id and an HMAC over it
and the answer, so they cannot be forged or turned to another letter or answer; a link opens a
page and only its button (a POST) records, so a mail scanner fetching links answers nothing.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Exists, exists, select, text
from sqlalchemy.orm import Session, aliased

from schemas.messages import is_submission_id
from workers.database.engine import insert_on_conflict, write_lock
from workers.database.models import (
    Campaign,
    LetterEvent,
    OutboxItem,
    OutboxStatus,
    State,
    Submission,
    table,
    utcnow,
)
from workers.letters.definitions import get_definition
from workers.outbox import sending as outbox
from workers.pipeline.states import SENT
from workers.webhooks.events import emit

LETTER_EVENTS = table(LetterEvent)
LETTER_ITEM = aliased(OutboxItem)  # the letter's outbox item (its id is its submission's)

ANSWERS = ("yes", "not_yet", "no")
BATCH = 500


def _sign(secret: bytes, submission_id: str, answer: str) -> str:
    message = f"survey\x00{submission_id}\x00{answer}".encode()
    mac = hmac.new(secret, message, hashlib.sha256).digest()
    return base64.urlsafe_b64encode(mac[:18]).decode()


def make_token(secret: bytes, submission_id: str, answer: str) -> str:
    return f"{submission_id}.{_sign(secret, submission_id, answer)}"


def read_token(secret: bytes, token: str, answer: str) -> str | None:
    """The submission a genuine token for ``answer`` names; None for anything forged,
    malformed, or signed for another answer."""
    submission_id, dot, mac = token.partition(".")
    if not dot or not token.isascii() or not is_submission_id(submission_id):
        return None
    if answer not in ANSWERS:
        return None
    if not hmac.compare_digest(mac.encode(), _sign(secret, submission_id, answer).encode()):
        return None
    return submission_id


def links(public_url: str, secret: bytes, submission_id: str) -> dict[str, str]:
    base = f"{public_url.rstrip('/')}/v1/replied"
    return {
        answer: f"{base}/{make_token(secret, submission_id, answer)}/{answer}" for answer in ANSWERS
    }


def _has_event(submission_id: Any, kind: str) -> Exists:
    return exists().where(LetterEvent.submission_id == submission_id, LetterEvent.kind == kind)


def _has_notice(submission_id: Any, key: str) -> Exists:
    other = aliased(OutboxItem)  # the reminders' query reads the outbox itself
    return exists().where(other.submission_id == submission_id, other.key == key)


def due(session: Session, now: datetime | None = None) -> list[str]:
    """Queue the surveys and reminders that are due in the outbox; the new items' ids (to send
    after the commit). A letter with a detected reply, or an answer, gets neither."""
    now = now or utcnow()
    asks: list[str] = []
    reminders: list[str] = []
    # Campaigns in sandbox mode send their letters to the sandbox, not to MPs: nothing to ask.
    for slug in session.scalars(select(Campaign.slug).where(Campaign.mode == "live")):
        definition = get_definition(session, slug)
        if definition is None or not definition.survey.enabled:
            continue
        waiting = (
            Submission.campaign_slug == slug,
            Submission.state == State.DELIVERED,
            Submission.erased_at.is_(None),
            ~_has_event(Submission.id, "reply"),
            ~_has_event(Submission.id, "survey"),
        )
        after = now - timedelta(days=definition.survey.after_days)
        asks += session.scalars(
            select(Submission.id)
            .join(LETTER_ITEM, LETTER_ITEM.id == Submission.id)
            .where(
                *waiting,
                LETTER_ITEM.status == OutboxStatus.SENT,
                LETTER_ITEM.sent_at < after,
                ~_has_notice(Submission.id, "survey"),
            )
            .limit(BATCH)
        ).all()
        remind = now - timedelta(days=definition.survey.reminder_days)
        reminders += session.scalars(
            select(OutboxItem.submission_id)
            .join(Submission, Submission.id == OutboxItem.submission_id)
            .where(
                *waiting,
                OutboxItem.key == "survey",
                OutboxItem.status == OutboxStatus.SENT,
                OutboxItem.sent_at < remind,
                ~_has_notice(Submission.id, "survey-reminder"),
            )
            .limit(BATCH)
        ).all()
    # Written after every read, and only when something is due (see the reconciler).
    return _add(session, asks, "survey") + _add(session, reminders, "survey-reminder")


def _add(session: Session, submission_ids: Sequence[str], key: str) -> list[str]:
    added = (outbox.enqueue(session, sid, key, "survey") for sid in submission_ids)
    return [item_id for item_id in added if item_id is not None]


def answerable(session: Session, submission_id: str, lock: bool = False) -> str:
    """Whether the survey's page may offer, and its button record, an answer for this letter:
    "ready", "erased" (the supporter's details were erased at their request: nothing more is
    recorded of them, nor told to a CRM), "not_delivered" (rejected, withdrawn, failed, or still
    on its way), or "invalid" (no such submission)."""
    query = select(Submission.state, Submission.erased_at).where(Submission.id == submission_id)
    if lock:  # until the answer's commit: an erasure waits for it, or it sees the erasure
        write_lock(session)
        query = query.with_for_update()
    row = session.execute(query).first()
    if row is None:
        return "invalid"
    if row.erased_at is not None:
        return "erased"
    if row.state not in SENT:
        return "not_delivered"
    return "ready"


def answer(session: Session, secret: bytes, token: str, value: str) -> str:
    """Record the supporter's answer: "recorded", "invalid" (forged or unknown), or why
    :func:`answerable` refuses it."""
    submission_id = read_token(secret, token, value)
    if submission_id is None:
        return "invalid"
    if (refused := answerable(session, submission_id, lock=True)) != "ready":
        return refused
    # One row per letter (a unique index): two answers at once, on any database, leave one
    # row, holding whichever was written last. The same answer again changes nothing.
    now = utcnow()
    insert = insert_on_conflict(session, LETTER_EVENTS).values(
        submission_id=submission_id, kind="survey", detail=value, at=now
    )
    written = session.execute(
        insert.on_conflict_do_update(
            index_elements=["submission_id"],
            index_where=text("kind = 'survey'"),  # a literal: the partial index's own WHERE
            set_={"detail": insert.excluded.detail, "at": insert.excluded.at},
            where=LETTER_EVENTS.c.detail.is_distinct_from(insert.excluded.detail),
        ).returning(LETTER_EVENTS.c.id)  # a row only when written (rowcount: -1 on PostgreSQL)
    ).first()
    if written is not None:  # a first answer, or a change: the CRM hears of each
        emit(session, "survey.answered", submission_id, _change(value, now))
    return "recorded"


def _change(value: str, at: datetime) -> str:
    """The webhook's discriminator, unique per change of answer (yes, no, then yes again is
    three): the answer (which the payload reads back) and the time, to the microsecond."""
    return f"{value}:{int(at.timestamp() * 1_000_000)}"


def campaign_survey_mp(session: Session, submission_id: str) -> tuple[str, str] | None:
    """(campaign slug, MP name) for a survey page."""
    row = session.execute(
        select(Submission.campaign_slug, Submission.recipient).where(Submission.id == submission_id)
    ).first()
    if row is None:
        return None
    return row.campaign_slug, str((row.recipient or {}).get("name") or "your MP")
