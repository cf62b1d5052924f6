"""Rate limits and quiet hours for delivery: a letter that meets one waits, it does not fail.
Limits are sliding windows in Redis sorted sets, so they hold across every worker; a reservation
is made atomically for every limit that applies, or for none."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from datetime import time as clock
from typing import Protocol
from zoneinfo import ZoneInfo

import redis

UK = ZoneInfo("Europe/London")


@dataclass(frozen=True)
class Limit:
    key: str
    limit: int
    window_seconds: float


class Limiter(Protocol):
    def reserve(self, member: str, limits: list[Limit]) -> float:
        """Reserve a slot in every limit for ``member``: 0.0, or the seconds to wait first."""
        ...

    def mark_sent(self, member: str, limits: list[Limit]) -> None:
        """Restart the member's slot at the moment it was actually sent."""
        ...


def hold_seconds(window_seconds: float) -> float:
    """How far ahead a reserved slot is dated until ``mark_sent`` records when the letter left,
    so that a letter slow to leave is never counted as older than it is."""
    return min(window_seconds / 2, 2.0)


# KEYS: the limits' keys. ARGV: member, then limit, window (ms) and hold (ms) per key. Server time.
_RESERVE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local member = ARGV[1]
local wait = 0
for i, key in ipairs(KEYS) do
  local limit = tonumber(ARGV[3 * i - 1])
  local window = tonumber(ARGV[3 * i])
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now - window)
  local mine = redis.call('ZSCORE', key, member)
  local count = redis.call('ZCARD', key)
  if not mine and count >= limit then
    local oldest = redis.call('ZRANGE', key, count - limit, count - limit, 'WITHSCORES')
    wait = math.max(wait, tonumber(oldest[2]) + window - now)
  end
end
if wait > 0 then return wait end
for i, key in ipairs(KEYS) do
  local hold = tonumber(ARGV[3 * i + 1])
  redis.call('ZADD', key, now + hold, member)
  redis.call('PEXPIRE', key, math.ceil(tonumber(ARGV[3 * i]) + hold))
end
return 0
"""

_MARK_SENT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
for i, key in ipairs(KEYS) do
  redis.call('ZADD', key, 'XX', now, ARGV[1])
end
return 0
"""


class RedisLimiter:
    def __init__(self, client: redis.Redis, prefix: str = "dearmp:rl:") -> None:
        self.prefix = prefix
        self._reserve = client.register_script(_RESERVE)
        self._mark_sent = client.register_script(_MARK_SENT)

    def _args(self, member: str, limits: list[Limit]) -> tuple[list[str], list[str]]:
        keys = [self.prefix + lim.key for lim in limits]
        args = [member]
        for lim in limits:
            hold = hold_seconds(lim.window_seconds)
            args += [str(lim.limit), str(int(lim.window_seconds * 1000)), str(int(hold * 1000))]
        return keys, args

    def reserve(self, member: str, limits: list[Limit]) -> float:
        if not limits:
            return 0.0
        keys, args = self._args(member, limits)
        return float(self._reserve(keys=keys, args=args)) / 1000

    def mark_sent(self, member: str, limits: list[Limit]) -> None:
        if limits:
            keys, args = self._args(member, limits)
            self._mark_sent(keys=keys, args=args[:1])


class MemoryLimiter:
    """The same semantics in one process: for tests and the StubBroker."""

    def __init__(self) -> None:
        self.slots: dict[str, dict[str, float]] = {}
        self.lock = threading.Lock()

    def reserve(self, member: str, limits: list[Limit]) -> float:
        now = time.monotonic()
        with self.lock:
            wait = 0.0
            for lim in limits:
                slots = self.slots.setdefault(lim.key, {})
                for other, at in list(slots.items()):
                    if at <= now - lim.window_seconds:
                        del slots[other]
                if member not in slots and len(slots) >= lim.limit:
                    oldest = sorted(slots.values())[len(slots) - lim.limit]
                    wait = max(wait, oldest + lim.window_seconds - now)
            if wait > 0:
                return wait
            for lim in limits:
                self.slots[lim.key][member] = now + hold_seconds(lim.window_seconds)
            return 0.0

    def mark_sent(self, member: str, limits: list[Limit]) -> None:
        now = time.monotonic()
        with self.lock:
            for lim in limits:
                if member in self.slots.get(lim.key, {}):
                    self.slots[lim.key][member] = now


def _quiet(t: clock, start: clock, end: clock) -> bool:
    return (t >= start or t < end) if start > end else start <= t < end


def seconds_until_open(now: datetime, start: clock, end: clock) -> float:
    """0 outside quiet hours (UK time, start inclusive, end exclusive), else seconds until the
    first instant after ``now`` the UK clock reads ``end``. Found in UTC among that wall time's
    readings today and tomorrow, both of an hour the clocks go back through (an end in it came
    once already, its first time; a wall-clock comparison said open and let letters out), and
    the one after an hour skipped in spring (an end in it: the hour after)."""
    if not _quiet(now.astimezone(UK).time(), start, end):
        return 0.0
    today = now.astimezone(UK).date()
    readings = (
        datetime.combine(day, end, tzinfo=UK).replace(fold=fold).astimezone(UTC)
        for day in (today, today + timedelta(days=1))
        for fold in (0, 1)
    )
    after = [at for at in readings if at > now and not _quiet(at.astimezone(UK).time(), start, end)]
    return (min(after) - now).total_seconds() if after else 3600.0  # (none: look in an hour)
