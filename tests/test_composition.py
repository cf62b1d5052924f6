"""What each kind of process builds, and how often: one App per process, however many threads
ask for it at once."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import make_settings
from workers.letters.mail import make_mailer
from workers.pipeline import app as app_module
from workers.pipeline.app import App, get_app, set_app


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
