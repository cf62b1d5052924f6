"""The API's probes: /healthz answers touching nothing; /readyz answers 200 only when the
database and Redis answer, and otherwise 503 naming what is down, with no URL or password."""

from __future__ import annotations

from typing import Any

import pytest

from tests.conftest import ApiClient
from workers.database.engine import make_engine, make_sessionmaker
from workers.pipeline.app import App
from workers.pipeline.embedded_redis import EmbeddedRedis
from workers.web.api import create_app

CLOSED = "redis://:hunter2@127.0.0.1:1/0"  # nothing listens on port 1


def probe(app: App, broker: Any, path: str, **headers: str) -> Any:
    with ApiClient(create_app(lambda: app, broker), raise_server_exceptions=False) as api:
        return api.get(path, headers=headers)


def database_down(app: App, tmp_path: Any) -> None:
    """A database SQLite cannot open: a folder where its file should be."""
    path = tmp_path / "x.sqlite3"
    app.engine = make_engine(f"sqlite:///{path}")
    path.unlink()
    path.mkdir()
    app.sessions = make_sessionmaker(app.engine)


def test_healthz_answers_with_the_database_and_redis_both_down(
    app: App, stub_broker: Any, tmp_path: Any
) -> None:
    database_down(app, tmp_path)
    app.settings.broker, app.settings.redis_url = "redis", CLOSED
    reply = probe(app, stub_broker, "/healthz", Origin="https://elsewhere.example")
    assert reply.status_code == 200 and reply.json()["status"] == "ok"


def test_readyz_without_redis_in_use_checks_the_database(app: App, stub_broker: Any) -> None:
    reply = probe(app, stub_broker, "/readyz")
    assert reply.status_code == 200
    assert reply.json() == {"status": "ready", "checks": {"database": "ok", "redis": "not used"}}
    assert reply.headers["cache-control"] == "no-store"


@pytest.mark.redis
def test_readyz_is_ready_with_redis_up(
    app: App, stub_broker: Any, redis_server: EmbeddedRedis
) -> None:
    app.settings.broker, app.settings.redis_url = "redis", redis_server.url
    reply = probe(app, stub_broker, "/readyz")
    assert reply.status_code == 200, reply.text
    assert reply.json()["checks"] == {"database": "ok", "redis": "ok"}


def test_readyz_with_redis_down_is_503_naming_redis_and_no_secret(
    app: App, stub_broker: Any
) -> None:
    app.settings.broker, app.settings.redis_url = "redis", CLOSED
    reply = probe(app, stub_broker, "/readyz", Origin="https://campaign.example.org")
    assert reply.status_code == 503
    data = reply.json()
    assert data["status"] == "unavailable" and data["checks"]["database"] == "ok"
    assert data["checks"]["redis"].startswith("unreachable (")
    assert "hunter2" not in reply.text and "127.0.0.1" not in reply.text


def test_readyz_with_the_database_down_is_503_naming_the_database(
    app: App, stub_broker: Any, tmp_path: Any
) -> None:
    database_down(app, tmp_path)
    reply = probe(app, stub_broker, "/readyz", Origin="https://campaign.example.org")
    assert reply.status_code == 503
    assert reply.json()["checks"] == {
        "database": "unreachable (OperationalError)",
        "redis": "not used",
    }


def test_probes_are_never_rate_limited(app: App, stub_broker: Any) -> None:
    app.settings.api_ip_limit = 1
    with ApiClient(create_app(lambda: app, stub_broker)) as api:
        answers = {api.get(path).status_code for path in ("/healthz", "/readyz") * 5}
    assert answers == {200}


def test_probes_answer_head_for_load_balancers(app: App, stub_broker: Any) -> None:
    with ApiClient(create_app(lambda: app, stub_broker)) as api:
        assert api.head("/healthz").status_code == api.head("/readyz").status_code == 200


def test_readyz_with_the_database_at_another_migration_is_503_saying_which(
    app: App, stub_broker: Any
) -> None:
    """The API's statements would fail one by one: not ready, and why."""
    from sqlalchemy import text

    with app.engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = '0021'"))
    reply = probe(app, stub_broker, "/readyz")
    assert reply.status_code == 503
    assert reply.json()["checks"]["database"] == (
        "the database is at migration 0021, this DearMP needs 0022: `dearmp migrate` brings "
        "it up to date"
    )


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_readyz_is_503_while_sqlite_cannot_be_written(
    app: App, stub_broker: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full disk: the intake answers 503 to every submission then, so not ready. (The write
    lock is health's to ask: a probe waiting for it beside the intake's writers would lose.)"""
    import shutil

    path = app.engine.url.database
    assert path is not None
    assert probe(app, stub_broker, "/readyz").status_code == 200

    usage = shutil.disk_usage(path)
    full = type(usage)(usage.total, usage.total, 0)
    monkeypatch.setattr(shutil, "disk_usage", lambda _: full)
    reply = probe(app, stub_broker, "/readyz")
    assert reply.status_code == 503
    said = reply.json()["checks"]["database"]
    assert said.startswith("the SQLite database's disk has 0 MiB free") and path not in said
