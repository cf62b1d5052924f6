"""What each kind of process builds, and how often: one App per process, however many threads
ask for it at once, given to what needs it by the process's composition root."""

from __future__ import annotations

import ast
import threading
import time
from pathlib import Path
from typing import Any

import dramatiq
import pytest

from tests.conftest import make_settings
from workers.letters.mail import make_mailer
from workers.pipeline import app as app_module
from workers.pipeline import middleware
from workers.pipeline.actors import setup
from workers.pipeline.app import App, get_app, set_app
from workers.web import asgi

REPO = Path(__file__).resolve().parent.parent


def test_eight_threads_on_a_cold_start_build_one_app_and_one_mailer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cold worker's eight threads asking at once share one App, so one mailer (one set of
    relay sessions, one login)."""
    settings = make_settings(tmp_path, database_url=f"sqlite:///{tmp_path / 'db.sqlite3'}")
    mailers: list[Any] = []

    def slow_mailer(*args: Any) -> Any:
        time.sleep(0.05)  # as a real build takes time: the other threads arrive meanwhile
        mailers.append(make_mailer(*args))
        return mailers[-1]

    monkeypatch.setattr(app_module, "get_settings", lambda: settings)
    monkeypatch.setattr(app_module, "make_mailer", slow_mailer)
    set_app(None)
    start = threading.Barrier(8)
    got: list[App] = []

    def ask() -> None:
        start.wait()
        got.append(get_app())

    threads = [threading.Thread(target=ask) for _ in range(8)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        set_app(None)
    assert len(got) == 8 and len({id(app) for app in got}) == 1
    assert len(mailers) == 1
    got[0].engine.dispose()


def test_a_worker_process_builds_its_app_as_it_boots(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """setup() gives the broker's middleware where the App comes from; the App is built when
    the worker process boots, before its threads start (after logging is configured), and is
    the one its actors run with."""
    booted: list[str] = []
    application = App.from_settings(make_settings(tmp_path))

    def apps() -> App:
        booted.append("app")
        return application

    monkeypatch.setattr(middleware, "configure_logging", lambda level: booted.append("logging"))
    broker = setup(make_settings(tmp_path), apps)
    assert booted == []  # setting up builds nothing
    broker.emit_after("process_boot")
    assert booted == ["logging", "app"]
    application.engine.dispose()


ROOTS = {"workers/pipeline/app.py", "workers/pipeline/actors.py", "workers/cli/base.py"}


def test_only_the_composition_roots_fetch_the_process_app() -> None:
    """The broker, its middleware, the actors and the API are given the App; only the worker's
    setup() and the command line's app_for_cli() fetch it."""
    fetching = []
    for path in (REPO / "workers").rglob("*.py"):
        tree = ast.parse(path.read_text())
        names = {
            alias.name
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and node.module == "workers.pipeline.app"
            for alias in node.names
        }
        if "get_app" in names:
            fetching.append(str(path.relative_to(REPO)))
    assert set(fetching) <= ROOTS


def test_the_api_builds_its_app_and_broker_once_and_gives_them_to_the_application(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The API's factory builds one App and one broker and passes both in: nothing in the
    application fetches or builds the process's App."""
    settings = make_settings(tmp_path, database_url=f"sqlite:///{tmp_path / 'db.sqlite3'}")
    monkeypatch.setattr(asgi, "get_settings", lambda: settings)
    set_app(None)
    api: Any = asgi.application()
    intake = api.fastapi.state.intake
    assert intake.app_getter() is intake.app_getter() is intake.batcher.app_getter()
    assert intake.app_getter().settings is settings
    assert intake.broker is dramatiq.get_broker()
    assert app_module._app is None  # the process's slot is the worker's and the commands'
    intake.app_getter().engine.dispose()
