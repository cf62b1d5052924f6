"""Rate limits (sliding windows, on a real Redis and in memory) and quiet hours in UK time."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from datetime import time as clock

import pytest
import redis

from schemas.campaign import RateLimit
from tests.test_rendering import campaign
from workers.letters.rate_limits import (
    Limit,
    Limiter,
    MemoryLimiter,
    RedisLimiter,
    hold_seconds,
    seconds_until_open,
)
from workers.pipeline.embedded_redis import EmbeddedRedis
from workers.stages.delivery import DeliveryPolicy, limits_for


@pytest.fixture(params=["memory", "redis"])
def limiter(request: pytest.FixtureRequest) -> Limiter:
    if request.param == "memory":
        return MemoryLimiter()
    server: EmbeddedRedis = request.getfixturevalue("redis_server")
    return RedisLimiter(redis.Redis.from_url(server.url))


def test_at_most_n_in_any_window_then_the_wait_until_a_slot_frees(limiter: Limiter) -> None:
    limit = [Limit("mp:1", 3, 0.5)]
    assert [limiter.reserve(f"l{i}", limit) for i in range(3)] == [0.0, 0.0, 0.0]
    wait = limiter.reserve("l3", limit)
    assert 0.3 < wait <= 0.5 + hold_seconds(0.5)  # in-flight letters are dated ahead
    time.sleep(wait + 0.02)
    assert limiter.reserve("l3", limit) == 0.0


def test_the_same_letter_reserving_twice_takes_one_slot(limiter: Limiter) -> None:
    limit = [Limit("mp:2", 2, 5)]
    assert limiter.reserve("same", limit) == 0.0
    assert limiter.reserve("same", limit) == 0.0
    assert limiter.reserve("other", limit) == 0.0
    assert limiter.reserve("third", limit) > 0


def test_all_limits_or_none(limiter: Limiter) -> None:
    wide, narrow = Limit("mp:3", 10, 5), Limit("campaign:x:mp:3", 1, 5)
    assert limiter.reserve("a", [wide, narrow]) == 0.0
    assert limiter.reserve("b", [wide, narrow]) > 0  # refused by the narrow limit ...
    for i in range(9):  # ... so it took no slot in the wide one
        assert limiter.reserve(f"w{i}", [wide]) == 0.0


def test_limits_for_a_letter() -> None:
    definition = campaign(rate_limit=RateLimit(per_mp=50, window_seconds=60))
    policy = DeliveryPolicy(mp_limit=100, mp_limit_window=3600, send_rate=0.5)
    assert limits_for(policy, definition, 4358, "smtp") == [
        Limit("mp:4358", 100, 3600),
        Limit("campaign:political-prisoners:mp:4358", 50, 60),
        Limit("account:smtp", 1, 2.0),
    ]
    assert limits_for(DeliveryPolicy(), campaign(rate_limit=None), 4358, "smtp") == []


@pytest.mark.parametrize(
    ("utc", "expected_hours"),
    [
        (datetime(2026, 1, 14, 12, 0, tzinfo=UTC), 0),  # midday in winter: open
        (datetime(2026, 1, 14, 19, 30, tzinfo=UTC), 13.5),  # 19:30 GMT: closed until 09:00
        (datetime(2026, 1, 15, 7, 0, tzinfo=UTC), 2),  # 07:00 GMT
        (datetime(2026, 7, 15, 7, 30, tzinfo=UTC), 0.5),  # 08:30 BST: half an hour to go
        (datetime(2026, 7, 15, 8, 0, tzinfo=UTC), 0),  # 09:00 BST: open
        (datetime(2026, 3, 28, 19, 0, tzinfo=UTC), 13),  # over the clocks going forward
    ],
)
def test_quiet_hours_in_uk_time(utc: datetime, expected_hours: float) -> None:
    wait = seconds_until_open(utc, clock(18, 0), clock(9, 0))
    assert wait == pytest.approx(expected_hours * 3600)


@pytest.mark.parametrize(
    ("utc", "minutes"),
    [
        (datetime(2026, 10, 25, 0, 10, tzinfo=UTC), 20),  # 01:10 BST, the hour's first time
        (datetime(2026, 10, 25, 0, 40, tzinfo=UTC), 0),  # 01:40 BST: open
        (datetime(2026, 10, 25, 1, 10, tzinfo=UTC), 20),  # 01:10 GMT, its second: quiet again
        (datetime(2026, 3, 29, 0, 50, tzinfo=UTC), 40),  # 00:50 GMT; 01:30 never comes
        (datetime(2026, 3, 29, 1, 10, tzinfo=UTC), 0),  # 02:10 BST: open
    ],
)
def test_quiet_hours_ending_in_an_hour_the_clocks_change_never_let_letters_out(
    utc: datetime, minutes: float
) -> None:
    """Quiet 22:00 to 01:30: when the clocks go back, 01:00 to 02:00 comes twice, and the wait
    was negative the second time (letters went out in quiet hours); when they go forward it
    never comes: the clock reads past it from 02:00 BST, and the wait ends at 02:30 BST (its
    reading before the change), half an hour late but never inside quiet hours."""
    wait = seconds_until_open(utc, clock(22, 0), clock(1, 30))
    assert wait == pytest.approx(minutes * 60)


def test_daytime_quiet_hours() -> None:
    lunch = clock(12, 0), clock(13, 0)
    assert seconds_until_open(datetime(2026, 1, 14, 12, 30, tzinfo=UTC), *lunch) == 1800
    assert seconds_until_open(datetime(2026, 1, 14, 13, 0, tzinfo=UTC), *lunch) == 0
