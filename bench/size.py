"""The size of the application: lines of workers/ without its migrations, per folder, and the
webhook channel's own lines (workers/webhooks and its commands).

    .venv/bin/python -m bench.size              # the working tree
    .venv/bin/python -m bench.size --rev HEAD~5 # a commit, read from git
"""

from __future__ import annotations

import argparse
import subprocess
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CHANNEL = ("workers/webhooks/", "workers/cli/webhooks.py")


def sources(rev: str | None) -> dict[str, int]:
    """Each counted file's number of lines, in the working tree or at ``rev``."""
    if rev is None:
        paths = [str(p.relative_to(REPO)) for p in (REPO / "workers").rglob("*.py")]
        text = {p: (REPO / p).read_text() for p in paths}
    else:
        listed = subprocess.run(
            ["git", "ls-tree", "-r", "--name-only", rev, "workers"],
            cwd=REPO,
            check=True,
            capture_output=True,
            text=True,
        ).stdout.split()
        paths = [p for p in listed if p.endswith(".py")]
        text = {
            p: subprocess.run(
                ["git", "show", f"{rev}:{p}"], cwd=REPO, check=True, capture_output=True, text=True
            ).stdout
            for p in paths
        }
    return {p: t.count("\n") for p, t in text.items() if "/migrations/" not in p}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rev", help="a git revision (default: the working tree)")
    args = parser.parse_args()
    lines = sources(args.rev)
    folders: Counter[str] = Counter()
    for path, n in lines.items():
        parts = path.split("/")
        folders["/".join(parts[:2]) if len(parts) > 2 else path] += n
    for folder, n in sorted(folders.items(), key=lambda item: -item[1]):
        print(f"{n:7,d}  {folder}")
    total = sum(lines.values())
    channel = sum(n for p, n in lines.items() if p.startswith(CHANNEL))
    print(f"{total:7,d}  workers/ without migrations ({args.rev or 'working tree'})")
    print(f"{total - channel:7,d}  without the webhook channel")
    print(f"{channel:7,d}  the webhook channel with its commands")


if __name__ == "__main__":
    main()
