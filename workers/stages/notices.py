"""Notices: send one email to a supporter about their letter, at most once.

Like a letter's delivery: the notice row is claimed (``sending``) and committed before the mail
server is asked, and marked ``sent`` in its own commit the moment it answers. A claim older than
the lease (a worker that died mid-send) is taken over and the same bytes go again, with the same
Message-ID. A forwarded reply's text is deleted in the commit that marks it sent.

An attempt that raises (writing the notice or sending it, for a reason other than the mail
server's answer) and a worker that stopped mid-send (its claim taken over) are failures, counted
in ``failures`` (:func:`workers.pipeline.failures.count_failure`; passing database trouble is
not counted): the ``max_failures``-th leaves the notice ``failed`` with the reason, never resent.
The mail server's passing refusals are counted by the claims, at most ``max_attempts``.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import structlog
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from schemas.submission import stored_email
from workers.database.engine import session_scope
from workers.database.models import (
    InboundMessage,
    Letter,
    LetterEvent,
    Notice,
    NoticeStatus,
    Submission,
    utcnow,
)
from workers.database.transitions import rowcount
from workers.inbound.addresses import ReturnAddresses
from workers.letters import notices
from workers.letters.campaigns import get_definition
from workers.letters.mail import (
    DkimSigner,
    Mailer,
    Outgoing,
    PermanentDeliveryError,
    TransientDeliveryError,
)
from workers.logging import mask_text
from workers.pipeline.failures import count_failure
from workers.stages import survey

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class NoticePolicy:
    public_url: str = "http://127.0.0.1:8000"
    lease_seconds: int = 300
    max_attempts: int = 10  # claims, the mail server's passing refusals among them
    max_failures: int = 3  # attempts that raised otherwise (DEARMP_MAX_DEAD_LETTERS)


STOPPED = "the worker sending it stopped"


def _claim(session: Session, notice_id: str, policy: NoticePolicy) -> bool:
    """Claim a pending notice, or take over a claim older than the lease: its worker stopped
    mid-send, a failure counted like one that raised (a notice that kills its worker every
    time ends ``failed``). True if claimed."""
    now = utcnow()
    claimed = session.execute(
        update(Notice)
        .where(Notice.id == notice_id, Notice.status == NoticeStatus.PENDING)
        .values(status=NoticeStatus.SENDING, claimed_at=now, attempts=Notice.attempts + 1)
        .execution_options(synchronize_session=False)
    )
    if rowcount(claimed) == 1:
        return True
    lapsed = (
        (Notice.id == notice_id)
        & (Notice.status == NoticeStatus.SENDING)
        & (Notice.claimed_at < now - timedelta(seconds=policy.lease_seconds))
    )
    counted = count_failure(session, Notice.failures, lapsed, STOPPED, policy.max_failures)
    if counted is None:
        return False  # sent, or held by a live claim
    if counted.final:
        _mark(session, notice_id, NoticeStatus.FAILED, counted.reason)
        log.warning("notice_failed", notice_id=notice_id, final=True, error="stopped")
        return False
    session.execute(
        update(Notice)
        .where(Notice.id == notice_id)
        .values(claimed_at=now, attempts=Notice.attempts + 1, error=counted.reason)
        .execution_options(synchronize_session=False)
    )
    return True


def _mark(session: Session, notice_id: str, status: NoticeStatus, error: str | None = None) -> None:
    values: dict[str, object] = {"status": status.value, "error": error}
    if status == NoticeStatus.SENT:
        values["sent_at"] = utcnow()
    session.execute(
        update(Notice)
        .where(Notice.id == notice_id)
        .values(values)
        .execution_options(synchronize_session=False)
    )


def _compose(
    session: Session,
    notice: Notice,
    returns: ReturnAddresses,
    signer: DkimSigner | None,
    policy: NoticePolicy,
) -> Outgoing | str:
    """The notice on the wire, or why it will not be sent."""
    submission = session.get(Submission, notice.submission_id)
    letter = session.get(Letter, notice.submission_id)
    if submission is None or letter is None:
        return "the letter is gone"
    to = stored_email(submission.payload)
    if to is None:
        return "the supporter's details were erased"
    definition = get_definition(session, submission.campaign_slug)
    if definition is None:
        return "the campaign is gone"
    sender = notices.Sender(definition.organisation, str(definition.from_email))
    recipient = submission.recipient or {}
    mp_name = str(recipient.get("name") or letter.to_name)
    if notice.kind == "bounce":
        message = notices.bounce_notice(
            notice.id, sender, to, mp_name, submission.member_id, notice.created_at
        )
    elif notice.kind == "forward":
        inbound = session.get(InboundMessage, notice.inbound_id) if notice.inbound_id else None
        if inbound is None or inbound.raw is None:
            return "the reply's text is gone"
        message = notices.forward(
            notice.id, sender, to, inbound.raw, mp_name, letter.to_email, notice.created_at
        )
    elif notice.kind == "survey":
        answered = session.scalar(
            select(LetterEvent.id).where(
                LetterEvent.submission_id == submission.id,
                LetterEvent.kind.in_(("reply", "survey")),
            )
        )
        if answered is not None:
            return "a reply or an answer came first"
        links = survey.links(policy.public_url, returns.secret, submission.id)
        reminder = notice.key == "survey-reminder"
        message = notices.survey(notice.id, sender, to, mp_name, links, notice.created_at, reminder)
    else:
        return f"unknown kind {notice.kind!r}"
    envelope = returns.notice(notice.id) or str(definition.from_email)
    return notices.outgoing(message, envelope, signer)


def send_notice(
    sessions: sessionmaker[Session],
    notice_id: str,
    mailer: Mailer,
    returns: ReturnAddresses,
    signer: DkimSigner | None,
    policy: NoticePolicy,
) -> None:
    """Send the notice if nobody has. Raises TransientDeliveryError for the actor's retry.

    The email is written (and signed) before the claim, so that the claim is the transaction's
    only write and is committed at once: on SQLite no one waits for the write lock while a
    notice is being written."""
    with session_scope(sessions) as session:
        notice = session.get(Notice, notice_id)
        if notice is None or notice.status not in (NoticeStatus.PENDING, NoticeStatus.SENDING):
            return
        broken: Exception | None = None
        try:
            mail: Outgoing | str = _compose(session, notice, returns, signer, policy)
        except ValueError as exc:  # an address the email package will not write
            mail = mask_text(f"cannot be written as email: {exc}")[:500]
        except Exception as exc:  # nobody foresaw it: counted, like a failed send
            broken, mail = exc, ""
        if not _claim(session, notice_id, policy):
            return  # sent, held by a live claim, or given up
        kind, inbound_id, attempts = notice.kind, notice.inbound_id, notice.attempts + 1
        if broken is None and isinstance(mail, str):
            _mark(session, notice_id, NoticeStatus.SKIPPED, mail)
            _forget_reply(session, notice)
            log.info("notice_skipped", notice_id=notice_id, kind=notice.kind, reason=mail)
            return
        if broken is not None and _count_failure(session, notice_id, kind, broken, policy):
            return
    if broken is not None:
        raise broken
    assert not isinstance(mail, str)
    # No transaction is open while the mail server answers.
    try:
        mailer.send(mail)
    except (PermanentDeliveryError, TransientDeliveryError) as exc:
        give_up = isinstance(exc, PermanentDeliveryError) or attempts >= policy.max_attempts
        with session_scope(sessions) as session:
            status = NoticeStatus.FAILED if give_up else NoticeStatus.PENDING
            _mark(session, notice_id, status, mask_text(str(exc))[:500])
        log.warning("notice_failed", notice_id=notice_id, kind=kind, final=give_up)
        if not give_up:
            raise
        return
    except Exception as exc:
        with session_scope(sessions) as session:
            final = _count_failure(session, notice_id, kind, exc, policy)
        if not final:
            raise
        return
    with session_scope(sessions) as session:
        _mark(session, notice_id, NoticeStatus.SENT)
        if inbound_id is not None and kind == "forward":
            _clear_raw(session, inbound_id)
    log.info("notice_sent", notice_id=notice_id, kind=kind)


def _count_failure(
    session: Session, notice_id: str, kind: str, error: Exception, policy: NoticePolicy
) -> bool:
    """An attempt that raised: pending again with the reason (passing database trouble is
    not counted), or failed for good at the limit. True if it was failed now."""
    counted = count_failure(
        session, Notice.failures, Notice.id == notice_id, error, policy.max_failures
    )
    final = counted is not None and counted.final
    reason = counted.reason if counted is not None else None
    _mark(session, notice_id, NoticeStatus.FAILED if final else NoticeStatus.PENDING, reason)
    log.warning(
        "notice_failed", notice_id=notice_id, kind=kind, final=final, error=type(error).__name__
    )
    return final


def _forget_reply(session: Session, notice: Notice) -> None:
    if notice.kind == "forward" and notice.inbound_id is not None:
        _clear_raw(session, notice.inbound_id)


def _clear_raw(session: Session, inbound_id: str) -> None:
    session.execute(
        update(InboundMessage)
        .where(InboundMessage.id == inbound_id)
        .values(raw=None)
        .execution_options(synchronize_session=False)
    )
