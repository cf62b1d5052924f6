"""What the API's endpoints share, as FastAPI dependencies: the App, the broker, the intake
batcher, short-lived caches of campaigns' definitions and allowed origins, and a Redis client."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Annotated, Any, Generic, TypeVar, cast

import dramatiq
import redis
from fastapi import Depends, Request
from sqlalchemy import select
from sqlalchemy.orm import Session

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
T = TypeVar("T")


class Timed(Generic[T]):
    """Values kept for ``ttl`` seconds, each computed on first use (a thousand at most)."""

    def __init__(self, ttl: float) -> None:
        self.ttl = ttl
        self._values: dict[str, tuple[float, T]] = {}
        self._lock = threading.Lock()

    def fresh(self, key: str) -> Any:
        """The value while it is fresh, else ``MISSING`` (computes nothing)."""
        found = self._values.get(key)
        return found[1] if found is not None and time.monotonic() - found[0] < self.ttl else MISSING

    def get(self, key: str, compute: Callable[[], T]) -> T:
        value: T = self.fresh(key)
        if value is MISSING:
            with self._lock:  # one thread computes a stale value; the others wait for it
                value = self.fresh(key)
                if value is MISSING:
                    value = compute()
                    if len(self._values) > 1000:
                        self._values.clear()
                    self._values[key] = (time.monotonic(), value)
        return value


def _origins(session: Session) -> dict[str, set[str]]:
    slugs = session.scalars(select(Campaign.slug)).all()
    return {
        slug: set(d.allowed_origins)
        for slug in slugs
        if (d := get_definition(session, slug)) is not None
    }


class Intake:
    """The API's shared state: one per application (``app.state.intake``)."""

    def __init__(self, app_getter: Callable[[], App], broker: dramatiq.Broker) -> None:
        self.app_getter = app_getter
        self.broker = broker
        self.batcher = IntakeBatcher(app_getter, broker)
        self.definitions: Timed[CampaignDefinition | None] = Timed(DEFINITION_TTL)
        self.examples: Timed[str | None] = Timed(DEFINITION_TTL)
        self.origins: Timed[dict[str, set[str]]] = Timed(ORIGINS_TTL)
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

    def read(self, query: Callable[..., T], *args: Any) -> T:
        """``query(session, *args)``, in a transaction of its own."""
        with session_scope(self.app_getter().sessions) as session:
            return query(session, *args)

    def definition(self, slug: str) -> CampaignDefinition | None:
        """The campaign's definition, read from the database at most every few seconds."""
        return self.definitions.get(slug[:64], lambda: self.read(get_definition, slug))

    def example_postcode(self) -> str | None:
        """A postcode the directory knows, for the page's hint."""
        return self.examples.get("", lambda: self.read(example_postcode))

    def origins_by_slug(self) -> dict[str, set[str]]:
        """Allowed origins per campaign, re-read from the database at most every 30 s."""
        return self.origins.get("", lambda: self.read(_origins))

    def origins_for(self, path: str) -> set[str]:
        """For CORS: a campaign's origins for /v1/campaigns/{slug}/..., every campaign's
        elsewhere (/v1/submissions checks the body's campaign)."""
        by_slug = self.origins_by_slug()
        parts = path.split("/")
        if len(parts) > 3 and parts[1:3] == ["v1", "campaigns"]:
            return by_slug.get(parts[3], set())
        return set().union(*by_slug.values())


# Async: they compute nothing, so they run on the event loop, not in a thread of their own.
async def _intake(request: Request) -> Intake:
    return cast(Intake, request.app.state.intake)


IntakeDep = Annotated[Intake, Depends(_intake)]


async def _app(intake: IntakeDep) -> App:
    return intake.app_getter()


AppDep = Annotated[App, Depends(_app)]
