"""Engine and session factory, built once per process; schema changes only through Alembic."""

from __future__ import annotations

import os
import shutil
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from typing import Any

import structlog
from alembic import command
from alembic.config import Config
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.exc import DBAPIError, OperationalError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from config.settings import ConfigurationError

log = structlog.get_logger(__name__)
MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
# busy_timeout: a writer waits up to 30 s for the write lock, half a stage's time limit: a lock
# held longer (by another process) is passing trouble, waited out, not the limit's kill.
# secure_delete: what is deleted or overwritten is zeroed, a long letter's overflow pages too,
# so an erased supporter's details are not left in the file's free space.
BUSY_TIMEOUT = "busy_timeout=30000"
SQLITE_PRAGMAS = (
    "journal_mode=WAL",
    "synchronous=NORMAL",
    BUSY_TIMEOUT,
    "foreign_keys=ON",
    "secure_delete=ON",
)
# Less free space than this on the SQLite file's disk, and writes may fail (see unwritable).
DISK_FLOOR_MIB = 16


def private_file(path: Path) -> None:
    """Create ``path`` (and its folder) readable by this user only before SQLite opens it (it
    holds personal data); SQLite gives its -wal and -shm files the same mode. A file that is
    there is never opened here: closing any descriptor of it would drop every lock this
    process's SQLite connections hold on it (POSIX locks), and another process would then
    checkpoint and delete the WAL under them."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    except FileExistsError:
        if path.stat().st_mode & 0o077:  # a file made before this rule
            path.chmod(0o600)


def make_engine(url: str, **kwargs: Any) -> Engine:
    """An engine for ``url``. SQLite gets SQLAlchemy's recipe for pysqlite (SQLAlchemy, not the
    driver, begins transactions), WAL, a busy timeout, and the write lock at the first write."""
    parsed = make_url(url)
    # A failed statement's error names its values (a letter, an address) unless hidden: its text
    # goes to the failures table, the logs and a retried message in Redis.
    kwargs.setdefault("hide_parameters", True)
    if parsed.get_backend_name() != "sqlite":
        kwargs.setdefault("pool_pre_ping", True)
        kwargs.setdefault("pool_size", 10)
        if parsed.drivername == "postgresql":  # SQLAlchemy 2.0 would take psycopg2, not installed
            parsed = parsed.set(drivername="postgresql+psycopg")
        if parsed.get_driver_name() != "psycopg":
            return create_engine(parsed, **kwargs)
        if "connect_timeout" not in parsed.query:  # libpq waits without end for a hung server
            kwargs.setdefault("connect_args", {"connect_timeout": 10})
        import psycopg

        # SQLAlchemy writes PostgreSQL's own $1 placeholders and psycopg's raw cursors send them
        # as they are: psycopg no longer parses every statement to rewrite %(name)s (uncached
        # for a group's multi-row INSERT, a seventh of a worker's time).
        engine = create_engine(parsed, paramstyle="numeric_dollar", **kwargs)

        @event.listens_for(engine, "connect")
        def _raw_cursors(dbapi_conn: Any, _record: Any) -> None:
            dbapi_conn.cursor_factory = psycopg.RawCursor
            dbapi_conn.server_cursor_factory = psycopg.RawServerCursor  # streamed results

        return engine

    if parsed.database and parsed.database != ":memory:":
        try:
            private_file(Path(str(parsed.database)))
        except OSError as exc:
            where = f"{exc.strerror}: {exc.filename}" if exc.filename else exc.strerror
            raise ConfigurationError(
                [f"DATABASE_URL: no SQLite file can be made at {parsed.database} ({where})"]
            ) from None
    engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False}, **kwargs)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # Take transaction control from pysqlite: no transaction until _on_execute opens one.
        dbapi_conn.isolation_level = None
        for pragma in SQLITE_PRAGMAS:
            dbapi_conn.execute(f"PRAGMA {pragma}")

    # Reads before a transaction's first write run on their own (autocommit), seeing the latest
    # committed data and waiting for no one (WAL). The first statement that is not a SELECT
    # (by the statement object: SQL text counts as a write; ``exec_driver_sql`` goes around this)
    # begins the transaction with BEGIN IMMEDIATE: it never holds a read snapshot that a write
    # would have to upgrade, which SQLite refuses once another writer has committed. The
    # stages' writes are conditional on what they read, so a stale read makes a write match
    # nothing. (BEGIN IMMEDIATE at every start would hold the one write lock over reads, and a
    # session waiting on a mail server would stop every writer.)
    @event.listens_for(engine, "before_execute")
    def _on_execute(
        conn: Any, statement: Any, _multiparams: Any, _params: Any, _options: Any
    ) -> None:
        dbapi_conn = conn.connection.dbapi_connection
        if not dbapi_conn.in_transaction and not getattr(statement, "is_select", False):
            try:
                dbapi_conn.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:  # as SQLAlchemy wraps the driver's (a lock: passing)
                raise DBAPIError.instance("BEGIN IMMEDIATE", None, exc, sqlite3.Error) from exc

    return engine


def forget_old_pages(engine: Engine, wait_ms: int = 2000) -> bool:
    """On SQLite, copy the write-ahead log into the file and truncate it: the log still holds
    the pages as they were before an erasure. Writers wait meanwhile, for ``wait_ms`` at most;
    False if a reader kept the log that long (a later checkpoint truncates it)."""
    if engine.dialect.name != "sqlite":
        return True
    with engine.connect() as conn:
        conn.exec_driver_sql(f"PRAGMA busy_timeout={wait_ms}")
        try:
            busy = conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)").scalar()
        finally:
            conn.exec_driver_sql(f"PRAGMA {BUSY_TIMEOUT}")
    return not busy


def unwritable(engine: Engine, wait_ms: int | None = 2000) -> str | None:
    """On SQLite, why nothing can be written now, in one line naming no path: its disk (nearly)
    full, or (unless ``wait_ms`` is None) the write lock held by another for ``wait_ms``; else
    None (and on PostgreSQL, whose server answers for itself). The lock is taken and let go at
    once (``BEGIN IMMEDIATE``, ``ROLLBACK``)."""
    path = engine.url.database
    if engine.dialect.name != "sqlite" or not path or path == ":memory:":
        return None
    cannot = "nothing can be accepted or sent"
    free_mib = shutil.disk_usage(Path(path).parent).free // 2**20
    if free_mib < DISK_FLOOR_MIB:
        said = f"the SQLite database's disk has {free_mib} MiB free"
        return f"{said} (less than {DISK_FLOOR_MIB} MiB): {cannot}"
    if wait_ms is None:
        return None
    with engine.connect() as conn:
        conn.exec_driver_sql(f"PRAGMA busy_timeout={wait_ms}")
        try:
            conn.exec_driver_sql("BEGIN IMMEDIATE")
            conn.exec_driver_sql("ROLLBACK")
        except OperationalError as exc:
            if getattr(exc.orig, "sqlite_errorname", None) != "SQLITE_BUSY":
                raise
            return (
                "another process holds the SQLite database's write lock (waited "
                f"{wait_ms / 1000:g} s): {cannot}"
            )
        finally:
            conn.exec_driver_sql(f"PRAGMA {BUSY_TIMEOUT}")
    return None


def write_lock(session: Session) -> None:
    """Begin the transaction's writing now: on SQLite, its one write lock, so that what is read
    next stays so until the commit (see :func:`make_engine`); PostgreSQL locks rows instead."""
    if session.get_bind().dialect.name == "sqlite":
        session.execute(text("SAVEPOINT dearmp_write"))  # a statement that is not a SELECT
        session.execute(text("RELEASE dearmp_write"))


def make_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


def dialect_insert(dialect: str, table: Any) -> Any:
    """An ``INSERT`` into ``table`` that can say what to do ``ON CONFLICT`` (PostgreSQL and SQLite
    spell it alike), for the dialect named ``dialect``."""
    return (postgresql if dialect == "postgresql" else sqlite).insert(table)


def insert_on_conflict(bind: Session | Connection, table: Any) -> Any:
    """:func:`dialect_insert` for ``bind``'s dialect."""
    dialect = bind.get_bind().dialect if isinstance(bind, Session) else bind.dialect
    return dialect_insert(dialect.name, table)


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


class SchemaProblem(Exception):
    """The database is not at this code's migration: :func:`schema_problem`'s line."""


def migrate(url: str, revision: str = "head") -> None:
    """Bring the database at ``url`` up to ``revision``; :class:`SchemaProblem` when it is at a
    migration this code does not know (Alembic cannot go from there)."""
    try:
        command.upgrade(alembic_config(url), revision)
    except CommandError:
        engine = make_engine(url)
        try:
            problem = schema_problem(engine)
        finally:
            engine.dispose()
        if problem is None or "does not know" not in problem:
            raise  # Alembic's own answer: a database this code knows that it could not move
        raise SchemaProblem(problem) from None


@cache
def _code_revisions() -> tuple[frozenset[str], frozenset[str]]:
    """This code's newest migrations (its heads) and every migration it knows, read once."""
    scripts = ScriptDirectory.from_config(alembic_config(""))
    return frozenset(scripts.get_heads()), frozenset(s.revision for s in scripts.walk_revisions())


def schema_problem(engine: Engine) -> str | None:
    """None when the database is at this code's newest migration; else one line saying where
    it is and what to do. Errors reaching the database are raised."""
    heads, known = _code_revisions()
    with engine.connect() as conn:
        current = frozenset(MigrationContext.configure(conn).get_current_heads())
    if current == heads:
        return None
    if not current:
        return (
            "the database has no DearMP tables yet: `dearmp migrate` makes them (or "
            "DATABASE_URL names another database)"
        )
    at = ", ".join(sorted(current))
    if current - known:
        return (
            f"the database is at migration {at}, which this DearMP does not know: a newer "
            "DearMP migrated it (run that version, or restore a backup)"
        )
    return (
        f"the database is at migration {at}, this DearMP needs {', '.join(sorted(heads))}: "
        "`dearmp migrate` brings it up to date"
    )


def check_schema(engine: Engine) -> None:
    """:class:`SchemaProblem` unless the database is at this code's newest migration: what a
    long-running process checks once, at its start, rather than fail statement by statement.
    A database away at the start is not a reason not to start (it may come up after us: a
    supervisor's restarts would be spent): that is logged, and the process starts."""
    try:
        problem = schema_problem(engine)
    except SQLAlchemyError as exc:
        log.warning("schema_not_checked", error=type(exc).__name__)
        return
    if problem is not None:
        raise SchemaProblem(problem)
