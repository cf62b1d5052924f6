#!/usr/bin/env python3
"""The two commands of a fresh checkout, with nothing but Python 3.11+ installed.

    python3 dev.py demo   # set up, then run the pipeline on embedded defaults with a sample batch
    python3 dev.py test   # set up, then lint, type-check and run the test suite

Set-up is a virtual environment in .venv with the project and its test tools installed; it is
redone only when pyproject.toml changes. Extra arguments go to the command (dearmp demo or pytest).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / "bin"
STAMP = VENV / ".dearmp-installed"


def ensure_venv() -> None:
    if sys.version_info < (3, 11):  # noqa: UP036 - this script may run on any python3
        sys.exit("DearMP needs Python 3.11 or newer.")
    wanted = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    if STAMP.exists() and STAMP.read_text() == wanted:
        return
    if not (BIN / "python").exists():
        print("creating .venv ...", flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
    print("installing DearMP and its dependencies into .venv ...", flush=True)
    pip = [str(BIN / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    subprocess.run([*pip, "--upgrade", "pip"], check=True)
    subprocess.run([*pip, "-e", f"{ROOT}[test]"], check=True)
    STAMP.write_text(wanted)


def run(*cmd: str) -> int:
    return subprocess.run(cmd, cwd=ROOT).returncode


def main() -> int:
    if len(sys.argv) < 2 or sys.argv[1] not in {"demo", "test"}:
        print(__doc__)
        return 2
    ensure_venv()
    what, extra = sys.argv[1], sys.argv[2:]
    if what == "demo":
        return run(str(BIN / "dearmp"), "demo", *extra)
    for check in (
        [str(BIN / "ruff"), "check", "."],
        [str(BIN / "ruff"), "format", "--check", "."],
        [str(BIN / "mypy")],
    ):
        if run(*check) != 0:
            return 1
    os.environ.setdefault("PYTHONDONTWRITEBYTECODE", "1")
    # The fast layer (no services) first, then the tests with real services and the exhaustive
    # checks. pytest's exit 5
    # (no test selected) is fine for one layer when the other ran.
    codes = []
    # The fast layer shares nothing between tests, so it runs on every core (pytest-xdist).
    # The service layer's tests mostly wait on their servers: two at a time (each xdist worker
    # has its own PostgreSQL cluster; Redis, SMTP and Postfix are per test) halve its time.
    layers = {
        "not services and not thorough": ("the fast layer (no services)", ["-n", "auto"]),
        "services or thorough": ("real services and exhaustive checks", ["-n", "2"]),
    }
    for layer, (name, spread) in layers.items():
        print(f"== tests: {name}", flush=True)
        # A temporary directory of the run's own: pytest keeps only the newest three of its
        # shared ones, and another run on the machine would delete this one's (its PostgreSQL
        # clusters' data among them) under it. Kept when the layer fails, for its logs.
        temp = tempfile.mkdtemp(prefix="dearmp-tests-")
        command = [str(BIN / "python"), "-m", "pytest", "-m", layer, *spread]
        codes.append(run(*command, f"--basetemp={temp}", *extra))
        if codes[-1] not in (0, 5):
            print(f"== its temporary files (each PostgreSQL's pg.log among them): {temp}")
            return codes[-1]
        shutil.rmtree(temp, ignore_errors=True)
    return 5 if codes == [5, 5] else 0


if __name__ == "__main__":
    sys.exit(main())
