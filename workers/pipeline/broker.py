"""The broker: dramatiq's Redis broker (or its stub, for tests) with DearMP's middleware."""

from __future__ import annotations

from functools import partial

import dramatiq
import structlog
from dramatiq import Message
from dramatiq.brokers.stub import StubBroker
from dramatiq.errors import DecodeError
from dramatiq.middleware import CurrentMessage, Retries

from config.settings import Settings
from workers.database.engine import session_scope
from workers.pipeline.app import Apps
from workers.pipeline.dead_letters import UNREADABLE
from workers.pipeline.dramatiq_private import ScreenedRedisBroker
from workers.pipeline.failures import Attempt, record_failure
from workers.pipeline.heartbeat import Heartbeat, mail_route, shared
from workers.pipeline.middleware import (
    FailureRecorder,
    LogContext,
    ProcessApp,
    StageMessagesOnly,
)

log = structlog.get_logger("workers")


class UnreadableMessage(Exception):
    """The reason recorded for bytes on a queue that are not a dramatiq message."""


def readable(data: bytes) -> bool:
    """Whether fetched bytes are a dramatiq message. Those that are not are dead-lettered as
    they are fetched: dramatiq's consumer would fail to decode them and restart, leaving every
    message it had prefetched in progress until the worker restarted."""
    try:
        Message.decode(data)
    except DecodeError:
        return False
    return True


def record_unreadable(apps: Apps, queue_name: str, redis_id: str, size: int) -> None:
    """Record a dead-lettered unreadable message as a failure (logged with its size only)."""
    log.error("unreadable_message_dead_lettered", queue=queue_name, bytes=size)
    error = UnreadableMessage(f"{size} bytes that are not a dramatiq message")
    attempt = Attempt(redis_id[:64], queue_name, UNREADABLE, None, error, 1, dead_lettered=True)
    try:
        with session_scope(apps().sessions) as session:
            record_failure(session, attempt)
    except Exception as exc:  # never let bookkeeping stop the consumer
        log.error("failure_not_recorded", error=type(exc).__name__)


def build_broker(settings: Settings, apps: Apps) -> dramatiq.Broker:
    """The broker for ``settings``, with DearMP's middleware; what it records goes to the
    database of ``apps()``, the process's App."""
    broker: dramatiq.Broker
    if settings.broker == "stub":
        broker = StubBroker()
    else:
        # Creating the client does not connect; the first command does.
        broker = ScreenedRedisBroker(
            keep=readable,
            refused=partial(record_unreadable, apps),
            url=settings.resolved_redis_url,
            namespace=settings.redis_namespace,
            heartbeat_timeout=settings.broker_heartbeat_timeout_ms,
            maintenance_chance=settings.broker_maintenance_chance,
        )
    if settings.worker_metrics:
        from dramatiq.middleware.prometheus import Prometheus

        broker.add_middleware(Prometheus())
    # Before LogContext: dramatiq runs after-hooks in reverse, so logging is configured before
    # the App is built as the process boots.
    broker.add_middleware(ProcessApp(apps))
    broker.add_middleware(LogContext(settings.log_level))
    broker.add_middleware(StageMessagesOnly())
    broker.add_middleware(CurrentMessage())  # what a stage met before (actors.settle)
    broker.add_middleware(FailureRecorder(apps), before=Retries)
    if isinstance(broker, ScreenedRedisBroker):  # `dearmp health` counts the live workers
        broker.add_middleware(
            Heartbeat(
                broker.client, settings.redis_namespace, mail_route(settings), shared(settings)
            )
        )
    return broker
