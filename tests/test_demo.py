"""The README's first command: the demo runs on embedded defaults and finishes every submission."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.services import REPO

pytestmark = pytest.mark.redis


def test_demo_processes_the_sample_batch_to_final_states(tmp_path: Path) -> None:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("DEARMP_", "REDIS_", "DATABASE_", "SMTP_"))
    }
    env["DEARMP_DATA_DIR"] = str(tmp_path / "var")
    result = subprocess.run(
        [sys.executable, "-m", "workers.cli", "demo", "--count", "30", "--timeout", "120"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "all final: True" in result.stdout
    assert "delivered" in result.stdout and "rejected" in result.stdout
    assert ".venv/bin/dearmp show " in result.stdout
    # Each rejection with its reason, not only the field (the summary may wrap a long line).
    flat = " ".join(result.stdout.split())
    assert "rejected: supporter.email: " in flat or "rejected: supporter.postcode: " in flat
    letters = list((tmp_path / "var" / "outbox").glob("*.eml"))
    assert len(letters) == 21  # 30 fed: 8 valid samples, 8 invalid, 1 repeated key, 13 generated
    log = (tmp_path / "var" / "logs" / "dearmp.jsonl").read_text()
    assert "amira.haddad@example.com" not in log and "12 Mill Lane" not in log
