"""Engine and session factory, built once per process; schema changes only through Alembic."""

from __future__ import annotations

import fcntl
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"


def make_engine(url: str, take_turns: bool = False, **kwargs: Any) -> Engine:
    """An engine for ``url``; SQLite gets WAL, a busy timeout and write-locking transactions.

    ``take_turns`` (SQLite; the HTTP intake and the pipeline workers): transactions queue for
    the writer (:class:`Turns`) instead of sleeping in SQLite's busy handler.
    """
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        kwargs.setdefault("pool_pre_ping", True)
        kwargs.setdefault("pool_size", 10)
        return create_engine(url, **kwargs)

    if parsed.database and parsed.database != ":memory:":
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, connect_args={"timeout": 60, "check_same_thread": False}, **kwargs)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # Take transaction control from pysqlite so that BEGIN IMMEDIATE below is what runs:
        # every transaction takes the write lock up front and waits for it, instead of failing
        # with "database is locked" when a reader later tries to write.
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute("PRAGMA busy_timeout=60000")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        conn.connection.dbapi_connection.execute("BEGIN IMMEDIATE")  # straight to the driver

    if not take_turns:
        return engine
    _take_turns(engine, parsed.database)
    return engine


class Turns:
    """Who may write to a SQLite file next: threads queue on a lock, processes on a file lock.

    SQLite has one writer at a time and every transaction here writes (``BEGIN IMMEDIATE``).
    Left to SQLite, a waiter sleeps in its busy handler, 1, 2, 5, 10 ms and longer, and finds
    the lock taken again when it wakes: waits grow long and uneven, and most of a busy worker's
    time went there. Here a thread holds its process's lock, and the process an exclusive
    ``flock`` on ``<database>-turn``, while it has a connection checked out (a transaction, in
    this code); the kernel wakes the next waiter the moment the holder lets go. Processes that
    do not take turns (a one-off command) still meet the others at SQLite's own lock.
    """

    def __init__(self, path: str | None) -> None:
        self.path = f"{path}-turn" if path and path != ":memory:" else None
        self._thread = threading.RLock()
        self._depth = 0
        self._owner: int | None = None
        self._fd: int | None = None
        self._pid = 0

    def _file(self) -> int | None:
        if self.path is None:
            return None
        if self._fd is None or self._pid != os.getpid():  # opened again in a forked child
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
            self._pid = os.getpid()
        return self._fd

    def acquire(self) -> None:
        self._thread.acquire()
        if self._depth == 0:
            fd = self._file()
            if fd is not None:
                fcntl.flock(fd, fcntl.LOCK_EX)
            self._owner = threading.get_ident()
        self._depth += 1

    def release(self) -> None:
        if self._owner != threading.get_ident():
            return  # checked in by another thread (pool cleanup at exit): nothing held here
        self._depth -= 1
        if self._depth == 0:
            self._owner = None
            if self._fd is not None and self._pid == os.getpid():
                fcntl.flock(self._fd, fcntl.LOCK_UN)
        self._thread.release()


def _take_turns(engine: Engine, database: str | None) -> None:
    turns = Turns(database)

    @event.listens_for(engine, "checkout")
    def _on_checkout(*_: Any) -> None:
        turns.acquire()

    @event.listens_for(engine, "checkin")
    def _on_checkin(*_: Any) -> None:
        turns.release()


def make_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


@contextmanager
def session_scope(factory: sessionmaker[Session]) -> Iterator[Session]:
    """One session per unit of work: committed on success, rolled back on error, always closed."""
    session = factory()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def alembic_config(url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def migrate(url: str, revision: str = "head") -> None:
    """Bring the database at ``url`` up to ``revision``."""
    command.upgrade(alembic_config(url), revision)
