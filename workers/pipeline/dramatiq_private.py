"""Every use of dramatiq's private API, in this one module: what its Redis broker does not offer
publicly and DearMP needs.

- A screen between a consumer's fetch (``RedisBroker._dispatch("fetch")``) and decoding, which
  dead-letters fetched bytes by their Redis id (``do_nack``), found in the ``__acks__`` set.
- The process's broker, if one was installed (``dramatiq.broker.global_broker``; the public
  ``get_broker()`` builds a default broker when none was): what a commit's webhooks are sent on.
- The clock of actors' time limits (``TimeLimit``'s ``manager`` thread), which dramatiq starts
  only in a worker process it booted, started in ``dearmp run``'s own.
- The Redis key layout the operator's commands read: queues, delayed queues (``.DQ``), dead
  letters (``.XQ``), their bodies (``.msgs``) and what workers hold (``__acks__``).

Written for dramatiq 2.2.1: ``tests/test_dramatiq_private.py`` pins the range (:data:`CHECKED`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import dramatiq.brokers.redis
import redis
from dramatiq.common import dq_name, xq_name
from dramatiq.middleware import TimeLimit

# The dramatiq versions this module was read against: [lowest, first one not checked).
CHECKED = ("2.2.1", "2.3")


def installed_broker() -> dramatiq.Broker | None:
    """The broker ``dramatiq.set_broker`` installed in this process (by a composition root:
    :func:`workers.pipeline.actors.setup`), or None: nothing is built."""
    broker: dramatiq.Broker | None = dramatiq.broker.global_broker
    return broker


def start_time_limits(broker: dramatiq.Broker) -> None:
    """Start the clock that stops an attempt past its actor's time limit, once per process
    (dramatiq's worker command starts it as it boots a worker process)."""
    for middleware in broker.middleware:
        if isinstance(middleware, TimeLimit) and getattr(middleware.manager, "ident", 0) is None:
            middleware.manager.start()


def queue_key(namespace: str, queue_name: str) -> str:
    """The list of a queue's waiting message ids."""
    return f"{namespace}:{queue_name}"


def delayed_key(namespace: str, queue_name: str) -> str:
    """The list of a queue's delayed message ids."""
    return queue_key(namespace, dq_name(queue_name))


def dead_key(namespace: str, queue_name: str) -> str:
    """The sorted set of a queue's dead letters' ids, by time of death (ms)."""
    return queue_key(namespace, xq_name(queue_name))


def acks_key(namespace: str, broker_id: str, queue_name: str) -> str:
    """The set of message ids one worker (broker id) has fetched from a queue and not acked."""
    return f"{namespace}:__acks__.{broker_id}.{queue_name}"


def bodies_key(namespace: str, queue_name: str) -> str:
    """The hash of the message bodies by Redis id of a queue (or its delayed or dead queue)."""
    return f"{queue_key(namespace, queue_name)}.msgs"


def held(client: redis.Redis, namespace: str, queue_name: str) -> int:
    """How many messages of a queue every worker holds (fetched, not yet acked)."""
    pattern = acks_key(namespace, "*", queue_name)
    return sum(int(client.scard(key)) for key in client.scan_iter(pattern))


class ScreenedRedisBroker(dramatiq.brokers.redis.RedisBroker):
    """dramatiq's Redis broker with a screen between fetching and decoding: fetched bytes that
    ``keep`` refuses are dead-lettered, and ``refused(queue, redis_id, size)`` is told."""

    def __init__(
        self,
        *,
        keep: Callable[[bytes], bool],
        refused: Callable[[str, str, int], None],
        **options: Any,
    ) -> None:
        super().__init__(**options)  # type: ignore[no-untyped-call]
        self.keep = keep
        self.refused = refused

    def do_fetch(self, queue_name: str, prefetch: int) -> list[bytes]:
        fetched: list[bytes] = self._dispatch("fetch")(queue_name, prefetch)  # type: ignore[no-untyped-call]
        kept = []
        for data in fetched:
            if self.keep(data):
                kept.append(data)
            else:
                self._dead_letter(queue_name, data)
        return kept

    def _dead_letter(self, queue_name: str, data: bytes) -> None:
        # Which fetched id holds these bytes: the ids this worker holds on the queue.
        ids = list(self.client.smembers(acks_key(self.namespace, self.broker_id, queue_name)))
        bodies = self.client.hmget(bodies_key(self.namespace, queue_name), ids) if ids else []
        for redis_id, body in zip(ids, bodies, strict=True):
            if body == data:
                self.do_nack(queue_name, redis_id)
                self.refused(queue_name, redis_id.decode(errors="replace"), len(data))
                return
