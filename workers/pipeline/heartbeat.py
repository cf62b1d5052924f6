"""What says a worker process and the reconciler are alive, for ``dearmp health``.

Each worker process writes a key of its own to Redis every few seconds (``<ns>:worker:<host>:
<pid>``, expiring after three missed beats); the reconciler records the time of its last pass
(``<ns>:reconciler``). Both say how far their clock is from Redis's and the settings every
process of a deployment must share (:func:`shared`), for health to compare. Nothing of
dramatiq's own key layout is read.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

import dramatiq
import redis
import structlog
from dramatiq.middleware import Middleware
from sqlalchemy.engine import make_url

from config.settings import Settings

log = structlog.get_logger(__name__)

BEAT_SECONDS = 10.0
# Seconds a process's clock may be from Redis's: claims' leases and dramatiq's own heartbeats
# compare times written on one machine with another's clock (NTP keeps them within a second).
CLOCK_TOLERANCE = 5.0


def shared(settings: Settings) -> dict[str, str]:
    """The settings every process of one deployment must hold alike: a lease, a limit or a
    database that differs sends letters twice, past a limit, or nowhere. The database by a
    fingerprint of where it is, never its URL."""
    url = make_url(settings.resolved_database_url)
    backend = url.get_backend_name()
    if backend == "sqlite":  # the file, wherever it was named from
        where = f"sqlite:{Path(url.database).resolve() if url.database else ''}"
    else:  # one server however written: its host's case, its port said or not
        port = url.port or (5432 if backend == "postgresql" else None)
        where = f"{backend}://{(url.host or '').lower()}:{port}/{url.database or ''}"
    return {
        "DATABASE_URL": "database " + hashlib.sha256(where.encode()).hexdigest()[:8],
        "DEARMP_DELIVERY_LEASE_SECONDS": str(settings.delivery_lease_seconds),
        "DEARMP_MP_LIMIT": str(settings.mp_limit),
        "DEARMP_MP_LIMIT_WINDOW": f"{settings.mp_limit_window:g}",
        "DEARMP_SEND_RATE": f"{settings.send_rate_per_second:g}",
    }


def clock_offset(client: redis.Redis) -> float:
    """Seconds this machine's clock is ahead of Redis's (behind: negative)."""
    before = time.time()
    theirs = redis_now(client)
    return (before + time.time()) / 2 - theirs


def clock_problem(offset: float, who: str = "this machine") -> str | None:
    """What a clock ``offset`` seconds from Redis's does, if past :data:`CLOCK_TOLERANCE`."""
    if abs(offset) <= CLOCK_TOLERANCE:
        return None
    way = "ahead of" if offset > 0 else "behind"
    return (
        f"{who}'s clock is {abs(offset):.0f} s {way} Redis's: its letters' claims can be taken "
        "over while it sends them, and go twice; set its clock (NTP)"
    )


def about_process(client: redis.Redis, settings: dict[str, str], **more: Any) -> dict[str, Any]:
    """What a process says of itself in Redis: host, pid, clock offset, shared settings."""
    offset = clock_offset(client)
    if (problem := clock_problem(offset)) is not None:
        log.error("clock_differs", offset_seconds=round(offset, 1), problem=problem)
    found = {"host": socket.gethostname(), "pid": os.getpid(), "clock": round(offset, 1)}
    return found | {"settings": settings} | more


def _worker_key(namespace: str) -> str:
    return f"{namespace}:worker:{socket.gethostname()}:{os.getpid()}"


class Heartbeat(Middleware):
    """A worker process's heartbeat, from its boot to its shutdown; ``mail``: where its letters
    go (:func:`mail_route`; empty: not said), which ``dearmp health`` holds against its own."""

    def __init__(
        self,
        client: redis.Redis,
        namespace: str,
        mail: str = "",
        settings: dict[str, str] | None = None,
    ) -> None:
        self.client, self.namespace, self.mail = client, namespace, mail
        self.settings = settings or {}
        self.stop = threading.Event()

    def after_worker_boot(self, broker: dramatiq.Broker, worker: dramatiq.Worker) -> None:
        key = _worker_key(self.namespace)
        started = time.time()

        def beat() -> None:
            while not self.stop.is_set():
                try:
                    about = about_process(
                        self.client, self.settings, started=started, mail=self.mail
                    )
                    self.client.set(key, json.dumps(about), ex=int(3 * BEAT_SECONDS))
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


def record_pass(broker: dramatiq.Broker, settings: dict[str, str] | None = None) -> None:
    """The reconciler's pass, on its broker's Redis (nothing on a broker without one), and what
    it says of itself (:func:`about_process`) for an hour."""
    client = getattr(broker, "client", None)
    if isinstance(client, redis.Redis):
        namespace = getattr(broker, "namespace", "dearmp")
        try:
            client.set(f"{namespace}:reconciler", str(redis_now(client)))
            about = about_process(client, settings or {})
            client.set(f"{namespace}:reconciler:about", json.dumps(about), ex=3_600)
        except redis.RedisError as exc:  # the pass itself was made; health says Redis is away
            log.warning("reconciler_pass_not_recorded", error=type(exc).__name__)


def redis_now(client: redis.Redis) -> float:
    """Redis's own clock (epoch seconds): the one every host that reads and writes a time in it
    agrees on, whatever their own clocks say."""
    seconds, micros = client.time()
    return float(seconds) + micros / 1e6


def reconciler_about(client: redis.Redis, namespace: str) -> dict[str, Any] | None:
    """What the reconciler said of itself at its last pass (:func:`record_pass`), if it did."""
    raw = client.get(f"{namespace}:reconciler:about")
    return json.loads(raw) if raw else None


def last_pass(client: redis.Redis, namespace: str) -> float | None:
    """When the reconciler last finished a pass (Redis's clock, :func:`redis_now`), if ever."""
    raw = client.get(f"{namespace}:reconciler")
    return float(raw) if raw else None
