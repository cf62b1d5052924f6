"""Inbound: act on a message that came back to a letter's return or reply address.

The receiver (``dearmp inbound``, or the Mailgun webhook) has stored it before saying ``250``;
this stage reads it, classifies it and, in one transaction guarded on the message's status (a
second run finds it done and does nothing):

- a permanent bounce moves the letter from ``delivered`` to ``bounced`` with the remote
  server's diagnostic, queues one notice to the supporter, and may mark the MP's address
  failing (:mod:`workers.mp.health`);
- a delay, a relay's confirmation or an automatic reply is recorded on the letter;
- a reply is recorded on the letter and, for a relayed letter, queued to be forwarded to the
  supporter (at most ``forwards_per_letter``), its text kept only until it is forwarded.

Anything it cannot tie to a letter it sent (forged or unknown token, a notice's bounce, a
returned message that is not the letter its address names, a loop, broken MIME) is dropped with
the reason recorded. The raw message is deleted once acted on.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import structlog
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from config.settings import Settings
from schemas.submission import stored_email
from workers.database.models import (
    Delivery,
    DeliveryStatus,
    InboundMessage,
    InboundStatus,
    Letter,
    LetterEvent,
    Notice,
    State,
    Submission,
    utcnow,
)
from workers.database.transitions import AlreadyMoved, At, advance, rowcount
from workers.inbound.addresses import ReturnAddresses
from workers.inbound.classify import Classification, classify
from workers.inbound.mailgun import event_classification
from workers.mp import health

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class InboundPolicy:
    failing_after: int = 3
    failing_window: timedelta = timedelta(hours=24)
    forwards_per_letter: int = 5
    sandbox_address: str = "sandbox@localhost"

    @classmethod
    def from_settings(cls, settings: Settings) -> InboundPolicy:
        return cls(
            failing_after=settings.failing_after_bounces,
            failing_window=timedelta(hours=settings.failing_window_hours),
            forwards_per_letter=settings.forwards_per_letter,
            sandbox_address=settings.sandbox_address,
        )


@dataclass(frozen=True)
class Outcome:
    status: InboundStatus
    kind: str
    reason: str | None = None
    submission_id: str | None = None
    keep_raw: bool = False
    notices: tuple[str, ...] = ()


def _drop(kind: str, reason: str, submission_id: str | None = None) -> Outcome:
    return Outcome(InboundStatus.DROPPED, kind, reason, submission_id)


def process(
    session: Session, inbound_id: str, returns: ReturnAddresses, policy: InboundPolicy
) -> list[str]:
    """Act on one stored inbound message; the notices to send after the commit."""
    row = session.get(InboundMessage, inbound_id)
    if row is None or row.status != InboundStatus.RECEIVED:
        return []
    outcome = _decide(session, row, returns, policy)
    finished = session.execute(
        update(InboundMessage)
        .where(InboundMessage.id == inbound_id, InboundMessage.status == InboundStatus.RECEIVED)
        .values(
            status=outcome.status.value,
            kind=outcome.kind,
            reason=outcome.reason,
            submission_id=outcome.submission_id,
            processed_at=utcnow(),
            raw=InboundMessage.raw if outcome.keep_raw else None,
        )
        .execution_options(synchronize_session=False)
    )
    if rowcount(finished) != 1:
        raise AlreadyMoved(inbound_id)
    log.info(
        "inbound_processed",
        inbound_id=inbound_id,
        status=outcome.status.value,
        kind=outcome.kind,
        submission_id=outcome.submission_id,
    )
    return list(outcome.notices)


def _classification(row: InboundMessage) -> Classification:
    if row.source == "mailgun":
        try:
            return event_classification(json.loads(row.raw or b"{}"))
        except ValueError:
            return Classification("malformed", diagnostic="not a Mailgun event")
    return classify(row.raw or b"")


def _decide(
    session: Session, row: InboundMessage, returns: ReturnAddresses, policy: InboundPolicy
) -> Outcome:
    found = _classification(row)
    if row.source == "mailgun":
        submission_id = row.submission_id
        purpose = "b"
    else:
        token = returns.read(row.recipient)
        if token is None:
            return _drop(found.kind, "not one of our addresses, or its token is forged")
        if token.purpose == "n":
            return _drop(found.kind, "about a notice to a supporter: never acted on")
        submission_id, purpose = token.object_id, token.purpose
    if not found.acts:
        return _drop(found.kind, found.diagnostic or found.kind, submission_id)
    if submission_id is None:
        return _drop(found.kind, "names no letter")
    letter = session.execute(
        select(
            Submission.state,
            Submission.member_id,
            Submission.payload,
            Letter.message_id,
            Letter.to_email,
            Delivery.status,
        )
        .join(Letter, Letter.submission_id == Submission.id)
        .join(Delivery, Delivery.submission_id == Submission.id)
        .where(Submission.id == submission_id)
    ).first()
    if letter is None or letter.status != DeliveryStatus.SENT:
        return _drop(found.kind, "no letter was sent from this address", submission_id)
    if found.original_message_id and found.original_message_id != letter.message_id:
        return _drop(
            found.kind, "the returned message is not the letter its address names", submission_id
        )
    event = {"submission_id": submission_id, "inbound_id": row.id, "at": utcnow()}

    def acted(kind: str, reason: str | None = None, notices: list[str] | None = None) -> Outcome:
        keep = bool(notices) and kind == "reply"  # a reply's text, until it is forwarded
        return Outcome(InboundStatus.DONE, kind, reason, submission_id, keep, tuple(notices or ()))

    if found.kind in ("bounce", "delay", "delivered", "auto_reply"):
        session.add(
            LetterEvent(kind=found.kind, status=found.status, detail=found.diagnostic, **event)
        )
        if found.kind != "bounce":
            return acted(found.kind, found.status)
        return acted(
            "bounce", found.status, _bounced(session, submission_id, letter, found, row.id, policy)
        )
    # A person's reply.
    session.add(LetterEvent(kind="reply", **event))
    if purpose != "r":
        return acted("reply", "to the return address: not forwarded")
    forwards = session.scalar(
        select(func.count()).where(Notice.submission_id == submission_id, Notice.kind == "forward")
    )
    if (forwards or 0) >= policy.forwards_per_letter:
        return acted("reply", "forward cap reached: not forwarded")
    if stored_email(letter.payload) is None:
        return acted("reply", "supporter erased: not forwarded")
    return acted(
        "reply", None, _queue(session, submission_id, f"forward:{row.id}", "forward", row.id)
    )


def _bounced(
    session: Session,
    submission_id: str,
    letter: Any,
    found: Classification,
    inbound_id: str,
    policy: InboundPolicy,
) -> list[str]:
    """A permanent bounce: the letter moves to bounced, the supporter is told once, and the
    MP's address may be marked failing. The notices to send."""
    notices: list[str] = []
    if letter.state == State.DELIVERED:
        try:
            advance(
                session,
                At(submission_id, State.DELIVERED),
                State.BOUNCED,
                f"returned: {found.status or ''} {found.diagnostic or ''}".strip()[:500],
                failure_reason=found.diagnostic,
            )
        except AlreadyMoved:
            pass
        notices = _queue(session, submission_id, "bounce", "bounce", inbound_id)
    session.flush()
    if letter.to_email.lower() != policy.sandbox_address.lower():
        marked = health.note_bounce(
            session, letter.to_email, letter.member_id, policy.failing_after, policy.failing_window
        )
        if marked:
            log.warning("address_failing", member_id=letter.member_id)
    return notices


def _queue(
    session: Session, submission_id: str, key: str, kind: str, inbound_id: str | None = None
) -> list[str]:
    """A notice to send, once per (submission, key): none if one exists already."""
    exists = session.scalar(
        select(Notice.id).where(Notice.submission_id == submission_id, Notice.key == key)
    )
    if exists is not None:
        return []
    notice = Notice(submission_id=submission_id, key=key, kind=kind, inbound_id=inbound_id)
    session.add(notice)
    session.flush()
    return [notice.id]
