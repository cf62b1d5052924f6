"""Inbound: act on a message that came back to a letter's return (``b-``) or reply address.

In one transaction guarded on the message's status (a second run does nothing): a permanent
bounce moves the letter to ``bounced`` and tells the supporter once (the MP's address may be
marked failing); a delay, a relay's confirmation or an automatic reply is recorded; a reply is
recorded and forwarded to the supporter, or held for an operator when its origin is doubtful.
Anything not tied to a letter we sent is dropped with the reason; the raw message is deleted
once acted on, and kept for the operator when processing fails ``max_attempts`` times.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import structlog
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from config.settings import Settings, default
from schemas.submission import stored_email
from workers.database.engine import session_scope
from workers.database.models import (
    InboundMessage,
    InboundStatus,
    Letter,
    LetterEvent,
    OutboxItem,
    OutboxStatus,
    State,
    Submission,
    utcnow,
)
from workers.database.transitions import AlreadyMoved, At, advance, rowcount
from workers.letters.notices import decoded_header, reply_text
from workers.mp import health
from workers.outbox import sending as outbox
from workers.outbox.sending import Kind
from workers.pipeline.failures import count_failure
from workers.receiving.addresses import ReturnAddresses
from workers.receiving.classify import Classification, classify, parse, reply_origin
from workers.receiving.mailgun import event_classification
from workers.stages import digests
from workers.stages.stage import Deferred
from workers.webhooks.events import emit
from workers.wording import one_line, printable

log = structlog.get_logger(__name__)

# What comes back about a letter while it is being sent waits this long, as often as needed.
SENT_MARK_WAIT = 10.0
_NOT_PROCESSED = InboundMessage.status == InboundStatus.RECEIVED


@dataclass(frozen=True)
class InboundPolicy:
    failing_after: int = default("failing_after_bounces")
    failing_window: timedelta = timedelta(hours=default("failing_window_hours"))
    forwards_per_letter: int = default("forwards_per_letter")
    sandbox_address: str = default("sandbox_address")
    # Our relay's authserv-ids: only its Authentication-Results are believed.
    authserv_ids: frozenset[str] = field(default_factory=frozenset)
    max_attempts: int = default("max_dead_letters")
    # Replies held for an operator at once, per letter: beyond, dropped with their text.
    held_per_letter: int = 2 * default("forwards_per_letter")

    @classmethod
    def from_settings(cls, settings: Settings) -> InboundPolicy:
        ids = (settings.inbound_authserv_id or "").split(",")
        return cls(
            failing_after=settings.failing_after_bounces,
            failing_window=timedelta(hours=settings.failing_window_hours),
            forwards_per_letter=settings.forwards_per_letter,
            sandbox_address=settings.sandbox_address,
            authserv_ids=frozenset(i.strip().lower() for i in ids if i.strip()),
            max_attempts=settings.max_dead_letters,
            held_per_letter=2 * settings.forwards_per_letter,
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
    session: Session,
    inbound_id: str,
    returns: ReturnAddresses,
    policy: InboundPolicy,
    kinds: Mapping[str, Kind],
) -> list[str]:
    """Act on one stored inbound message; the notices to send after the commit. ``kinds``: the
    outbox's, to settle a letter sent but not yet marked delivered (a bounce can be that quick)."""
    row = session.get(InboundMessage, inbound_id)
    if row is None or row.status != InboundStatus.RECEIVED:
        return []
    outcome = _decide(session, row, returns, policy, kinds)
    finished = _set(
        session,
        inbound_id,
        _NOT_PROCESSED,
        status=outcome.status.value,
        kind=outcome.kind,
        reason=outcome.reason,
        submission_id=outcome.submission_id,
        processed_at=utcnow(),
        raw=InboundMessage.raw if outcome.keep_raw else None,
    )
    if finished != 1:
        raise AlreadyMoved(inbound_id)
    if outcome.status == InboundStatus.DONE and outcome.kind in FORWARDED and outcome.submission_id:
        once = _forward_key(row.raw, inbound_id)  # the same reply come again: one event
        emit(session, "reply.received", outcome.submission_id, once, inbound_id=inbound_id)
    log.info(
        "inbound_processed",
        inbound_id=inbound_id,
        status=outcome.status.value,
        kind=outcome.kind,
        submission_id=outcome.submission_id,
    )
    return list(outcome.notices)


def _set(session: Session, inbound_id: str, *where: Any, **values: Any) -> int:
    """Update the message's row (only if ``where`` holds); how many rows changed."""
    result = session.execute(
        update(InboundMessage)
        .where(InboundMessage.id == inbound_id, *where)
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    return rowcount(result)


def _decide(
    session: Session,
    row: InboundMessage,
    returns: ReturnAddresses,
    policy: InboundPolicy,
    kinds: Mapping[str, Kind],
) -> Outcome:
    if row.source == "mailgun":
        try:
            found = event_classification(json.loads(row.raw or b"{}"))
        except ValueError:
            found = Classification("malformed", diagnostic="not a Mailgun event")
        submission_id, purpose = row.submission_id, "b"
    else:
        found = classify(row.raw or b"")
        token = returns.read(row.recipient)
        if token is None:
            return _drop(found.kind, "not one of our addresses, or its token is forged")
        if token.purpose == "n":
            return _drop(found.kind, "about a notice to a supporter: never acted on")
        submission_id, purpose = token.object_id, token.purpose
    if not found.acts:
        return _drop(found.kind, found.diagnostic or found.kind, submission_id)
    if purpose == "r" and found.kind in ("bounce", "delay", "delivered"):
        # Mail systems report to the envelope sender (b-); to the reply address, anyone can.
        return _drop(found.kind, "a delivery report sent to the reply address", submission_id)
    if submission_id is None:
        return _drop(found.kind, "names no letter")
    # Sent, its move to delivered may still be to come (the sender's group, or a dead worker).
    state = session.scalar(select(Submission.state).where(Submission.id == submission_id))
    if state in (State.RENDERED, State.IN_DIGEST) and outbox.settle(
        session, digests.carriers(session, submission_id), kinds
    ):
        raise Deferred(SENT_MARK_WAIT, "its letter's sending is not recorded yet")
    letter = session.execute(
        select(
            Submission.state,
            Submission.member_id,
            Submission.payload,
            Letter.message_id,
            Letter.to_email,
            OutboxItem.status,
        )
        .join(Letter, Letter.submission_id == Submission.id)
        .join(OutboxItem, OutboxItem.id == Submission.id)
        .where(Submission.id == submission_id)
    ).first()
    if letter is None or letter.status != OutboxStatus.SENT:
        return _drop(found.kind, "no letter was sent from this address", submission_id)
    sent_as = (letter.message_id, digests.message_id(session, submission_id, letter.message_id))
    if found.original_message_id and found.original_message_id not in sent_as:
        return _drop(
            found.kind, "the returned message is not the letter its address names", submission_id
        )
    event = {"submission_id": submission_id, "inbound_id": row.id, "at": utcnow()}

    def acted(kind: str, reason: str | None = None, notices: list[str] | None = None) -> Outcome:
        keep = bool(notices) and kind in FORWARDED  # a reply's text, until it is forwarded
        return Outcome(InboundStatus.DONE, kind, reason, submission_id, keep, tuple(notices or ()))

    if found.kind in ("bounce", "delay", "delivered", "auto_reply"):
        session.add(
            LetterEvent(kind=found.kind, status=found.status, detail=found.diagnostic, **event)
        )
        bounced = found.kind == "bounce"
        notices = _bounced(session, submission_id, letter, found, row.id, policy) if bounced else []
        return acted(found.kind, found.status, notices)
    if purpose != "r":  # a reply comes to the reply address; mail systems write to this one
        # (an office's acknowledgement, a challenge-response filter; anyone can): at most an
        # automatic reply, never the MP's (it would stop the survey, and tell the CRM).
        session.add(LetterEvent(kind="auto_reply", detail=found.diagnostic, **event))
        return Outcome(InboundStatus.DONE, "auto_reply", TO_RETURN_ADDRESS, submission_id)
    doubt = reply_origin(row.raw or b"", letter.to_email, set(policy.authserv_ids))
    if doubt is not None:
        return _hold(session, row.id, found.kind, doubt, submission_id, policy)
    session.add(LetterEvent(kind=_event_kind(found.kind), detail=found.diagnostic, **event))
    reason, queued = _forward(session, submission_id, row.id, row.raw, letter.payload, policy)
    return acted(found.kind, reason, queued)


TO_RETURN_ADDRESS = "to the return address: counted as an automatic reply, not forwarded"
# What is forwarded where replies are relayed: a person's reply, and an office's
# acknowledgement (only a guess from its words: a substantive form reply can read like one).
FORWARDED = ("reply", "acknowledgement")


def _event_kind(kind: str) -> str:
    """What a forwarded kind counts as on the letter: an acknowledgement is an automatic reply
    (the survey still asks the supporter), not the MP's reply."""
    return "auto_reply" if kind == "acknowledgement" else "reply"


def _hold(
    session: Session,
    inbound_id: str,
    kind: str,
    doubt: str,
    submission_id: str,
    policy: InboundPolicy,
) -> Outcome:
    """Hold a reply for an operator, its text kept; with ``held_per_letter`` held for the
    letter already (anyone who knows its reply address can send), it is dropped instead, with
    the reason, and its text deleted."""
    _one_at_a_time(session, submission_id, lambda: _set(session, inbound_id, kind=kind))
    held_now = _count(
        session,
        InboundMessage.submission_id == submission_id,
        InboundMessage.status == InboundStatus.HELD,
    )
    if held_now >= policy.held_per_letter:
        log.warning("reply_not_held", inbound_id=inbound_id, submission_id=submission_id)
        return _drop(
            kind,
            f"not held: {policy.held_per_letter} replies to this letter are held already ({doubt})",
            submission_id,
        )
    log.warning("reply_held", inbound_id=inbound_id, submission_id=submission_id)
    return Outcome(InboundStatus.HELD, kind, f"held: {doubt}", submission_id, True)


def _forward(
    session: Session,
    submission_id: str,
    inbound_id: str,
    raw: bytes | None,
    payload: Any,
    policy: InboundPolicy,
) -> tuple[str | None, list[str]]:
    """Queue a reply's forward: once per Message-ID, at most ``forwards_per_letter`` per letter.
    (Why not, and) the notices queued. Called with a write pending (the reply's event)."""
    _one_at_a_time(session, submission_id, session.flush)
    if stored_email(payload) is None:
        return "supporter erased: not forwarded", []
    key = _forward_key(raw, inbound_id)
    if outbox.item_of(session, submission_id, key) is not None:
        return "the same reply was forwarded already: not forwarded", []
    forwards = _count(
        session, OutboxItem.submission_id == submission_id, OutboxItem.kind == "forward"
    )
    if forwards >= policy.forwards_per_letter:
        return "forward cap reached: not forwarded", []
    return None, _queue(session, submission_id, key, "forward", inbound_id)


def _one_at_a_time(session: Session, submission_id: str, write: Callable[[], object]) -> None:
    """Decide one transaction at a time per letter: PostgreSQL locks the letter's row; on
    SQLite, ``write`` takes the one write lock before anything is counted."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(
            select(Letter.submission_id)
            .where(Letter.submission_id == submission_id)
            .with_for_update()
        )
    else:
        write()


def _count(session: Session, *where: Any) -> int:
    return session.scalar(select(func.count()).where(*where)) or 0


def _forward_key(raw: bytes | None, inbound_id: str) -> str:
    """A forward's notice key: the reply's Message-ID (hashed), so that the same reply come
    again (an MTA's retry, in another SMTP session) is forwarded once; without one, the
    inbound message's id."""
    try:
        message_id = " ".join(str(parse(raw or b"").get("Message-ID") or "").split())
    except Exception:  # hostile MIME: no Message-ID to go by
        message_id = ""
    if not message_id:
        return f"forward:{inbound_id}"
    return "forward:" + hashlib.sha256(message_id.encode("utf-8", "replace")).hexdigest()[:32]


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
    if letter.state == State.DELIVERED:  # and the letters that went in its digest with it
        for returned in (submission_id, *digests.mates(session, submission_id)):
            try:
                advance(
                    session,
                    At(returned, State.DELIVERED),
                    State.BOUNCED,
                    f"returned: {found.status or ''} {found.diagnostic or ''}".strip()[:500],
                    failure_reason=found.diagnostic,
                )
            except AlreadyMoved:
                if returned != submission_id:  # a letter of its digest erased, or returned
                    continue
            erased = select(Submission.erased_at).where(Submission.id == returned)
            if session.scalar(erased) is None:  # (an erased supporter: no one to tell)
                notices += _queue(session, returned, "bounce", "bounce", inbound_id)
    session.flush()
    if letter.to_email.lower() != policy.sandbox_address.lower():
        marked = health.note_bounce(
            session, letter.to_email, letter.member_id, policy.failing_after, policy.failing_window
        )
        if marked:
            log.warning("address_failing", member_id=letter.member_id)
    return notices


def _queue(session: Session, submission_id: str, key: str, kind: str, inbound_id: str) -> list[str]:
    """A notice to send through the outbox, once per (submission, key)."""
    added = outbox.enqueue(session, submission_id, key, kind, inbound_id)
    return [] if added is None else [added]


def process_counted(
    sessions: sessionmaker[Session],
    inbound_id: str,
    returns: ReturnAddresses,
    policy: InboundPolicy,
    kinds: Mapping[str, Kind],
) -> list[str]:
    """:func:`process` in a transaction of its own; an attempt that raises is counted (not
    for passing database trouble, nor :class:`Deferred`), and the ``max_attempts``-th leaves
    the message failed with the reason (masked), its text kept for the operator (the reconciler
    resends only what is still ``received``). Raises for the actor's retry until then."""
    try:
        with session_scope(sessions) as session:
            return process(session, inbound_id, returns, policy, kinds)
    except AlreadyMoved:
        raise
    except Deferred as later:  # its delayed message is the one: the reconciler's comes after
        due = utcnow() + timedelta(seconds=later.seconds)
        with session_scope(sessions) as session:
            _set(session, inbound_id, _NOT_PROCESSED, dispatched_at=due)
        raise
    except Exception as exc:
        with session_scope(sessions) as session:
            counted = count_failure(
                session,
                InboundMessage.attempts,
                (InboundMessage.id == inbound_id) & _NOT_PROCESSED,
                exc,
                policy.max_attempts,
            )
            if counted is not None and counted.final:
                failed = {"status": InboundStatus.FAILED.value, "reason": counted.reason}
                _set(session, inbound_id, **failed, processed_at=utcnow())
        if counted is None or not counted.final:
            raise
        log.error("inbound_failed", inbound_id=inbound_id, error=type(exc).__name__)
        return []


def _oldest_first(session: Session, *where: Any) -> list[InboundMessage]:
    query = select(InboundMessage).where(*where).order_by(InboundMessage.received_at)
    return list(session.scalars(query))


def held(session: Session) -> list[InboundMessage]:
    """Replies held for an operator, oldest first."""
    return _oldest_first(session, InboundMessage.status == InboundStatus.HELD)


def postmaster(session: Session) -> list[InboundMessage]:
    """Mail to the postmaster whose text is still kept, oldest first."""
    kept = InboundMessage.raw.is_not(None)
    return _oldest_first(session, InboundMessage.kind == "postmaster", kept)


def for_the_operator(session: Session, inbound_id: str) -> InboundMessage | None:
    """A message an operator may read: held, failed, or to the postmaster. None otherwise."""
    row = session.get(InboundMessage, inbound_id)
    if row is not None and (
        row.status in (InboundStatus.HELD, InboundStatus.FAILED) or row.kind == "postmaster"
    ):
        return row
    return None


# How much of a message's text `dearmp replies show` prints: enough to judge it by.
SHOWN_CHARS = 20_000
_HEADER_CHARS = 200


@dataclass(frozen=True)
class Readable:
    """A stored message as an operator reads it: every value cleaned of control characters
    (a terminal's escape sequences among them), its headers one line each."""

    sender: str  # the From header, decoded, one line
    subject: str
    authentication: tuple[str, ...]  # our relay's own Authentication-Results, one line each
    text: str  # at most SHOWN_CHARS
    more: int  # characters of the text not shown


def readable(row: InboundMessage, authserv_ids: frozenset[str], text: bool = True) -> Readable:
    """What an operator reads of a stored message (a Mailgun event: its JSON as text); its
    headers only, without ``text`` (a listing)."""
    raw = row.raw or b""
    sender = subject = ""
    results: list[str] = []
    body = raw.decode("utf-8", "replace") if text else ""  # as it came
    if row.source != "mailgun":
        with contextlib.suppress(Exception):  # hostile MIME: the text as it came
            message = parse(raw)
            sender = _header_line(message.get_all("From") or [])
            subject = _header_line(message.get_all("Subject") or [])
            for value in message.get_all("Authentication-Results") or []:
                line = _header_line([value])
                if line.split(";")[0].strip().lower() in authserv_ids:
                    results.append(line)
            body = reply_text(raw).text if text else ""
    shown = printable(body[:SHOWN_CHARS])
    return Readable(sender, subject, tuple(results), shown, max(0, len(body) - SHOWN_CHARS))


def _header_line(values: list[Any]) -> str:
    decoded = (decoded_header("".join(str(value).splitlines())) for value in values[:10])
    return one_line(", ".join(decoded), _HEADER_CHARS)


def _settle(session: Session, inbound_id: str, status: InboundStatus, reason: str) -> bool:
    """Move a held reply on (guarded: of two operators, one does it)."""
    held_now = InboundMessage.status == InboundStatus.HELD
    values = {"status": status.value, "reason": reason, "processed_at": utcnow()}
    return _set(session, inbound_id, held_now, **values) == 1


def release(session: Session, inbound_id: str, policy: InboundPolicy) -> Outcome | None:
    """An operator vouches for a held reply: it is recorded and forwarded like any reply (once
    per Message-ID, within the cap). None if no reply with that id is held."""
    row = session.get(InboundMessage, inbound_id)
    if row is None or row.status != InboundStatus.HELD or row.submission_id is None:
        return None
    submission_id, raw, released = row.submission_id, row.raw, "released by an operator"
    submission = session.get(Submission, submission_id)
    if submission is None or not _settle(session, inbound_id, InboundStatus.DONE, released):
        return None
    kind = _event_kind(row.kind or "reply")
    session.add(
        LetterEvent(kind=kind, submission_id=submission_id, inbound_id=inbound_id, at=utcnow())
    )
    reason, queued = _forward(session, submission_id, inbound_id, raw, submission.payload, policy)
    once = _forward_key(raw, inbound_id)
    emit(session, "reply.received", submission_id, once, inbound_id=inbound_id)
    reason = reason or released
    _set(session, inbound_id, reason=reason, raw=InboundMessage.raw if queued else None)
    log.info("reply_released", inbound_id=inbound_id, forwarded=bool(queued))
    return Outcome(InboundStatus.DONE, "reply", reason, submission_id, bool(queued), tuple(queued))


def drop(session: Session, inbound_id: str) -> bool:
    """An operator drops a held reply (its text is deleted, nothing is recorded on the letter),
    or deletes the kept text of a failed message or of mail to the postmaster. False if no
    such message has its text."""
    if not _settle(session, inbound_id, InboundStatus.DROPPED, "dropped by an operator"):
        row = for_the_operator(session, inbound_id)
        if row is None or row.raw is None or row.status == InboundStatus.HELD:
            return False
    _set(session, inbound_id, raw=None)
    log.info("reply_dropped", inbound_id=inbound_id)
    return True
