"""Inbound benchmark: bounces and replies received by `dearmp inbound` over SMTP, stored,
classified and recorded by the inbound actor, end to end, on real Redis and a real database.

    .venv/bin/python -m bench.inbound --postgres       # 2,000 messages, throwaway PostgreSQL
    .venv/bin/python -m bench.inbound                  # the same on SQLite
    .venv/bin/python -m bench.inbound -n 5000 --clients 8

N letters are written to the database as delivered, each to an address of its own (so no
address turns failing); then ``--clients`` SMTP connections send, for each letter, a message to
its return address: half permanent bounces (Postfix's DSN, whose notice to the supporter is then
sent to the file outbox), a quarter automatic replies, a quarter delays. The clock runs from the
first message sent to the last one recorded; latency is from the receiver's 250 to the inbound
stage's commit.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import smtplib  # noqa: E402

from sqlalchemy import func, insert, select  # noqa: E402

from bench.common import bench_app, databases, machine, worker_env  # noqa: E402
from bench.pipeline import CpuMeter, percentile, start_workers, stop  # noqa: E402
from tests import mail_samples as samples  # noqa: E402
from tests.services import free_port, wait_for  # noqa: E402
from workers.database.engine import session_scope  # noqa: E402
from workers.database.models import (  # noqa: E402
    LETTERS,
    OUTBOX,
    SUBMISSIONS,
    InboundMessage,
    InboundStatus,
    utcnow,
)
from workers.pipeline.embedded_redis import EmbeddedRedis  # noqa: E402

BOUNCES = "bounces.campaign.example.org"


def delivered_letters(app: object, n: int) -> list[tuple[str, str, str]]:
    """N delivered letters: (submission id, Message-ID, MP address)."""
    now = utcnow()
    rows = []
    for i in range(n):
        sid = str(uuid.uuid4())
        rows.append((sid, f"<{sid}@campaign.example.org>", f"mp{i}@parliament.example"))
    payload = {"supporter": {"email": "bench@example.com", "name": "Bench"}}
    with session_scope(app.sessions) as session:  # type: ignore[attr-defined]
        session.execute(
            insert(SUBMISSIONS),
            [
                {"id": sid, "campaign_slug": "political-prisoners", "state": "delivered",
                 "payload": payload, "member_id": i, "created_at": now, "updated_at": now,
                 "dispatched_at": now, "recipient": {"name": "An MP", "email": to}}
                for i, (sid, _, to) in enumerate(rows)
            ],
        )  # fmt: skip
        session.execute(
            insert(LETTERS),
            [
                {"submission_id": sid, "message_id": mid, "subject": "Please act",
                 "body_text": "Dear MP", "from_name": "Bench", "to_name": "An MP",
                 "from_email": "letters@campaign.example.org", "to_email": to,
                 "content_sha256": "0" * 64, "created_at": now}
                for sid, mid, to in rows
            ],
        )  # fmt: skip
        session.execute(
            insert(OUTBOX),
            [
                {"id": sid, "submission_id": sid, "key": "letter", "kind": "letter",
                 "status": "sent", "attempts": 1, "sent_at": now}
                for sid, _, _ in rows
            ],
        )  # fmt: skip
    return rows


def message_for(i: int, mid: str, to: str, rcpt: str) -> bytes:
    if i % 4 in (0, 1):
        return samples.postfix_dsn(mid, to, rcpt)
    if i % 4 == 2:
        return samples.rfc3834_auto_reply(mid, to, rcpt)
    return samples.exim_delay(mid, to, rcpt)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("-n", type=int, default=2000, help="messages (default 2000)")
    parser.add_argument("--clients", type=int, default=4, help="SMTP connections sending")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--postgres", action="store_true", help="a throwaway PostgreSQL cluster")
    parser.add_argument("--timeout", type=float, default=600)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="dearmp-bench-") as tmpdir:
        tmp = Path(tmpdir)
        with (
            databases(tmp, args.postgres) as database,
            EmbeddedRedis(tmp / "redis", port=free_port()) as server,
        ):
            db_url = database("inbound")
            port = free_port()
            extra = {
                "DEARMP_BOUNCE_DOMAIN": BOUNCES,
                "DEARMP_INBOUND_PORT": str(port),
                "DEARMP_INBOUND_PEER_PER_MINUTE": str(10 * args.n),
                "DEARMP_OUTBOX_DIR": str(tmp / "outbox"),
            }
            app = bench_app(db_url, tmp / "var", server.url, bounce_domain=BOUNCES)
            letters = delivered_letters(app, args.n)
            env = worker_env(db_url, tmp / "var", server.url, **extra)
            workers = start_workers(
                "workers.pipeline.actors:setup", env, args.processes, args.threads
            )
            receiver = subprocess.Popen(
                [sys.executable, "-m", "workers.cli", "inbound"], cwd=REPO, env=env,
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
            time.sleep(3)  # let the workers boot before the clock starts
            meter = CpuMeter(
                workers=workers.pid,
                receiver=receiver.pid,
                redis=server.process.pid if server.process else None,
            )
            meter.start()
            accepted: dict[int, float] = {}
            lock = threading.Lock()

            def send(part: int) -> None:
                with smtplib.SMTP("127.0.0.1", port, timeout=60) as smtp:
                    for i in range(part, args.n, args.clients):
                        sid, mid, to = letters[i]
                        rcpt = app.returns.bounce(sid)
                        assert rcpt is not None
                        smtp.sendmail("<>", [rcpt], message_for(i, mid, to, rcpt))
                        with lock:
                            accepted[i] = time.time()

            start = time.time()
            senders = [threading.Thread(target=send, args=(p,)) for p in range(args.clients)]
            for thread in senders:
                thread.start()
            for thread in senders:
                thread.join()
            received = time.time()

            def pending() -> int:
                with session_scope(app.sessions) as session:
                    return int(
                        session.scalar(
                            select(func.count()).where(
                                InboundMessage.status == InboundStatus.RECEIVED
                            )
                        )
                        or 0
                    )

            wait_for(lambda: pending() == 0, args.timeout, 0.2)
            cpu = meter.stop()
            with session_scope(app.sessions) as session:
                rows = session.execute(
                    select(
                        InboundMessage.received_at, InboundMessage.processed_at, InboundMessage.kind
                    )
                ).all()
            stop(workers)
            receiver.terminate()
            receiver.wait(timeout=30)
            app.engine.dispose()
    done = [r for r in rows if r.processed_at is not None]
    if len(done) < args.n:
        raise SystemExit(f"only {len(done)} of {args.n} processed before the timeout")
    end = max(r.processed_at.timestamp() for r in done)
    latencies = [(r.processed_at - r.received_at).total_seconds() for r in done]
    kinds: dict[str, int] = {}
    for r in done:
        kinds[r.kind] = kinds.get(r.kind, 0) + 1
    print(machine())
    print(
        f"database: {'PostgreSQL' if args.postgres else 'SQLite'}; workers: {args.processes} "
        f"processes x {args.threads} threads; {args.clients} SMTP clients; n={args.n}"
    )
    print(f"  received (stored, 250): {args.n / (received - start):8.1f} messages/s")
    p50, p99 = (percentile(latencies, p) * 1000 for p in (50, 99))
    print(
        f"  end to end (recorded):  {args.n / (end - start):8.1f} messages/s   "
        f"p50 {p50:.0f} ms   p99 {p99:.0f} ms"
    )
    print(f"  kinds: {kinds}")
    print(
        "  CPU ms per message: "
        + ", ".join(f"{name} {used / args.n * 1000:.2f}" for name, used in cpu.items())
    )


if __name__ == "__main__":
    main()
