"""The handoff between stages: what the stages moved on goes to the next stage in groups."""

from __future__ import annotations

import multiprocessing
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

import dramatiq

from schemas.messages import parse_stage_message
from workers.pipeline.actors import held_by
from workers.pipeline.handoff import Handoff
from workers.pipeline.middleware import SendHeld
from workers.stages.stage import Stage


class Recorder:
    """A ``send`` that keeps what it was given, in which thread, and when."""

    def __init__(self, fail_first: int = 0) -> None:
        self.sent: list[tuple[dict[Stage, list[str]], str, float]] = []
        self.fail_first = fail_first
        self.arrived = threading.Event()

    def __call__(self, sends: Mapping[Stage, Sequence[str]]) -> None:
        if self.fail_first:
            self.fail_first -= 1
            raise ConnectionError("redis went away")
        copied = {stage: list(ids) for stage, ids in sends.items()}
        self.sent.append((copied, threading.current_thread().name, time.monotonic()))
        self.arrived.set()

    def ids(self, stage: Stage) -> list[str]:
        return [sid for sends, _, _ in self.sent for sid in sends.get(stage, [])]


def wait_until(condition: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def test_without_linger_each_call_is_sent_at_once() -> None:
    sent = Recorder()
    handoff = Handoff(sent, linger=0)
    handoff.add({Stage.RESOLVE: ["a"], Stage.CONSENT: ["a"]})
    handoff.add({Stage.RESOLVE: ["b"]})
    assert [s for s, _, _ in sent.sent] == [
        {Stage.RESOLVE: ["a"], Stage.CONSENT: ["a"]},
        {Stage.RESOLVE: ["b"]},
    ]
    assert handoff.held() == 0


def test_what_comes_within_the_linger_goes_in_one_message_per_stage() -> None:
    sent = Recorder()
    handoff = Handoff(sent, linger=0.2)
    first = time.monotonic()
    for name in "abc":
        handoff.add({Stage.RESOLVE: [name], Stage.CONSENT: [name]})
    assert sent.sent == [] and handoff.held() == 6
    wait_until(lambda: handoff.held() == 0)
    [(sends, thread, at)] = sent.sent
    assert sends == {Stage.RESOLVE: ["a", "b", "c"], Stage.CONSENT: ["a", "b", "c"]}
    assert thread == "dearmp-handoff"
    assert at - first >= 0.2


def test_a_full_group_goes_at_once_from_the_thread_that_filled_it() -> None:
    sent = Recorder()
    handoff = Handoff(sent, linger=0.2)
    size = Stage.DELIVER.group_size
    ids = [f"s{i}" for i in range(size + 3)]
    handoff.add({Stage.DELIVER: ids[:5]})
    handoff.add({Stage.DELIVER: ids[5:]})
    [(sends, thread, _)] = sent.sent
    assert sends == {Stage.DELIVER: ids[:size]}
    assert thread == threading.current_thread().name
    assert handoff.held() == 3
    wait_until(lambda: handoff.held() == 0)
    assert sent.ids(Stage.DELIVER) == ids  # the rest after the linger, in order, once each


def test_each_stage_waits_from_its_own_oldest_submission() -> None:
    sent, now = Recorder(), [0.0]
    # The clock is the test's: the sender thread would wait a real minute, so what is sent here
    # is sent by send_due, when the test's clock says so.
    handoff = Handoff(sent, linger=60, clock=lambda: now[0])
    handoff.add({Stage.RESOLVE: ["a"]})
    now[0] = 40
    handoff.add({Stage.RENDER: ["b"]})
    now[0] = 60
    handoff.send_due()
    assert [sends for sends, _, _ in sent.sent] == [{Stage.RESOLVE: ["a"]}]
    assert handoff.held() == 1
    now[0] = 99
    handoff.send_due()
    assert handoff.held() == 1  # "b" has waited 59 of its 60
    now[0] = 100
    handoff.send_due()
    assert [sends for sends, _, _ in sent.sent][1:] == [{Stage.RENDER: ["b"]}]
    assert handoff.held() == 0


def test_flush_sends_everything_held_now() -> None:
    sent = Recorder()
    handoff = Handoff(sent, linger=60)
    handoff.add({Stage.RESOLVE: ["a"], Stage.RENDER: ["b"]})
    handoff.flush()
    assert sent.sent[0][0] == {Stage.RESOLVE: ["a"], Stage.RENDER: ["b"]}
    assert handoff.held() == 0
    handoff.flush()  # nothing held: nothing sent
    assert len(sent.sent) == 1


def test_a_failed_send_does_not_stop_the_sender() -> None:
    sent = Recorder(fail_first=1)
    handoff = Handoff(sent, linger=0.05)
    handoff.add({Stage.RESOLVE: ["lost"]})  # left to the reconciler
    wait_until(lambda: handoff.held() == 0)
    handoff.add({Stage.RESOLVE: ["b"]})
    assert sent.arrived.wait(5)
    assert sent.ids(Stage.RESOLVE) == ["b"]


def test_a_worker_shutting_down_sends_what_is_held(stub_broker: dramatiq.Broker) -> None:
    sent = Recorder()
    handoff = Handoff(sent, linger=60)
    middleware = SendHeld(handoff)
    stub_broker.add_middleware(middleware)
    try:
        worker = dramatiq.Worker(stub_broker, worker_timeout=20, worker_threads=1)
        worker.start()
        handoff.add({Stage.RESOLVE: ["a", "b"]})
        worker.stop()
    finally:
        stub_broker.middleware.remove(middleware)
        stub_broker.middleware[:] = [
            m for m in stub_broker.middleware if type(m).__name__ != "_WorkerMiddleware"
        ]
    assert sent.ids(Stage.RESOLVE) == ["a", "b"]


def test_the_stages_send_on_through_the_handoff(stub_broker: dramatiq.Broker) -> None:
    handoff = held_by(stub_broker)
    a, b, c = (f"00000000-0000-4000-8000-00000000000{n}" for n in range(3))
    assert handoff.linger > 0  # the default: the stages' messages are grouped
    handoff.add({Stage.RESOLVE: [a, b], Stage.CONSENT: [a]})
    handoff.add({Stage.RESOLVE: [c]})
    resolve, consent = (stub_broker.queues[s.queue] for s in (Stage.RESOLVE, Stage.CONSENT))
    wait_until(lambda: resolve.qsize() and consent.qsize())
    [message] = [dramatiq.Message.decode(raw) for raw in resolve.queue]
    assert parse_stage_message(message.args[0]).ids == [a, b, c]
    [message] = [dramatiq.Message.decode(raw) for raw in consent.queue]
    assert parse_stage_message(message.args[0]).ids == [a]


def _add_in_child(handoff: Handoff, done: Any) -> None:
    handoff.add({Stage.RESOLVE: ["child"]})
    wait_until(lambda: handoff.held() == 0)
    done.set()


def test_a_forked_worker_process_starts_its_own_sender() -> None:
    sent = Recorder()
    handoff = Handoff(sent, linger=0.05)
    handoff.add({Stage.RESOLVE: ["parent"]})  # the parent's sender thread is running
    wait_until(lambda: handoff.held() == 0)
    context = multiprocessing.get_context("fork")
    done = context.Event()
    child = context.Process(target=_add_in_child, args=(handoff, done))
    child.start()
    child.join(10)
    assert child.exitcode == 0 and done.is_set()
