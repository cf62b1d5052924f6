"""The broker: dramatiq's Redis broker (or its stub, for tests) with DearMP's middleware."""

from __future__ import annotations

import dramatiq
import dramatiq.brokers.redis
import structlog
from dramatiq import Message
from dramatiq.brokers.stub import StubBroker
from dramatiq.errors import DecodeError
from dramatiq.middleware import Retries

from config.settings import Settings
from workers.database.engine import session_scope
from workers.pipeline.app import get_app
from workers.pipeline.dead_letters import UNREADABLE
from workers.pipeline.failures import Attempt, record_failure
from workers.pipeline.middleware import (
    CloseMailSessions,
    FailureRecorder,
    LogContext,
    StageMessagesOnly,
)


class UnreadableMessage(Exception):
    """The reason recorded for bytes on a queue that are not a dramatiq message."""


class RedisBroker(dramatiq.brokers.redis.RedisBroker):
    """dramatiq's Redis broker, except that bytes on a queue that are not a message are
    dead-lettered as they are fetched, with a recorded reason. (dramatiq's consumer would fail
    to decode them, restart, and leave every message it had prefetched "in progress" until the
    worker process restarted.) Each fetched message is decoded once more here, about 10 us."""

    def do_fetch(self, queue_name: str, prefetch: int) -> list[bytes]:
        fetched: list[bytes] = self._dispatch("fetch")(queue_name, prefetch)  # type: ignore[no-untyped-call]
        readable = []
        for data in fetched:
            try:
                Message.decode(data)
            except DecodeError:
                self._dead_letter_unreadable(queue_name, data)
            else:
                readable.append(data)
        return readable

    def _dead_letter_unreadable(self, queue_name: str, data: bytes) -> None:
        # Which fetched id holds these bytes: the ids this worker holds on the queue.
        held = f"{self.namespace}:__acks__.{self.broker_id}.{queue_name}"
        ids = list(self.client.smembers(held))
        bodies = self.client.hmget(f"{self.namespace}:{queue_name}.msgs", ids) if ids else []
        for redis_id, body in zip(ids, bodies, strict=True):
            if body == data:
                self.do_nack(queue_name, redis_id)
                record_unreadable(queue_name, redis_id.decode(errors="replace"), len(data))
                return


def record_unreadable(queue_name: str, redis_id: str, size: int) -> None:
    """Record a dead-lettered unreadable message as a failure (logged with its size only)."""
    structlog.get_logger("workers").error(
        "unreadable_message_dead_lettered", queue=queue_name, bytes=size
    )
    attempt = Attempt(
        message_id=redis_id[:64],
        queue_name=queue_name,
        actor_name=UNREADABLE,
        submission_id=None,
        exception=UnreadableMessage(f"{size} bytes that are not a dramatiq message"),
        attempts=1,
        dead_lettered=True,
    )
    try:
        with session_scope(get_app().sessions) as session:
            record_failure(session, attempt)
    except Exception as exc:  # never let bookkeeping stop the consumer
        structlog.get_logger("workers").error("failure_not_recorded", error=type(exc).__name__)


def build_broker(settings: Settings) -> dramatiq.Broker:
    broker: dramatiq.Broker
    if settings.broker == "stub":
        broker = StubBroker()
    else:
        # Creating the client does not connect; the first command does.
        broker = RedisBroker(  # type: ignore[no-untyped-call]
            url=settings.resolved_redis_url,
            namespace=settings.redis_namespace,
            heartbeat_timeout=settings.broker_heartbeat_timeout_ms,
            maintenance_chance=settings.broker_maintenance_chance,
        )
    if settings.worker_metrics:
        from dramatiq.middleware.prometheus import Prometheus

        broker.add_middleware(Prometheus())
    broker.add_middleware(LogContext())
    broker.add_middleware(StageMessagesOnly())
    broker.add_middleware(CloseMailSessions())
    broker.add_middleware(FailureRecorder(), before=Retries)
    return broker
