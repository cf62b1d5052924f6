"""The one place the broker is built and installed; actor modules import this first."""

from __future__ import annotations

import dramatiq
from dramatiq.brokers.redis import RedisBroker
from dramatiq.brokers.stub import StubBroker
from dramatiq.middleware import Retries

from config.settings import Settings, get_settings
from workers.middleware import FailureRecorder, LogContext


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
    broker.add_middleware(FailureRecorder(), before=Retries)
    return broker


broker = build_broker(get_settings())
dramatiq.set_broker(broker)
