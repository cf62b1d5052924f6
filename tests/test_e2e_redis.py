"""End to end on a real Redis server with real worker processes, on SQLite and PostgreSQL."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from dramatiq.brokers.redis import RedisBroker
from sqlalchemy import func, select

from tests.conftest import make_settings
from tests.factories import submission
from tests.services import REPO, wait_for
from workers.database.engine import session_scope
from workers.database.models import OutboxItem
from workers.pipeline.app import App
from workers.pipeline.embedded_redis import EmbeddedRedis
from workers.pipeline.runtime import count_final, prepare, state_counts, submit

pytestmark = pytest.mark.redis


class Stack:
    """Worker and reconciler processes sharing one Redis and one database."""

    def __init__(self, tmp_path: Path, db_url: str, redis_url: str, **env: str) -> None:
        self.tmp_path = tmp_path
        self.logs = tmp_path / "logs"
        self.logs.mkdir()
        self.env = {
            **os.environ,
            "DEARMP_BROKER": "redis",
            "REDIS_URL": redis_url,
            "DATABASE_URL": db_url,
            "DEARMP_SECRET_KEY": "test-secret-of-at-least-32-characters",  # as make_settings
            "DEARMP_SANDBOX_ADDRESS": "sandbox@campaign.example.org",
            "DEARMP_DATA_DIR": str(tmp_path / "var"),
            "DEARMP_OUTBOX_DIR": str(tmp_path / "outbox"),
            "DEARMP_RECONCILE_INTERVAL": "1",
            "DEARMP_RECONCILE_AFTER": "4",
            "dramatiq_restart_delay": "500",
            **env,
        }
        self.processes: list[subprocess.Popen[bytes]] = []

    def start(self, *args: str) -> subprocess.Popen[bytes]:
        log = (self.logs / f"{args[0]}-{len(self.processes)}.log").open("wb")
        process = subprocess.Popen(
            [sys.executable, "-m", "workers.cli", *args],
            cwd=REPO,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: a kill reaches its children too
        )
        self.processes.append(process)
        return process

    def kill(self, process: subprocess.Popen[bytes]) -> None:
        """SIGKILL the process and every worker process it started, with no clean-up."""
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)

    def log_text(self) -> str:
        return "\n".join(p.read_text(errors="replace") for p in self.logs.glob("*.log"))


@pytest.fixture
def stack(
    tmp_path: Path, db_url: str, redis_server: EmbeddedRedis
) -> Iterator[tuple[Stack, App, Any]]:
    app = App.from_settings(make_settings(tmp_path, database_url=db_url))
    prepare(app)
    broker = RedisBroker(url=redis_server.url, namespace="dearmp")
    running = Stack(tmp_path, db_url, redis_server.url)
    running.start("worker", "--processes", "1", "--threads", "4")
    running.start("reconcile")
    yield running, app, broker
    running.stop()
    app.engine.dispose()


def wait_all_final(app: App, ids: list[str], timeout: float) -> dict[str, int]:
    unique = sorted(set(ids))
    wait_for(lambda: count_final(state_counts(app, unique)) == len(unique), timeout, 0.25)
    return state_counts(app, unique)


def test_batch_reaches_final_states_with_no_personal_data_in_logs(
    stack: tuple[Stack, App, Any], tmp_path: Path
) -> None:
    running, app, broker = stack
    valid = [submission(supporter__email=f"person{i}@example.com") for i in range(20)]
    invalid = [submission(supporter__email="bad"), submission(supporter__postcode="DM9 9XX")]
    ids = [submit(app, broker, p)[0] for p in valid + invalid]
    counts = wait_all_final(app, ids, timeout=90)
    assert counts == {"delivered": 20, "rejected": 2}, running.log_text()[-3000:]
    assert len(list((tmp_path / "outbox").glob("*.eml"))) == 20
    logs = running.log_text()
    assert '"event": "stage_done"' in logs and '"submission_id"' in logs
    personal = ["example.com", "Amira", "Haddad", "Mill Lane", "Millbrook", "DM1 1AA", "7946 0000"]
    leaked = [p for p in personal if p in logs]
    assert leaked == [], f"personal data in worker logs: {leaked}"


def test_restarting_redis_without_persistence_loses_no_submission(
    stack: tuple[Stack, App, Any], redis_server: EmbeddedRedis, tmp_path: Path
) -> None:
    running, app, broker = stack
    ids = [submit(app, broker, submission())[0] for _ in range(50)]
    # Let part of the batch through, then take Redis away with everything queued in it; what
    # is submitted while it is away is stored, and its messages are lost (sent to no one).
    assert wait_for(lambda: count_final(state_counts(app, ids)) >= 10, 60, 0.05)
    redis_server.stop(kill=True)
    ids += [submit(app, broker, submission())[0] for _ in range(100)]
    unfinished_at_kill = len(ids) - count_final(state_counts(app, ids))
    time.sleep(1.5)
    redis_server.start()
    assert redis_server.is_up()
    counts = wait_all_final(app, ids, timeout=120)
    assert counts == {"delivered": 150}, (counts, running.log_text()[-3000:])
    assert unfinished_at_kill > 0, "Redis was killed after the batch had finished"
    assert '"event": "reconciler_resent"' in running.log_text()
    # Every letter exactly once: one file per letter, one attempt per delivery.
    assert len(list((tmp_path / "outbox").glob("*.eml"))) == 150
    with session_scope(app.sessions) as session:
        assert session.scalar(select(func.max(OutboxItem.attempts))) == 1


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)  # production's: CI's time
def test_the_three_policies_for_near_identical_letters_on_real_workers(
    tmp_path: Path, db_url: str, redis_server: EmbeddedRedis
) -> None:
    """Three campaigns, one per policy (send, hold, digest), each writing to an MP of its own
    (letters to one MP are compared whatever their campaign), each letter the draft as it is,
    sent one after another through worker and reconciler processes on real Redis: after the
    first, each is near-identical to those before it."""
    import redis

    from workers.database.models import Digest
    from workers.pipeline import checks
    from workers.pipeline.dispatch import dispatch_groups
    from workers.stages import comparison, digests
    from workers.stages.stage import Stage

    campaigns = tmp_path / "campaigns"
    campaigns.mkdir()
    sample = (REPO / "config" / "campaigns" / "political-prisoners.toml").read_text()
    for policy in ("send", "hold", "digest"):
        text = sample.replace('slug = "political-prisoners"', f'slug = "{policy}-letters"')
        text += f'\n[similar_letters]\npolicy = "{policy}"\nhold_after = 1\ndigest_hour = 23\n'
        (campaigns / f"{policy}.toml").write_text(text)
    app = App.from_settings(make_settings(tmp_path, database_url=db_url, campaigns_dir=campaigns))
    prepare(app)
    broker = RedisBroker(url=redis_server.url, namespace="dearmp")
    running = Stack(tmp_path, db_url, redis_server.url, DEARMP_CAMPAIGNS_DIR=str(campaigns))
    running.start("worker", "--processes", "1", "--threads", "4")
    running.start("reconcile")
    try:
        ids: dict[str, list[str]] = {}
        mps = {"send": "DM1 1AA", "hold": "DM2 1AA", "digest": "DM3 1AA"}
        for policy, postcode in mps.items():
            for i in range(3):
                payload = submission(campaign=f"{policy}-letters", supporter__postcode=postcode)
                payload["supporter"]["email"] = f"{policy}{i}@example.com"
                sid = submit(app, broker, payload)[0]
                ids.setdefault(policy, []).append(sid)
                settled = partial(_settled, app, sid)
                assert wait_for(settled, 60, 0.05), running.log_text()[-3000:]
        states = {p: [_state(app, sid) for sid in group] for p, group in ids.items()}
        assert states == {
            "send": ["delivered"] * 3,
            "hold": ["delivered", "delivered", "in_review"],
            "digest": ["delivered", "delivered", "in_digest"],
        }, running.log_text()[-3000:]
        client = redis.Redis.from_url(redis_server.url)
        found = {c.name: c for c in checks.run(app, client, "dearmp", 3, 300)}
        assert (
            found["review"].status == "degraded"
            and "1 letter near-identical" in found["review"].detail
        )
        with session_scope(app.sessions) as session:
            assert comparison.release(session, ids["hold"][2])
            made = digests.build_due(session, force=True)
        dispatch_groups(broker, {Stage.RENDER: [ids["hold"][2]], Stage.DELIVER: made})
        everything = [sid for group in ids.values() for sid in group]
        assert wait_all_final(app, everything, timeout=60) == {"delivered": 9}
        with session_scope(app.sessions) as session:
            assert session.scalar(select(func.count()).select_from(Digest)) == 1
        assert len(list((tmp_path / "outbox").glob("digest-*.eml"))) == 1
    finally:
        running.stop()
        app.engine.dispose()


def _state(app: App, sid: str) -> str:
    return next(iter(state_counts(app, [sid])))


def _settled(app: App, sid: str) -> bool:
    return _state(app, sid) in ("delivered", "in_review", "in_digest", "rejected", "failed")


def test_dearmp_run_starts_its_embedded_redis_again_when_it_dies(
    tmp_path: Path, db_url: str
) -> None:
    """`dearmp run` on the embedded defaults: its Redis dies, it is started again, and a letter
    submitted after goes (before, the process went on with nothing moving)."""
    import redis

    app = App.from_settings(make_settings(tmp_path, database_url=db_url))
    prepare(app)
    running = Stack(tmp_path, db_url, "")
    del running.env["REDIS_URL"]  # the embedded Redis
    server = EmbeddedRedis(app.settings.data_dir, socket=app.settings.embedded_redis_socket)
    try:
        running.start("run", "--threads", "2")
        assert wait_for(lambda: "pipeline running" in running.log_text(), 60), running.log_text()[
            -3000:
        ]
        client = redis.Redis.from_url(server.url)
        first = client.info()["process_id"]
        with contextlib.suppress(redis.ConnectionError):
            client.shutdown(nosave=True)
        assert wait_for(lambda: server.is_up() and client.info()["process_id"] != first, 30), (
            running.log_text()[-3000:]
        )
        broker = RedisBroker(url=server.url, namespace="dearmp")
        sid = submit(app, broker, submission())[0]
        assert wait_for(lambda: state_counts(app, [sid]) == {"delivered": 1}, 90), (
            running.log_text()[-3000:]
        )
        assert "embedded_redis_restarted" in running.log_text()
    finally:
        running.stop()
        app.engine.dispose()


def test_dearmp_run_killed_leaves_a_redis_the_next_run_replaces_and_watches(
    tmp_path: Path, db_url: str
) -> None:
    """A `dearmp run` killed with SIGKILL cannot stop its Redis (in a session of its own); the
    next run shuts that one down and starts its own, which it then starts again when it dies."""
    import redis

    app = App.from_settings(make_settings(tmp_path, database_url=db_url))
    prepare(app)
    running = Stack(tmp_path, db_url, "")
    del running.env["REDIS_URL"]  # the embedded Redis
    server = EmbeddedRedis(app.settings.data_dir, socket=app.settings.embedded_redis_socket)
    client = redis.Redis.from_url(server.url)
    try:
        first = running.start("run", "--threads", "1")
        assert wait_for(lambda: "pipeline running" in running.log_text(), 60), running.log_text()
        orphan = client.info()["process_id"]
        running.kill(first)
        first.wait(timeout=10)
        assert server.is_up() and client.info()["process_id"] == orphan  # left behind

        running.start("run", "--threads", "1")
        assert wait_for(lambda: running.log_text().count("pipeline running") == 2, 60), (
            running.log_text()[-3000:]
        )
        assert "embedded_redis_orphan_stopped" in running.log_text()
        own = client.info()["process_id"]
        assert own != orphan
        with contextlib.suppress(redis.ConnectionError):
            client.shutdown(nosave=True)  # and this one is watched: started again
        assert wait_for(lambda: server.is_up() and client.info()["process_id"] != own, 30), (
            running.log_text()[-3000:]
        )
    finally:
        running.stop()
        with contextlib.suppress(redis.RedisError):
            client.shutdown(nosave=True)
        app.engine.dispose()
