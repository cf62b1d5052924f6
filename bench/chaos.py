"""Chaos benchmark: submissions fed at a steady rate while the worker processes are SIGKILLed on a
schedule, the Redis server is restarted empty, and the SMTP server (aiosmtpd on loopback) answers
451 to a share of the letters. It records every Message-ID the server accepts and reports:

- lost: accepted submissions with neither a letter at the server nor a recorded failure (must be 0);
- stuck: submissions not in a final state once the chaos stops and the pipeline settles (must be 0);
- duplicates: letters the server accepted twice, per SIGKILL, whether each copy was byte-identical,
  and for each how long before the kill the server had accepted its first copy.

    .venv/bin/python -m bench.chaos --postgres     # 2 processes x 8 threads, a SIGKILL every 4 s
    .venv/bin/python -m bench.chaos                # the same on SQLite
    .venv/bin/python -m bench.chaos -n 3000 --rate 50 --kill-every 4 --redis-restarts 2

The reconciler runs throughout in a process of its own (it is what resends what Redis forgot).
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from dramatiq.brokers.redis import RedisBroker
from sqlalchemy import text

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.common import bench_app, database_name, databases, machine, worker_env  # noqa: E402
from tests.factories import submission  # noqa: E402
from tests.services import SmtpSink, free_port  # noqa: E402
from workers.database.engine import session_scope  # noqa: E402
from workers.pipeline.app import App  # noqa: E402
from workers.pipeline.dispatch import dispatch  # noqa: E402
from workers.pipeline.embedded_redis import EmbeddedRedis  # noqa: E402
from workers.pipeline.intake import accept  # noqa: E402
from workers.pipeline.runtime import state_counts  # noqa: E402
from workers.privacy.ledger import verify  # noqa: E402
from workers.stages.stage import Stage  # noqa: E402

POSTCODES = ["DM1 1AA", "DM2 1AA", "DM3 1AA", "DM4 1AA", "DM5 1AA", "DM6 1AA"]


class FlakySink(SmtpSink):
    """An SMTP server that refuses a share of the letters with 451 and records, for every letter
    it accepts, its Message-ID, bytes and when."""

    def __init__(self, share_451: float) -> None:
        super().__init__()
        self.share_451 = share_451
        self.accepted: list[tuple[str, bytes, float]] = []
        self.refused = 0

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        if random.random() < self.share_451:
            self.refused += 1
            return "451 4.3.0 Try again later"
        content = bytes(envelope.original_content)
        message_id = next(
            (
                line.split(b":", 1)[1].strip().decode()
                for line in content.split(b"\r\n")
                if line.lower().startswith(b"message-id:")
            ),
            "",
        )
        self.accepted.append((message_id, content, time.monotonic()))
        return "250 2.0.0 Ok: queued"


class Workers:
    """The worker processes (one process group), killed and started again on schedule."""

    def __init__(self, env: dict[str, str], processes: int, threads: int, logs: Path) -> None:
        self.env, self.logs = env, logs
        self.args = ["worker", "--processes", str(processes), "--threads", str(threads)]
        self.process: subprocess.Popen[bytes] | None = None
        self.kills: list[float] = []

    def start(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "workers.cli", *self.args],
            cwd=REPO, env=self.env, start_new_session=True,
            stdout=(self.logs / f"worker-{len(self.kills)}.log").open("wb"),
            stderr=subprocess.STDOUT,
        )  # fmt: skip

    def kill(self) -> None:
        assert self.process is not None
        os.killpg(self.process.pid, signal.SIGKILL)
        self.kills.append(time.monotonic())
        self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)


def feed(app: App, broker: RedisBroker, n: int, rate: float, ids: list[str]) -> None:
    """Submit ``n`` submissions at ``rate`` a second; a send that finds Redis away is left to
    the reconciler, as the API does."""
    start = time.monotonic()
    for i in range(n):
        payload = submission(supporter__postcode=POSTCODES[i % len(POSTCODES)])
        with session_scope(app.sessions) as session:
            accepted = accept(session, payload, app.secret)
        ids.append(accepted.submission_id)
        dispatch(broker, [Stage.VALIDATE], accepted.submission_id)  # False: the reconciler's
        pause = start + (i + 1) / rate - time.monotonic()
        if pause > 0:
            time.sleep(pause)


def run(args: argparse.Namespace, tmp: Path, db_url: str) -> dict[str, Any]:
    sink = FlakySink(args.share_451).start()
    redis_server = EmbeddedRedis(tmp / "redis", port=free_port()).start()
    app = bench_app(db_url, tmp / "var", redis_server.url)
    env = worker_env(
        db_url, tmp / "var", redis_server.url, DEARMP_MAIL_BACKEND="smtp", SMTP_HOST="127.0.0.1",
        SMTP_PORT=str(sink.port), DEARMP_RECONCILE_INTERVAL="1", DEARMP_RECONCILE_AFTER="5",
        DEARMP_DELIVERY_LEASE_SECONDS="10", DEARMP_OUTBOX_BACKOFF_SECONDS="2",
        dramatiq_restart_delay="500",
    )  # fmt: skip
    logs = tmp / "logs"
    logs.mkdir()
    reconciler = subprocess.Popen(
        [sys.executable, "-m", "workers.cli", "reconcile"], cwd=REPO, env=env,
        start_new_session=True, stdout=(logs / "reconcile.log").open("wb"),
        stderr=subprocess.STDOUT,
    )  # fmt: skip
    deadlocks_before = deadlocks(app)
    workers = Workers(env, args.processes, args.threads, logs)
    workers.start()
    broker = RedisBroker(url=redis_server.url, namespace="dearmp")  # type: ignore[no-untyped-call]
    ids: list[str] = []
    feeder = threading.Thread(target=feed, args=(app, broker, args.n, args.rate, ids))
    started = time.monotonic()
    feeder.start()
    chaos_for = args.n / args.rate
    restarts = [started + chaos_for * (i + 1) / (args.redis_restarts + 1)
                for i in range(args.redis_restarts)]  # fmt: skip
    next_kill = started + args.kill_every
    while time.monotonic() < started + chaos_for:
        now = time.monotonic()
        if restarts and now >= restarts[0]:
            restarts.pop(0)
            redis_server.stop(kill=True)  # no persistence: it comes back empty
            redis_server.start()
        if now >= next_kill:
            workers.kill()
            workers.start()
            next_kill += args.kill_every
        time.sleep(0.05)
    feeder.join()
    settle_until = time.monotonic() + args.settle
    while time.monotonic() < settle_until:
        counts = state_counts(app, ids)
        if sum(n for state, n in counts.items() if state in FINAL) == len(ids):
            break
        time.sleep(0.5)
    elapsed = time.monotonic() - started
    workers.stop()
    reconciler.terminate()
    reconciler.wait(timeout=30)
    counts = state_counts(app, ids)
    with session_scope(app.sessions) as session:
        ledger = verify(session)
    time.sleep(1)  # the stopped workers' database sessions report their statistics as they end
    new_deadlocks = None if deadlocks_before is None else deadlocks(app) - deadlocks_before
    app.engine.dispose()
    redis_server.stop()
    sink.stop()
    result = report(ids, counts, sink, workers.kills, elapsed)
    result.update(ledger=ledger, deadlocks=new_deadlocks)
    return result


def deadlocks(app: App) -> int | None:
    """PostgreSQL's count of deadlocks in this database so far (None on SQLite)."""
    if app.engine.dialect.name != "postgresql":
        return None
    with session_scope(app.sessions) as session:
        return int(
            session.scalar(
                text("SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()")
            )
            or 0
        )


FINAL = {"delivered", "rejected", "failed"}


def report(
    ids: list[str], counts: dict[str, int], sink: FlakySink, kills: list[float], elapsed: float
) -> dict[str, Any]:
    copies: dict[str, list[tuple[bytes, float]]] = defaultdict(list)
    for message_id, content, at in sink.accepted:
        copies[message_id].append((content, at))
    expected = {f"<{sid}@campaign.example.org>" for sid in ids}
    arrived = expected & copies.keys()
    recorded_failures = counts.get("failed", 0) + counts.get("rejected", 0)
    duplicates = {m: c for m, c in copies.items() if len(c) > 1}
    # Each duplicate is put down to the kill nearest its first copy. The server may finish a
    # transaction a killed worker had completed a moment after the kill (negative figures).
    before_kill_ms = [
        (min(kills, key=lambda k: abs(k - c[0][1])) - c[0][1]) * 1000
        for c in duplicates.values()
        if kills
    ]
    return {
        "submissions": len(ids),
        "counts": counts,
        "lost": len(ids) - len(arrived) - recorded_failures,
        "stuck": len(ids) - sum(n for state, n in counts.items() if state in FINAL),
        "kills": len(kills),
        "duplicates": sum(len(c) - 1 for c in duplicates.values()),
        "identical": all(len({v[0] for v in c}) == 1 for c in duplicates.values()),
        "before_kill_ms": sorted(before_kill_ms),
        "refused_451": sink.refused,
        "seconds": elapsed,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--postgres", action="store_true", help="a throwaway PostgreSQL cluster")
    parser.add_argument(
        "--durable",
        action="store_true",
        help="PostgreSQL with fsync and synchronous commits on, as production runs",
    )
    parser.add_argument("-n", type=int, default=3000, help="submissions fed")
    parser.add_argument("--rate", type=float, default=50.0, help="submissions fed per second")
    parser.add_argument("--kill-every", type=float, default=4.0, help="seconds between SIGKILLs")
    parser.add_argument("--redis-restarts", type=int, default=2)
    parser.add_argument("--share-451", type=float, default=0.2)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--settle", type=float, default=300, help="seconds to settle after")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="dearmp-chaos-") as tmpdir:
        tmp = Path(tmpdir)
        with databases(tmp, args.postgres, args.durable) as url:
            r = run(args, tmp, url("chaos"))
    print(machine())
    print(
        f"database: {database_name(args.postgres, args.durable)}; workers: {args.processes} "
        f"processes x {args.threads} threads; {r['submissions']} submissions at {args.rate:g}/s; "
        f"a SIGKILL every {args.kill_every:g} s; Redis restarted empty {args.redis_restarts} "
        f"times; {args.share_451:.0%} of SMTP transactions answered 451"
    )
    print(f"final states: {r['counts']} after {r['seconds']:.0f} s")
    print(f"lost: {r['lost']}   stuck: {r['stuck']}   451 answers: {r['refused_451']}")
    per_kill = r["duplicates"] / r["kills"] if r["kills"] else 0.0
    print(
        f"SIGKILLs: {r['kills']}   duplicates: {r['duplicates']} ({per_kill:.2f} per SIGKILL), "
        f"{'all' if r['identical'] else 'NOT all'} byte-identical"
    )
    ledger = r["ledger"]
    print(
        f"consent ledger: {ledger.events} events, {'intact' if ledger.intact else 'BROKEN'}"
        + ("" if r["deadlocks"] is None else f"; PostgreSQL deadlocks: {r['deadlocks']}")
    )
    gaps = r["before_kill_ms"]
    if gaps:
        print(
            f"first copy accepted before its kill: median {statistics.median(gaps):.0f} ms, "
            f"most {max(gaps):.0f} ms (negative: the server finished it just after the kill)"
        )


if __name__ == "__main__":
    main()
