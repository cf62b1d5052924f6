"""Real services for the tests: a throwaway PostgreSQL cluster, Redis, an SMTP server.

In CI (CI=true) a service that cannot start is an error, never a skip.
"""

from __future__ import annotations

import asyncio
import base64
import glob
import json
import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from email import message_from_bytes
from email.message import Message
from functools import cache
from pathlib import Path
from typing import Any

import pytest

IN_CI = os.environ.get("CI", "").lower() == "true"
REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"
NOBODY = 65534


def unavailable(reason: str) -> None:
    """Skip locally; fail in CI, where every real-service test must run."""
    if IN_CI:
        pytest.fail(f"required service unavailable in CI: {reason}")
    pytest.skip(reason)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pg_bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return candidates[-1] if candidates else None


class PostgresCluster:
    """initdb + pg_ctl into a temp dir, on a loopback port; as 'nobody' when we are root."""

    def __init__(self, base: Path, count_statements: bool = False, durable: bool = False) -> None:
        """``count_statements``: load pg_stat_statements (the benchmarks count statements).
        ``durable``: fsync, synchronous commits and full page writes on, as production runs
        (off by default: a throwaway cluster for tests need not survive a power cut)."""
        self.base = base
        self.count_statements = count_statements
        self.durable = durable
        self.datadir = base / "pgdata"
        self.port = free_port()
        self.as_root = os.geteuid() == 0

    def _run(self, *args: str, check: bool = True) -> None:
        kwargs: dict[str, Any] = {"check": check, "capture_output": True}
        if self.as_root:
            kwargs |= {"user": NOBODY, "group": NOBODY, "extra_groups": []}
        subprocess.run(args, **kwargs)

    def start(self) -> PostgresCluster:
        initdb, pg_ctl = pg_bin("initdb"), pg_bin("pg_ctl")
        if not initdb or not pg_ctl:
            unavailable("PostgreSQL binaries (initdb, pg_ctl) not found")
        assert initdb and pg_ctl
        self.base.mkdir(parents=True, exist_ok=True)
        if self.as_root:
            os.chown(self.base, NOBODY, NOBODY)
            self.base.chmod(0o755)
            # The cluster's user must be able to reach its directory.
            for parent in self.base.parents:
                if parent == Path("/"):
                    break
                parent.chmod(parent.stat().st_mode | 0o011)
        self._run(initdb, "-D", str(self.datadir), "-U", "postgres", "-A", "trust", "-E", "UTF8")
        options = (
            f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.base} -c max_connections=200"
        )
        if not self.durable:
            options += " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        if self.count_statements:
            options += " -c shared_preload_libraries=pg_stat_statements"
        self._run(
            pg_ctl, "-D", str(self.datadir), "-o", options, "-l", str(self.base / "pg.log"),
            "-w", "start",
        )  # fmt: skip
        return self

    def stop(self) -> None:
        pg_ctl = pg_bin("pg_ctl")
        if pg_ctl:
            # Best effort: a cluster whose directory is already gone has nothing left to stop.
            self._run(pg_ctl, "-D", str(self.datadir), "-m", "immediate", "stop", check=False)

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def postmaster_pid(self) -> int:
        """The server's main process (its children serve the connections)."""
        return int((self.datadir / "postmaster.pid").read_text().split()[0])


@dataclass
class Received:
    """What the test SMTP server accepted, as parsed messages."""

    messages: list[Message] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def count(self) -> int:
        with self.lock:
            return len(self.messages)

    def message_ids(self) -> list[str]:
        with self.lock:
            return [str(m["Message-ID"]) for m in self.messages]


class SmtpSink:
    """A real SMTP server (aiosmtpd) on loopback that records every message it accepts.

    ``answer`` lets a test make the server refuse with a 4xx or 5xx reply.
    """

    def __init__(self, **smtp_options: Any) -> None:
        self.received = Received()
        self.answer: str | None = None
        self.refuse: dict[str, str] = {}  # recipient address -> the RCPT answer refusing it
        self.sender_answer: str | None = None  # the MAIL FROM answer refusing every sender
        self.delay = 0.0
        self.rcpt_delay = 0.0
        self.rcpt_seen = threading.Event()
        self.arrivals: list[float] = []
        self.helo_names: list[str] = []  # the name each accepted letter's client gave in EHLO
        self.sessions: list[int] = []  # the SMTP session each accepted letter came in on
        self.open_sessions = 0  # connected now
        self.most_sessions = 0  # connected at once, at the most
        self.port = free_port()
        self.controller: Any = None
        self.options = smtp_options

    async def handle_MAIL(
        self, server: Any, session: Any, envelope: Any, address: str, options: Any
    ) -> str:
        if self.sender_answer:
            return self.sender_answer
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 OK"

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, options: Any
    ) -> str:
        self.rcpt_seen.set()
        if self.rcpt_delay:
            await asyncio.sleep(self.rcpt_delay)
        if address in self.refuse:
            return self.refuse[address]
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.answer:
            return self.answer
        with self.received.lock:
            self.received.messages.append(message_from_bytes(envelope.original_content))
            self.arrivals.append(time.monotonic())
            self.helo_names.append(session.host_name)
            self.sessions.append(id(session))
        return "250 2.0.0 Ok: queued"

    def start(self) -> SmtpSink:
        try:
            from aiosmtpd.controller import Controller
            from aiosmtpd.smtp import SMTP
        except ImportError:
            unavailable("aiosmtpd is not installed")
        sink = self

        class Counted(SMTP):  # type: ignore[misc]
            """Counts the sessions connected at once."""

            def connection_made(self, transport: Any) -> None:
                sink.open_sessions += 1
                sink.most_sessions = max(sink.most_sessions, sink.open_sessions)
                super().connection_made(transport)

            def connection_lost(self, error: Any) -> None:
                sink.open_sessions -= 1
                super().connection_lost(error)

        class CountingController(Controller):  # type: ignore[misc]
            def factory(self) -> Any:
                return Counted(self.handler, **self.SMTP_kwargs)

        self.controller = CountingController(
            self, hostname="127.0.0.1", port=self.port, **self.options
        )
        self.controller.start()
        return self

    def stop(self) -> None:
        if self.controller is not None:
            self.controller.stop()


def wait_for(predicate: Any, timeout: float, interval: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


@dataclass
class HttpStub:
    """A local HTTP server: ``route(path_and_query)`` answers, unless a scripted reply is queued.

    ``script`` holds (status, headers, body) replies, used first, one per request, to inject
    failures (503, 429 with Retry-After...). A body is JSON, bytes sent as they are, or an
    iterator of bytes: each piece written as it comes, with no Content-Length (a body that
    trickles in, or never ends). ``requests`` records every path asked for.
    """

    route: Any
    script: list[tuple[int, dict[str, str], Any]] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)
    server: Any = None
    port: int = 0  # 0: any free one

    def start(self) -> HttpStub:
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                stub.requests.append(self.path)
                status, headers, body = stub.script.pop(0) if stub.script else stub.route(self.path)
                reply(self, status, headers, body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        ).start()
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def reply(handler: Any, status: int, headers: dict[str, str], body: Any) -> None:
    """Answer a request of a :class:`http.server.BaseHTTPRequestHandler`: ``body`` is JSON,
    bytes, or an iterator of bytes written piece by piece without a Content-Length (HTTP/1.0:
    the body ends when the connection closes). A client that hangs up early ends it."""
    handler.send_response(status)
    handler.send_header("Content-Type", "application/json; charset=utf-8")
    if not isinstance(body, Iterator):
        body = [body if isinstance(body, bytes) else json.dumps(body).encode()]
        handler.send_header("Content-Length", str(len(body[0])))
    for name, value in headers.items():
        handler.send_header(name, value)
    handler.end_headers()
    try:
        for piece in body:
            handler.wfile.write(piece)
            handler.wfile.flush()
    except OSError:
        pass  # the client hung up: what it was sent is the test


@cache
def dkim_keys() -> tuple[bytes, bytes]:
    """A test RSA key for DKIM: the private key (PEM) and the DNS record's text."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return pem, b"v=DKIM1; k=rsa; p=" + base64.b64encode(public)


def dkim_dns(name: bytes, timeout: int = 5) -> bytes:
    """The DNS answer for :func:`dkim_keys`'s selector, whatever the name asked."""
    return dkim_keys()[1]
