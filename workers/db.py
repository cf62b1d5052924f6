"""Engine and session factory, built once per process; schema changes only through Alembic."""

from __future__ import annotations

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

    ``take_turns`` (SQLite, the HTTP intake): threads of the process queue on a lock for their
    transaction instead of sleeping in SQLite's busy handler.
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
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    if not take_turns:
        return engine

    # SQLite has one writer at a time, and every transaction here writes. Threads of one process
    # take turns on a lock held while a connection is checked out (a transaction, in this code)
    # instead of each sleeping in SQLite's busy handler, whose growing sleeps made waits long and
    # uneven. Other processes still meet at SQLite's own lock. Only for code that always returns
    # its connection on the thread that took it (the HTTP intake); the pipeline workers showed
    # stalls with it.
    turn = threading.RLock()

    @event.listens_for(engine, "checkout")
    def _on_checkout(*_: Any) -> None:
        turn.acquire()

    @event.listens_for(engine, "checkin")
    def _on_checkin(*_: Any) -> None:
        try:
            turn.release()
        except RuntimeError:  # checked in by another thread (pool cleanup at exit): nothing held
            pass

    return engine


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
