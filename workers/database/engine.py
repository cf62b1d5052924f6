"""Engine and session factory, built once per process; schema changes only through Alembic."""

from __future__ import annotations

import fcntl
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.orm import Session, sessionmaker

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"


def private_file(path: Path) -> None:
    """Create ``path`` (and its folder) readable by this user only, before SQLite opens it: it
    holds personal data. SQLite gives its -wal and -shm files the database file's mode."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
    if path.stat().st_mode & 0o077:  # a file made before this rule
        path.chmod(0o600)


def make_engine(url: str, take_turns: bool = False, **kwargs: Any) -> Engine:
    """An engine for ``url``; SQLite gets WAL, a busy timeout, and a transaction that takes the
    write lock at its first write (reads before it wait for nothing).

    ``take_turns`` (SQLite; the HTTP intake and the pipeline workers): transactions queue for
    the writer (:class:`Turns`) instead of sleeping in SQLite's busy handler.
    """
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        kwargs.setdefault("pool_pre_ping", True)
        kwargs.setdefault("pool_size", 10)
        return create_engine(url, **kwargs)

    file_db = bool(parsed.database) and parsed.database != ":memory:"
    if file_db:
        private_file(Path(str(parsed.database)))
    engine = create_engine(url, connect_args={"timeout": 60, "check_same_thread": False}, **kwargs)
    turns = Turns(parsed.database, enabled=take_turns)
    checkpoints = Checkpointer(str(parsed.database)) if take_turns and file_db else None

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # Take transaction control from pysqlite: no transaction until _on_execute opens one.
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute("PRAGMA busy_timeout=60000")
        cur.execute("PRAGMA foreign_keys=ON")
        if checkpoints is not None:
            cur.execute("PRAGMA wal_autocheckpoint=0")  # the checkpointer's thread does it
            checkpoints.ensure_running()
        cur.close()

    # Reads before a transaction's first write run on their own (autocommit), each seeing the
    # latest committed data, as under PostgreSQL's READ COMMITTED; they wait for no one, since
    # WAL readers never block. The first statement that is not a SELECT (an INSERT, UPDATE,
    # DELETE, DDL, or SQL text, whatever it says) begins the transaction with BEGIN IMMEDIATE
    # (after the process's turn, with take_turns), and the rest of it is serialised. SQLAlchemy
    # tells which is which: the statement object, not its text. Every write the stages make is
    # conditional on what they read (a state, a claim), so a read that is stale by then makes
    # the write match nothing rather than do harm. (A BEGIN IMMEDIATE for every transaction
    # would hold the one write lock over reads: a session reading inside another's, or reading
    # and then waiting on a mail server, would stop every writer.)
    @event.listens_for(engine, "before_execute")
    def _on_execute(
        conn: Any, statement: Any, _multiparams: Any, _params: Any, _options: Any
    ) -> None:
        dbapi_conn = conn.connection.dbapi_connection
        if dbapi_conn.in_transaction or getattr(statement, "is_select", False):
            return
        info = conn.connection.info
        if not info.get("turn"):
            turns.acquire(first=bool(_options.get(FIRST_TURN)))
            info["turn"] = True
        dbapi_conn.execute("BEGIN IMMEDIATE")

    @event.listens_for(engine, "checkin")
    def _on_checkin(_dbapi_conn: Any, record: Any) -> None:
        if record.info.pop("turn", False):
            turns.release()

    return engine


FIRST_TURN = "dearmp_first_turn"
"""An execution option: this transaction's writes go before those of the process's other
threads that are waiting for their turn (:class:`Turns`)."""


class Turns:
    """Who may write to a SQLite file next: threads queue on a lock, processes on a file lock.

    SQLite has one writer at a time. Left to SQLite, a waiting writer sleeps in its busy
    handler, 1, 2, 5, 10 ms and longer, and finds the lock taken again when it wakes: waits grow
    long and uneven, and most of a busy worker's time went there. Here a thread holds its
    process's turn, and the process an exclusive ``flock`` on ``<database>-turn``, from its
    transaction's first write until its connection goes back to the pool; the kernel wakes the
    next waiter the moment the holder lets go. Processes that do not take turns (a one-off
    command) still meet the others at SQLite's own lock.

    What it buys is short waits, above all for the commit that records a letter the mail server
    has accepted. ``bench.chaos`` on SQLite (SIGKILL every 4 s, 2 processes x 8 threads):
    without turns a kill resent 3.43 letters, their first copies accepted up to 903 ms before
    the kill; with them 0.14 to 0.21, at most 5 ms. Throughput is the same either way.

    A transaction that asks for the first turn (:data:`FIRST_TURN`: a letter's sent mark) goes
    before the process's other waiting threads. Queued with them, a sent mark waited 30 ms for
    its turn at the median and 104 ms at the 99th percentile in ``bench.chaos``.

    A release wakes only the thread that goes next. Waking every waiting thread, to find all
    but one still had to wait, took 8% of a pipeline worker's time with the GIL (py-spy);
    ``bench.pipeline --intake-groups 6`` on SQLite, five runs alternated: 576 to 641
    submissions/s and 2.08 to 2.33 ms of worker CPU each, against 544 to 608 and 2.19 to 2.43.
    """

    def __init__(self, path: str | None, enabled: bool = True) -> None:
        self.enabled = enabled
        self.path = f"{path}-turn" if enabled and path and path != ":memory:" else None
        lock = threading.Lock()
        self._next = threading.Condition(lock)  # threads waiting for a turn
        self._next_first = threading.Condition(lock)  # threads waiting for a first turn
        self._owner: int | None = None
        self._depth = 0
        self._first = 0  # threads waiting for a first turn
        self._waiting = 0
        self._fd: int | None = None
        self._pid = 0

    def _file(self) -> int | None:
        if self.path is None:
            return None
        if self._fd is None or self._pid != os.getpid():  # opened again in a forked child
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
            self._pid = os.getpid()
        return self._fd

    def acquire(self, first: bool = False) -> None:
        if not self.enabled:
            return
        me = threading.get_ident()
        queue = self._next_first if first else self._next
        with queue:
            if self._owner == me:
                self._depth += 1
                return
            self._first += first
            self._waiting += 1
            try:
                while self._owner is not None or (self._first and not first):
                    queue.wait()
            except BaseException:  # interrupted while waiting: pass on a wake-up it may have had
                self._first -= first
                self._wake()
                raise
            finally:
                self._waiting -= 1
            self._first -= first
            self._owner, self._depth = me, 1
        try:  # the process's turn is this thread's: now the other processes'
            fd = self._file()
            if fd is not None:
                fcntl.flock(fd, fcntl.LOCK_EX)
        except BaseException:
            self._depth = 1
            self.release()
            raise

    def release(self) -> None:
        if not self.enabled or self._owner != threading.get_ident():
            return  # checked in by another thread (pool cleanup at exit): nothing held here
        with self._next:
            self._depth -= 1
            if self._depth:
                return
            if self._fd is not None and self._pid == os.getpid():
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            self._owner = None
            self._wake()

    def _wake(self) -> None:
        """Wake the one thread that goes next, a first turn before the rest (lock held)."""
        if self._owner is None:
            (self._next_first if self._first else self._next).notify()

    def waiting(self) -> int:
        """How many threads are waiting for their turn."""
        with self._next:
            return self._waiting


class Checkpointer:
    """Copies SQLite's write-ahead log into the database file from a thread of its own.

    Left to SQLite, the commit that takes the log past 1,000 pages does the copy, with its
    fsyncs, while it still holds the write lock, and every writer in every process waits for
    it. Here the processes that take turns (workers, the HTTP intake) switch that off and run a
    PASSIVE checkpoint every ``interval`` seconds instead, which waits for no reader or writer.
    Other connections (commands, tests) keep SQLite's own checkpoints, and any of them also
    bounds the log.
    """

    def __init__(self, path: str, interval: float = 1.0) -> None:
        self.path = path
        self.interval = interval
        self._pid = 0
        self._lock = threading.Lock()

    def ensure_running(self) -> None:
        with self._lock:
            if self._pid == os.getpid():
                return
            self._pid = os.getpid()  # started again in a forked worker process
            threading.Thread(target=self._run, name="sqlite-checkpoint", daemon=True).start()

    def _run(self) -> None:
        connection = sqlite3.connect(self.path, timeout=60, isolation_level=None)
        while True:
            time.sleep(self.interval)
            try:
                connection.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
            except sqlite3.Error:  # busy or gone for a moment: the next round catches up
                continue


def make_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


def insert_on_conflict(bind: Session | Connection, table: Any) -> Any:
    """An ``INSERT`` into ``table`` that can say what to do ``ON CONFLICT`` (PostgreSQL and SQLite
    spell it alike; SQLAlchemy builds it from each dialect's own ``insert``)."""
    dialect = bind.get_bind().dialect if isinstance(bind, Session) else bind.dialect
    return (postgresql if dialect.name == "postgresql" else sqlite).insert(table)


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
