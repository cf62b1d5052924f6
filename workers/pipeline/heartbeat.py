"""What says a worker process and the reconciler are alive, for ``dearmp health``.

Each worker process writes a key of its own to Redis every few seconds (``<ns>:worker:<host>:
<pid>``, expiring after three missed beats); the reconciler records the time of its last pass
(``<ns>:reconciler``). Nothing of dramatiq's own key layout is read.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from typing import Any

import dramatiq
import redis
import structlog
from dramatiq.middleware import Middleware

from config.settings import Settings

log = structlog.get_logger(__name__)

BEAT_SECONDS = 10.0


def _worker_key(namespace: str) -> str:
    return f"{namespace}:worker:{socket.gethostname()}:{os.getpid()}"


class Heartbeat(Middleware):
    """A worker process's heartbeat, from its boot to its shutdown; ``mail``: where its letters
    go (:func:`mail_route`; empty: not said), which ``dearmp health`` holds against its own."""

    def __init__(self, client: redis.Redis, namespace: str, mail: str = "") -> None:
        self.client, self.namespace, self.mail = client, namespace, mail
        self.stop = threading.Event()

    def after_worker_boot(self, broker: dramatiq.Broker, worker: dramatiq.Worker) -> None:
        key = _worker_key(self.namespace)
        about = json.dumps(
            {
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "started": time.time(),
                "mail": self.mail,
            }
        )

        def beat() -> None:
            while not self.stop.is_set():
                try:
                    self.client.set(key, about, ex=int(3 * BEAT_SECONDS))
                except redis.RedisError as exc:  # Redis away: health says so on its own
                    log.warning("heartbeat_failed", error=type(exc).__name__)
                self.stop.wait(BEAT_SECONDS)

        threading.Thread(target=beat, name="heartbeat", daemon=True).start()

    def before_worker_shutdown(self, broker: dramatiq.Broker, worker: dramatiq.Worker) -> None:
        self.stop.set()
        try:
            self.client.delete(_worker_key(self.namespace))
        except redis.RedisError:
            pass  # it expires


def mail_route(settings: Settings) -> str:
    """Where letters go with ``settings``, in words: files, a relay, or an email API's domain."""
    if settings.mail_backend == "smtp":
        return f"SMTP {settings.smtp_host}:{settings.smtp_port}"
    if settings.mail_backend == "http":
        return f"the email API for {settings.email_api_domain}"
    return f"files in {settings.resolved_outbox_dir}"


def live_workers(client: redis.Redis, namespace: str) -> list[dict[str, Any]]:
    """The worker processes whose heartbeat has not expired: host, pid, started (epoch), and
    where their letters go."""
    beats = (client.get(key) for key in client.scan_iter(match=f"{namespace}:worker:*", count=500))
    found = [json.loads(raw) for raw in beats if raw]
    return sorted(found, key=lambda w: (w["host"], w["pid"]))


def record_pass(broker: dramatiq.Broker) -> None:
    """The reconciler's pass, on its broker's Redis (nothing on a broker without one)."""
    client = getattr(broker, "client", None)
    if isinstance(client, redis.Redis):
        namespace = getattr(broker, "namespace", "dearmp")
        try:
            client.set(f"{namespace}:reconciler", str(redis_now(client)))
        except redis.RedisError as exc:  # the pass itself was made; health says Redis is away
            log.warning("reconciler_pass_not_recorded", error=type(exc).__name__)


def redis_now(client: redis.Redis) -> float:
    """Redis's own clock (epoch seconds): the one every host that reads and writes a time in it
    agrees on, whatever their own clocks say."""
    seconds, micros = client.time()
    return float(seconds) + micros / 1e6


def last_pass(client: redis.Redis, namespace: str) -> float | None:
    """When the reconciler last finished a pass (Redis's clock, :func:`redis_now`), if ever."""
    raw = client.get(f"{namespace}:reconciler")
    return float(raw) if raw else None
