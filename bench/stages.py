"""Each stage's cost per submission, measured in one process: CPU of this process (the stage's
work) and of the database server, stage by stage, on groups as a stage message carries them.

    .venv/bin/python -m bench.stages --postgres     # 1,600 submissions, groups of 16
    .venv/bin/python -m bench.stages -n 3200 -g 6   # SQLite (the server's CPU is this process's)

Submissions are stored first; then each stage's work function (the one its actor runs) is
called on groups of ``-g`` submissions in turn, without Redis or worker threads: what moves on
is handed to the stub broker. The pipeline benchmark's figures move with the machine and with
how the handoff groups submissions under each run's load; these are steadier, so a change worth
a tenth of a stage shows in a few runs alternated with the code before it (``git worktree``).
The letters' files go to tmpfs when there is one.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.common import SECRET, STAGES, machine  # noqa: E402
from bench.pipeline import SHM, CpuMeter  # noqa: E402
from config.settings import Settings  # noqa: E402
from tests.factories import submission  # noqa: E402
from tests.services import PostgresCluster  # noqa: E402
from workers.database.engine import session_scope  # noqa: E402
from workers.letters.definitions import update_definition  # noqa: E402
from workers.logging import configure_logging  # noqa: E402
from workers.pipeline import actors  # noqa: E402
from workers.pipeline.app import App  # noqa: E402
from workers.pipeline.intake import accept  # noqa: E402
from workers.pipeline.runtime import prepare  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("-n", type=int, default=1600, help="submissions (default 1600)")
    parser.add_argument("-g", type=int, default=16, help="submissions per stage message")
    parser.add_argument("--postgres", action="store_true", help="a throwaway PostgreSQL cluster")
    args = parser.parse_args()
    outbox_parent = SHM if SHM.is_dir() else None
    with (
        tempfile.TemporaryDirectory(prefix="dearmp-bench-") as folder,
        tempfile.TemporaryDirectory(prefix="dearmp-bench-", dir=outbox_parent) as outbox,
    ):
        cluster = PostgresCluster(Path(folder) / "pg").start() if args.postgres else None
        try:
            run(args, Path(folder), Path(outbox), cluster)
        finally:
            if cluster is not None:
                cluster.stop()


def run(
    args: argparse.Namespace, folder: Path, outbox: Path, cluster: PostgresCluster | None
) -> None:
    url = cluster.url() if cluster else f"sqlite:///{folder / 'stages.sqlite3'}"
    settings = Settings(
        database_url=url, data_dir=folder / "var", secret_key=SECRET, broker="stub",
        outbox_dir=outbox, log_level="WARNING",
    )  # fmt: skip
    configure_logging(settings.log_level)  # as a worker process does: no info events
    # As the workers build theirs (workers.pipeline.app.get_app): no ping per checkout.
    app = App.from_settings(settings, pool_pre_ping=False)
    prepare(app)
    actors.setup(settings, lambda: app)  # what the stages move on goes to the stub broker
    with session_scope(app.sessions) as session:
        update_definition(session, "political-prisoners", rate_limit=None)
        ids = [
            accept(session, submission(supporter__email=f"b{i}@example.com"), app.secret)
            .submission_id
            for i in range(args.n)
        ]  # fmt: skip
    print(machine())
    database = "PostgreSQL" if cluster else "SQLite"
    print(f"database: {database}; n={args.n}; groups of {args.g}")
    for stage in STAGES:
        work = actors.WORK[stage]
        server = CpuMeter(database=cluster.postmaster_pid() if cluster else None)
        server.start()
        cpu, wall = time.process_time(), time.perf_counter()
        failed = 0
        for start in range(0, len(ids), args.g):
            group = ids[start : start + args.g]
            # What a stage moves on is not sent on: each stage runs over every submission.
            failed += sum(error is not None for _, error in work(app, group, lambda moved: None))
        cpu = time.process_time() - cpu
        db = server.stop().get("database", 0.0)
        wall = time.perf_counter() - wall
        per = 1000 / len(ids)
        on_server = f"database {db * per:6.3f} ms  " if cluster else ""
        print(
            f"{stage.value:9s} workers {cpu * per:6.3f} ms  {on_server}"
            f"wall {wall * per:6.3f} ms per submission  (failed: {failed})"
        )
    app.engine.dispose()


if __name__ == "__main__":
    main()
