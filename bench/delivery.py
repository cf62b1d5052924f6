"""Delivery benchmark: letters per second to a local SMTP server (aiosmtpd on loopback), over
reused connections, first with no limits, then under a configured send rate with a backlog.

    .venv/bin/python -m bench.delivery                    # 1,000 letters; then 400 at 25/s
    .venv/bin/python -m bench.delivery -n 1000 --rate 10 --limited 300

Letters are validated, resolved and rendered first (not timed); the worker processes then only
deliver. Rates are measured from what the SMTP server received.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from dramatiq.brokers.redis import RedisBroker

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.common import bench_app, machine, worker_env  # noqa: E402
from tests.factories import submission  # noqa: E402
from tests.services import SmtpSink, free_port  # noqa: E402
from workers.database.engine import session_scope  # noqa: E402
from workers.pipeline.app import App  # noqa: E402
from workers.pipeline.dispatch import stage_message  # noqa: E402
from workers.pipeline.embedded_redis import EmbeddedRedis  # noqa: E402
from workers.pipeline.intake import accept  # noqa: E402
from workers.stages.comparison import compare  # noqa: E402
from workers.stages.rendering import render  # noqa: E402
from workers.stages.resolution import resolve  # noqa: E402
from workers.stages.stage import Stage  # noqa: E402
from workers.stages.validation import validate  # noqa: E402


def rendered_letters(app: App, n: int) -> list[str]:
    ids = []
    for i in range(n):
        with session_scope(app.sessions) as session:
            sid = accept(session, submission(supporter__email=f"d{i}@example.com"), app.secret)
        for step in (validate, resolve, compare):
            with session_scope(app.sessions) as session:
                step(session, sid.submission_id)
        with session_scope(app.sessions) as session:
            render(session, sid.submission_id)
        ids.append(sid.submission_id)
    return ids


def run(
    args: argparse.Namespace, tmp: Path, n: int, rate: float, sink: SmtpSink, redis_url: str
) -> tuple[float, int]:
    """Deliver ``n`` letters; returns (letters per second received, most in any one second)."""
    db_url = f"sqlite:///{tmp / f'delivery-{rate}.sqlite3'}"
    app = bench_app(db_url, tmp / "var", redis_url)  # only the limit under test applies
    ids = rendered_letters(app, n)
    env = worker_env(
        db_url, tmp / "var", redis_url, DEARMP_MAIL_BACKEND="smtp", SMTP_HOST="127.0.0.1",
        SMTP_PORT=str(sink.port), DEARMP_SEND_RATE=str(rate),
    )  # fmt: skip
    workers = subprocess.Popen(
        [sys.executable, "-m", "dramatiq", "workers.pipeline.actors:setup",
         "--processes", str(args.processes),
         "--threads", str(args.threads), "--skip-logging"],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    time.sleep(3)
    before = sink.received.count()
    first_arrival = len(sink.arrivals)
    broker = RedisBroker(url=redis_url, namespace="dearmp")  # type: ignore[no-untyped-call]
    for sid in ids:
        broker.enqueue(stage_message(Stage.DELIVER, sid))
    deadline = time.monotonic() + args.timeout
    while sink.received.count() - before < n and time.monotonic() < deadline:
        time.sleep(0.2)
    workers.terminate()
    workers.wait(timeout=60)
    app.engine.dispose()
    arrivals = sorted(sink.arrivals[first_arrival:])
    if len(arrivals) < n:
        raise SystemExit(f"only {len(arrivals)} of {n} letters arrived")
    per_second = (n - 1) / (arrivals[-1] - arrivals[0])
    busiest = max(sum(1 for t in arrivals[i:] if t < a + 1.0) for i, a in enumerate(arrivals))
    return per_second, busiest


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("-n", type=int, default=1000, help="letters with no limit")
    parser.add_argument("--rate", type=float, default=25.0, help="the configured letters/second")
    parser.add_argument("--limited", type=int, default=400, help="letters under the rate limit")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--timeout", type=float, default=600)
    args = parser.parse_args()
    sink = SmtpSink().start()
    try:
        with tempfile.TemporaryDirectory(prefix="dearmp-bench-") as tmpdir:
            tmp = Path(tmpdir)
            with EmbeddedRedis(tmp / "redis", port=free_port()) as server:
                free, _ = run(args, tmp, args.n, 0.0, sink, server.url)
                limited, busiest = run(args, tmp, args.limited, args.rate, sink, server.url)
    finally:
        sink.stop()
    print(machine())
    print(f"workers: {args.processes} processes x {args.threads} threads; SMTP: aiosmtpd, loopback")
    print(f"no limit:   {free:7.1f} letters/s  ({args.n} letters)")
    print(
        f"limit {args.rate:g}/s: {limited:7.1f} letters/s achieved, at most {busiest} in a second "
        f"({args.limited} letters queued at once)"
    )


if __name__ == "__main__":
    main()
