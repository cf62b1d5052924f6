"""dramatiq's private API, used in workers/pipeline/dramatiq_private.py alone, is what that module
was written for."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import threading
from pathlib import Path
from typing import Any

import dramatiq.brokers.redis
from dramatiq.middleware import TimeLimitExceeded
from packaging.version import Version

from workers.pipeline.app import App
from workers.pipeline.dramatiq_private import (
    CHECKED,
    acks_key,
    bodies_key,
    dead_key,
    delayed_key,
    queue_key,
)
from workers.pipeline.runtime import running_pipeline

REPO = Path(__file__).resolve().parent.parent
DISPATCH = Path(dramatiq.brokers.redis.__file__).parent / "redis" / "dispatch.lua"


def test_dramatiq_is_a_version_the_private_api_was_checked_with() -> None:
    """On an upgrade past CHECKED, re-read dramatiq/brokers/redis.py and redis/dispatch.lua and
    re-check, then widen CHECKED: that the consumer still fetches through ``broker.do_fetch``
    (and nothing else), that ``_dispatch("fetch")`` still returns the message bodies and takes
    (queue, prefetch), that ``do_nack`` still dead-letters by Redis id, and that fetched ids are
    still held in ``<ns>:__acks__.<broker id>.<queue>`` with bodies in ``<ns>:<queue>.msgs``,
    and that delayed and dead letters are still under ``<queue>.DQ`` and ``<queue>.XQ``.
    tests/test_foreign_messages.py (unreadable bytes dead-lettered on a real Redis) and
    tests/test_operations.py (queue depths, dead letters requeued and purged) exercise them."""
    lowest, first_unchecked = (Version(v) for v in CHECKED)
    assert lowest <= Version(importlib.metadata.version("dramatiq")) < first_unchecked


def test_the_key_layout_is_the_dispatch_scripts() -> None:
    """The keys read here are the ones dramatiq's Lua script writes."""
    script = DISPATCH.read_text()
    assert 'namespace .. ":__acks__." .. worker_id' in script
    assert 'acks .. "." .. queue_name' in script
    assert '".msgs"' in script
    assert 'namespace .. ":" .. queue_canonical_name .. ".XQ"' in script
    assert 'q_fn .. ".DQ" .. ".msgs"' in script
    assert acks_key("ns", "w", "q") == "ns:__acks__.w.q"
    assert (queue_key("ns", "q"), bodies_key("ns", "q")) == ("ns:q", "ns:q.msgs")
    assert (delayed_key("ns", "q"), dead_key("ns", "q")) == ("ns:q.DQ", "ns:q.XQ")


def test_the_consumer_fetches_through_the_hook_the_broker_overrides() -> None:
    """dramatiq's Redis consumer fetches with ``broker.do_fetch`` and the broker still has
    ``_dispatch``: the screen of unreadable bytes sits there."""
    source = Path(dramatiq.brokers.redis.__file__).read_text()
    assert "self.broker.do_fetch(" in source
    assert hasattr(dramatiq.brokers.redis.RedisBroker, "_dispatch")


def test_no_other_module_uses_dramatiqs_private_api() -> None:
    """Private attributes of dramatiq's broker and the names of its Redis keys appear in one
    module only."""
    private = re.compile(
        r"\._dispatch\('|__acks__|\bdo_fetch\b|\bdo_nack\b|\.(msgs|XQ|DQ)\b|\bglobal_broker\b"
        r"|\.manager\.start\b"
    )
    found = []
    for path in (REPO / "workers").rglob("*.py"):
        if path.name == "dramatiq_private.py":
            continue
        code = ast.unparse(ast.parse(path.read_text()))  # docstrings count, comments do not
        found += [f"{path.relative_to(REPO)}: {m}" for m in private.findall(code)]
    assert found == []


def test_dearmp_run_stops_an_attempt_past_its_actors_time_limit(app: App, stub_broker: Any) -> None:
    """As ``dramatiq`` worker processes do: a CRM or a relay that trickles its answer must not
    hold a thread of ``dearmp run`` for ever (its clock started nowhere before)."""
    stopped, never = threading.Event(), threading.Event()

    @dramatiq.actor(broker=stub_broker, queue_name="test.hang", time_limit=100, max_retries=0)
    def hang() -> None:
        try:
            for _ in range(1000):  # ten seconds at most: an attempt that is never stopped
                never.wait(0.01)
        except TimeLimitExceeded:
            stopped.set()
            raise

    with running_pipeline(app, stub_broker, 1):
        hang.send()
        assert stopped.wait(10)
