"""Group commit for the stages, and SQLite's write lock taken at the first write."""

from __future__ import annotations

import ctypes
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from sqlalchemy import text
from sqlalchemy.orm import Session

from tests.factories import submission
from workers.app import App
from workers.db import Turns, make_engine, make_sessionmaker, session_scope
from workers.intake import accept
from workers.models import State, Submission
from workers.together import Together
from workers.transitions import AlreadyMoved, Apply, current
from workers.validation import plan

REPO = Path(__file__).resolve().parent.parent


def _scratch(tmp_path: Path, take_turns: bool = False) -> Any:
    engine = make_engine(f"sqlite:///{tmp_path / 'scratch.sqlite3'}", take_turns=take_turns)
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE IF NOT EXISTS done (item TEXT PRIMARY KEY)"))
    return engine


def _run_at_once(items: list[str], call: Any) -> dict[str, Any]:
    """``call(item)`` on one thread per item, released together; each thread's result or error."""
    results: dict[str, Any] = {}
    start = threading.Barrier(len(items))

    def one(item: str) -> None:
        start.wait()
        try:
            results[item] = call(item)
        except Exception as exc:
            results[item] = exc

    threads = [threading.Thread(target=one, args=(item,)) for item in items]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return results


def test_threads_arriving_together_share_transactions_and_get_their_own_results(
    tmp_path: Path,
) -> None:
    engine = _scratch(tmp_path)
    sessions = make_sessionmaker(engine)
    together: Together[tuple[str, int]] = Together()
    seen: list[int] = []

    def work(session: Session, item: str) -> Apply[tuple[str, int]]:
        time.sleep(0.02)  # long enough for the other threads to queue behind the leader

        def write(session: Session) -> tuple[str, int]:
            seen.append(id(session))
            session.execute(text("INSERT INTO done VALUES (:i)"), {"i": item})
            return item, id(session)

        return write

    items = [f"s{i}" for i in range(8)]
    results = _run_at_once(items, lambda item: together.run(sessions, work, item))

    assert {item: r[0] for item, r in results.items()} == {i: i for i in items}
    assert len(set(seen)) < len(items)  # some shared a session (a transaction)
    with engine.connect() as conn:
        assert sorted(conn.execute(text("SELECT item FROM done")).scalars()) == sorted(items)


def test_a_submission_already_moved_is_told_so_and_the_batch_goes_on(tmp_path: Path) -> None:
    engine = _scratch(tmp_path)
    sessions = make_sessionmaker(engine)
    together: Together[str] = Together()

    def work(session: Session, item: str) -> Apply[str]:
        time.sleep(0.02)

        def write(session: Session) -> str:
            if item == "moved":
                raise AlreadyMoved(item)
            session.execute(text("INSERT INTO done VALUES (:i)"), {"i": item})
            return item

        return write

    items = ["a", "moved", "b", "c"]
    results = _run_at_once(items, lambda item: together.run(sessions, work, item))
    assert isinstance(results["moved"], AlreadyMoved)
    assert [results[i] for i in ("a", "b", "c")] == ["a", "b", "c"]
    with engine.connect() as conn:
        assert sorted(conn.execute(text("SELECT item FROM done")).scalars()) == ["a", "b", "c"]


def test_an_error_rolls_the_batch_back_and_each_runs_again_alone(tmp_path: Path) -> None:
    engine = _scratch(tmp_path)
    sessions = make_sessionmaker(engine)
    together: Together[str] = Together()
    runs: dict[str, int] = {}

    def work(session: Session, item: str) -> Apply[str]:
        time.sleep(0.02)

        def write(session: Session) -> str:
            runs[item] = runs.get(item, 0) + 1
            session.execute(text("INSERT INTO done VALUES (:i)"), {"i": item})
            if item == "bad":
                raise ValueError("this one is broken")
            return item

        return write

    items = ["a", "b", "bad", "c", "d"]
    results = _run_at_once(items, lambda item: together.run(sessions, work, item))
    assert isinstance(results["bad"], ValueError)
    assert [results[i] for i in ("a", "b", "c", "d")] == ["a", "b", "c", "d"]
    with engine.connect() as conn:  # the good ones committed once each, the bad one not at all
        assert sorted(conn.execute(text("SELECT item FROM done")).scalars()) == list("abcd")
    assert runs["bad"] >= 1 and all(runs[i] in (1, 2) for i in "abcd")


class Interrupted(BaseException):
    """Like dramatiq's time limit: raised in a thread from outside, and not an Exception."""


def _start(results: dict[str, Any], name: str, call: Any) -> threading.Thread:
    def one() -> None:
        try:
            results[name] = call()
        except BaseException as exc:
            results[name] = exc

    thread = threading.Thread(target=one, name=name)
    thread.start()
    return thread


def _queued(together: Together[Any], count: int) -> None:
    deadline = time.monotonic() + 10
    while len(together._pending) < count:
        assert time.monotonic() < deadline, "the callers never queued"
        time.sleep(0.005)


class _Line:
    """A leader ("first") held at a gate while the named callers queue behind it, one by one;
    ``fail`` names a caller whose decision is interrupted."""

    def __init__(self, tmp_path: Path, fail: str | None = None) -> None:
        self.engine = _scratch(tmp_path)
        self.sessions = make_sessionmaker(self.engine)
        self.together: Together[str] = Together()
        self.gate = threading.Event()
        self.fail = fail
        self.results: dict[str, Any] = {}
        self.threads: list[threading.Thread] = []

    def work(self, session: Session, item: str) -> Apply[str]:
        if item == "first":
            self.gate.wait(10)
        if item == self.fail:
            raise Interrupted()

        def write(session: Session) -> str:
            session.execute(text("INSERT INTO done VALUES (:i)"), {"i": item})
            return item

        return write

    def queue(self, *names: str) -> None:
        self._start("first")
        time.sleep(0.05)  # "first" leads, alone
        for count, name in enumerate(names, start=1):
            self._start(name)
            _queued(self.together, count)

    def _start(self, name: str) -> None:
        def call() -> str:
            return self.together.run(self.sessions, self.work, name)

        self.threads.append(_start(self.results, name, call))

    def finish(self) -> list[str]:
        """Open the gate; what was written."""
        self.gate.set()
        for thread in self.threads:
            thread.join(10)
            assert not thread.is_alive()
        with self.engine.connect() as conn:
            return sorted(conn.execute(text("SELECT item FROM done")).scalars())


def test_an_interrupted_leader_puts_the_others_back_and_the_next_one_leads(
    tmp_path: Path,
) -> None:
    line = _Line(tmp_path, fail="slow")
    line.queue("slow", "b", "c")  # "slow" leads next, in a batch that holds "b" and "c"
    assert line.finish() == ["b", "c", "first"]
    assert isinstance(line.results.pop("slow"), Interrupted)
    assert line.results == {"first": "first", "b": "b", "c": "c"}


def test_a_waiting_caller_interrupted_leaves_the_line_without_stopping_it(
    tmp_path: Path,
) -> None:
    line = _Line(tmp_path)
    line.queue("gone", "c")
    # dramatiq's time limit, raised in the waiting thread (it surfaces once the thread wakes).
    gone = line.threads[1].ident
    assert gone is not None
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(gone), ctypes.py_object(Interrupted))
    assert line.finish() == ["c", "first"]
    assert isinstance(line.results.pop("gone"), Interrupted)
    assert line.results == {"first": "first", "c": "c"}


def test_batched_validation_moves_each_submission_once(app: App) -> None:
    with session_scope(app.sessions) as session:
        ids = [accept(session, submission(), app.secret).submission_id for _ in range(6)]
        bad = accept(session, submission(supporter__email="not an email"), app.secret)
    together: Together[list[Any]] = Together()
    every = [*ids, bad.submission_id, ids[0]]  # one twice: the second finds it moved or done
    results = _run_at_once(
        [f"{i}:{sid}" for i, sid in enumerate(every)],
        lambda key: together.run(app.sessions, plan, key.split(":", 1)[1]),
    )
    assert all(isinstance(r, list | AlreadyMoved) for r in results.values()), results
    with session_scope(app.sessions) as session:
        for sid in ids:
            row = current(session, sid)
            assert row is not None and row.state == State.VALIDATED
            assert len(session.get(Submission, sid).events) == 2  # type: ignore[union-attr]
        row = current(session, bad.submission_id)
        assert row is not None and row.state == State.REJECTED


def test_reads_on_sqlite_do_not_wait_for_a_writer(tmp_path: Path) -> None:
    engine = _scratch(tmp_path)
    other = make_engine(f"sqlite:///{tmp_path / 'scratch.sqlite3'}")
    with engine.connect() as writer:
        writer.execute(text("INSERT INTO done VALUES ('pending')"))  # holds the write lock
        started = time.monotonic()
        with other.connect() as reader:  # sees the last commit, at once
            assert reader.execute(text("SELECT count(*) FROM done")).scalar() == 0
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
from workers.db import Turns
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
