"""What a process needs, built once: settings, the database, the mailer, the hashing key.
Nothing here connects at import time; :func:`get_app` builds on first use."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis
import structlog
from sqlalchemy import Engine, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from config.settings import Settings, get_settings, masked_url
from workers.database.engine import make_engine, make_sessionmaker
from workers.database.models import Campaign
from workers.letters.mail import DkimSigner, Mailer, make_mailer, make_signer
from workers.letters.rate_limits import Limiter, MemoryLimiter, RedisLimiter
from workers.mp.live_sources import LiveSources
from workers.pipeline.dead_letters import MailPauseAlarm
from workers.receiving.addresses import ReturnAddresses
from workers.stages.delivery import DeliveryPolicy


@dataclass(eq=False)  # hashed by identity: what is built once per App is cached by it
class App:
    settings: Settings
    engine: Engine
    sessions: sessionmaker[Session]
    mailer: Mailer
    secret: bytes
    delivery_policy: DeliveryPolicy
    limiter: Limiter
    signer: DkimSigner | None
    returns: ReturnAddresses
    live_sources: LiveSources | None = None

    @classmethod
    def from_settings(cls, settings: Settings, **engine_options: Any) -> App:
        engine = make_engine(settings.resolved_database_url, **engine_options)
        limiter: Limiter = MemoryLimiter()
        alarm = None
        if settings.broker == "redis":
            client = redis.Redis.from_url(settings.resolved_redis_url)
            limiter = RedisLimiter(client)
            alarm = MailPauseAlarm(client, settings.redis_namespace)
        secret = settings.secret()
        return cls(
            settings=settings,
            engine=engine,
            sessions=make_sessionmaker(engine),
            mailer=make_mailer(settings, alarm),
            secret=secret,
            returns=ReturnAddresses(secret, settings.bounce_domain, settings.reply_domain),
            delivery_policy=DeliveryPolicy.from_settings(settings),
            limiter=limiter,
            signer=make_signer(settings),
            live_sources=(
                LiveSources.from_settings(settings)
                if settings.resolution_order != "local"
                else None
            ),
        )


def log_started(app: App, process: str) -> None:
    """The process's one start-up line: where letters go, the database and Redis (without
    passwords) and the campaigns' modes."""
    settings = app.settings
    where: dict[str, Any] = {"mail_backend": settings.mail_backend}
    if settings.mail_backend == "outbox":  # letters go to files, not to any MP
        where["outbox_dir"] = str(settings.resolved_outbox_dir)
    structlog.get_logger("workers").info(
        "dearmp_started",
        process=process,
        **where,
        database=masked_url(settings.resolved_database_url),
        redis=masked_url(settings.resolved_redis_url) if settings.broker == "redis" else "stub",
        campaigns=campaign_modes(app),
    )


def campaign_modes(app: App) -> dict[str, str] | None:
    """Each campaign's mode, or None when the database cannot say (not migrated yet, down)."""
    try:
        with app.sessions() as session:
            return dict(session.execute(select(Campaign.slug, Campaign.mode)).all())
    except SQLAlchemyError:
        return None


# Where the process's App comes from, given to what needs it when it is built (the broker, its
# middleware, the actors): :func:`get_app` in a worker or a command, the test's own in tests.
Apps = Callable[[], App]

_app: App | None = None
_building = threading.Lock()  # one App, however many of a cold worker's threads ask at once


def get_app() -> App:
    """The process's App, built on first use. Only the composition roots call it (the worker's
    :func:`workers.pipeline.actors.setup`, the command line's Cli); the rest are given it."""
    global _app
    if _app is not None:
        return _app
    with _building:
        if _app is None:
            # No ping before each transaction: after a database restart the first statement
            # fails, the pool is replaced, and the message is retried like any failed attempt.
            _app = App.from_settings(get_settings(), pool_pre_ping=False)
        return _app


def set_app(app: App | None) -> None:
    """Install the process's App (tests), or None to have the next :func:`get_app` build one."""
    global _app
    _app = app
