"""HTTP intake benchmark: accepted submissions per second and latency for ``POST /v1/submissions``,
against a bare endpoint of the same framework (FastAPI on uvicorn) in the same run.

    .venv/bin/python -m bench.http                  # SQLite, embedded Redis, 2 uvicorn workers
    .venv/bin/python -m bench.http --postgres       # a throwaway PostgreSQL 15 cluster
    .venv/bin/python -m bench.http --duration 20 --connections 32 --workers 2

The load generator is wrk (Debian's package) on loopback, on the same two cores. Every request
carries a fresh idempotency key and email (a Lua script), so every 202 is a new stored submission;
the benchmark counts the rows afterwards. Rate limits are off for the run unless
``--rate-limits`` (then every request makes its two checks against Redis, as in production).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis
import requests

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from sqlalchemy import func, select  # noqa: E402

from bench.common import SECRET  # noqa: E402
from tests.factories import submission  # noqa: E402
from tests.services import PostgresCluster, free_port  # noqa: E402
from workers.database.engine import make_engine, make_sessionmaker, session_scope  # noqa: E402
from workers.database.models import Submission  # noqa: E402
from workers.pipeline.embedded_redis import EmbeddedRedis  # noqa: E402

LUA = """
local template = [[%s]]
local n = 0
math.randomseed(os.time() + math.floor(os.clock() * 1000000))
local prefix = tostring(math.random(1, 1000000000))
request = function()
  n = n + 1
  local key = prefix .. "-" .. n
  local body = template:gsub("@KEY@", key)
  return wrk.format("POST", "/v1/submissions", {["Content-Type"] = "application/json"}, body)
end
"""


def lua_script(path: Path) -> Path:
    payload = submission(idempotency_key="@KEY@", supporter__email="s-@KEY@@example.com")
    payload.pop("client_ip")
    path.write_text(LUA % json.dumps(payload))
    return path


def serve(module: str, port: int, workers: int, env: dict[str, str]) -> subprocess.Popen[bytes]:
    factory = ["--factory"] if module.startswith("workers.") else []
    process = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", module, *factory, "--host", "127.0.0.1",
         "--port", str(port),
         "--workers", str(workers), "--no-access-log", "--log-level", "warning"],
        cwd=REPO, env=env,
    )  # fmt: skip
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            requests.get(f"http://127.0.0.1:{port}/openapi.json", timeout=1)
            return process
        except requests.ConnectionError:
            time.sleep(0.2)
    process.kill()
    raise RuntimeError(f"{module} did not start")


def wrk(port: int, script: Path, duration: int, connections: int) -> dict[str, float]:
    out = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{duration}s", "--latency", "-s", str(script),
         f"http://127.0.0.1:{port}/v1/submissions"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip

    def ms(label: str) -> float:
        match = re.search(rf"^\s+{label}%\s+([\d.]+)(us|ms|s)", out, re.M)
        assert match, out
        value, unit = float(match.group(1)), match.group(2)
        return value / 1000 if unit == "us" else value * 1000 if unit == "s" else value

    total = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = int(bad.group(1)) if bad else 0
    return {
        "requests": total,
        "non_2xx": errors,
        "per_second": (total - errors) / duration,
        "p50": ms("50"),
        "p99": ms("99"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=int, default=15)
    parser.add_argument("--connections", type=int, default=24)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--postgres", action="store_true")
    parser.add_argument(
        "--durable",
        action="store_true",
        help="PostgreSQL with fsync and synchronous commits on, as production runs",
    )
    parser.add_argument(
        "--rate-limits",
        action="store_true",
        help="keep the per-network and per-email limits on (set high enough that none refuses)",
    )
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("wrk is needed: apt-get install wrk")

    work = Path(tempfile.mkdtemp(prefix="dearmp-bench-http-"))
    cluster = None
    redis_server = EmbeddedRedis(work / "redis", port=free_port()).start()
    try:
        url = f"sqlite:///{work / 'bench.sqlite3'}"
        if args.postgres:
            cluster = PostgresCluster(work / "pg", durable=args.durable).start()
            url = cluster.url()
        env = {
            **os.environ,
            "DATABASE_URL": url,
            "REDIS_URL": redis_server.url,
            "DEARMP_DATA_DIR": str(work),
            "DEARMP_SECRET_KEY": SECRET,
            # Off, or on with limits no run reaches: every request then makes its two checks
            # against Redis, as in production.
            "DEARMP_API_IP_LIMIT": "100000000" if args.rate_limits else "0",
            "DEARMP_API_EMAIL_LIMIT": "100000000" if args.rate_limits else "0",
            "DEARMP_LOG_LEVEL": "WARNING",
        }
        subprocess.run(
            [sys.executable, "-m", "workers.cli", "init"], cwd=REPO, env=env, check=True,
            stdout=subprocess.DEVNULL,
        )  # fmt: skip
        script = lua_script(work / "post.lua")
        results = {}
        for name, module in (
            ("bare", "bench.bare_api:app"),
            ("dearmp", "workers.web.asgi:application"),
        ):
            port = free_port()
            server = serve(module, port, args.workers, env)
            try:
                wrk(port, script, 3, args.connections)  # warm up
                results[name] = wrk(port, script, args.duration, args.connections)
            finally:
                server.terminate()
                server.wait(30)
        engine = make_engine(url)
        with session_scope(make_sessionmaker(engine)) as session:
            stored = session.scalar(select(func.count()).select_from(Submission))
        engine.dispose()
        database = (
            ("PostgreSQL 15 (durable)" if args.durable else "PostgreSQL 15")
            if args.postgres
            else "SQLite"
        )
        load = f"wrk -c{args.connections}, {args.duration} s"
        load += ", rate limits on" if args.rate_limits else ", rate limits off"
        print(f"{database}, {args.workers} uvicorn workers, {load}")
        for name, r in results.items():
            print(
                f"  {name:7s} {r['per_second']:8,.0f} accepted/s  p50 {r['p50']:6.1f} ms  "
                f"p99 {r['p99']:6.1f} ms  (non-2xx: {r['non_2xx']:.0f})"
            )
        print(f"  rows stored: {stored:,} (every 202 of the timed and warm-up runs)")
        # No workers run here: every validation message the intake sent is still on its queue.
        messages = redis.Redis.from_url(redis_server.url).hlen("dearmp:dearmp.validate.msgs")
        if messages:
            print(
                f"  validation messages sent: {messages:,} "
                f"({stored / messages:.1f} submissions per message, one per committed batch)"
            )
        python = platform.python_version()
        print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {python}")
    finally:
        redis_server.stop()
        if cluster is not None:
            cluster.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
