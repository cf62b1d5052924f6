"""Files that hold personal data are readable by their owner only."""

from __future__ import annotations

import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

from sqlalchemy import text

from workers.database.engine import make_engine
from workers.letters.mail import OutboxMailer, Outgoing


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_the_sqlite_database_and_its_journal_are_private(tmp_path: Path) -> None:
    path = tmp_path / "data" / "dearmp.sqlite3"
    engine = make_engine(f"sqlite:///{path}")
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE t (x TEXT)"))
        conn.execute(text("INSERT INTO t VALUES ('a supporter')"))
        for journal in (path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
            assert mode(journal) == 0o600
    assert mode(path) == 0o600 and mode(path.parent) == 0o700
    engine.dispose()
    path.chmod(0o644)  # a database made before the rule is made private when opened
    make_engine(f"sqlite:///{path}").dispose()
    assert mode(path) == 0o600


def test_a_second_engine_on_the_file_leaves_the_first_ones_locks_alone(tmp_path: Path) -> None:
    """A process that builds another engine on its database (migrations do) must not open and
    close the file itself: that drops the locks of its own SQLite connections, and another
    process that then closes last deletes the WAL under them (writes after that are lost)."""
    path = tmp_path / "dearmp.sqlite3"
    url = f"sqlite:///{path}"
    first = make_engine(url)
    with first.begin() as conn:
        conn.execute(text("CREATE TABLE t (x INTEGER)"))
    held = first.connect()  # a connection kept open, as a running process keeps its pool's
    held.exec_driver_sql("SELECT count(*) FROM t").scalar()  # a read: no transaction held
    make_engine(url).dispose()  # a second engine in this process (the migrations' own)
    other = (
        "import sqlite3, sys; c = sqlite3.connect(sys.argv[1]); "
        "c.execute('PRAGMA journal_mode=WAL'); c.execute('INSERT INTO t VALUES (1)'); "
        "c.commit(); c.close()"
    )
    subprocess.run([sys.executable, "-c", other, str(path)], check=True)
    assert path.with_name(path.name + "-wal").exists()  # the other process was not the last
    assert held.exec_driver_sql("SELECT count(*) FROM t").scalar() == 1
    held.close()
    first.dispose()


def test_letters_in_the_outbox_are_private(tmp_path: Path) -> None:
    outbox = tmp_path / "outbox"
    OutboxMailer(outbox).send(Outgoing("a@example.org", ["b@example.org"], b"x", "<id-1@x>"))
    assert mode(outbox) == 0o700 and mode(outbox / "id-1.eml") == 0o600


def test_the_demos_data_folder_and_logs_folder_are_private(
    tmp_path: Path, monkeypatch: Any
) -> None:
    from config.settings import get_settings
    from workers.cli.base import app_for_cli as _app
    from workers.pipeline.app import set_app

    data = tmp_path / "var"
    monkeypatch.setenv("DEARMP_DATA_DIR", str(data))
    monkeypatch.setenv("DEARMP_BROKER", "stub")
    get_settings.cache_clear()
    try:
        app = _app(data / "logs" / "dearmp.jsonl")
        app.engine.dispose()
    finally:
        set_app(None)
        get_settings.cache_clear()
    assert mode(data) == 0o700 and mode(data / "logs") == 0o700
