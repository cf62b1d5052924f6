"""Delivery: hand a stored letter to the mail backend exactly once, within the limits.

The delivery row is the unique key per letter. It is claimed ("sending") and committed before
the mail transaction, and marked "sent" with the server's answer after. A second worker, a
duplicate message or a reconciler resend finds the claim and does nothing. Only a claim older
than the lease (a worker that died mid-send) is taken over, and the letter goes again with the
same Message-ID and the same bytes.

Quiet hours and rate limits are checked before the claim. A letter that meets one is deferred:
sent back to the queue to wait, using up none of its retries.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import timedelta
from functools import partial
from typing import Any, TypeVar

import structlog
from sqlalchemy import Connection, Engine, bindparam, or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from config.settings import Settings
from schemas.campaign import CampaignDefinition
from workers.database.engine import session_scope
from workers.database.models import (
    CAMPAIGNS,
    DELIVERIES,
    LETTERS,
    SUBMISSIONS,
    DeliveryStatus,
    Letter,
    State,
    Submission,
    utcnow,
)
from workers.database.transitions import (
    AlreadyMoved,
    Apply,
    At,
    advance,
    done,
    read_one,
    rowcount,
    run_group,
    writes_of,
)
from workers.letters.definitions import get_definition
from workers.letters.mail import (
    OUT_OF_STEP_WAIT,
    DkimSigner,
    Mailer,
    Outgoing,
    PermanentDeliveryError,
    TransientDeliveryError,
    outgoing,
)
from workers.letters.rate_limits import Limit, Limiter, seconds_until_open
from workers.logging import bound
from workers.receiving.addresses import ReturnAddresses
from workers.stages.stage import Deferred, Stage

T = TypeVar("T")

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class DeliveryPolicy:
    lease_seconds: int = 300
    max_attempts: int = 20
    mp_limit: int = 0
    mp_limit_window: float = 3600.0
    send_rate: float = 0.0

    @classmethod
    def from_settings(cls, settings: Settings) -> DeliveryPolicy:
        return cls(
            lease_seconds=settings.delivery_lease_seconds,
            max_attempts=settings.delivery_max_attempts,
            mp_limit=settings.mp_limit,
            mp_limit_window=settings.mp_limit_window,
            send_rate=settings.send_rate_per_second,
        )


def limits_for(
    policy: DeliveryPolicy, definition: CampaignDefinition, member_id: int | None, account: str
) -> list[Limit]:
    """Every limit that applies to one letter: per MP, per campaign and MP, per sending account."""
    limits = []
    if policy.mp_limit and member_id is not None:
        limits.append(Limit(f"mp:{member_id}", policy.mp_limit, policy.mp_limit_window))
    if definition.rate_limit and member_id is not None:
        rl = definition.rate_limit
        limits.append(
            Limit(f"campaign:{definition.slug}:mp:{member_id}", rl.per_mp, rl.window_seconds)
        )
    if policy.send_rate:
        per_second = policy.send_rate
        if per_second >= 1:
            limits.append(Limit(f"account:{account}", math.floor(per_second), 1.0))
        else:
            limits.append(Limit(f"account:{account}", 1, 1 / per_second))
    return limits


# Everything delivery reads, in one statement: the submission, its delivery row, its letter and
# its campaign's version.
LETTER_FIELDS = tuple(c.name for c in LETTERS.c)
_READ = select(
    SUBMISSIONS.c.id,
    SUBMISSIONS.c.state,
    SUBMISSIONS.c.campaign_slug,
    SUBMISSIONS.c.member_id,
    DELIVERIES.c.status,
    DELIVERIES.c.attempts,
    DELIVERIES.c.error,
    CAMPAIGNS.c.definition_sha256,
    *(LETTERS.c[name] for name in LETTER_FIELDS),
).select_from(
    SUBMISSIONS.outerjoin(DELIVERIES, DELIVERIES.c.submission_id == SUBMISSIONS.c.id)
    .outerjoin(LETTERS, LETTERS.c.submission_id == SUBMISSIONS.c.id)
    .outerjoin(CAMPAIGNS, CAMPAIGNS.c.slug == SUBMISSIONS.c.campaign_slug)
)


_d = DELIVERIES.c
_CLAIM = (
    update(DELIVERIES)
    .where(
        _d.submission_id == bindparam("id"),
        or_(
            _d.status == DeliveryStatus.PENDING.value,
            (_d.status == DeliveryStatus.SENDING.value) & (_d.claimed_at < bindparam("stale")),
        ),
    )
    .values(
        status=DeliveryStatus.SENDING.value, claimed_at=bindparam("now"), attempts=_d.attempts + 1
    )
)


def _update_delivery(session: Session | Connection, submission_id: str, **values: object) -> None:
    # SQLAlchemy compiles it once per set of columns (its compiled cache).
    session.execute(update(DELIVERIES).where(_d.submission_id == submission_id).values(values))


# A claim given back for a refusal that was not the letter's: the attempt does not count.
_UNCOUNTED = (
    update(DELIVERIES)
    .where(_d.submission_id == bindparam("id"), _d.status == DeliveryStatus.SENDING.value)
    .values(
        status=DeliveryStatus.PENDING.value,
        attempts=_d.attempts - 1,
        error=bindparam("error"),
    )
)


def _claim_params(submission_id: str, lease_seconds: int) -> dict[str, object]:
    now = utcnow()
    return {"id": submission_id, "now": now, "stale": now - timedelta(seconds=lease_seconds)}


def claim(session: Session, submission_id: str, lease_seconds: int) -> bool:
    """Take the delivery for this worker; False if it is sent, failed or held by a live claim."""
    params = _claim_params(submission_id, lease_seconds)
    return rowcount(session.execute(_CLAIM, params)) == 1


def _finish(
    session: Session, submission_id: str, to_state: State, detail: str = "", **delivery: object
) -> None:
    if delivery:
        _update_delivery(session, submission_id, **delivery)
    detail = detail or str(delivery.get("error") or delivery.get("response") or "")[:500]
    reason = str(delivery["error"]) if to_state == State.FAILED else None
    try:
        # Only a rendered submission moves on (one erased meanwhile stays withdrawn).
        advance(session, At(submission_id, State.RENDERED), to_state, detail, failure_reason=reason)
    except AlreadyMoved:
        pass


def _defer(sessions: sessionmaker[Session], submission_id: str, seconds: float, why: str) -> None:
    """Wait ``seconds``; the reconciler is told not to resend before then."""
    with session_scope(sessions) as session:
        session.execute(
            update(Submission)
            .where(Submission.id == submission_id)
            .values(dispatched_at=utcnow() + timedelta(seconds=seconds))
        )
    raise Deferred(seconds, why)


@dataclass
class _Taken:
    """A letter to send: claimed, or to claim once its wait (quiet hours, limits) is over."""

    letter: Letter
    claimed: bool
    definition: CampaignDefinition
    limits: list[Limit]


def _take(
    session: Session,
    submission_id: str,
    mailer: Mailer,
    policy: DeliveryPolicy,
    limiter: Limiter | None,
) -> Apply[_Taken | None]:
    """Read and decide (no writes); the write claims the letter when nothing makes it wait, and
    answers the letter to send, or None when there is nothing to send (sent, failed, someone
    else's claim, not rendered)."""
    found = read_one(session, _READ, submission_id)
    if found is None or found.state != State.RENDERED:
        return done(None)
    definition = get_definition(session, found.campaign_slug, found.definition_sha256)
    if found.status is None or found.message_id is None or definition is None:
        return done(None)
    if found.status == DeliveryStatus.SENT:
        # Sent, but the state change was lost: repair it, send nothing.
        def repair(session: Session) -> None:
            _finish(session, submission_id, State.DELIVERED)

        return repair
    if found.status == DeliveryStatus.PENDING and found.attempts >= policy.max_attempts:
        reason = f"gave up after {found.attempts} attempts; last error: {found.error}"

        def give_up(session: Session) -> None:
            if claim(session, submission_id, policy.lease_seconds):  # nobody else is sending
                failed = DeliveryStatus.FAILED.value
                _finish(session, submission_id, State.FAILED, status=failed, error=reason)

        return give_up
    limits = limits_for(policy, definition, found.member_id, mailer.name)
    letter = Letter(**{name: getattr(found, name) for name in LETTER_FIELDS})
    if definition.quiet_hours or (limiter is not None and limits) or mailer.waiting() > 0:
        return done(_Taken(letter, False, definition, limits))  # claimed after the wait

    def take(session: Session) -> _Taken | None:
        # Nothing to wait for: claimed now, with the group's other claims; a claim that matches
        # nothing stops the group (each letter then runs alone).
        writes_of(session).guard(_CLAIM, _claim_params(submission_id, policy.lease_seconds))
        return _Taken(letter, True, definition, limits)

    return take


def deliver(
    sessions: sessionmaker[Session],
    submission_id: str,
    mailer: Mailer,
    policy: DeliveryPolicy,
    limiter: Limiter | None = None,
    signer: DkimSigner | None = None,
    returns: ReturnAddresses | None = None,
) -> list[Stage]:
    """Send the letter if nobody has.

    Raises :class:`Deferred` to wait for quiet hours or a rate limit, TransientDeliveryError for
    the retry policy (until ``max_attempts``, then a recorded failure), and, once the failure is
    recorded, PermanentDeliveryError so that an operator sees it in the dead-letter queue.
    """
    [(_, error)] = deliver_group(
        sessions, [submission_id], mailer, policy, limiter, signer, returns
    )
    if error is not None and not isinstance(error, AlreadyMoved):  # held by another worker
        raise error
    return []


def deliver_group(
    sessions: sessionmaker[Session],
    submission_ids: list[str],
    mailer: Mailer,
    policy: DeliveryPolicy,
    limiter: Limiter | None = None,
    signer: DkimSigner | None = None,
    returns: ReturnAddresses | None = None,
) -> list[tuple[str, BaseException | None]]:
    """The letters of one message: read and claimed in one transaction, then sent one by one,
    each recorded as sent in a commit of its own the moment the server has answered. What a
    crash can leave sent but unrecorded is the one letter between the server's answer and
    that commit; it is sent again, the same bytes, once its lease is over. The letters sent
    then move to delivered together, in one transaction (:func:`_delivered`).

    Each submission gets its own outcome: a permanent refusal is recorded at once (the letter
    failed, with the server's answer) and raised; a passing one puts the letter back as it was
    (its claim released, the error recorded) for its retry.
    """
    plan = partial(_take, mailer=mailer, policy=policy, limiter=limiter)
    taken = run_group(sessions, submission_ids, plan)
    outcomes: dict[str, BaseException | None] = {}
    sent: dict[str, str] = {}  # submission id: the server's answer
    try:
        for submission_id, letter, error in taken:
            with bound(submission_id=submission_id):
                try:
                    if error is not None:
                        raise error
                    if letter is not None:
                        answer = _send(sessions, submission_id, letter, mailer, policy, limiter,
                                       signer, returns)  # fmt: skip
                        if answer is not None:
                            _record(sessions, answer, limiter)
                            sent[submission_id] = str(answer.values.get("response") or "")
                except Exception as exc:
                    outcomes[submission_id] = exc
                    continue
            outcomes[submission_id] = None
    finally:  # also when the worker is interrupted: what was sent moves on
        if sent:
            outcomes.update(_delivered(sessions, sent))
    return list(outcomes.items())


@dataclass
class _Sent:
    """A letter the server accepted, to record as sent."""

    submission_id: str
    values: dict[str, Any]
    limits: list[Limit]


def _record(sessions: sessionmaker[Session], sent: _Sent, limiter: Limiter | None) -> None:
    """Record the letter as sent. Nothing may stand between the server's answer and the commit
    that marks its delivery row sent: that row is what stops a resend, so it goes alone, in
    one statement and its commit, on a connection of the engine's (no session: half of this
    function's cost was the session's own bookkeeping). On PostgreSQL that statement commits
    itself (autocommit), one round trip with no ``BEGIN`` and ``COMMIT`` around it; on SQLite
    it waits for the write lock like any other writer."""
    engine: Engine = sessions.kw["bind"]
    with engine.connect() as connection:
        if engine.dialect.name == "postgresql":
            connection.execution_options(isolation_level="AUTOCOMMIT")
        _update_delivery(connection, sent.submission_id, **sent.values, error=None)
        connection.commit()
    if limiter is not None and sent.limits:
        try:
            limiter.mark_sent(sent.submission_id, sent.limits)
        except Exception as exc:  # bookkeeping: the reservation already counts the letter
            log.warning("rate_limit_mark_failed", error=type(exc).__name__)


def _delivered(
    sessions: sessionmaker[Session], sent: dict[str, str]
) -> dict[str, BaseException | None]:
    """Move the submissions whose letters are recorded as sent to delivered, in one transaction
    (one statement of each kind). A worker that dies before it commits leaves sent rows that
    the next delivery message (or the reconciler's) turns into the move, sending nothing; an
    error here is the submission's, so its message is tried again for the same repair."""

    def plan(_session: Session, submission_id: str) -> Apply[None]:
        detail = sent[submission_id][:500]
        return lambda session: _finish(session, submission_id, State.DELIVERED, detail=detail)

    return {sid: error for sid, _, error in run_group(sessions, list(sent), plan)}


def _send(
    sessions: sessionmaker[Session],
    submission_id: str,
    taken: _Taken,
    mailer: Mailer,
    policy: DeliveryPolicy,
    limiter: Limiter | None,
    signer: DkimSigner | None,
    returns: ReturnAddresses | None = None,
) -> _Sent | None:
    """Hand the letter to the mail server (claiming it first if it had to wait); what to record,
    or None if someone else holds it. A refusal is recorded here and raised."""
    definition, limits = taken.definition, taken.limits
    if not taken.claimed:
        wait = mailer.waiting()
        if wait > 0:  # the backend would be refused for our configuration, not the letter
            _defer(sessions, submission_id, wait, "delivery paused: the mail server refused us")
        if definition.quiet_hours:
            wait = seconds_until_open(
                utcnow(), definition.quiet_hours.start, definition.quiet_hours.end
            )
            if wait > 0:
                _defer(sessions, submission_id, wait, "quiet hours")
        if limiter is not None and limits:
            wait = limiter.reserve(submission_id, limits)
            if wait > 0:
                _defer(sessions, submission_id, wait, "rate limit")
        with session_scope(sessions) as session:
            if not claim(session, submission_id, policy.lease_seconds):
                return None
    # No transaction is open while we talk to the mail server.
    try:
        bounce = returns.bounce(submission_id) if returns is not None else None
        mail: Outgoing = _outgoing(taken, signer, bounce)
        response = mailer.send(mail)
    except (TransientDeliveryError, PermanentDeliveryError) as exc:
        with session_scope(sessions) as session:  # (rare: a transaction of its own)
            if isinstance(exc, PermanentDeliveryError):
                _finish(
                    session,
                    submission_id,
                    State.FAILED,
                    status=DeliveryStatus.FAILED.value,
                    error=str(exc)[:2000],
                )
            elif isinstance(exc, TransientDeliveryError) and exc.ours:
                # Not the letter's doing: the claim released without counting the attempt,
                # and the letter waits (a deferral, costing no retry either).
                session.execute(_UNCOUNTED, {"id": submission_id, "error": str(exc)[:2000]})
            else:  # the claim released: the retry (or the letter's own message) sends it
                _update_delivery(
                    session,
                    submission_id,
                    status=DeliveryStatus.PENDING.value,
                    error=str(exc)[:2000],
                )
        if isinstance(exc, TransientDeliveryError) and exc.ours:
            wait = exc.retry_after if exc.retry_after is not None else OUT_OF_STEP_WAIT
            _defer(sessions, submission_id, wait, f"the mail server: {exc}"[:200])
        raise

    values = {"status": DeliveryStatus.SENT.value, "sent_at": utcnow(), "response": response[:2000]}
    return _Sent(submission_id, values, limits)


def _outgoing(taken: _Taken, signer: DkimSigner | None, envelope_sender: str | None) -> Outgoing:
    """The letter's bytes; a letter that cannot be written as email is its own permanent
    failure (an address only SMTPUTF8 could carry, from data stored before validation refused
    such addresses)."""
    try:
        return outgoing(taken.letter, signer, envelope_sender)
    except ValueError as exc:
        raise PermanentDeliveryError(f"the letter cannot be written as email: {exc}") from exc


def reopen_failed(
    session: Session,
    reason: str | None = None,
    campaign: str | None = None,
    member_id: int | None = None,
    dry_run: bool = False,
) -> list[str]:
    """Failed deliveries back to ``rendered`` with a fresh count of attempts (the caller sends
    them to delivery after the commit): a mistake in configuration costs nothing once fixed.
    ``reason``: part of the recorded error; returns the submissions reopened (or that would be)."""
    query = (
        select(SUBMISSIONS.c.id)
        .select_from(SUBMISSIONS.join(DELIVERIES, DELIVERIES.c.submission_id == SUBMISSIONS.c.id))
        .where(
            SUBMISSIONS.c.state == State.FAILED.value,
            DELIVERIES.c.status == DeliveryStatus.FAILED.value,
        )
        .order_by(SUBMISSIONS.c.updated_at)
    )
    if reason:
        query = query.where(DELIVERIES.c.error.contains(reason, autoescape=True))
    if campaign:
        query = query.where(SUBMISSIONS.c.campaign_slug == campaign)
    if member_id is not None:
        query = query.where(SUBMISSIONS.c.member_id == member_id)
    ids = list(session.scalars(query))
    if dry_run:
        return ids
    for submission_id in ids:
        advance(
            session,
            At(submission_id, State.FAILED),
            State.RENDERED,
            "delivery reopened by an operator",
            failure_reason=None,
        )
        _update_delivery(
            session,
            submission_id,
            status=DeliveryStatus.PENDING.value,
            attempts=0,
            error=None,
            claimed_at=None,
        )
    return ids
