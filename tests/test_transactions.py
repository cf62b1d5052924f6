"""A stage's group in one transaction, and SQLite's write lock taken at the first write."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

from sqlalchemy import Column, MetaData, Table, Text, event, func, select, text
from sqlalchemy.orm import Session

from tests.factories import submission
from workers.database.engine import make_engine, make_sessionmaker, session_scope
from workers.database.models import State, Submission
from workers.database.transitions import AlreadyMoved, Apply, current, run_group
from workers.pipeline.app import App
from workers.pipeline.intake import accept
from workers.stages.validation import plan

DONE = Table("done", MetaData(), Column("item", Text, primary_key=True))


def _scratch(tmp_path: Path) -> Any:
    engine = make_engine(f"sqlite:///{tmp_path / 'scratch.sqlite3'}")
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE IF NOT EXISTS done (item TEXT PRIMARY KEY)"))
    return engine


def _work(runs: dict[str, int]) -> Any:
    """A stage whose write inserts its item: "moved" was moved by another worker first, "bad"
    fails its write, and "undecided" fails its decision."""

    def work(session: Session, item: str) -> Apply[str]:
        if item == "undecided":
            raise ValueError("cannot decide")

        def write(session: Session) -> str:
            runs[item] = runs.get(item, 0) + 1
            if item == "moved":
                raise AlreadyMoved(item)
            session.execute(text("INSERT INTO done VALUES (:i)"), {"i": item})
            if item == "bad":
                raise ValueError("this one is broken")
            return item

        return write

    return work


def _done(engine: Any) -> list[str]:
    with engine.connect() as conn:
        return sorted(conn.execute(text("SELECT item FROM done")).scalars())


def test_a_group_is_one_transaction_and_each_gets_its_own_result(tmp_path: Path) -> None:
    engine = _scratch(tmp_path)
    commits = [0]
    event.listen(engine, "commit", lambda _conn: commits.__setitem__(0, commits[0] + 1))
    runs: dict[str, int] = {}
    outcomes = run_group(make_sessionmaker(engine), ["c", "a", "moved", "b", "a"], _work(runs))
    # In the order of the ids (row locks taken in one order), each id once.
    assert [sid for sid, _, _ in outcomes] == ["a", "b", "c", "moved"]
    assert [value for _, value, _ in outcomes][:3] == ["a", "b", "c"]
    assert isinstance(outcomes[3][2], AlreadyMoved)
    assert commits == [1] and _done(engine) == ["a", "b", "c"]


def test_a_decision_that_fails_fails_that_submission_alone(tmp_path: Path) -> None:
    engine = _scratch(tmp_path)
    outcomes = run_group(make_sessionmaker(engine), ["a", "undecided", "b"], _work({}))
    errors = {sid: error for sid, _, error in outcomes}
    assert isinstance(errors.pop("undecided"), ValueError)
    assert errors == {"a": None, "b": None} and _done(engine) == ["a", "b"]


def test_a_decision_the_database_failed_runs_the_group_again_each_alone(db_url: str) -> None:
    """A database error in one decision can spend the transaction (PostgreSQL's "current
    transaction is aborted"; a dropped connection's PendingRollbackError): the decisions after
    it failed with that, counted against their submissions."""
    engine = make_engine(db_url)
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE done (item TEXT PRIMARY KEY)"))
    work = _work({})

    def plan(session: Session, item: str) -> Apply[str]:
        if item == "broken":
            session.execute(text("SELECT * FROM no_such_table"))
        session.execute(select(func.count()).select_from(DONE))  # each decision reads
        return work(session, item)

    outcomes = run_group(make_sessionmaker(engine), ["broken", "c"], plan)
    errors = {sid: error for sid, _, error in outcomes}
    assert "no_such_table" in str(errors.pop("broken"))
    assert errors == {"c": None} and _done(engine) == ["c"]
    engine.dispose()


def test_an_error_in_a_write_rolls_the_group_back_and_each_runs_again_alone(
    tmp_path: Path,
) -> None:
    engine = _scratch(tmp_path)
    runs: dict[str, int] = {}
    outcomes = run_group(make_sessionmaker(engine), ["a", "b", "bad", "c"], _work(runs))
    errors = {sid: error for sid, _, error in outcomes}
    assert isinstance(errors.pop("bad"), ValueError)
    assert errors == {"a": None, "b": None, "c": None}
    assert _done(engine) == ["a", "b", "c"]  # the good ones committed once each
    assert runs == {"a": 2, "b": 2, "bad": 2, "c": 1}  # "c" came after "bad" the first time


def test_a_group_of_validations_moves_each_submission_once(app: App) -> None:
    with session_scope(app.sessions) as session:
        ids = [accept(session, submission(), app.secret).submission_id for _ in range(6)]
        bad = accept(session, submission(supporter__email="not an email"), app.secret)
    commits = [0]
    event.listen(app.engine, "commit", lambda _conn: commits.__setitem__(0, commits[0] + 1))
    outcomes = run_group(app.sessions, [*ids, bad.submission_id], plan)
    assert all(error is None for _, _, error in outcomes)
    assert commits == [1]  # one transaction: the moves of all seven made together
    again = run_group(app.sessions, ids, plan)  # a duplicate message: nothing left to do
    assert all(value == [] for _, value, _ in again)
    with session_scope(app.sessions) as session:
        for sid in ids:
            row = current(session, sid)
            assert row is not None and row.state == State.VALIDATED
            assert len(session.get(Submission, sid).events) == 2  # type: ignore[union-attr]
        row = current(session, bad.submission_id)
        assert row is not None and row.state == State.REJECTED


def test_a_submission_another_worker_moves_mid_group_is_told_so_and_the_rest_move_once(
    app: App,
) -> None:
    """The group's moves are made together at the end: when one of them matches nothing
    (another worker moved that submission after this group read it), the group is rolled back
    and each submission runs again alone, so the others move once and that one does nothing."""
    with session_scope(app.sessions) as session:
        ids = sorted(accept(session, submission(), app.secret).submission_id for _ in range(4))
    taken = ids[1]

    def racing(session: Session, submission_id: str) -> Apply[Any]:
        write = plan(session, submission_id)
        if submission_id == taken and not raced:
            raced.append(submission_id)
            with session_scope(app.sessions) as other:  # another worker, in between
                plan(other, submission_id)(other)
        return write

    raced: list[str] = []
    outcomes = {sid: (value, error) for sid, value, error in run_group(app.sessions, ids, racing)}
    assert outcomes.pop(taken) == ([], None)  # alone, it finds nothing left to do
    assert all(error is None and value for value, error in outcomes.values())
    with session_scope(app.sessions) as session:
        for sid in ids:
            row = current(session, sid)
            assert row is not None and row.state == State.VALIDATED
            assert len(session.get(Submission, sid).events) == 2  # type: ignore[union-attr]


def test_reads_on_sqlite_do_not_wait_for_a_writer(tmp_path: Path) -> None:
    engine = _scratch(tmp_path)
    other = make_engine(f"sqlite:///{tmp_path / 'scratch.sqlite3'}")
    with engine.connect() as writer:
        writer.execute(text("INSERT INTO done VALUES ('pending')"))  # holds the write lock
        started = time.monotonic()
        with other.connect() as reader:  # sees the last commit, at once
            assert reader.execute(select(func.count()).select_from(DONE)).scalar() == 0
            # A SELECT with a CTE is a read too (the statement object says so, not its text).
            counted = select(func.count()).select_from(select(DONE.c.item).cte())
            assert reader.execute(counted).scalar() == 0
            assert not reader.connection.dbapi_connection.in_transaction  # type: ignore[union-attr]
        assert time.monotonic() - started < 1

        finished = threading.Event()

        def write() -> None:
            with other.begin() as conn:
                conn.execute(text("INSERT INTO done VALUES ('second')"))
            finished.set()

        thread = threading.Thread(target=write)
        thread.start()
        assert not finished.wait(0.3)  # a second writer waits for the first
        writer.commit()
        assert finished.wait(10)
        thread.join()
    with other.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM done")).scalar() == 2


def test_a_write_lock_held_elsewhere_is_sqlalchemys_operational_error_passing_trouble(
    tmp_path: Path,
) -> None:
    """The driver's own error escaped the BEGIN IMMEDIATE of the engine's hook: the intake
    answered a bare 500 and workers counted another process's lock against a letter."""
    import sqlite3

    from sqlalchemy.exc import OperationalError

    from workers.pipeline.failures import passing

    engine = _scratch(tmp_path)
    holder = sqlite3.connect(tmp_path / "scratch.sqlite3", isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        with engine.connect() as conn:
            conn.exec_driver_sql("PRAGMA busy_timeout=50")
            try:
                conn.execute(text("INSERT INTO done VALUES ('x')"))
            except Exception as exc:
                caught: Exception = exc
            else:
                raise AssertionError("the write did not wait for the lock")
    finally:
        holder.rollback()
        holder.close()
    assert isinstance(caught, OperationalError) and passing(caught)
    assert "database is locked" in str(caught)


def test_two_threads_writing_at_once_on_a_sqlite_file_both_commit(tmp_path: Path) -> None:
    """No scheduler of our own: SQLite's busy timeout makes each writer wait for the other, and
    every row of both gets written."""
    engine = _scratch(tmp_path)
    failed: list[BaseException] = []
    start = threading.Barrier(2)

    def write(name: str) -> None:
        try:
            start.wait(10)
            for index in range(200):
                with engine.begin() as conn:
                    conn.execute(select(func.count()).select_from(DONE)).scalar()
                    conn.execute(DONE.insert().values(item=f"{name}-{index}"))
        except BaseException as exc:  # pragma: no cover - reported below
            failed.append(exc)

    threads = [threading.Thread(target=write, args=(name,)) for name in ("a", "b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert failed == []
    with engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(DONE)).scalar() == 400
    engine.dispose()


def test_a_write_begins_immediate_so_a_read_then_write_is_never_refused(tmp_path: Path) -> None:
    """A transaction that has written holds SQLite's write lock from its first write (BEGIN
    IMMEDIATE): another's read-then-write waits for it, and is not refused the upgrade of a
    read snapshot ("database is locked") that a deferred BEGIN would give it."""
    engine = _scratch(tmp_path)
    statements: list[str] = []
    event.listen(engine, "before_cursor_execute", lambda *a: statements.append(a[2]))
    with engine.connect() as conn:
        conn.execute(select(func.count()).select_from(DONE))
        conn.execute(DONE.insert().values(item="first"))
        dbapi = conn.connection.dbapi_connection
        assert dbapi is not None and dbapi.in_transaction
        conn.commit()
    assert not any(s.startswith("BEGIN") and "IMMEDIATE" not in s for s in statements)

    other = make_engine(f"sqlite:///{tmp_path / 'scratch.sqlite3'}")
    errors: list[BaseException] = []
    read = threading.Event()

    def read_then_write() -> None:
        try:
            with other.begin() as conn:
                conn.execute(select(func.count()).select_from(DONE)).scalar()  # a read snapshot
                read.set()
                time.sleep(0.2)  # meanwhile the other transaction writes and commits
                conn.execute(DONE.insert().values(item="after"))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    with engine.connect() as writer:
        thread = threading.Thread(target=read_then_write)
        thread.start()
        assert read.wait(10)
        writer.execute(DONE.insert().values(item="between"))
        writer.commit()
        thread.join(30)
    assert errors == []
    with engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(DONE)).scalar() == 3
    other.dispose()
    engine.dispose()


def test_sqlite_engines_use_wal_a_busy_timeout_and_sqlites_own_checkpoints(tmp_path: Path) -> None:
    engine = _scratch(tmp_path)
    with engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30000
        assert conn.exec_driver_sql("PRAGMA wal_autocheckpoint").scalar() == 1000
    engine.dispose()


def test_statements_keep_percent_signs_and_placeholder_lookalikes_as_text(db_url: str) -> None:
    # On PostgreSQL, SQLAlchemy writes $1 placeholders that psycopg sends as they are: a
    # literal %, and values that look like placeholders, are text like any other.
    engine = make_engine(db_url)
    table = Table("lookalikes", MetaData(), Column("value", Text, primary_key=True))
    values = ["100%", "%(value)s", "%s", "$1", ":value", "?"]
    try:
        with engine.begin() as conn:
            table.create(conn)
            conn.execute(table.insert(), [{"value": v} for v in values])
            found = (
                conn.execute(
                    select(table.c.value)
                    .where(table.c.value.like(text("'%' || :tail")))
                    .order_by(table.c.value),
                    {"tail": "s"},
                )
                .scalars()
                .all()
            )
            assert found == sorted(["%(value)s", "%s"])
            assert conn.execute(text("SELECT '100%' || :x"), {"x": "$1"}).scalar() == "100%$1"
            returned = (
                conn.execute(
                    table.insert().returning(table.c.value), [{"value": f"{v}!"} for v in values]
                )
                .scalars()
                .all()
            )
            assert sorted(returned) == sorted(f"{v}!" for v in values)
            # A streamed result (a server-side cursor on PostgreSQL) with a bound value.
            streamed = conn.execution_options(yield_per=2).execute(
                select(table.c.value).where(table.c.value.like("%!")).order_by(table.c.value)
            )
            assert list(streamed.scalars()) == sorted(f"{v}!" for v in values)
    finally:
        engine.dispose()


def test_a_postgresql_url_without_a_driver_runs_on_psycopg_with_its_raw_cursors() -> None:
    # SQLAlchemy 2.0 would take psycopg2 for postgresql://, which DearMP does not install.
    engine = make_engine("postgresql://dearmp:secret@127.0.0.1:1/dearmp")
    try:
        assert engine.dialect.driver == "psycopg"
        assert engine.dialect.paramstyle == "numeric_dollar"
        assert engine.url.render_as_string(hide_password=True).startswith("postgresql+psycopg://")
    finally:
        engine.dispose()


def test_a_message_for_a_submission_the_database_does_not_have_is_logged(app: App) -> None:
    """Done, as for one deleted since, but said: a worker on another database acknowledged
    every message without a word."""
    from structlog.testing import capture_logs

    with capture_logs() as logs:
        [(sid, value, error)] = run_group(app.sessions, ["no-such-submission"], plan)
    assert (sid, value, error) == ("no-such-submission", [], None)
    assert {"event": "submission_not_found", "submission_id": "no-such-submission"}.items() <= next(
        e for e in logs if e["event"] == "submission_not_found"
    ).items()
