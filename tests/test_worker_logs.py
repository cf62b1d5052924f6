"""Every line a worker process writes is a JSON event: the dramatiq parent's own records (a child
that died), and an exception nobody caught, in the main thread or another."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.services import REPO, wait_for
from tests.test_e2e_redis import Stack
from workers.pipeline.embedded_redis import EmbeddedRedis

pytestmark = pytest.mark.redis


def children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(child) for child in text.split()]


def not_json(text: str) -> list[str]:
    bad = []
    for line in text.splitlines():
        try:
            assert isinstance(json.loads(line), dict)
        except (ValueError, AssertionError):
            bad.append(line)
    return bad


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_worker_whose_child_is_killed_writes_only_json_lines(
    tmp_path: Path, db_url: str, redis_server: EmbeddedRedis
) -> None:
    stack = Stack(tmp_path, db_url, redis_server.url, DEARMP_LOG_LEVEL="DEBUG")
    parent = stack.start("worker", "--processes", "2", "--threads", "1")
    try:
        # Both children booted: each says so (dramatiq's own record, at DEBUG).
        assert wait_for(lambda: stack.log_text().count("ready for action") >= 2, 60), (
            stack.log_text()
        )
        os.kill(children(parent.pid)[0], signal.SIGKILL)
        assert parent.wait(timeout=60) != 0  # the parent shuts the rest down and exits
    finally:
        stack.stop()
    text = stack.log_text()
    assert "exited unexpectedly" in text
    assert not_json(text) == []


@pytest.mark.parametrize("where", ["main", "thread"])
def test_an_uncaught_exception_is_one_json_event(where: str) -> None:
    code = (
        "import threading\n"
        "from workers.logging import configure_logging\n"
        "configure_logging()\n"
        "def fail():\n"
        "    raise RuntimeError('nobody caught this, ask bob@example.org')\n"
        + ("fail()\n" if where == "main" else "t = threading.Thread(target=fail)\n"
           "t.start()\nt.join()\n")
    )  # fmt: skip
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == (1 if where == "main" else 0)
    assert done.stdout == "" and not_json(done.stderr) == []
    [event] = [json.loads(line) for line in done.stderr.splitlines()]
    assert event["event"] == "uncaught_exception" and event["level"] == "critical"
    assert "RuntimeError: nobody caught this" in event["exception"]
    assert "bob@example.org" not in done.stderr  # masked like any logged value
