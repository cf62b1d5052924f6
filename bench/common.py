"""What the benchmarks share: the machine line they print, a database for a run, and the
application and worker environment on it."""

from __future__ import annotations

import contextlib
import os
import platform
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from config.settings import Settings
from tests.services import PostgresCluster
from workers.database.engine import session_scope
from workers.letters.definitions import update_definition
from workers.pipeline.app import App
from workers.pipeline.runtime import prepare
from workers.pipeline.states import STAGES as POLICIES
from workers.stages.stage import Stage

# The stages every benchmark submission goes through (``bench.stages`` runs each one's work).
STAGES = (
    Stage.VALIDATE,
    Stage.RESOLVE,
    Stage.CONSENT,
    Stage.COMPARE,
    Stage.RENDER,
    Stage.DELIVER,
)
# The stage messages a submission makes (with the intake's groups, a group's): a stage run in
# line by the worker before it sends none. The bare chain has as many no-op actors.
MESSAGES = sum(not POLICIES[stage].inline for stage in STAGES)
# The benchmarks' DEARMP_SECRET_KEY (32 characters, as the settings ask).
SECRET = "bench-secret-32-characters-long!"  # noqa: S105 (a benchmark's)


def machine() -> str:
    return (
        f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    )


def database_name(postgres: bool, durable: bool) -> str:
    """The database a run used, as its report names it."""
    if not postgres:
        return "SQLite"
    return "PostgreSQL (durable)" if durable else "PostgreSQL"


@contextlib.contextmanager
def databases(tmp: Path, postgres: bool, durable: bool = False) -> Iterator[Callable[[str], str]]:
    """A database URL for each name: a SQLite file each, or one throwaway PostgreSQL cluster's
    (``durable``: with fsync and synchronous commits, as production runs)."""
    cluster = PostgresCluster(tmp / "pg", durable=durable).start() if postgres else None
    try:
        yield lambda name: cluster.url() if cluster else f"sqlite:///{tmp / f'{name}.sqlite3'}"
    finally:
        if cluster:
            cluster.stop()


def bench_app(db_url: str, data_dir: Path, redis_url: str, **values: Any) -> App:
    """The application on a prepared database, with the sample campaign's limit of letters per
    MP lifted (all its letters go to one MP)."""
    settings = Settings(
        database_url=db_url, data_dir=data_dir, secret_key=SECRET, broker="redis",
        redis_url=redis_url, log_level="WARNING", **values,
    )  # fmt: skip
    app = App.from_settings(settings)
    prepare(app)
    with session_scope(app.sessions) as session:
        update_definition(session, "political-prisoners", rate_limit=None)
    return app


def worker_env(db_url: str, data_dir: Path, redis_url: str, **extra: str) -> dict[str, str]:
    """The environment of worker processes for :func:`bench_app`'s application."""
    return {
        **os.environ, "REDIS_URL": redis_url, "DATABASE_URL": db_url, "DEARMP_BROKER": "redis",
        "DEARMP_SECRET_KEY": SECRET, "DEARMP_DATA_DIR": str(data_dir),
        "DEARMP_LOG_LEVEL": "WARNING", "DEARMP_SANDBOX_ADDRESS": "sandbox@campaign.example.org",
        **extra,
    }  # fmt: skip
