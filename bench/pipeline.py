"""Pipeline benchmark: N submissions through every stage on real Redis and a real database,
against a bare chain of no-op dramatiq actors, one for each stage message a submission makes
(``bench.common.MESSAGES``: five, the comparison stage running in line), on the same Redis with
the same worker settings.

    .venv/bin/python -m bench.pipeline                 # 5,000 submissions, SQLite
    .venv/bin/python -m bench.pipeline --postgres      # the same on a throwaway PostgreSQL cluster
    .venv/bin/python -m bench.pipeline -n 1000 --processes 2 --threads 8

Submissions are stored first (intake is the HTTP front door's cost, measured separately); the clock
starts when their first stage messages are enqueued and stops when the last letter is delivered.
Latency is per submission, from its enqueue to its "delivered" transition (bare: to the last actor).
The letters' .eml files go to tmpfs (/dev/shm) when there is one; the database stays on disk.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import redis
from dramatiq.brokers.redis import RedisBroker
from sqlalchemy import func, select, text

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.common import MESSAGES, SECRET, STAGES, database_name  # noqa: E402
from config.settings import Settings  # noqa: E402
from tests.factories import submission  # noqa: E402
from tests.services import PostgresCluster, free_port  # noqa: E402
from workers.database.engine import session_scope  # noqa: E402
from workers.database.models import State, SubmissionEvent  # noqa: E402
from workers.letters.definitions import update_definition  # noqa: E402
from workers.pipeline.app import App  # noqa: E402
from workers.pipeline.dispatch import stage_message  # noqa: E402
from workers.pipeline.embedded_redis import EmbeddedRedis  # noqa: E402
from workers.pipeline.intake import accept  # noqa: E402
from workers.stages.stage import Stage  # noqa: E402

TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU used so far by ``pids`` (processes that are gone count nothing)."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / TICKS


def family(pid: int) -> list[int]:
    """``pid`` and every process below it."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(children.get(current, []))
    return found


class CpuMeter:
    """CPU used by groups of processes between start() and stop(), in core-seconds."""

    def __init__(self, **roots: int | None) -> None:
        self.roots = {name: pid for name, pid in roots.items() if pid}
        self.before: dict[str, float] = {}

    def _now(self) -> dict[str, float]:
        return {name: cpu_seconds(family(pid)) for name, pid in self.roots.items()}

    def start(self) -> None:
        self.before = self._now()

    def stop(self) -> dict[str, float]:
        return {name: used - self.before[name] for name, used in self._now().items()}


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def start_workers(
    module: str, env: dict[str, str], processes: int, threads: int
) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "dramatiq", module, "--processes", str(processes),
         "--threads", str(threads), "--skip-logging"],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip


def stop(process: subprocess.Popen[bytes]) -> None:
    """Stop the worker processes (a process group), killing them if they do not stop."""
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def bench_pipeline(
    args: argparse.Namespace, redis_url: str, db_url: str, tmp: Path, others: dict[str, int | None]
) -> dict[str, float]:
    outbox = args.outbox_root / "outbox"
    settings = Settings(
        database_url=db_url, data_dir=tmp / "var", secret_key=SECRET, broker="redis",
        redis_url=redis_url, outbox_dir=outbox, log_level="WARNING",
    )  # fmt: skip
    app = App.from_settings(settings)
    from workers.pipeline.runtime import prepare

    prepare(app)
    with session_scope(app.sessions) as session:
        # The sample campaign allows 500 letters an hour to one MP, and every benchmark letter
        # goes to the same one: the benchmark measures the pipeline, not the limit.
        update_definition(session, "political-prisoners", rate_limit=None)
    ids = []
    with session_scope(app.sessions) as session:
        for i in range(args.n):
            payload = submission(supporter__email=f"bench{i}@example.com")
            ids.append(accept(session, payload, app.secret).submission_id)
    env = {
        **os.environ, "REDIS_URL": redis_url, "DATABASE_URL": db_url, "DEARMP_BROKER": "redis",
        "DEARMP_SECRET_KEY": SECRET, "DEARMP_DATA_DIR": str(tmp / "var"),
        "DEARMP_OUTBOX_DIR": str(outbox), "DEARMP_LOG_LEVEL": "WARNING",
    }  # fmt: skip
    workers = start_workers("workers.pipeline.actors:setup", env, args.processes, args.threads)
    time.sleep(3)  # let the workers boot before the clock starts
    meter = CpuMeter(workers=workers.pid, **others)
    meter.start()
    counting = app.engine.dialect.name == "postgresql"
    if counting:  # every statement the database runs from here on, BEGIN and COMMIT included
        with app.engine.begin() as conn:
            conn.execute(text("CREATE EXTENSION IF NOT EXISTS pg_stat_statements"))
            conn.execute(text("SELECT pg_stat_statements_reset()"))
    broker = RedisBroker(url=redis_url, namespace="dearmp")  # type: ignore[no-untyped-call]
    enqueued: dict[str, float] = {}
    start = time.time()
    size = args.intake_groups
    for start_at in range(0, len(ids), size):
        group = ids[start_at : start_at + size]
        now = time.time()
        enqueued.update(dict.fromkeys(group, now))
        broker.enqueue(stage_message(Stage.VALIDATE, *group))
    # Poll with a count (cheap: the benchmark shares the cores with what it measures); read the
    # delivery times once everything is in.
    count = 0
    deadline = time.monotonic() + args.timeout
    while count < len(ids) and time.monotonic() < deadline:
        time.sleep(0.2)
        with session_scope(app.sessions) as session:
            count = (
                session.scalar(select(func.count()).where(SubmissionEvent.state == State.DELIVERED))
                or 0
            )
    cpu = meter.stop()
    statements = {}
    if counting:  # less this benchmark's own polling
        with app.engine.begin() as conn:
            calls = conn.execute(
                text(
                    "SELECT sum(calls) FROM pg_stat_statements WHERE query NOT LIKE "
                    "'%count(*)%submission_events%' AND query NOT LIKE '%pg_stat_statements%'"
                )
            ).scalar()
            if args.statements:  # the commonest, per submission
                top = conn.execute(
                    text(
                        "SELECT calls, query FROM pg_stat_statements WHERE query NOT LIKE "
                        "'%pg_stat_statements%' ORDER BY calls DESC LIMIT 30"
                    )
                ).all()
                for many, query in top:
                    print(f"{many / len(ids):6.2f}  {' '.join(query.split())[:150]}")
        statements = {"statements": float(calls or 0)}
    with session_scope(app.sessions) as session:
        rows = session.execute(
            select(SubmissionEvent.submission_id, SubmissionEvent.at).where(
                SubmissionEvent.state == State.DELIVERED
            )
        ).all()
    delivered = {sid: at.timestamp() for sid, at in rows}
    stop(workers)
    app.engine.dispose()
    cpu_used = {f"cpu_{k}": v for k, v in cpu.items()}
    return summarise(start, enqueued, delivered, len(ids)) | cpu_used | statements


def bench_bare(
    args: argparse.Namespace, redis_url: str, others: dict[str, int | None]
) -> dict[str, float]:
    env = {**os.environ, "REDIS_URL": redis_url, "BARE_HOPS": str(args.bare_hops)}
    workers = start_workers("bench.bare_chain", env, args.processes, args.threads)
    time.sleep(3)
    meter = CpuMeter(workers=workers.pid, **others)
    meter.start()
    os.environ["REDIS_URL"], os.environ["BARE_HOPS"] = redis_url, str(args.bare_hops)
    from bench import bare_chain

    client = redis.Redis.from_url(redis_url)
    client.delete(bare_chain.DONE_KEY)
    enqueued: dict[str, float] = {}
    start = time.time()
    for i in range(args.n):
        enqueued[str(i)] = time.time()
        bare_chain.steps[0].send(str(i), enqueued[str(i)])
    deadline = time.monotonic() + args.timeout
    while client.llen(bare_chain.DONE_KEY) < args.n and time.monotonic() < deadline:
        time.sleep(0.2)
    done = {}
    for raw in client.lrange(bare_chain.DONE_KEY, 0, -1):
        item, _t0, t_done = raw.decode().split()
        done[item] = float(t_done)
    cpu = meter.stop()
    stop(workers)
    return summarise(start, enqueued, done, args.n) | {f"cpu_{k}": v for k, v in cpu.items()}


def summarise(
    start: float, enqueued: dict[str, float], done: dict[str, float], n: int
) -> dict[str, float]:
    if len(done) < n:
        raise SystemExit(f"only {len(done)} of {n} finished before the timeout")
    latencies = [done[k] - enqueued[k] for k in done]
    elapsed = max(done.values()) - start
    return {
        "per_second": n / elapsed,
        "seconds": elapsed,
        "p50_ms": percentile(latencies, 50) * 1000,
        "p99_ms": percentile(latencies, 99) * 1000,
        "mean_ms": statistics.fmean(latencies) * 1000,
    }


# The letters' files go to tmpfs by default. The file outbox stands in for a mail server, and on
# ext4 creating a file costs between 50 and 900 µs of kernel time depending on how many files were
# deleted in the minutes before (each run deletes its 5,000): that measures the disk's state, not
# the pipeline. ``--outbox /some/disk/folder`` measures it anyway (docs/performance.md).
SHM = Path("/dev/shm")


@contextlib.contextmanager
def outbox_root(args: argparse.Namespace) -> Iterator[Path]:
    if args.outbox:
        yield args.outbox
    elif SHM.is_dir() and os.access(SHM, os.W_OK):
        with tempfile.TemporaryDirectory(prefix="dearmp-bench-", dir=SHM) as folder:
            yield Path(folder)
    else:
        with tempfile.TemporaryDirectory(prefix="dearmp-bench-outbox-") as folder:
            yield Path(folder)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("-n", type=int, default=5000, help="submissions (default 5000)")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--postgres", action="store_true", help="a throwaway PostgreSQL cluster")
    parser.add_argument(
        "--durable",
        action="store_true",
        help="PostgreSQL with fsync and synchronous commits on, as production runs",
    )
    parser.add_argument(
        "--bare-hops",
        type=int,
        default=MESSAGES,
        help=f"no-op actors in the bare chain (default {MESSAGES}: one a stage message)",
    )
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument(
        "--statements", action="store_true", help="PostgreSQL: the commonest statements"
    )
    parser.add_argument(
        "--intake-groups",
        type=int,
        default=1,
        metavar="K",
        help="send the validation messages K submissions at a time, as the HTTP intake does "
        "for a batch it commits together (default 1: one message per submission)",
    )
    parser.add_argument(
        "--outbox",
        type=Path,
        help="put the letters' .eml files under this folder (default: tmpfs, /dev/shm, if there "
        "is one, else a temporary folder on disk)",
    )
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="dearmp-bench-") as tmpdir, outbox_root(args) as root:
        tmp = Path(tmpdir)
        args.outbox_root = root
        cluster = (
            PostgresCluster(tmp / "pg", count_statements=True, durable=args.durable).start()
            if args.postgres
            else None
        )
        db_url = cluster.url() if cluster else f"sqlite:///{tmp / 'bench.sqlite3'}"
        with EmbeddedRedis(tmp / "redis", port=free_port()) as server:
            others = {
                "redis": server.process.pid if server.process else None,
                "database": cluster.postmaster_pid() if cluster else None,
            }
            bare = bench_bare(args, server.url, others)
            pipeline = bench_pipeline(args, server.url, db_url, tmp, others)
        if cluster:
            cluster.stop()

    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    )
    print(
        f"database: {database_name(args.postgres, args.durable)}; "
        f"workers: {args.processes} processes x {args.threads} threads; n={args.n}; "
        f"outbox: {args.outbox_root}"
    )
    print(
        f"bare chain: {args.bare_hops} no-op actors; pipeline: {len(STAGES)} stages, "
        f"{MESSAGES} messages a submission"
    )
    for name, r in (("bare chain", bare), ("pipeline", pipeline)):
        print(
            f"{name:>10}: {r['per_second']:8.1f} submissions/s   p50 {r['p50_ms']:8.1f} ms   "
            f"p99 {r['p99_ms']:8.1f} ms   ({r['seconds']:.1f} s)"
        )
    # The targets: with the intake's groups 0.6 on PostgreSQL and 0.5 on SQLite; one
    # submission per message (when throughput matters least) 0.3 on either.
    target = 0.3 if args.intake_groups == 1 else 0.6 if args.postgres else 0.5
    print(
        f"     ratio: {pipeline['per_second'] / bare['per_second']:.2f}"
        f" (pipeline / bare, target >= {target})"
    )
    # Where the time goes: CPU per submission while the clock ran (the database is SQLite in the
    # workers' own processes, or the PostgreSQL cluster's processes).
    for name, r in (("bare chain", bare), ("pipeline", pipeline)):
        parts = [
            f"{key[4:]} {r[key] / args.n * 1000:.2f}"
            for key in ("cpu_workers", "cpu_redis", "cpu_database")
            if key in r
        ]
        print(f"{name:>10}: CPU ms per submission: " + ", ".join(parts))
    if "statements" in pipeline:
        print(
            f"  pipeline: database statements per submission: {pipeline['statements'] / args.n:.1f}"
        )


if __name__ == "__main__":
    main()
