"""Group commit for the stages: worker threads that run the same stage at once share a transaction.

Each dramatiq message is still one submission, run and acknowledged by its own worker thread,
and the thread returns only once the transaction holding its submission's changes has committed.
What is shared is the transaction: when several threads of a process arrive at a stage together,
the first (the leader) makes the stage's decision for each of them (reads, parsing, rendering,
hashing: see :data:`workers.transitions.Apply`), then makes all their writes in one transaction,
and hands each thread its own result. Under load that turns one transaction (one commit, one turn
at SQLite's write lock, one connection checkout) per submission into one per batch, and the write
lock is held for writes only; alone, a thread makes a batch of one and waits for nobody.

Two things keep one submission from harming the others in its batch:

- A stage function's first write is its guarded state change, so a submission another worker
  already moved (:class:`AlreadyMoved`) has written nothing: it is reported to its own thread
  and the rest of the batch carries on.
- Any other error rolls the whole batch back, and the leader runs each submission again in a
  transaction of its own; each thread then gets its own submission's result or error, and only
  that message is retried.

A caller may bring several submissions (a message about a group, :mod:`schemas.messages`), and
may ask for ``then``: called by the leader, after the commit and before anyone is released, with
the results of every submission in the batch that brought the same ``then``. The stages send
everything a batch moved on to the next stage in one message that way.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any, Generic, TypeVar

import structlog
from sqlalchemy.orm import Session, sessionmaker

from workers.db import session_scope
from workers.transitions import AlreadyMoved, Apply

T = TypeVar("T")

# What the leader calls with ``(submission id, result)`` for the batch's successes.
Then = Callable[[list[tuple[str, T]]], None]


class _Caller:
    """A thread in :meth:`Together.run_all`. It sleeps on ``wake`` (a lock it holds) until it is
    released once: when all its slots are settled, or when it is asked to lead."""

    __slots__ = ("lead", "slots", "wake", "woken")

    def __init__(self) -> None:
        self.slots: list[_Slot[Any]] = []
        self.wake = threading.Lock()
        self.wake.acquire()
        self.lead = False
        self.woken = False

    def settled(self) -> bool:
        return all(slot.done for slot in self.slots)


class _Slot(Generic[T]):
    def __init__(
        self,
        sessions: sessionmaker[Session],
        work: Callable[[Session, str], Apply[T]],
        submission_id: str,
        then: Then[T] | None,
        caller: _Caller,
    ) -> None:
        self.sessions = sessions
        self.work = work
        self.submission_id = submission_id
        self.then = then
        self.caller = caller
        self.done = False
        self.value: T | None = None
        self.error: BaseException | None = None

    def settle(self, value: T | None = None, error: BaseException | None = None) -> None:
        self.value, self.error, self.done = value, error, True

    def result(self) -> T:
        if self.error is not None:
            raise self.error
        return self.value  # type: ignore[return-value]  # set whenever error is None


Outcome = tuple[T | None, BaseException | None]


class Together(Generic[T]):
    """Runs ``work(session, submission_id)`` (a stage's decision, which returns its writes) for
    the threads that call :meth:`run` together, and the writes in one transaction.

    A batch holds the pending calls that share the leader's ``sessions``, whatever their
    ``work``: the stages of a worker process share one instance, so that what several stages
    have to write at the same moment goes in one transaction.

    Each waiting thread is woken once: by the leader that settled its last submission, or to
    lead the next batch. (Waking every waiter after each batch, to look and sleep again, cost
    more CPU than the batches saved once threads were many.)
    """

    def __init__(self, max_batch: int = 64) -> None:
        self.max_batch = max_batch
        self._lock = threading.Lock()
        self._pending: list[_Slot[T]] = []
        self._leading = False

    def run(
        self,
        sessions: sessionmaker[Session],
        work: Callable[[Session, str], Apply[T]],
        submission_id: str,
    ) -> T:
        [slot] = self.run_all(sessions, work, [submission_id])
        return slot.result()

    def run_all(
        self,
        sessions: sessionmaker[Session],
        work: Callable[[Session, str], Apply[T]],
        submission_ids: Sequence[str],
        then: Then[T] | None = None,
    ) -> list[_Slot[T]]:
        """Each submission's slot, settled with its result or its error."""
        caller = _Caller()
        mine = caller.slots = [_Slot(sessions, work, sid, then, caller) for sid in submission_ids]
        with self._lock:
            self._pending.extend(mine)
            follow, self._leading = self._leading, True
        if follow:
            try:
                caller.wake.acquire()
            except BaseException:  # interrupted (a time limit) while waiting
                self._leave(caller)
                raise
            if not caller.lead:
                return mine
        try:
            self._lead(sessions, caller)
        finally:
            with self._lock:
                self._hand_over(caller)
        return mine

    def _lead(self, sessions: sessionmaker[Session], caller: _Caller) -> None:
        while True:
            with self._lock:
                own = [slot for slot in caller.slots if not slot.done]
                if not own:
                    return
                # This caller's own submissions first, then whoever else is waiting.
                batch = list(own)
                limit = max(self.max_batch, len(own))
                for other in self._pending:
                    if len(batch) >= limit:
                        break
                    if other.sessions is sessions and other.caller is not caller:
                        batch.append(other)
                taken = {id(slot) for slot in batch}
                self._pending = [s for s in self._pending if id(s) not in taken]
            try:
                self._run_batch(sessions, batch)
            finally:
                with self._lock:
                    # Interrupted (a time limit, shutdown) before settling everyone: the others
                    # go back in line for the next leader.
                    unsettled = [s for s in batch if not s.done and s.caller is not caller]
                    self._pending[:0] = unsettled
                    for waiting in {id(s.caller): s.caller for s in batch}.values():
                        if waiting is not caller and not waiting.woken and waiting.settled():
                            waiting.woken = True
                            waiting.wake.release()

    def _hand_over(self, leader: _Caller) -> None:
        """The next waiting caller leads, or nobody does (called with the lock held)."""
        self._pending = [s for s in self._pending if s.caller is not leader]
        for slot in self._pending:
            if not slot.caller.woken:
                slot.caller.lead = slot.caller.woken = True
                slot.caller.wake.release()
                return
        self._leading = False

    def _leave(self, caller: _Caller) -> None:
        """A waiting caller gives up: its submissions leave the line, and if it had just been
        asked to lead, the next one is."""
        with self._lock:
            self._pending = [s for s in self._pending if s.caller is not caller]
            if caller.lead:
                self._hand_over(caller)

    @classmethod
    def _decide(cls, session: Session, slot: _Slot[T]) -> Apply[T]:
        # Logs from the stage name the submission they are about, not the leader's (the
        # leader's own binding is put back when the batch is done).
        structlog.contextvars.bind_contextvars(submission_id=slot.submission_id)
        return slot.work(session, slot.submission_id)

    @classmethod
    def _write(cls, session: Session, slot: _Slot[T], write: Apply[T]) -> Outcome[T]:
        structlog.contextvars.bind_contextvars(submission_id=slot.submission_id)
        try:
            return write(session), None
        except AlreadyMoved as moved:  # nothing written for it: the batch goes on
            return None, moved

    @classmethod
    def _run_batch(cls, sessions: sessionmaker[Session], batch: list[_Slot[T]]) -> None:
        bound = structlog.contextvars.get_contextvars().get("submission_id")
        try:
            cls._run_batch_bound(sessions, batch)
        finally:
            if bound is None:
                structlog.contextvars.unbind_contextvars("submission_id")
            else:
                structlog.contextvars.bind_contextvars(submission_id=bound)

    @classmethod
    def _run_batch_bound(cls, sessions: sessionmaker[Session], batch: list[_Slot[T]]) -> None:
        try:
            with session_scope(sessions) as session:
                # Every decision first (reads only: on SQLite they take no lock), then every
                # write, so that the write lock is held for the writes alone.
                writes = [cls._decide(session, slot) for slot in batch]
                outcomes = [
                    cls._write(session, slot, write)
                    for slot, write in zip(batch, writes, strict=True)
                ]
        except Exception as exc:
            if len(batch) == 1:
                batch[0].settle(error=exc)
                return
            structlog.get_logger(__name__).warning(
                "batch_failed_running_alone", size=len(batch), error=type(exc).__name__
            )
            outcomes = []
            for slot in batch:
                try:
                    with session_scope(sessions) as session:
                        outcomes.append(cls._write(session, slot, cls._decide(session, slot)))
                except Exception as alone:
                    outcomes.append((None, alone))
        cls._send_on(batch, outcomes)
        for slot, (value, error) in zip(batch, outcomes, strict=True):
            slot.settle(value, error)

    @classmethod
    def _send_on(cls, batch: list[_Slot[T]], outcomes: list[Outcome[T]]) -> None:
        """Each ``then`` gets the committed results of the slots that brought it."""
        groups: dict[Then[T], list[tuple[str, T]]] = {}
        for slot, (value, error) in zip(batch, outcomes, strict=True):
            if error is None and slot.then is not None:
                groups.setdefault(slot.then, []).append((slot.submission_id, value))  # type: ignore[arg-type]
        for then, moved in groups.items():
            try:
                then(moved)
            except Exception as exc:  # committed already: the reconciler sends them on
                structlog.get_logger(__name__).error(
                    "send_on_failed", size=len(moved), error=type(exc).__name__
                )
