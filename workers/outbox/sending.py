"""The outbox: everything DearMP sends (letters to MPs, emails to supporters, webhooks to a
CRM), sent at most once, one way: claim, lease, send, mark, backoff, give up and take over.

How and why (every mark guarded by the claim, what counts as a failed attempt, the table owning
the timing): docs/design.md, "The outbox". The kinds are in :mod:`workers.outbox.kinds`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Protocol

import structlog
from sqlalchemy import ColumnElement, Engine, Select, bindparam, func, select, update
from sqlalchemy.orm import Session

from config.settings import default
from workers.database.engine import insert_on_conflict, write_lock
from workers.database.models import OUTBOX, OutboxItem, OutboxStatus, Submission, utcnow
from workers.database.transitions import rowcount, together
from workers.letters.mail import (
    OUT_OF_STEP_WAIT,
    Mailer,
    PermanentDeliveryError,
    TransientDeliveryError,
)
from workers.logging import answer_logged, mask_text
from workers.pipeline.failures import count_failure, passing
from workers.privacy.hashing import mask_supporter
from workers.stages.stage import Deferred

log = structlog.get_logger(__name__)

STOPPED = "the worker sending it stopped"
# An item due within this is claimed now (a deferred message may arrive a moment early).
DUE_TOLERANCE = timedelta(seconds=1)
# After passing database trouble: the wait before the item is tried again (not counted).
PASSING_WAIT = timedelta(seconds=30)
# A sent mark is written again through passing database trouble (a failover, a restart) for
# this long: the server has the email, and a mark lost sends it again after the lease.
MARK_PATIENCE = 20.0


@dataclass(frozen=True)
class OutboxPolicy:
    lease_seconds: int = default("delivery_lease_seconds")
    max_attempts: int = default("outbox_max_attempts")  # failed attempts before it is given up
    first_backoff: float = default("outbox_backoff_seconds")
    max_backoff: float = 3600.0

    def backoff(self, failures: int) -> timedelta:
        """How long to wait after the ``failures``-th failed attempt."""
        seconds = self.first_backoff * 2 ** max(failures - 1, 0)
        return timedelta(seconds=min(seconds, self.max_backoff))


class Channel(Protocol):
    """A transport (the :class:`~workers.letters.mail.Mailer` is one): ``send`` raises
    :class:`PermanentDeliveryError` or :class:`TransientDeliveryError`; ``waiting`` is how long
    it knows it would refuse us (0: it would not)."""

    def waiting(self) -> float: ...

    def send(self, message: Any, /) -> object: ...


@dataclass(frozen=True)
class Kind:
    """One kind of item: ``compose`` writes it from its row (or returns why it is skipped, or
    raises :class:`Deferred`); ``done`` runs in the commit that ends it; ``channel`` sends it
    (None: the mailer); ``max_attempts`` replaces the policy's."""

    compose: Callable[[Session, OutboxItem], object]
    done: Callable[[Session, OutboxItem, str, str | None], None] | None = None
    channel: Channel | None = None
    max_attempts: int | None = None
    sent: Callable[[Any], None] | None = None  # after the sent mark's commit: bookkeeping


def enqueue(
    session: Session, submission_id: str, key: str, kind: str, inbound_id: str | None = None
) -> str | None:
    """Add an item to send once per (submission, key): its id, or None if there is one already.
    The caller commits, then dispatches the id."""
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
    """The items to try now: pending and not waiting, or with a lapsed claim."""
    return (
        (OutboxItem.status == OutboxStatus.PENDING)
        & (OutboxItem.next_attempt_at.is_(None) | (OutboxItem.next_attempt_at <= now))
    ) | ((OutboxItem.status == OutboxStatus.SENDING) & (OutboxItem.claimed_at < now - lease))


def waiting(item_id: Any) -> Any:
    """Whether the item ``item_id`` (a value or a column) is still to send: pending or sending."""
    return (
        select(OutboxItem.id)
        .where(
            OutboxItem.id == item_id,
            OutboxItem.status.in_((OutboxStatus.PENDING, OutboxStatus.SENDING)),
        )
        .exists()
    )


def counts(session: Session) -> dict[tuple[str, str], int]:
    """How many items of each (kind, status): the metrics' and ``dearmp health``'s view."""
    rows = session.execute(
        select(OutboxItem.kind, OutboxItem.status, func.count()).group_by(
            OutboxItem.kind, OutboxItem.status
        )
    ).all()
    return {(kind, status): count for kind, status, count in rows}


def overdue(
    session: Session, now: datetime, late: timedelta, lease: timedelta, kind: str | None = None
) -> int:
    """Items (of ``kind``, or of every kind) that should have been sent more than ``late`` ago."""
    waited = (
        (OutboxItem.status == OutboxStatus.PENDING)
        & (func.coalesce(OutboxItem.next_attempt_at, OutboxItem.created_at) < now - late)
    ) | ((OutboxItem.status == OutboxStatus.SENDING) & (OutboxItem.claimed_at < now - lease - late))
    if kind is not None:
        waited = waited & (OutboxItem.kind == kind)
    return session.scalar(select(func.count()).select_from(OutboxItem).where(waited)) or 0


def retry_failed(session: Session, kind: str | None = None, dry_run: bool = False) -> list[str]:
    """Given-up items (of ``kind``) back to pending with a fresh count, due now; the caller sends
    them after the commit. Not letters nor digests: those failed their submissions too, and
    ``dearmp deliveries reopen`` sends them again. The items retried (or that would be)."""
    where = [OutboxItem.status == OutboxStatus.FAILED, OutboxItem.kind.not_in(("letter", "digest"))]
    if kind is not None:
        where.append(OutboxItem.kind == kind)
    ids = list(session.scalars(select(OutboxItem.id).where(*where).order_by(OutboxItem.created_at)))
    return ids if dry_run else send_again(session, ids, (OutboxStatus.FAILED,))


def due_now(
    session: Session, kinds: Sequence[str], dry_run: bool = False, of: Select[Any] | None = None
) -> list[str]:
    """The pending items of ``kinds`` (of the submissions ``of`` selects) waiting for a later
    attempt, made due now (an operator's "retry now" or "resume"); the caller sends them after
    the commit. The items (or that would be)."""
    waiting = (
        OutboxItem.kind.in_(kinds)
        & (OutboxItem.status == OutboxStatus.PENDING)
        & (OutboxItem.next_attempt_at > utcnow())
    )
    if of is not None:
        waiting = waiting & OutboxItem.submission_id.in_(of)
    if dry_run:
        return list(session.scalars(select(OutboxItem.id).where(waiting)))
    return list(
        session.scalars(
            update(OutboxItem)
            .where(waiting)
            .values(next_attempt_at=None, dispatched_at=utcnow())
            .returning(OutboxItem.id)
            .execution_options(synchronize_session=False)
        )
    )


def send_again(
    session: Session, ids: Sequence[str], statuses: Sequence[str] = (OutboxStatus.FAILED,)
) -> list[str]:
    """The items of ``ids`` in ``statuses`` back to pending with a fresh count, due now (the same
    rows: a webhook replayed keeps its ``webhook-id``); the caller sends them after the commit.
    The ids of those changed."""
    if not ids:
        return []
    changed = set(
        session.scalars(
            update(OutboxItem)
            .where(OutboxItem.id.in_(ids), OutboxItem.status.in_(statuses))
            .values(
                status=OutboxStatus.PENDING,
                failures=0,
                next_attempt_at=None,
                error=None,
                dispatched_at=utcnow(),
            )
            .returning(OutboxItem.id)
            .execution_options(synchronize_session=False)
        )
    )
    return [item_id for item_id in ids if item_id in changed]


def listing(
    session: Session,
    statuses: Sequence[str],
    limit: int = 100,
    kinds: Sequence[str] | None = None,
    lease: float = default("delivery_lease_seconds"),
) -> list[dict[str, object]]:
    """Items in ``statuses`` (of ``kinds``), oldest first, for an operator: their errors with the
    supporter's details hidden and anything email- or postcode-shaped masked
    (``claimed_at``: when a sending one's worker took it, to send now; ``lapsed``: its claim
    is older than ``lease`` seconds, so its worker stopped and the next try takes it over)."""
    lapsed_before = utcnow() - timedelta(seconds=lease)
    where: list[ColumnElement[bool]] = [OutboxItem.status.in_(statuses)]
    if kinds is not None:
        where.append(OutboxItem.kind.in_(kinds))
    found = (  # with the submission's details, to hide them in a server's answer quoting them
        select(OutboxItem, Submission.payload)
        .outerjoin(Submission, Submission.id == OutboxItem.submission_id)
        .where(*where)
        .order_by(OutboxItem.created_at)
        .limit(limit)
    )
    return [
        {
            "id": row.id,
            "kind": row.kind,
            "status": row.status,
            "failures": row.failures,
            "next_attempt_at": row.next_attempt_at.isoformat() if row.next_attempt_at else None,
            "claimed_at": row.claimed_at.isoformat() if row.claimed_at else None,
            "lapsed": row.status == OutboxStatus.SENDING
            and row.claimed_at is not None
            and row.claimed_at < lapsed_before,
            "error": mask_supporter(row.error, payload)[:500] if row.error else None,
        }
        for row, payload in session.execute(found)
    ]


# Each item (or submission) a message was about, and its error (None when its work is done).
Outcome = tuple[str, BaseException | None]


@dataclass
class _Ready:
    """An item composed (or broken while composing), to claim and send."""

    item: OutboxItem
    kind: Kind | None
    channel: Channel
    mail: object = ""
    broken: Exception | None = None
    claim: datetime | None = None  # the claimed_at this worker wrote: every end mark checks it


def send(
    session: Session, item_id: str, mailer: Mailer, kinds: Mapping[str, Kind], policy: OutboxPolicy
) -> None:
    """Send one item (:func:`send_group`); its error raised, but for a refusal for good, which
    is recorded on the item (and by its kind)."""
    [(_, error)] = send_group(session, [item_id], mailer, kinds, policy)
    if error is not None and not isinstance(error, PermanentDeliveryError):
        raise error


def send_group(
    session: Session,
    item_ids: Sequence[str],
    mailer: Mailer,
    kinds: Mapping[str, Kind],
    policy: OutboxPolicy,
) -> list[Outcome]:
    """Send the items that are due and that nobody has: every item is read and composed, those
    ready are claimed in one commit, then each is sent and marked in a commit of its own.
    An item to try later gets :class:`Deferred` for when it is due; a refusal for good its
    :class:`PermanentDeliveryError` (recorded already); anything else is for the actor's retry."""
    ids = sorted(set(item_ids))
    outcomes: dict[str, BaseException | None] = dict.fromkeys(ids)
    now = utcnow()
    lapsed = now - timedelta(seconds=policy.lease_seconds)
    waits: list[tuple[str, Deferred]] = []
    ready: list[_Ready] = []
    ended: list[OutboxItem] = []
    found = session.scalars(
        select(OutboxItem).where(OutboxItem.id.in_(ids)).order_by(OutboxItem.id)
    ).all()
    for item in found:  # detached: a rollback below does not expire (and reload) them
        session.expunge(item)
    # What the kinds read of their submissions is read for them all at once (read_one).
    with together(session, [item.submission_id for item in found], writing=False):
        for item in found:
            if item.status not in (OutboxStatus.PENDING, OutboxStatus.SENDING):
                ended.append(item)
            elif item.status == OutboxStatus.SENDING and (item.claimed_at or now) >= lapsed:
                pass  # another worker's live claim: its to end
            elif (not_due := _not_due(item, now)) is not None:
                outcomes[item.id] = not_due  # its deferred message comes then; nothing written
            else:
                one = _compose(session, item, kinds, mailer)
                if isinstance(one, Deferred) and one.__cause__ is not None:
                    outcomes[item.id] = one  # passing trouble: the item stays due
                elif isinstance(one, Deferred):
                    waits.append((item.id, one))
                else:
                    ready.append(one)
    if any(one.broken is not None for one in ready):
        session.rollback()  # only read: a failed read may have ended the transaction
    if ended:
        _repair(session, ended, kinds)
    for item_id, wait in waits:
        if _wait(session, item_id, wait.seconds, lapsed):
            outcomes[item_id] = wait
    # The emails are written before the claims, so that the claims are the transaction's only
    # writes and are committed at once: on SQLite no one waits for the write lock meanwhile.
    _claim(session, ready, policy)
    claimed = []
    for one in ready:
        if one.claim is None:
            continue  # sent, not due, held by a live claim, or given up
        if one.broken is None and isinstance(one.mail, str):
            if _end(session, one, OutboxStatus.SKIPPED, one.mail):
                log.info("outbox_skipped", outbox_id=one.item.id, kind=one.item.kind)
            continue
        claimed.append(one)
    session.commit()
    sent: list[tuple[_Ready, str | None]] = []
    try:
        for one in claimed:  # no transaction is open while a server answers
            try:
                response = _send(session, one, policy)
            except Exception as exc:  # Deferred, a refusal for good, or the unforeseen
                session.rollback()
                outcomes[one.item.id] = exc
                if passing(exc):  # the database is away: the rest would go and stay unmarked
                    for rest in claimed[claimed.index(one) + 1 :]:
                        outcomes[rest.item.id] = exc  # claimed: the lease's takeover sends it
                    break
                continue
            if response is not None:
                sent.append((one, response or None))
    finally:  # also when the worker is interrupted (its time limit): what was sent moves on
        if sent:
            outcomes.update(_sent(session, sent, kinds))
    return list(outcomes.items())


def _sent(
    session: Session, sent: list[tuple[_Ready, str | None]], kinds: Mapping[str, Kind]
) -> dict[str, Exception]:
    """The kinds' ``done`` for the items sent, in one transaction (one statement of each kind),
    each only if its item is still as marked (:func:`_ended`); if that fails, each alone. A
    worker that dies before leaves them to the next message about them (the reconciler's
    resend). The errors."""
    ended = [(one.item, OutboxStatus.SENT.value, response) for one, response in sent]
    try:
        with together(session, [one.item.submission_id for one, _ in sent], writing=True):
            _ended(session, ended, kinds)
        session.commit()
        return {}
    except Exception:
        session.rollback()
    errors: dict[str, Exception] = {}
    for item, status, response in ended:
        try:
            _ended(session, [(item, status, response)], kinds)
            session.commit()
        except Exception as exc:  # sent and marked: its message's retry makes it again
            session.rollback()
            log.error("outbox_done_failed", outbox_id=item.id, error=type(exc).__name__)
            errors[item.id] = exc
    return errors


def _send(session: Session, one: _Ready, policy: OutboxPolicy) -> str | None:
    """Send a claimed item and mark it sent, alone in its commit, the moment the server took it:
    the server's answer ("" for none), or None when it was not (or the claim was lost)."""
    item, kind = one.item, one.kind
    if one.broken is not None:
        _failed(session, one, one.broken, policy)
        return None
    try:
        answer = one.channel.send(one.mail)
    except PermanentDeliveryError as exc:
        ended = _end(session, one, OutboxStatus.FAILED, mask_text(str(exc))[:500])
        session.commit()
        if ended:
            log.warning("outbox_failed", outbox_id=item.id, kind=item.kind, final=True)
            raise
        return None
    except TransientDeliveryError as exc:
        if exc.ours:
            _give_back(session, one, exc)
        else:
            _failed(session, one, exc, policy)
        return None
    except Exception as exc:
        _failed(session, one, exc, policy)
        return None
    response = answer[:2000] if isinstance(answer, str) else ""
    if not _mark_sent(session, one, response):
        _lost(item)
        return None
    log.info("outbox_sent", outbox_id=item.id, kind=item.kind)
    if kind is not None and kind.sent is not None:
        try:
            kind.sent(one.mail)
        except Exception as exc:  # bookkeeping only: it is sent, and marked
            log.warning("outbox_sent_hook_failed", outbox_id=item.id, error=type(exc).__name__)
    return response


def _compose(
    session: Session, item: OutboxItem, kinds: Mapping[str, Kind], mailer: Mailer
) -> _Ready | Deferred:
    """The item written by its kind, ready to claim (or broken, or a reason not to send it);
    or how long it must wait, unclaimed, because its destination would refuse us now."""
    kind = kinds.get(item.kind)
    one = _Ready(item, kind, kind.channel if kind is not None and kind.channel else mailer)
    paused = one.channel.waiting()
    if paused > 0:  # refusing us, not the email
        return Deferred(paused, "delivery paused: the mail server refused us")
    try:
        one.mail = kind.compose(session, item) if kind else f"unknown kind {item.kind!r}"
    except Deferred as later:  # its destination would refuse us now (quiet hours, a limit)
        return later
    except ValueError as exc:  # an address the email package will not write
        one.mail = mask_text(f"cannot be written as email: {exc}")[:500]
    except Exception as exc:  # nobody foresaw it: counted, like a failed send
        if passing(exc):  # the database or Redis away a moment: unclaimed, no attempt spent
            session.rollback()  # only read so far: a failed read may have ended the transaction
            moment = Deferred(PASSING_WAIT.total_seconds(), f"{type(exc).__name__}: try again")
            moment.__cause__ = exc  # (send_group: nothing written, its message waits a moment)
            return moment
        one.broken = exc
    return one


def _not_due(item: OutboxItem, now: datetime) -> Deferred | None:
    at = item.next_attempt_at
    if item.status == OutboxStatus.PENDING and at is not None and at > now + DUE_TOLERANCE:
        return Deferred((at - now).total_seconds(), "not due")
    return None


def _wait(session: Session, item_id: str, seconds: float, lapsed: datetime) -> bool:
    """Make the item wait ``seconds`` unclaimed, costing no attempt, so that neither a duplicate
    message nor the reconciler tries it sooner; a lapsed claim is given back to wait too.
    False if someone else has it now. The caller commits."""
    later = utcnow() + timedelta(seconds=seconds)
    mine = (OutboxItem.status == OutboxStatus.PENDING) | (
        (OutboxItem.status == OutboxStatus.SENDING) & (OutboxItem.claimed_at < lapsed)
    )
    return _set(
        session,
        (OutboxItem.id == item_id) & mine,
        status=OutboxStatus.PENDING,
        next_attempt_at=later,
        dispatched_at=later,
    )


def settle(session: Session, item_ids: Sequence[str], kinds: Mapping[str, Kind]) -> set[str]:
    """The ``done`` of those items that were sent, made now if it is still to come (their
    sender not yet at :func:`_sent`, or dead before it), so that what reads a letter's end from
    its submission (a bounce, which can come back within milliseconds) reads it true. The items
    read are locked until the commit (none is claimed meanwhile); returned, those claimed
    already, which may be with their server now (their answer not yet recorded)."""
    write_lock(session)
    rows = session.scalars(
        select(OutboxItem)
        .where(OutboxItem.id.in_(item_ids))
        .order_by(OutboxItem.id)
        .with_for_update()
        .execution_options(populate_existing=True)
    ).all()
    for row in rows:
        if row.status == OutboxStatus.SENT:
            _done(session, row, kinds.get(row.kind), row.status, row.response)
    return {row.id for row in rows if row.status == OutboxStatus.SENDING}


def _repair(session: Session, ended: list[OutboxItem], kinds: Mapping[str, Kind]) -> None:
    """The ``done`` of items ended already, made again in case it was lost (a worker died
    between the sent mark and ``done``); a kind's ``done`` does nothing if it has been done."""
    _ended(session, [(item, item.status, item.response or item.error) for item in ended], kinds)


def _ended(
    session: Session, ended: Sequence[tuple[OutboxItem, str, str | None]], kinds: Mapping[str, Kind]
) -> None:
    """Each item's kind's ``done`` (with its status and detail), only if the item is still in
    that status, locked until the commit (in one order, so that two workers ending one item
    wait for each other): not once an operator's resend has made it anew."""
    write_lock(session)
    still = dict(
        session.execute(
            select(OutboxItem.id, OutboxItem.status)
            .where(OutboxItem.id.in_([item.id for item, _, _ in ended]))
            .order_by(OutboxItem.id)
            .with_for_update()
        ).all()
    )
    for item, status, detail in ended:
        if still.get(item.id) == status:
            _done(session, item, kinds.get(item.kind), status, detail)


def _claim(session: Session, ready: Sequence[_Ready], policy: OutboxPolicy) -> None:
    """Claim the due pending items with one statement, and take over each claim older than the
    lease; set the ``claim`` of each item claimed."""
    if not ready:
        return
    now = utcnow()
    ids = [one.item.id for one in ready]
    claimed = set(session.scalars(_CLAIM, {"ids": ids, "now": now, "due": now + DUE_TOLERANCE}))
    for one in ready:
        if one.item.id in claimed or (
            one.item.status == OutboxStatus.SENDING and _take_over(session, one, now, policy)
        ):
            one.claim = now


def _take_over(session: Session, one: _Ready, now: datetime, policy: OutboxPolicy) -> bool:
    """Take over the item's claim if it is older than the lease: its worker stopped mid-send, a
    failed attempt like any other (an item that kills its worker every time ends ``failed``)."""
    item = one.item
    lapsed = (
        (OutboxItem.id == item.id)
        & (OutboxItem.status == OutboxStatus.SENDING)
        & (OutboxItem.claimed_at < now - timedelta(seconds=policy.lease_seconds))
    )
    counted = count_failure(session, OutboxItem.failures, lapsed, STOPPED, _limit(one, policy))
    if counted is None:
        return False
    # The row is locked (PostgreSQL) or the database is (SQLite) until the commit: still lapsed.
    if counted.final:
        _set(session, lapsed, status=OutboxStatus.FAILED, error=counted.reason)
        _done(session, item, one.kind, OutboxStatus.FAILED, counted.reason)
        log.warning("outbox_failed", outbox_id=item.id, final=True, error="stopped")
        return False
    _set(session, lapsed, claimed_at=now, attempts=OutboxItem.attempts + 1, error=counted.reason)
    # Its worker stopped between claim and sent mark: the server may have taken it already.
    log.warning("outbox_claim_taken_over", outbox_id=item.id, kind=item.kind)
    return True


def _limit(one: _Ready, policy: OutboxPolicy) -> int:
    kind = one.kind
    return kind.max_attempts if kind is not None and kind.max_attempts else policy.max_attempts


def _held(one: _Ready) -> ColumnElement[bool]:
    """The item, still claimed by this worker (its claim not taken over since)."""
    return (
        (OutboxItem.id == one.item.id)
        & (OutboxItem.status == OutboxStatus.SENDING)
        & (OutboxItem.claimed_at == one.claim)
    )


def _lost(item: OutboxItem) -> None:
    """The claim lapsed and another worker took the item over: what it did stands."""
    log.warning("outbox_claim_lost", outbox_id=item.id, kind=item.kind)


def _give_back(session: Session, one: _Ready, error: TransientDeliveryError) -> None:
    """A refusal of our side, not of the email: the claim is given back uncounted, and the item
    waits (a deferral, costing no retry either)."""
    wait = error.retry_after if error.retry_after is not None else OUT_OF_STEP_WAIT
    reason = mask_text(f"{type(error).__name__}: {error}")[:500]
    given = _set(
        session,
        _held(one),
        status=OutboxStatus.PENDING,
        attempts=OutboxItem.attempts - 1,  # a claim given back is no attempt
        error=reason,
        next_attempt_at=utcnow() + timedelta(seconds=wait),
    )
    session.commit()
    if not given:
        _lost(one.item)
        return
    log.info("outbox_waiting", outbox_id=one.item.id, kind=one.item.kind, retry_in=wait)
    raise Deferred(wait, f"refused us: {answer_logged(reason)}")


def _failed(session: Session, one: _Ready, error: Exception, policy: OutboxPolicy) -> None:
    """A failed attempt: pending again after the backoff, or failed for good at the limit;
    passing database trouble is not counted and waits a moment. Raises :class:`Deferred` for
    the next attempt unless the item was given up (or the claim lost)."""
    item, held = one.item, _held(one)
    counted = count_failure(session, OutboxItem.failures, held, error, _limit(one, policy))
    final = counted is not None and counted.final
    wait = policy.backoff(counted.failures) if counted is not None else PASSING_WAIT
    if isinstance(error, TransientDeliveryError) and error.retry_after is not None:
        wait = timedelta(seconds=error.retry_after)  # the server said when to try again
    reason = counted.reason if counted is not None else None
    if counted is None and not passing(error):
        marked = False  # nothing matched: the claim is not ours
    elif final:
        marked = _set(session, held, status=OutboxStatus.FAILED, error=reason)
        if marked:
            _done(session, item, one.kind, OutboxStatus.FAILED, reason)
    else:
        later = utcnow() + wait if counted is not None else None
        marked = _set(
            session, held, status=OutboxStatus.PENDING, error=reason, next_attempt_at=later
        )
    session.commit()
    if not marked:
        _lost(item)
        return
    log.warning(
        "outbox_failed",
        outbox_id=item.id,
        kind=item.kind,
        final=final,
        error=type(error).__name__,
        answer=answer_logged(
            f"{type(error).__name__}: {error}"
        ),  # its words are on the item (they may quote a supporter)
        retry_in=wait.total_seconds(),
    )
    if final:
        return
    why = "passing database trouble" if counted is None else f"failed attempt {counted.failures}"
    raise Deferred(wait.total_seconds(), why) from error


def _end(session: Session, one: _Ready, status: OutboxStatus, error: str | None) -> bool:
    """End the attempt (skipped or failed) and run the kind's ``done``, if this worker still
    holds the claim (False, changing nothing, if not)."""
    if not _set(session, _held(one), status=status, error=error):
        _lost(one.item)
        return False
    _done(session, one.item, one.kind, status, error)
    return True


def _done(
    session: Session, item: OutboxItem, kind: Kind | None, status: str, detail: str | None
) -> None:
    """The kind's ``done``, in the transaction that ends the item."""
    if kind is not None and kind.done is not None:
        kind.done(session, item, status, detail)


# The statements of the hot path, built once (building one anew and computing its cache key
# costs more than running it).
_o = OUTBOX.c
_CLAIM = (
    update(OUTBOX)
    .where(
        _o.id.in_(bindparam("ids", expanding=True)),
        _o.status == OutboxStatus.PENDING.value,
        _o.next_attempt_at.is_(None) | (_o.next_attempt_at <= bindparam("due")),
    )
    .values(
        status=OutboxStatus.SENDING.value, claimed_at=bindparam("now"), attempts=_o.attempts + 1
    )
    .returning(_o.id)
)
_SENT = (  # for an item this worker still holds (as _held), or marked by it already (a mark
    # whose commit went through as its connection dropped: written again, the same)
    update(OUTBOX)
    .where(
        _o.id == bindparam("b_id"),
        _o.status.in_((OutboxStatus.SENDING.value, OutboxStatus.SENT.value)),
        _o.claimed_at == bindparam("b_mine"),
    )
    .values(
        status=OutboxStatus.SENT.value,
        error=None,
        sent_at=bindparam("v_sent_at"),
        response=bindparam("v_response"),
    )
)


def _mark_sent(session: Session, one: _Ready, response: str) -> bool:
    """The sent mark, alone, written again on a fresh connection through passing trouble for
    :data:`MARK_PATIENCE` seconds (it changes only a claim still this worker's)."""
    params = {
        "b_id": one.item.id,
        "b_mine": one.claim,
        "v_sent_at": utcnow(),
        "v_response": response,
    }
    deadline, wait = time.monotonic() + MARK_PATIENCE, 0.1
    while True:
        try:
            return _write_mark(session, params)
        except Exception as exc:
            if not passing(exc) or time.monotonic() + wait > deadline:
                raise
            session.rollback()
            log.warning("outbox_mark_retried", outbox_id=one.item.id, error=type(exc).__name__)
            time.sleep(wait)
            wait = min(2 * wait, 2.0)


def _write_mark(session: Session, params: dict[str, Any]) -> bool:
    """The mark on a connection of its own, which on PostgreSQL commits itself (autocommit: one
    round trip, no ``BEGIN`` and ``COMMIT`` around it)."""
    engine = session.get_bind()
    if not isinstance(engine, Engine):  # a session bound to a connection of its own
        marked = rowcount(session.execute(_SENT, params)) == 1
        session.commit()
        return marked
    with engine.connect() as connection:
        if engine.dialect.name == "postgresql":
            connection = connection.execution_options(isolation_level="AUTOCOMMIT")
        marked = rowcount(connection.execute(_SENT, params)) == 1
        connection.commit()
    return marked


def _set(session: Session, guard: ColumnElement[bool], **values: object) -> bool:
    """Update the row ``guard`` selects; True if there was one."""
    changed = session.execute(
        update(OutboxItem).where(guard).values(values).execution_options(synchronize_session=False)
    )
    return rowcount(changed) == 1
