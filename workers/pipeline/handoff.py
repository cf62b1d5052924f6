"""Handing submissions on to their next stages in groups, up to ``linger`` seconds late.

:class:`Handoff` holds what the stages moved on for up to ``DEARMP_HANDOFF_LINGER_MS`` and sends
it in messages of up to each stage's group size (a full group goes at once, in the thread that
filled it), so the next stage runs bigger transactions. What it holds is committed already: the
reconciler resends it if it is lost, and a worker that shuts down sends it first (``SendHeld``).
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence

import structlog

from workers.stages.stage import Stage

log = structlog.get_logger(__name__)

Send = Callable[[Mapping[Stage, Sequence[str]]], object]


class Handoff:
    """Collects ``{stage: submission ids}`` and sends them grouped, through ``send``."""

    def __init__(
        self, send: Send, linger: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.send = send
        self.linger = linger
        self.clock = clock
        self._cond = threading.Condition()
        self._held: dict[Stage, list[str]] = {}
        self._since: dict[Stage, float] = {}  # when the oldest held id of each stage came
        self._sending = threading.Lock()  # what a sender took is out before flush() returns
        self._thread: threading.Thread | None = None
        self._pid = 0

    def add(self, sends: Mapping[Stage, Sequence[str]]) -> None:
        if self.linger <= 0:
            self.send(sends)
            return
        full: dict[Stage, list[str]] = {}
        with self._cond:
            idle = not self._held
            for stage, ids in sends.items():
                if not ids:
                    continue
                held = self._held.setdefault(stage, [])
                if not held:
                    self._since[stage] = self.clock()
                held.extend(ids)
                size = stage.group_size
                if len(held) >= size:
                    cut = len(held) - len(held) % size
                    full[stage] = held[:cut]
                    del held[:cut]
                    if not held:
                        del self._held[stage], self._since[stage]
            if self._held:
                self._ensure_thread()
                if idle:  # only the first arrival sets a deadline: the sender's wake-up
                    self._cond.notify()
        if full:
            self.send(full)

    def held(self) -> int:
        """How many submissions are waiting to be sent."""
        with self._cond:
            return sum(len(ids) for ids in self._held.values())

    def flush(self) -> None:
        """Send everything held now (a worker shutting down, a test draining its queues)."""
        self.send_due(math.inf)

    def send_due(self, now: float | None = None) -> None:
        """Send what has waited ``linger`` by ``now`` (the clock's: the sender thread's work)."""
        due = (self.clock() if now is None else now) - self.linger
        with self._sending:
            with self._cond:
                taken = {s: ids for s, ids in self._held.items() if self._since[s] <= due}
                for stage in taken:
                    del self._held[stage], self._since[stage]
            if taken:
                self.send(taken)

    def _ensure_thread(self) -> None:
        # Called with the lock held. A forked child has the parent's state but not its thread.
        if self._thread is None or self._pid != os.getpid() or not self._thread.is_alive():
            self._pid = os.getpid()
            self._thread = threading.Thread(target=self._run, name="dearmp-handoff", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._held:
                    self._cond.wait()
                wait = min(self._since.values()) + self.linger - self.clock()
                if wait > 0:
                    self._cond.wait(wait)
                    continue
            try:
                self.send_due()
            except Exception as exc:  # never let the sender die: the reconciler resends
                log.error("handoff_send_failed", error=type(exc).__name__)
