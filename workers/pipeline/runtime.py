"""The pipeline in one process: embedded Redis (if none is configured), workers, reconciler."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from functools import partial
from typing import Any

import dramatiq
import structlog
from aiosmtpd.controller import Controller
from sqlalchemy import func, select

from config.settings import CONFIG_DIR, ConfigurationError, Settings
from workers.database.engine import migrate, session_scope
from workers.database.models import State, Submission
from workers.letters.definitions import load_definitions, sync_campaigns
from workers.mp.directory import current_version_id, import_directory
from workers.pipeline.app import App
from workers.pipeline.dispatch import dispatch, dispatch_groups
from workers.pipeline.dramatiq_private import start_time_limits
from workers.pipeline.embedded_redis import EmbeddedRedis
from workers.pipeline.heartbeat import shared
from workers.pipeline.intake import accept
from workers.pipeline.reconciler import run_forever
from workers.privacy.hashing import ip_hash
from workers.receiving.receiver import (
    InboundController,
    InboundHandler,
    server_options,
    tls_context,
)
from workers.stages.confirmation import ConfirmationPolicy
from workers.stages.stage import Stage

SAMPLE_DIR = CONFIG_DIR / "sample"

log = structlog.get_logger(__name__)


def prepare(app: App) -> None:
    """Migrate the database, load campaign files, and import the sample directory if none."""
    migrate(app.settings.resolved_database_url)
    with session_scope(app.sessions) as session:
        sync_campaigns(session, load_definitions(app.settings.campaigns_dir))
        if current_version_id(session) is None:
            import_directory(
                session,
                SAMPLE_DIR / "mps.csv",
                [SAMPLE_DIR / "postcodes.csv"],
                source="DearMP fictional sample directory",
            )


def submit(app: App, broker: dramatiq.Broker, payload: Any) -> tuple[str, bool]:
    """Store a submission, commit, then send it to validation (the reconciler covers a failure)."""
    with session_scope(app.sessions) as session:
        accepted = accept(session, payload, app.secret)
    if accepted.created:
        dispatch(broker, [Stage.VALIDATE], accepted.submission_id)
    return accepted.submission_id, accepted.created


def reconciler_options(settings: Settings) -> dict[str, Any]:
    """The reconciler's settings, as ``reconcile_once`` and ``run_forever`` take them."""
    return {
        "older_than": timedelta(seconds=settings.reconcile_after),
        "held_recheck": timedelta(seconds=settings.held_recheck),
        "confirmation": ConfirmationPolicy.from_settings(settings),
        "max_dead_letters": settings.max_dead_letters,
        "lease": timedelta(seconds=settings.delivery_lease_seconds),
        "shared": shared(settings),
    }


def state_counts(app: App, ids: list[str] | None = None) -> dict[str, int]:
    with session_scope(app.sessions) as session:
        query = select(Submission.state, func.count()).group_by(Submission.state)
        if ids is not None:
            query = query.where(Submission.id.in_(ids))
        return dict(session.execute(query).all())


def count_final(counts: dict[str, int]) -> int:
    return sum(n for state, n in counts.items() if State(state).is_final)


@contextmanager
def running_pipeline(app: App, broker: dramatiq.Broker, threads: int) -> Iterator[None]:
    """Embedded Redis (when no REDIS_URL), an in-process worker and the reconciler, and the
    inbound SMTP receiver when there is a bounce or reply domain, until exit."""
    embedded = None
    settings = app.settings
    if settings.broker == "redis" and not settings.redis_url:
        server = EmbeddedRedis(settings.data_dir, socket=settings.embedded_redis_socket)
        if (dead := server.stop_orphan()) is not None:
            log.warning("embedded_redis_orphan_stopped", started_by=dead)
        if not server.is_up():  # else another `dearmp run` owns it
            embedded = server.start()
    worker = dramatiq.Worker(broker, worker_threads=threads, worker_timeout=100)
    start_time_limits(broker)  # as a worker process does when it boots: this one is none
    stop = threading.Event()
    reconciler = threading.Thread(
        target=run_forever,
        args=(app.sessions, broker, settings.reconcile_interval),
        kwargs={"stop": stop, **reconciler_options(settings)},
        name="reconciler",
        daemon=True,
    )
    keeper = None
    if embedded is not None:
        keeper = threading.Thread(
            target=keep_up, args=(embedded, stop), name="embedded-redis", daemon=True
        )
        keeper.start()
    worker.start()
    reconciler.start()
    receiver = start_receiver(app, broker) if app.returns.domains else None
    try:
        yield
    finally:
        stop.set()
        try:
            if receiver is not None:
                receiver.stop()
            worker.stop()
            reconciler.join(timeout=5)
        finally:  # also on a second Ctrl-C: its Redis, in a session of its own, goes too
            if keeper is not None:
                keeper.join(timeout=15)
            if embedded is not None:
                embedded.stop()


def keep_up(server: EmbeddedRedis, stop: threading.Event, every: float = 1.0) -> None:
    """Start the embedded Redis again whenever it exits, until ``stop``: it is transport only,
    and the reconciler resends from the database what it held."""
    while not stop.wait(every):
        if not server.exited():
            continue
        code = server.process.returncode if server.process is not None else None
        if server.is_up():  # another `dearmp run` started its own meanwhile: it is theirs
            log.warning("embedded_redis_taken_over", exit_code=code)
            return
        try:
            server.start()
        except Exception as exc:  # tried again in a second; `dearmp health` says Redis is down
            log.error("embedded_redis_not_restarted", exit_code=code, error=type(exc).__name__)
            continue
        log.warning("embedded_redis_restarted", exit_code=code)


def start_receiver(
    app: App, broker: dramatiq.Broker, host: str | None = None, port: int | None = None
) -> Controller:
    """`dearmp inbound`'s SMTP receiver, started in a thread of its own, sending what it stores
    to the inbound stage on ``broker``. Stop it with ``.stop()``."""
    settings = app.settings

    def send_on(ids: list[str]) -> None:
        dispatch_groups(broker, {Stage.INBOUND: ids})

    handler = InboundHandler(
        app.sessions,
        app.returns,
        send_on,
        partial(ip_hash, app.secret),
        settings.inbound_peer_per_minute,
    )
    controller = InboundController(
        handler,
        settings.inbound_max_sessions,
        settings.inbound_max_sessions_per_peer,
        settings.inbound_session_seconds,
        hostname=host or settings.inbound_host,
        port=port or settings.inbound_port,
        **server_options(
            settings.inbound_max_bytes,
            settings.inbound_idle_seconds,
            tls_context(settings.inbound_tls_cert, settings.inbound_tls_key),
        ),
    )
    try:
        controller.start()
    except OSError as exc:  # the port taken (another receiver?) or not ours to bind
        where = f"{controller.hostname}:{controller.port}"
        said = f"cannot listen on {where}: {exc.strerror or exc}"
        raise ConfigurationError([f"DEARMP_INBOUND_HOST/DEARMP_INBOUND_PORT: {said}"]) from None
    return controller
