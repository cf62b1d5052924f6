"""What the API's endpoints share, as FastAPI dependencies: the App, the broker, the intake
batcher, campaigns' allowed origins, short-lived caches of campaign definitions, and the Redis
client the readiness probe pings."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Annotated, Any

import dramatiq
import redis
from fastapi import Depends, Request
from sqlalchemy import select

from schemas.campaign import CampaignDefinition
from workers.database.engine import session_scope
from workers.database.models import Campaign
from workers.letters.definitions import get_definition
from workers.mp.directory import example_postcode
from workers.pipeline.app import App
from workers.web.batcher import IntakeBatcher

DEFINITION_TTL = 5.0  # seconds a campaign edit takes to reach the API
ORIGINS_TTL = 30.0
MISSING: Any = object()


class Timed:
    """Values kept for ``ttl`` seconds, each computed on first use (a thousand at most)."""

    def __init__(self, ttl: float) -> None:
        self.ttl = ttl
        self._values: dict[str, tuple[float, Any]] = {}

    def fresh(self, key: str) -> Any:
        """The value while it is fresh, else ``MISSING`` (computes nothing)."""
        found = self._values.get(key)
        return found[1] if found is not None and time.monotonic() - found[0] < self.ttl else MISSING

    def get(self, key: str, compute: Callable[[], Any]) -> Any:
        value = self.fresh(key)
        if value is MISSING:
            value = compute()
            if len(self._values) > 1000:
                self._values.clear()
            self._values[key] = (time.monotonic(), value)
        return value


class CampaignOrigins:
    """Allowed origins per campaign, re-read from the database at most every 30 s."""

    def __init__(self, app_getter: Callable[[], App]) -> None:
        self.app_getter = app_getter
        self.loaded_at = -1e9
        self.by_slug: dict[str, set[str]] = {}
        self.lock = threading.Lock()

    def _load(self) -> dict[str, set[str]]:
        now = time.monotonic()
        with self.lock:
            if now - self.loaded_at > ORIGINS_TTL:
                with session_scope(self.app_getter().sessions) as session:
                    slugs = session.scalars(select(Campaign.slug)).all()
                    self.by_slug = {
                        slug: set(d.allowed_origins)
                        for slug in slugs
                        if (d := get_definition(session, slug)) is not None
                    }
                self.loaded_at = now
            return self.by_slug

    def for_path(self, path: str) -> set[str]:
        by_slug = self._load()
        parts = path.split("/")
        if len(parts) > 3 and parts[1:3] == ["v1", "campaigns"]:
            return by_slug.get(parts[3], set())
        return set().union(*by_slug.values()) if by_slug else set()

    def slugs(self) -> list[str]:
        return list(self._load())

    def allows(self, slug: str, origin: str) -> bool:
        return origin in self._load().get(slug, set())


class Intake:
    """The API's shared state: one per application (``app.state.intake``)."""

    def __init__(self, app_getter: Callable[[], App], broker: dramatiq.Broker) -> None:
        self.app_getter = app_getter
        self.broker = broker
        self.batcher = IntakeBatcher(app_getter, broker)
        self.origins = CampaignOrigins(app_getter)
        self.definitions = Timed(DEFINITION_TTL)
        self.examples = Timed(DEFINITION_TTL)
        self._redis: redis.Redis | None = None
        self._redis_lock = threading.Lock()

    def redis_client(self) -> redis.Redis | None:
        """A client for the Redis the rate limits and the broker use (None with the stub
        broker: then the API uses none), built on first use, with short timeouts."""
        settings = self.app_getter().settings
        if settings.broker != "redis":
            return None
        with self._redis_lock:
            if self._redis is None:
                self._redis = redis.Redis.from_url(
                    settings.resolved_redis_url, socket_connect_timeout=2, socket_timeout=2
                )
            return self._redis

    def cached_definition(self, slug: str) -> CampaignDefinition | Any | None:
        """The cached definition while fresh, else ``MISSING`` (no database access here)."""
        return self.definitions.fresh(slug[:64])

    def definition(self, slug: str) -> CampaignDefinition | None:
        """The campaign's definition, read from the database at most every few seconds."""

        def read() -> CampaignDefinition | None:
            with session_scope(self.app_getter().sessions) as session:
                return get_definition(session, slug)

        found: CampaignDefinition | None = self.definitions.get(slug[:64], read)
        return found

    def example_postcode(self) -> str | None:
        """A postcode the directory knows, for the page's hint."""

        def read() -> str | None:
            with session_scope(self.app_getter().sessions) as session:
                return example_postcode(session)

        found: str | None = self.examples.get("", read)
        return found


# Async: they compute nothing, so they run on the event loop, not in a thread of their own.
async def _intake(request: Request) -> Intake:
    intake: Intake = request.app.state.intake
    return intake


async def _app(request: Request) -> App:
    intake: Intake = request.app.state.intake
    return intake.app_getter()


IntakeDep = Annotated[Intake, Depends(_intake)]
AppDep = Annotated[App, Depends(_app)]
