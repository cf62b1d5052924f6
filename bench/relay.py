"""Delivery through a real relay: letters per second into Debian's Postfix with STARTTLS, SMTP
AUTH and DKIM-signed letters, relaying to smtp-sink (the relay of ``tests/postfix.py``).

    .venv/bin/python -m bench.relay --postgres          # a backlog of 200, then of 2,000
    .venv/bin/python -m bench.relay --backlog 200 --backlog 2000 --processes 2 --threads 8

Needs root and Debian's postfix and sasl2-bin packages (as the test suite does). Letters are
validated, resolved, rendered and signed first (not timed); the worker processes then only
deliver: the figure is from the first delivery message sent to the last letter recorded as
accepted by the relay, in the database.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from dramatiq.brokers.redis import RedisBroker
from sqlalchemy import func, select

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.common import bench_app, databases, machine, worker_env  # noqa: E402
from bench.delivery import rendered_letters  # noqa: E402
from tests.postfix import Postfix  # noqa: E402
from tests.services import dkim_keys, free_port  # noqa: E402
from workers.database.engine import session_scope  # noqa: E402
from workers.database.models import OutboxItem  # noqa: E402
from workers.pipeline.app import App  # noqa: E402
from workers.pipeline.dispatch import stage_message  # noqa: E402
from workers.pipeline.embedded_redis import EmbeddedRedis  # noqa: E402
from workers.stages.stage import Stage  # noqa: E402


def delivered(app: App, ids: list[str]) -> int:
    with session_scope(app.sessions) as session:
        return int(
            session.scalar(
                select(func.count())
                .select_from(OutboxItem)
                .where(OutboxItem.id.in_(ids), OutboxItem.status == "sent")
            )
            or 0
        )


def run(args: argparse.Namespace, n: int, db_url: str, tmp: Path, redis_url: str) -> float:
    """Deliver a backlog of ``n`` letters through the relay; returns letters per second."""
    tmp.mkdir(parents=True, exist_ok=True)
    key = tmp / "dkim.pem"
    key.write_bytes(dkim_keys()[0])
    app = bench_app(
        db_url, tmp / "var", redis_url, dkim_private_key_file=key, dkim_selector="dearmp"
    )  # the relay is what is measured: no limit on letters per MP
    ids = rendered_letters(app, n)
    relay = Postfix().start()
    env = worker_env(db_url, tmp / "var", redis_url, **relay.environment())
    workers = subprocess.Popen(
        [sys.executable, "-m", "dramatiq", "workers.pipeline.actors:setup",
         "--processes", str(args.processes),
         "--threads", str(args.threads), "--skip-logging"],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        time.sleep(3)  # the worker processes start (not timed)
        broker = RedisBroker(url=redis_url, namespace="dearmp")  # type: ignore[no-untyped-call]
        started = time.monotonic()
        for sid in ids:
            broker.enqueue(stage_message(Stage.DELIVER, sid))
        deadline = started + args.timeout
        while (done := delivered(app, ids)) < n and time.monotonic() < deadline:
            time.sleep(0.1)
        elapsed = time.monotonic() - started
        if done < n:
            raise SystemExit(f"only {done} of {n} letters delivered in {args.timeout:g} s")
        signed = relay.count("sasl_method=PLAIN")
        if signed < n:
            raise SystemExit(f"the relay logged {signed} authenticated letters of {n}")
    finally:
        workers.terminate()
        workers.wait(timeout=60)
        relay.stop()
        app.engine.dispose()
    return n / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--backlog", type=int, action="append", help="letters waiting (default: 200 and 2,000)"
    )
    parser.add_argument("--postgres", action="store_true", help="a throwaway PostgreSQL cluster")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--timeout", type=float, default=600)
    args = parser.parse_args()
    backlogs = args.backlog or [200, 2000]
    results = []
    with tempfile.TemporaryDirectory(prefix="dearmp-bench-") as tmpdir:
        tmp = Path(tmpdir)
        with (
            databases(tmp, args.postgres) as url,
            EmbeddedRedis(tmp / "redis", port=free_port()) as server,
        ):
            for i, n in enumerate(backlogs):
                results.append((n, run(args, n, url(f"relay-{i}"), tmp / str(i), server.url)))
    print(machine())
    print(
        f"database: {'PostgreSQL' if args.postgres else 'SQLite'}; "
        f"workers: {args.processes} processes x {args.threads} threads; relay: Postfix "
        f"{postfix_version()} with STARTTLS and SMTP AUTH, letters DKIM-signed, to smtp-sink"
    )
    for n, per_second in results:
        print(f"backlog {n:>5}: {per_second:7.1f} letters/s")


def postfix_version() -> str:
    answer = subprocess.run(["postconf", "-h", "mail_version"], capture_output=True, text=True)
    return answer.stdout.strip()


if __name__ == "__main__":
    main()
