"""Webhook benchmark: webhooks a second signed and sent to a receiver on loopback, and the
pipeline's throughput with no endpoint, with one answering 200, and with one answering 500 and
another that never answers (each wanting every event), on real Redis and a real database.

    .venv/bin/python -m bench.webhooks                 # SQLite
    .venv/bin/python -m bench.webhooks --postgres      # a throwaway PostgreSQL cluster
    .venv/bin/python -m bench.webhooks -n 1000 --events 3000 --processes 2 --threads 8

Events: ``--events`` items are written first (one ``submission.accepted`` per stored submission),
then their messages enqueued; the clock stops when the last is sent. Pipeline: as
``bench.pipeline`` (submissions stored first, clock from the first validation message to the last
"delivered"), once per case, each on a fresh database (PostgreSQL: the same cluster, emptied).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from dramatiq.brokers.redis import RedisBroker
from sqlalchemy import delete, func, select

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.common import bench_app, database_name, databases, machine, worker_env  # noqa: E402
from bench.pipeline import start_workers, stop  # noqa: E402
from tests.factories import submission  # noqa: E402
from tests.services import free_port  # noqa: E402
from workers.database.engine import session_scope  # noqa: E402
from workers.database.models import (  # noqa: E402
    OutboxItem,
    State,
    Submission,
    SubmissionEvent,
    WebhookEndpoint,
)
from workers.pipeline.app import App  # noqa: E402
from workers.pipeline.dispatch import stage_message  # noqa: E402
from workers.pipeline.embedded_redis import EmbeddedRedis  # noqa: E402
from workers.pipeline.intake import accept  # noqa: E402
from workers.stages.stage import Stage  # noqa: E402
from workers.webhooks import endpoints, events  # noqa: E402


class Receiver:
    """``/ok`` answers 200, ``/fail`` 500, ``/hang`` nothing until the benchmark ends."""

    def __init__(self) -> None:
        self.done = threading.Event()
        done = self.done

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers["content-length"]))
                if self.path == "/hang":
                    done.wait()
                    return
                self.send_response(500 if self.path == "/fail" else 200)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}{path}"

    def close(self) -> None:
        self.done.set()
        self.server.shutdown()


def store(app: App, n: int) -> list[str]:
    with session_scope(app.sessions) as session:
        return [
            accept(
                session, submission(supporter__email=f"bench{i}@example.com"), app.secret
            ).submission_id
            for i in range(n)
        ]


def until(count: Callable[[], int], n: int, timeout: float) -> None:
    """Wait until ``count()`` reaches ``n`` (polled: the benchmark shares the cores)."""
    deadline = time.monotonic() + timeout
    while count() < n:
        if time.monotonic() > deadline:
            raise SystemExit(f"only {count()} of {n} before the timeout")
        time.sleep(0.2)


def scalar(app: App, query: Any) -> int:
    with session_scope(app.sessions) as session:
        return int(session.scalar(query) or 0)


def events_per_second(args: argparse.Namespace, app: App, env: dict[str, str], url: str) -> float:
    with session_scope(app.sessions) as session:
        endpoints.add(session, url, ("submission.accepted",))
    ids = store(app, args.events)
    with session_scope(app.sessions) as session:  # this process has no broker: not dispatched
        for sid in ids:
            events.emit(session, "submission.accepted", sid)
        items = list(session.scalars(select(OutboxItem.id).where(OutboxItem.kind == events.KIND)))
    workers = start_workers("workers.pipeline.actors:setup", env, args.processes, args.threads)
    time.sleep(3)  # the workers boot before the clock starts
    broker = RedisBroker(url=env["REDIS_URL"], namespace="dearmp")  # type: ignore[no-untyped-call]
    start = time.monotonic()
    for item_id in items:
        broker.enqueue(stage_message(Stage.WEBHOOK, item_id))
    sent = select(func.count()).where(OutboxItem.status == "sent")
    until(lambda: scalar(app, sent), len(items), args.timeout)
    elapsed = time.monotonic() - start
    stop(workers)
    return len(items) / elapsed


def pipeline(
    args: argparse.Namespace, app: App, env: dict[str, str], urls: list[str]
) -> tuple[float, dict[str, int]]:
    """Submissions delivered a second with an endpoint (wanting every event) at each URL, and
    the webhook items' statuses at the end."""
    with session_scope(app.sessions) as session:
        for url in urls:
            endpoints.add(session, url, events.EVENTS)
    ids = store(app, args.n)
    workers = start_workers("workers.pipeline.actors:setup", env, args.processes, args.threads)
    time.sleep(3)
    broker = RedisBroker(url=env["REDIS_URL"], namespace="dearmp")  # type: ignore[no-untyped-call]
    start = time.monotonic()
    for sid in ids:
        broker.enqueue(stage_message(Stage.VALIDATE, sid))
    delivered = select(func.count()).where(SubmissionEvent.state == State.DELIVERED)
    until(lambda: scalar(app, delivered), len(ids), args.timeout)
    elapsed = time.monotonic() - start
    stop(workers)
    with session_scope(app.sessions) as session:
        statuses = dict(
            session.execute(
                select(OutboxItem.status, func.count())
                .where(OutboxItem.kind == events.KIND)
                .group_by(OutboxItem.status)
            ).all()
        )
    return len(ids) / elapsed, statuses


def emptied(app: App) -> App:
    """PostgreSQL's cases share one database: each starts with no submission or endpoint."""
    with session_scope(app.sessions) as session:
        session.execute(delete(OutboxItem))
        session.execute(delete(WebhookEndpoint))
        session.execute(delete(Submission))
    events.forget()
    return app


def no_endpoint_cost(app: App, calls: int = 100_000) -> float:
    """Microseconds an event costs the emitting transaction when no endpoint is configured."""
    with session_scope(app.sessions) as session:
        events.wanting(session, "letter.delivered")
        start = time.perf_counter()
        for _ in range(calls):
            events.emit(session, "letter.delivered", "none")
        return (time.perf_counter() - start) / calls * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("-n", type=int, default=1000, help="submissions per pipeline case")
    parser.add_argument("--events", type=int, default=3000, help="webhooks sent (default 3000)")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--postgres", action="store_true", help="a throwaway PostgreSQL cluster")
    parser.add_argument("--timeout", type=float, default=900)
    args = parser.parse_args()
    receiver = Receiver()
    with (
        tempfile.TemporaryDirectory(prefix="dearmp-bench-") as tmpdir,
        databases(Path(tmpdir), args.postgres) as database,
        EmbeddedRedis(Path(tmpdir) / "redis", port=free_port()) as redis,
    ):
        tmp = Path(tmpdir)
        results: dict[str, Any] = {}
        for case, urls in (
            ("events", [receiver.url("/ok")]),
            ("none", []),
            ("200", [receiver.url("/ok")]),
            ("500 + hang", [receiver.url("/fail"), receiver.url("/hang")]),
        ):
            url = database(case.split()[0])
            data = tmp / f"var-{case.split()[0]}"
            app = emptied(bench_app(url, data, redis.url, outbox_dir=tmp / "outbox"))
            env = worker_env(url, data, redis.url, DEARMP_OUTBOX_DIR=str(tmp / "outbox"))
            redis_flush(redis.url)
            if case == "events":
                results["cost_us"] = no_endpoint_cost(app)
                results[case] = events_per_second(args, app, env, urls[0])
            else:
                results[case] = pipeline(args, app, env, urls)
            app.engine.dispose()
    receiver.close()
    print(machine())
    print(
        f"database: {database_name(args.postgres, False)}; "
        f"workers: {args.processes} processes x {args.threads} threads"
    )
    print(f"webhooks sent: {results['events']:8.1f} /s  (n={args.events}, receiver answers 200)")
    print(f"no endpoint: an event costs its transaction {results['cost_us']:.2f} µs")
    for case in ("none", "200", "500 + hang"):
        rate, statuses = results[case]
        print(
            f"pipeline, endpoints {case:>10}: {rate:8.1f} submissions/s  (n={args.n})  {statuses}"
        )


def redis_flush(url: str) -> None:
    """Each case starts with empty queues (a hanging webhook's retries stay behind)."""
    import redis

    redis.Redis.from_url(url).flushdb()


if __name__ == "__main__":
    main()
