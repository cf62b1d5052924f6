"""Five dramatiq actors that do nothing but pass a message on: the benchmark's baseline.

Run by ``dramatiq bench.bare_chain`` with the same worker settings as the pipeline.
"""

from __future__ import annotations

import os
import time

import dramatiq
import redis
from dramatiq.brokers.redis import RedisBroker

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
broker = RedisBroker(url=REDIS_URL, namespace="bare")  # type: ignore[no-untyped-call]
dramatiq.set_broker(broker)
DONE_KEY = "bare:done"
_client = redis.Redis.from_url(REDIS_URL)


@dramatiq.actor(queue_name="bare.5", max_retries=0)
def step5(item: str, t0: float) -> None:
    _client.rpush(DONE_KEY, f"{item} {t0} {time.time()}")


@dramatiq.actor(queue_name="bare.4", max_retries=0)
def step4(item: str, t0: float) -> None:
    step5.send(item, t0)


@dramatiq.actor(queue_name="bare.3", max_retries=0)
def step3(item: str, t0: float) -> None:
    step4.send(item, t0)


@dramatiq.actor(queue_name="bare.2", max_retries=0)
def step2(item: str, t0: float) -> None:
    step3.send(item, t0)


@dramatiq.actor(queue_name="bare.1", max_retries=0)
def step1(item: str, t0: float) -> None:
    step2.send(item, t0)
