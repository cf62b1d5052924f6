"""The outbox: every email DearMP sends to a supporter, sent at most once, one way.

An item is a row of ``outbox``, unique per (submission, key), so a second enqueue is harmless.
Sending one:

- it is composed (its bytes the same every time: the kind writes them from the row) and then
  claimed (``sending``) in a commit of its own, before the mail server is asked, with no
  transaction open while it answers;
- it is marked ``sent`` in its own commit the moment the server takes it;
- a failed attempt (the server's passing refusal, an error, the worker sending it stopped) is
  counted in ``failures`` and the item waits before its next (``next_attempt_at``: exponential
  backoff, capped); the ``max_attempts``-th, or a permanent refusal, leaves it ``failed`` with the
  reason, masked, never resent. Passing database trouble is not counted
  (:func:`workers.pipeline.failures.passing`);
- a claim older than the lease (its worker died mid-send) is taken over, and the same bytes go
  again with the same Message-ID.

What each kind sends is a :class:`Kind`: how to compose it from its row, and what to do in the
commit that ends it. The kinds are in :mod:`workers.outbox.kinds`; a new kind is one entry there.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta

import structlog
from sqlalchemy import ColumnElement, func, select, update
from sqlalchemy.orm import Session

from workers.database.engine import insert_on_conflict
from workers.database.models import OutboxItem, OutboxStatus, utcnow
from workers.database.transitions import rowcount
from workers.letters.mail import (
    Mailer,
    Outgoing,
    PermanentDeliveryError,
    TransientDeliveryError,
)
from workers.logging import mask_text
from workers.pipeline.failures import count_failure

log = structlog.get_logger(__name__)

STOPPED = "the worker sending it stopped"


@dataclass(frozen=True)
class OutboxPolicy:
    lease_seconds: int = 300  # DEARMP_DELIVERY_LEASE_SECONDS
    max_attempts: int = 8  # failed attempts before it is given up (DEARMP_OUTBOX_MAX_ATTEMPTS)
    first_backoff: float = 60.0
    max_backoff: float = 3600.0

    def backoff(self, failures: int) -> timedelta:
        """How long to wait after the ``failures``-th failed attempt."""
        seconds = self.first_backoff * 2 ** max(failures - 1, 0)
        return timedelta(seconds=min(seconds, self.max_backoff))


@dataclass(frozen=True)
class Kind:
    """One kind of email: ``compose`` writes it from its row (or says, in words, why it will
    not be sent: it is skipped); ``done`` runs in the commit that marks it sent or skipped."""

    compose: Callable[[Session, OutboxItem], Outgoing | str]
    done: Callable[[Session, OutboxItem], None] | None = None


def enqueue(
    session: Session, submission_id: str, key: str, kind: str, inbound_id: str | None = None
) -> str | None:
    """Add an item to send once per (submission, key): its id, or None if there is one already
    (the unique key makes a second enqueue, even at the same moment, harmless). The caller
    commits, then dispatches the id."""
    stmt = insert_on_conflict(session, OutboxItem).values(
        submission_id=submission_id, key=key, kind=kind, inbound_id=inbound_id
    )
    added: str | None = session.scalar(
        stmt.on_conflict_do_nothing(index_elements=["submission_id", "key"]).returning(
            OutboxItem.id
        )
    )
    return added


def item_of(session: Session, submission_id: str, key: str) -> OutboxItem | None:
    return session.scalar(
        select(OutboxItem).where(OutboxItem.submission_id == submission_id, OutboxItem.key == key)
    )


def due(now: datetime, lease: timedelta) -> ColumnElement[bool]:
    """The items a worker should try now: pending and not waiting, or claimed by a worker
    whose lease has lapsed."""
    return (
        (OutboxItem.status == OutboxStatus.PENDING)
        & (OutboxItem.next_attempt_at.is_(None) | (OutboxItem.next_attempt_at <= now))
    ) | ((OutboxItem.status == OutboxStatus.SENDING) & (OutboxItem.claimed_at < now - lease))


def counts(session: Session) -> dict[tuple[str, str], int]:
    """How many items of each (kind, status): the metrics' and ``dearmp health``'s view."""
    rows = session.execute(
        select(OutboxItem.kind, OutboxItem.status, func.count()).group_by(
            OutboxItem.kind, OutboxItem.status
        )
    ).all()
    return {(kind, status): count for kind, status, count in rows}


def overdue(session: Session, now: datetime, late: timedelta, lease: timedelta) -> int:
    """Items that should have been sent more than ``late`` ago and are not: no worker sends."""
    waited = (
        (OutboxItem.status == OutboxStatus.PENDING)
        & (func.coalesce(OutboxItem.next_attempt_at, OutboxItem.created_at) < now - late)
    ) | ((OutboxItem.status == OutboxStatus.SENDING) & (OutboxItem.claimed_at < now - lease - late))
    return session.scalar(select(func.count()).select_from(OutboxItem).where(waited)) or 0


def send(
    session: Session,
    item_id: str,
    mailer: Mailer,
    kinds: Mapping[str, Kind],
    policy: OutboxPolicy,
) -> None:
    """Send the item if it is due and nobody has. ``session`` is committed at each step. Raises
    the error of a failed attempt that will be tried again (a TransientDeliveryError's
    ``retry_after`` is the backoff), for the actor's retry."""
    item = session.get(OutboxItem, item_id)
    if item is None or item.status not in (OutboxStatus.PENDING, OutboxStatus.SENDING):
        return
    kind = kinds.get(item.kind)
    broken: Exception | None = None
    mail: Outgoing | str = ""
    try:
        mail = kind.compose(session, item) if kind else f"unknown kind {item.kind!r}"
    except ValueError as exc:  # an address the email package will not write
        mail = mask_text(f"cannot be written as email: {exc}")[:500]
    except Exception as exc:  # nobody foresaw it: counted, like a failed send
        broken = exc
    if broken is not None:
        session.rollback()  # only read: a failed read may have ended the transaction
    # The email is written before the claim, so that the claim is the transaction's only write
    # and is committed at once: on SQLite no one waits for the write lock meanwhile.
    if not _claim(session, item_id, policy):
        session.commit()
        return  # sent, not due, held by a live claim, or given up
    if broken is None and isinstance(mail, str):
        _end(session, item, OutboxStatus.SKIPPED, kind, mail)
        session.commit()
        log.info("outbox_skipped", outbox_id=item_id, kind=item.kind, reason=mail)
        return
    session.commit()
    if broken is not None:
        _failed(session, item, broken, policy)
        return
    assert not isinstance(mail, str)
    try:
        mailer.send(mail)  # no transaction is open while the mail server answers
    except PermanentDeliveryError as exc:
        _end(session, item, OutboxStatus.FAILED, None, mask_text(str(exc))[:500])
        session.commit()
        log.warning("outbox_failed", outbox_id=item_id, kind=item.kind, final=True)
        return
    except Exception as exc:
        _failed(session, item, exc, policy)
        return
    _end(session, item, OutboxStatus.SENT, kind)
    session.commit()
    log.info("outbox_sent", outbox_id=item_id, kind=item.kind)


def _claim(session: Session, item_id: str, policy: OutboxPolicy) -> bool:
    """Claim a pending item that is due, or take over a claim older than the lease: its worker
    stopped mid-send, a failed attempt like any other (an item that kills its worker every
    time ends ``failed``). True if claimed."""
    now = utcnow()
    claimed = session.execute(
        update(OutboxItem)
        .where(
            OutboxItem.id == item_id,
            OutboxItem.status == OutboxStatus.PENDING,
            OutboxItem.next_attempt_at.is_(None) | (OutboxItem.next_attempt_at <= now),
        )
        .values(status=OutboxStatus.SENDING, claimed_at=now, attempts=OutboxItem.attempts + 1)
        .execution_options(synchronize_session=False)
    )
    if rowcount(claimed) == 1:
        return True
    lapsed = (
        (OutboxItem.id == item_id)
        & (OutboxItem.status == OutboxStatus.SENDING)
        & (OutboxItem.claimed_at < now - timedelta(seconds=policy.lease_seconds))
    )
    counted = count_failure(session, OutboxItem.failures, lapsed, STOPPED, policy.max_attempts)
    if counted is None:
        return False
    if counted.final:
        _set(session, item_id, status=OutboxStatus.FAILED, error=counted.reason)
        log.warning("outbox_failed", outbox_id=item_id, final=True, error="stopped")
        return False
    _set(session, item_id, claimed_at=now, attempts=OutboxItem.attempts + 1, error=counted.reason)
    return True


def _failed(session: Session, item: OutboxItem, error: Exception, policy: OutboxPolicy) -> None:
    """A failed attempt: pending again after the backoff with the reason (passing database
    trouble is not counted, and waits for no backoff), or failed for good at the limit. Raises
    ``error`` unless the item was given up."""
    counted = count_failure(
        session, OutboxItem.failures, OutboxItem.id == item.id, error, policy.max_attempts
    )
    final = counted is not None and counted.final
    wait = policy.backoff(counted.failures) if counted is not None else timedelta(0)
    reason = counted.reason if counted is not None else None
    if final:
        _set(session, item.id, status=OutboxStatus.FAILED, error=reason)
    else:
        later = utcnow() + wait if counted is not None else None
        _set(session, item.id, status=OutboxStatus.PENDING, error=reason, next_attempt_at=later)
    session.commit()
    log.warning(
        "outbox_failed",
        outbox_id=item.id,
        kind=item.kind,
        final=final,
        error=type(error).__name__,
        retry_in=wait.total_seconds(),
    )
    if final:
        return
    if isinstance(error, TransientDeliveryError):  # the actor's retry comes when it is due
        raise TransientDeliveryError(reason or "", retry_after=wait.total_seconds()) from error
    raise error


def _end(
    session: Session,
    item: OutboxItem,
    status: OutboxStatus,
    kind: Kind | None,
    error: str | None = None,
) -> None:
    values: dict[str, object] = {"status": status, "error": error}
    if status == OutboxStatus.SENT:
        values["sent_at"] = utcnow()
    _set(session, item.id, **values)
    if kind is not None and kind.done is not None and status != OutboxStatus.FAILED:
        kind.done(session, item)


def _set(session: Session, item_id: str, **values: object) -> None:
    session.execute(
        update(OutboxItem)
        .where(OutboxItem.id == item_id)
        .values(values)
        .execution_options(synchronize_session=False)
    )
