"""The benchmark's baseline: a chain of dramatiq actors that do nothing but pass a message on,
as many as the stage messages a benchmark submission makes (``BARE_HOPS``, set by
``bench.pipeline``), each on a queue of its own.

Run by ``dramatiq bench.bare_chain`` with the same worker settings as the pipeline.
"""

from __future__ import annotations

import os
import time
from typing import Any

import dramatiq
import redis
from dramatiq.brokers.redis import RedisBroker

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
HOPS = int(os.environ.get("BARE_HOPS", "5"))
broker = RedisBroker(url=REDIS_URL, namespace="bare")  # type: ignore[no-untyped-call]
dramatiq.set_broker(broker)
DONE_KEY = "bare:done"
_client = redis.Redis.from_url(REDIS_URL)


def _step(n: int) -> Any:
    def step(item: str, t0: float) -> None:
        if n == HOPS:
            _client.rpush(DONE_KEY, f"{item} {t0} {time.time()}")
        else:
            steps[n].send(item, t0)

    return dramatiq.actor(step, actor_name=f"step{n}", queue_name=f"bare.{n}", max_retries=0)


steps = [_step(n) for n in range(1, HOPS + 1)]
