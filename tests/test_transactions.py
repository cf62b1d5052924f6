"""A stage's group in one transaction, and SQLite's write lock taken at the first write."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from sqlalchemy import Column, MetaData, Table, Text, event, func, select, text
from sqlalchemy.orm import Session

from tests.factories import submission
from workers.database.engine import Turns, make_engine, make_sessionmaker, session_scope
from workers.database.models import State, Submission
from workers.database.transitions import AlreadyMoved, Apply, current, run_group
from workers.pipeline.app import App
from workers.stages.intake import accept
from workers.stages.validation import plan

REPO = Path(__file__).resolve().parent.parent
DONE = Table("done", MetaData(), Column("item", Text, primary_key=True))


def _scratch(tmp_path: Path, take_turns: bool = False) -> Any:
    engine = make_engine(f"sqlite:///{tmp_path / 'scratch.sqlite3'}", take_turns=take_turns)
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


HOLD = """
import sys, time
sys.path.insert(0, {repo!r})
from workers.database.engine import Turns
turns = Turns({path!r})
turns.acquire()
print("held", flush=True)
time.sleep(0.6)
turns.release()
"""


def test_turns_keep_writers_of_two_processes_apart(tmp_path: Path) -> None:
    path = str(tmp_path / "db.sqlite3")
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD.format(repo=str(REPO), path=path)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
    turns = Turns(path)
    started = time.monotonic()
    turns.acquire()  # waits in the kernel until the other process lets go
    waited = time.monotonic() - started
    turns.release()
    holder.wait(10)
    assert waited > 0.3


def test_a_first_turn_goes_before_the_threads_already_waiting() -> None:
    turns = Turns(None)
    order: list[str] = []

    def write(name: str, first: bool) -> None:
        turns.acquire(first=first)
        order.append(name)
        turns.release()

    def waiting(count: int) -> None:  # until that many threads wait for the turn
        deadline = time.monotonic() + 10
        while turns.waiting() < count:
            assert time.monotonic() < deadline
            time.sleep(0.001)

    turns.acquire()
    waiters = [threading.Thread(target=write, args=("a stage", False))]
    waiters[0].start()
    waiting(1)
    waiters.append(threading.Thread(target=write, args=("a sent mark", True)))
    waiters[1].start()
    waiting(2)
    turns.release()
    for thread in waiters:
        thread.join(10)
    assert order == ["a sent mark", "a stage"]


def test_threads_take_turns_one_at_a_time_and_none_is_left_waiting() -> None:
    """A release wakes only the thread that goes next: a wake-up lost to a thread that came
    at the same moment, or to one interrupted, must still leave every thread its turn."""
    turns = Turns(None)
    inside: list[int] = []
    overlaps = 0
    failed: list[BaseException] = []

    def write(index: int) -> None:
        nonlocal overlaps
        try:
            for round_ in range(300):
                turns.acquire(first=(index + round_) % 5 == 0)
                inside.append(index)
                os.sched_yield()  # lets the others run, and queue, while this one holds the turn
                overlaps += len(inside) > 1
                inside.remove(index)
                turns.release()
        except BaseException as exc:  # pragma: no cover - reported below
            failed.append(exc)

    threads = [threading.Thread(target=write, args=(i,), daemon=True) for i in range(12)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 30
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    assert not any(thread.is_alive() for thread in threads), "a thread never got its turn"
    assert (failed, overlaps, turns.waiting()) == ([], 0, 0)


def test_worker_engines_checkpoint_the_log_from_a_thread_not_a_commit(tmp_path: Path) -> None:
    engine = _scratch(tmp_path, take_turns=True)
    database = tmp_path / "scratch.sqlite3"
    with engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA wal_autocheckpoint").scalar() == 0
    before = database.stat().st_size
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE blobs (b BLOB)"))
    for _ in range(20):  # far past SQLite's own 1,000-page threshold
        with engine.begin() as conn:
            conn.execute(text("INSERT INTO blobs VALUES (zeroblob(100000))"))
    assert "sqlite-checkpoint" in {t.name for t in threading.enumerate()}
    # The rows reach the database file itself without any commit having copied them.
    deadline = time.monotonic() + 10
    while database.stat().st_size < before + 2_000_000 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert database.stat().st_size >= before + 2_000_000
    engine.dispose()
    # A command's engine keeps SQLite's own checkpoints.
    plain = make_engine(f"sqlite:///{database}")
    with plain.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA wal_autocheckpoint").scalar() == 1000
    plain.dispose()
