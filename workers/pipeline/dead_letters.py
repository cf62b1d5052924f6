"""What operators need from Redis: queue depths and dead letters, read and requeued safely
(dramatiq's Redis keys are named in :mod:`workers.pipeline.dramatiq_private`)."""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import dramatiq
import redis
import structlog
from dramatiq import Message
from dramatiq.common import dq_name, xq_name
from dramatiq.errors import DecodeError
from sqlalchemy import ColumnElement, and_, func, select, union, update
from sqlalchemy.orm import Session, sessionmaker

from workers.database.engine import session_scope
from workers.database.models import (
    Failure,
    OutboxItem,
    OutboxStatus,
    PurgedDeadLetter,
    Submission,
    SubmissionEvent,
)
from workers.pipeline.dispatch import stage_message, submission_id_of
from workers.pipeline.dramatiq_private import bodies_key, dead_key, delayed_key, held, queue_key
from workers.pipeline.states import STATES, State
from workers.privacy.hashing import mask_supporter
from workers.stages.stage import Stage


@dataclass(frozen=True)
class QueueDepth:
    queue: str
    waiting: int
    delayed: int
    in_progress: int
    dead: int


@dataclass(frozen=True)
class DeadLetter:
    message_id: str
    redis_id: str
    queue: str
    actor: str
    submission_id: str | None
    dead_at: datetime
    message: Message[Any] | None  # None: bytes that are not a message


UNREADABLE = "(unreadable)"


def queue_depths(client: redis.Redis, namespace: str, dead: Mapping[str, int]) -> list[QueueDepth]:
    """Per stage queue, from Redis; ``dead``: the database's counts (:func:`dead_counts`)."""
    return [
        QueueDepth(
            queue=stage.queue,
            waiting=int(client.llen(queue_key(namespace, stage.queue))),
            delayed=int(client.llen(delayed_key(namespace, stage.queue)))
            + held(client, namespace, dq_name(stage.queue)),
            in_progress=held(client, namespace, stage.queue),
            dead=dead.get(stage.queue, 0),
        )
        for stage in Stage
    ]


def dead_letters(client: redis.Redis, namespace: str, queue: str | None = None) -> list[DeadLetter]:
    """Every dead letter (of one queue, or all), oldest first."""
    found = []
    for q in [stage.queue for stage in Stage if not queue or stage.queue == queue]:
        # redis-py's return types are loose: these are what the commands return here.
        entries = cast(
            "list[tuple[bytes, float]]",
            client.zrange(dead_key(namespace, q), 0, -1, withscores=True),
        )
        if not entries:
            continue
        bodies = cast(
            "list[bytes | None]",
            client.hmget(bodies_key(namespace, xq_name(q)), [r for r, _ in entries]),
        )
        for (rid, score), body in zip(entries, bodies, strict=True):
            if body is None:
                continue
            try:
                message: Message[Any] | None = Message.decode(body)
            except DecodeError:  # bytes that were never a message: listed, never requeued
                message = None
            redis_id = rid.decode(errors="replace")
            found.append(
                DeadLetter(
                    message_id=message.message_id if message else redis_id,
                    redis_id=redis_id,
                    queue=q,
                    actor=message.actor_name if message else UNREADABLE,
                    submission_id=submission_id_of(message) if message else None,
                    dead_at=datetime.fromtimestamp(float(score) / 1000, UTC),
                    message=message,
                )
            )
    return sorted(found, key=lambda d: d.dead_at)


@dataclass(frozen=True)
class Found:
    """A dead letter that needs an operator: the database's record, and Redis's copy if any."""

    message_id: str
    queue: str
    actor: str
    submission_id: str | None
    dead_at: datetime
    failure: Failure | None
    dead: DeadLetter | None
    payload: Any = None  # the submission's, to hide its supporter's details in the answer

    @property
    def reason(self) -> str:
        return self.failure.exception_type if self.failure else "unknown"

    @property
    def answer(self) -> str | None:
        """The first line of the failure's message (the server's answer, which can quote the
        sender), the supporter's details hidden, masked and cut."""
        if self.failure is None or not self.failure.exception_message:
            return None
        return mask_supporter(self.failure.exception_message.splitlines()[0], self.payload)[:200]


def by_reason(found: list[Found]) -> list[tuple[str, list[Found]]]:
    """Dead letters grouped by reason, the largest group first, each oldest first."""
    groups: dict[str, list[Found]] = {}
    for one in found:
        groups.setdefault(one.reason, []).append(one)
    return sorted(groups.items(), key=lambda group: -len(group[1]))


def _needing_attention() -> ColumnElement[bool]:
    """A failure that was dead-lettered and not requeued or purged since."""
    return and_(
        Failure.dead_lettered_at.is_not(None),
        Failure.requeued_at.is_(None),
        Failure.message_id.not_in(select(PurgedDeadLetter.message_id)),
    )


def find_dead(
    client: redis.Redis | None,
    namespace: str,
    sessions: sessionmaker[Session],
    *,
    queue: str | None = None,
    actor: str | None = None,
    reason: str | None = None,
    since: datetime | None = None,
) -> list[Found]:
    """Dead letters matching every filter given (``reason``: part of the exception type): those
    the database records as needing attention, and any Redis holds that it never heard of
    (``client`` None: Redis is away, the database's record alone)."""
    held = dead_letters(client, namespace, queue) if client is not None else []
    in_redis = {d.message_id: d for d in held}
    query = select(Failure).where(_needing_attention()).order_by(Failure.dead_lettered_at)
    if queue:
        query = query.where(Failure.queue_name == queue)
    with session_scope(sessions) as session:
        failures = list(session.scalars(query))
        ids = list(in_redis)
        recorded = union(  # failed or purged: a dead letter the database has heard of
            select(Failure.message_id).where(Failure.message_id.in_(ids)),
            select(PurgedDeadLetter.message_id).where(PurgedDeadLetter.message_id.in_(ids)),
        )
        known = set(session.scalars(recorded))
        about = {f.submission_id for f in failures if f.submission_id}
        payloads: dict[str, Any] = dict(
            session.execute(
                select(Submission.id, Submission.payload).where(Submission.id.in_(about))
            ).all()
        )
        session.expunge_all()
    found = []
    for failure in failures:
        dead = in_redis.get(failure.message_id)
        assert failure.dead_lettered_at is not None
        found.append(
            Found(
                message_id=failure.message_id,
                queue=failure.queue_name,
                actor=failure.actor_name,
                submission_id=failure.submission_id,
                dead_at=dead.dead_at if dead else failure.dead_lettered_at,
                failure=failure,
                dead=dead,
                payload=payloads.get(failure.submission_id or ""),
            )
        )
    found += [
        Found(d.message_id, d.queue, d.actor, d.submission_id, d.dead_at, None, d)
        for message_id, d in in_redis.items()
        if message_id not in known
    ]
    return sorted(
        (
            f
            for f in found
            if (not actor or f.actor == actor)
            and (not reason or reason.lower() in f.reason.lower())
            and (not since or f.dead_at >= since)
        ),
        key=lambda f: f.dead_at,
    )


def dead_counts(sessions: sessionmaker[Session]) -> dict[str, int]:
    """Dead letters needing attention per queue, from the database."""
    with session_scope(sessions) as session:
        rows = session.execute(
            select(Failure.queue_name, func.count())
            .where(_needing_attention())
            .group_by(Failure.queue_name)
        ).all()
    return {queue: int(count) for queue, count in rows}


class RequeueRefused(ValueError):
    """A requeue that would not help: a letter the mail server refused for good failed its
    submission, so a requeue would send nothing."""


def replay(
    client: redis.Redis | None,
    broker: dramatiq.Broker,
    namespace: str,
    sessions: sessionmaker[Session],
    found: Found,
    *,
    dry_run: bool = False,
) -> str | None:
    """Put a dead letter back on its queue with a fresh retry budget (Redis's copy, or the stage
    message made again from the database); :class:`RequeueRefused` when that would not help,
    ValueError when there is nothing to requeue. The copy is enqueued before the dead one is
    removed: a crash in between leaves a harmless duplicate, never a loss. Returns the new
    message id (``dry_run``: None, after the refusal check alone)."""
    if found.reason.endswith("PermanentDeliveryError"):
        raise RequeueRefused(
            "the mail server refused the letter for good and its submission failed, so a "
            "requeue sends nothing; once the cause is fixed, `dearmp deliveries reopen` sends "
            "it again (and clears this dead letter)"
        )
    if dry_run:
        return None
    stages = {stage.queue: stage for stage in Stage}
    fresh: Message[Any]
    if found.dead is not None and found.dead.message is not None:
        fresh = Message(
            queue_name=found.dead.queue,
            actor_name=found.dead.actor,
            args=found.dead.message.args,
            kwargs=found.dead.message.kwargs,
            options={},  # a fresh retry budget; the old failure stays recorded in the database
        )
    elif found.submission_id is not None and found.queue in stages:
        fresh = stage_message(stages[found.queue], found.submission_id)
    else:
        raise ValueError("not a readable stage message; purge it")
    broker.enqueue(fresh)
    if found.dead is not None and client is not None:
        remove(client, namespace, found.dead)
    with session_scope(sessions) as session:
        session.execute(
            update(Failure)
            .where(Failure.message_id == found.message_id)
            .values(requeued_at=datetime.now(UTC))
        )
    return fresh.message_id


def purge(
    client: redis.Redis | None, namespace: str, sessions: sessionmaker[Session], found: Found
) -> None:
    """Delete a dead letter, recording it first: a crash in between leaves a record, not a gap."""
    with session_scope(sessions) as session:
        session.add(
            PurgedDeadLetter(
                message_id=found.message_id,
                queue_name=found.queue,
                actor_name=found.actor,
                submission_id=found.submission_id,
                reason=found.failure.exception_type if found.failure else None,
                dead_at=found.dead_at,
            )
        )
    if found.dead is not None and client is not None:
        remove(client, namespace, found.dead)


def remove(client: redis.Redis, namespace: str, dead: DeadLetter) -> None:
    pipe = client.pipeline()
    pipe.zrem(dead_key(namespace, dead.queue), dead.redis_id)
    pipe.hdel(bodies_key(namespace, xq_name(dead.queue)), dead.redis_id)
    pipe.execute()


class MailPauseAlarm:
    """How a worker tells operators' commands that the relay refused us (and when that ends: a
    Redis key that lives as long as the pause and half a minute more), and hears an operator's
    ``dearmp deliveries resume`` (:meth:`resumed`)."""

    def __init__(self, client: redis.Redis, namespace: str) -> None:
        self.client, self.namespace = client, namespace

    def __call__(self, reason: str | None, seconds: float, lasting: bool = False) -> None:
        try:
            if reason is None:
                self.client.delete(f"{self.namespace}:mail-paused")
            else:
                until = datetime.now(UTC) + timedelta(seconds=seconds)
                pause = {"reason": reason, "until": until.isoformat(), "lasting": lasting}
                value = json.dumps(pause)
                self.client.set(f"{self.namespace}:mail-paused", value, ex=int(seconds) + 30)
        except redis.RedisError as exc:  # the pause itself holds in the worker regardless
            structlog.get_logger("workers").warning(
                "mail_pause_not_shared", error=type(exc).__name__
            )

    def resumed(self, since: float) -> bool:
        """Whether an operator asked to resume after ``since`` (epoch seconds)."""
        try:
            raw = cast("bytes | None", self.client.get(f"{self.namespace}:mail-resumed"))
        except redis.RedisError:
            return False
        return raw is not None and float(raw) > since


def resume_mail(client: redis.Redis, namespace: str) -> dict[str, str] | None:
    """An operator's resume of the mail pause (the relay is fixed): every worker process tries
    again within seconds, instead of waiting out its doubled pause. The pause it ends, if any
    was reported."""
    paused = mail_pause(client, namespace)
    client.set(f"{namespace}:mail-resumed", str(time.time()), ex=86_400)
    client.delete(f"{namespace}:mail-paused")
    return paused


def mail_pause(client: redis.Redis, namespace: str) -> dict[str, Any] | None:
    """The relay's refusal that paused delivery, if a worker reported one: reason, until, and
    whether it lasts until someone acts."""
    raw = cast("bytes | None", client.get(f"{namespace}:mail-paused"))
    return None if raw is None else cast("dict[str, Any]", json.loads(raw))


def oldest_waiting_seconds(client: redis.Redis, namespace: str, now_ms: int) -> float:
    """Age of the oldest message waiting on any stage queue (0 when all are empty)."""
    oldest = 0.0
    for stage in Stage:
        first = cast("bytes | None", client.lindex(queue_key(namespace, stage.queue), 0))
        bodies = bodies_key(namespace, stage.queue)
        body = cast("bytes | None", client.hget(bodies, first)) if first else None
        if body is not None:
            try:
                age = (now_ms - Message.decode(body).message_timestamp) / 1000
            except DecodeError:  # dead-lettered when a worker fetches it
                continue
            oldest = max(oldest, age)
    return oldest


@dataclass(frozen=True)
class Snapshot:
    depths: list[QueueDepth]
    per_minute: dict[str, int]
    newest_failures: list[tuple[datetime, str, str, str | None]]


def snapshot(client: redis.Redis, namespace: str, sessions: sessionmaker[Session]) -> Snapshot:
    """What an operator watches: queues, work done per stage in the last minute, new failures.
    Redis is read before the transaction."""
    depths = queue_depths(client, namespace, dead_counts(sessions))
    with session_scope(sessions) as session:
        return _snapshot_from_db(session, depths, datetime.now(UTC))


def _snapshot_from_db(session: Session, depths: list[QueueDepth], now: datetime) -> Snapshot:
    since = now - timedelta(minutes=1)
    # A recorded move is the work of the stage acting on the state it moved from (the table of
    # states says which): each move of the last minute, with the state before it.
    recent = select(SubmissionEvent.submission_id).where(SubmissionEvent.at >= since)
    moves = (
        select(
            SubmissionEvent.at,
            func.lag(SubmissionEvent.state)
            .over(partition_by=SubmissionEvent.submission_id, order_by=SubmissionEvent.id)
            .label("moved_from"),
        )
        .where(SubmissionEvent.submission_id.in_(recent))
        .subquery()
    )
    counts = session.execute(
        select(moves.c.moved_from, func.count())
        .where(moves.c.at >= since, moves.c.moved_from.is_not(None))
        .group_by(moves.c.moved_from)
    ).all()
    per_minute = {stage.value: 0 for stage in Stage}
    for state, count in counts:
        stage = STATES[State(state)].stage if state in STATES else None
        if stage is not None:
            per_minute[stage.value] += count
    per_minute[Stage.CONSENT.value] = int(
        session.scalar(
            select(func.count())
            .select_from(Submission)
            .where(Submission.consent_logged_at >= since)
        )
        or 0
    )
    failures = session.execute(
        select(
            Failure.last_failed_at,
            Failure.actor_name,
            Failure.exception_type,
            Failure.submission_id,
        )
        .order_by(Failure.last_failed_at.desc())
        .limit(5)
    ).all()
    # An email's failed tries are on its outbox item (waiting to retry, or given up).
    tries = session.execute(
        select(
            OutboxItem.claimed_at,
            OutboxItem.kind,
            OutboxItem.error,
            OutboxItem.submission_id,
            Submission.payload,
        )
        .outerjoin(Submission, Submission.id == OutboxItem.submission_id)
        .where(
            OutboxItem.failures > 0,
            OutboxItem.status.in_((OutboxStatus.PENDING, OutboxStatus.FAILED)),
            OutboxItem.claimed_at.is_not(None),
        )
        .order_by(OutboxItem.claimed_at.desc())
        .limit(5)
    ).all()
    newest = [(at, actor, kind.rsplit(".", 1)[-1], sid) for at, actor, kind, sid in failures]
    newest += [
        (at or now, f"outbox ({kind})", mask_supporter(error or "", payload)[:80], sid)
        for at, kind, error, sid, payload in tries
    ]
    newest.sort(key=lambda row: row[0], reverse=True)
    return Snapshot(depths, per_minute, newest[:5])
