"""The code's layout: no import cycles, counting imports inside functions; nothing is built or
connected when a module is imported."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("workers", "schemas", "config")


def _module(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, known: set[str]) -> set[str]:
    """The project modules ``path`` imports, at the top or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        found |= {name for name in names if name in known}
    return found


def test_no_module_imports_itself_through_others() -> None:
    paths = [
        p
        for package in PACKAGES
        for p in (REPO / package).rglob("*.py")
        if "migrations" not in p.parts
    ]
    known = {_module(p) for p in paths}
    graph = {_module(p): _imports(p, known) - {_module(p)} for p in paths}
    cycles = []
    for start in graph:
        stack, seen = [(start, [start])], set()
        while stack:
            node, path = stack.pop()
            for nxt in graph.get(node, ()):
                if nxt == start:
                    cycles.append(" -> ".join([*path, start]))
                elif nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, [*path, nxt]))
    assert cycles == []


def test_importing_every_module_builds_no_broker_and_opens_no_connection() -> None:
    code = (
        "import pkgutil, importlib, socket, dramatiq.broker, workers\n"
        "def refuse(*a, **k): raise AssertionError('a connection at import time')\n"
        "socket.socket.connect = refuse\n"
        "for m in pkgutil.walk_packages(workers.__path__, 'workers.'):\n"
        "    if '.migrations' not in m.name and not m.name.endswith('__main__'):\n"
        "        importlib.import_module(m.name)\n"
        "assert dramatiq.broker.global_broker is None, 'a broker was built at import time'\n"
    )
    env = {"PATH": "/usr/bin:/bin", "HOME": str(REPO)}  # no DEARMP_* settings at all
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]
