"""Group commit for the HTTP intake: each request waits for its 202 until the transaction
holding its row has committed; requests that queued while one batch was written go into the next
(one INSERT, one commit and one stage message for the group). At low load a batch is one."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import anyio.to_thread

from workers.database.engine import session_scope
from workers.database.models import State
from workers.pipeline.app import App
from workers.pipeline.dispatch import dispatch_groups, group_by_stage
from workers.pipeline.intake import Accepted, accept_many
from workers.stages.stage import Stage

MAX_BATCH = 128


@dataclass
class Pending:
    payload: dict[str, Any]
    state: State
    future: asyncio.Future[Accepted]


class IntakeBatcher:
    def __init__(self, app_getter: Callable[[], App], broker: Any) -> None:
        self.app_getter = app_getter
        self.broker = broker
        self.queue: asyncio.Queue[Pending] | None = None
        self.task: asyncio.Task[None] | None = None
        self.sending: set[asyncio.Task[None]] = set()

    def start(self) -> None:
        self.queue = asyncio.Queue()
        self.task = asyncio.get_running_loop().create_task(self._run())

    async def sent(self) -> None:
        """Return once the stage messages of every batch committed so far are sent (or failed)."""
        if self.sending:
            await asyncio.gather(*self.sending, return_exceptions=True)

    async def stop(self) -> None:
        await self.sent()
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task

    async def submit(self, payload: dict[str, Any], state: State) -> Accepted:
        if self.queue is None:  # not started (no lifespan): one at a time, in a thread
            result = (await anyio.to_thread.run_sync(self._store, [(payload, state)]))[0]
            if result.created:
                await anyio.to_thread.run_sync(self._dispatch, [(result.submission_id, state)])
            return result
        future: asyncio.Future[Accepted] = asyncio.get_running_loop().create_future()
        await self.queue.put(Pending(payload, state, future))
        return await future

    async def _run(self) -> None:
        assert self.queue is not None
        while True:
            batch = [await self.queue.get()]
            while len(batch) < MAX_BATCH and not self.queue.empty():
                batch.append(self.queue.get_nowait())
            try:
                results = await anyio.to_thread.run_sync(
                    self._store, [(p.payload, p.state) for p in batch]
                )
            except Exception as exc:  # the database is away: every request in it gets the error
                for pending in batch:
                    if not pending.future.done():
                        pending.future.set_exception(exc)
                continue
            for pending, result in zip(batch, results, strict=True):
                if not pending.future.done():
                    pending.future.set_result(result)
            # The 202s need only the commit; the stage messages go out beside the next batch.
            sends = [
                (r.submission_id, p.state) for p, r in zip(batch, results, strict=True) if r.created
            ]
            if sends:
                task = asyncio.get_running_loop().create_task(
                    anyio.to_thread.run_sync(self._dispatch, sends)
                )
                self.sending.add(task)
                task.add_done_callback(self.sending.discard)

    def _store(self, items: list[tuple[dict[str, Any], State]]) -> list[Accepted]:
        app = self.app_getter()
        with session_scope(app.sessions) as session:
            return accept_many(session, items, app.secret)

    def _dispatch(self, sends: list[tuple[str, State]]) -> None:
        """After the commit, a message for each group of a batch's submissions; one lost here is
        resent by the reconciler."""
        dispatch_groups(
            self.broker,
            group_by_stage(
                (sid, [Stage.NOTIFY if state == State.UNCONFIRMED else Stage.VALIDATE])
                for sid, state in sends
            ),
        )
