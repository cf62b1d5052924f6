"""Directory benchmarks: a full-size ONS Postcode Directory import into PostgreSQL, and the cost of
one postcode lookup from the local directory.

    .venv/bin/python -m bench.directory                   # 2.7 million rows, a throwaway cluster
    .venv/bin/python -m bench.directory --rows 500000     # smaller
    .venv/bin/python -m bench.directory --database-url postgresql+psycopg://...

The benchmark writes a synthetic file in the real ONSPD layout (its column names and order, about
330 bytes a row like the real one), imports it with the project's own import (the same code as
``dearmp directory import``), then times lookups of random postcodes, one at a time, as the
resolution stage makes them. It reports the import time, the rows per second, the importing
process's peak memory (bounded: the file is streamed), and lookup p50/p99 on PostgreSQL and SQLite.
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from sqlalchemy import text  # noqa: E402

from tests.services import PostgresCluster  # noqa: E402
from workers.database.engine import make_engine, make_sessionmaker, migrate, session_scope  # noqa: E402
from workers.mp.directory import import_directory  # noqa: E402
from workers.mp.lookup import Found, lookup_local  # noqa: E402

SHARED = REPO.parent / "shared" / "data"
SAMPLE = REPO / "config" / "sample"
# The ONSPD's columns (November 2025 edition order); the import reads pcds, pcon and doterm.
ONSPD_COLUMNS = (
    "pcd pcd2 pcds dointr doterm oscty ced oslaua osward parish usertype oseast1m osnrth1m "
    "osgrdind oshlthau nhser ctry rgn streg pcon eer teclec ttwa pct itl statsward oa01 casward "
    "npark lsoa01 msoa01 ur01ind oac01 oa11 lsoa11 msoa11 wz11 sicbl bua24 ru11ind oac11 lat long "
    "lep1 lep2 pfa imd calncv icb oa21 lsoa21 msoa21 ruc21 lsoa25"
).split()
LETTERS = "ABDEFGHJLNPQRSTUWXYZ"  # unit letters Royal Mail uses
AREAS = ["AB", "B", "BS", "CF", "E", "EH", "G", "L", "LS", "M", "N", "NE", "S", "SE", "SW", "W"]


# Runs the dearmp command, then writes the process's own peak memory (kB) to argv[1]. VmHWM, not
# ru_maxrss: the latter survives exec and would count the benchmark's own memory at fork time.
IMPORT_AND_REPORT_PEAK = """
import atexit, sys
from pathlib import Path
from workers.cli import main
out = Path(sys.argv.pop(1))
def peak():
    status = Path("/proc/self/status").read_text().splitlines()
    out.write_text(next(l.split()[1] for l in status if l.startswith("VmHWM")))
atexit.register(peak)
main()
"""


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def synthetic_postcodes(n: int) -> list[str]:
    out = []
    for area in AREAS:
        for district in range(1, 100):
            for sector in range(10):
                for a in LETTERS:
                    for b in LETTERS:
                        out.append(f"{area}{district} {sector}{a}{b}")
                        if len(out) == n:
                            return out
    raise ValueError(f"at most {len(out)} synthetic postcodes")


def write_onspd(path: Path, rows: int, seats: list[str]) -> list[str]:
    """A file in the ONSPD layout; returns the live postcodes in it."""
    rng = random.Random(7)
    postcodes = synthetic_postcodes(rows)
    live = []
    with path.open("w", newline="") as fh:
        out = csv.writer(fh)
        out.writerow(ONSPD_COLUMNS)
        filler = ["E99999999"] * (len(ONSPD_COLUMNS) - 20)
        for i, pcds in enumerate(postcodes):
            outward, inward = pcds.split(" ")
            terminated = "201906" if i % 7 == 0 else ""
            if not terminated:
                live.append(pcds)
            out.writerow(
                [f"{outward:<4}{inward}", f"{outward:<5}{inward}", pcds, "198001", terminated,
                 "E10000002", "E58000001", "E06000001", "E05008942", "E43000001", "0",
                 "447143", "531717", "1", "E18000001", "E40000001", "E92000001", "E12000001",
                 "0", rng.choice(seats), *filler]
            )  # fmt: skip
    return live


def time_lookups(url: str, postcodes: list[str], n: int) -> tuple[float, float, float]:
    engine = make_engine(url)
    sessions = make_sessionmaker(engine)
    rng = random.Random(11)
    sample = [rng.choice(postcodes) for _ in range(n)]
    timings = []
    with session_scope(sessions) as session:
        for postcode in sample[:200]:  # warm the caches and the statement cache
            lookup_local(session, postcode)
        for postcode in sample:
            start = time.perf_counter()
            answer = lookup_local(session, postcode)
            timings.append((time.perf_counter() - start) * 1000)
            assert isinstance(answer, Found), (postcode, answer)
    engine.dispose()
    return percentile(timings, 50), percentile(timings, 99), max(timings)


def report(label: str, p50: float, p99: float, worst: float) -> None:
    print(f"{label}: p50 {p50:.3f} ms, p99 {p99:.3f} ms, max {worst:.1f} ms")


def run_import(url: str, members: Path, postcodes: Path) -> tuple[float, int]:
    engine = make_engine(url)
    sessions = make_sessionmaker(engine)
    read = [0]
    start = time.perf_counter()
    with session_scope(sessions) as session:
        counts = import_directory(
            session,
            members,
            [postcodes],
            "benchmark",
            progress=lambda n: read.__setitem__(0, read[0] + n),
        )
    elapsed = time.perf_counter() - start
    engine.dispose()
    assert read[0] == postcodes.stat().st_size
    return elapsed, counts.postcodes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=2_700_000)
    parser.add_argument("--lookups", type=int, default=20_000)
    parser.add_argument("--database-url", help="an empty PostgreSQL database (default: throwaway)")
    args = parser.parse_args()

    members = SHARED / "constituencies_2024_current_mps.csv"
    if not members.exists():
        members = SAMPLE / "mps.csv"
    with members.open() as fh:
        seats = [row["ons_code"] for row in csv.DictReader(fh)]

    work = Path(tempfile.mkdtemp(prefix="dearmp-bench-directory-"))
    cluster = None
    try:
        onspd = work / "ONSPD_SYNTHETIC.csv"
        start = time.perf_counter()
        live = write_onspd(onspd, args.rows, seats)
        size_mb = onspd.stat().st_size / 1e6
        print(
            f"wrote {args.rows:,} rows ({size_mb:,.0f} MB) in {time.perf_counter() - start:.1f} s"
        )

        url = args.database_url
        if url is None:
            cluster = PostgresCluster(work / "pg").start()
            url = cluster.url()
        migrate(url)
        # The import runs as an operator would run it, in its own process (so that its memory
        # is its own): `dearmp directory import`, progress bar and all.
        start = time.perf_counter()
        peak_file = work / "peak-kb"
        subprocess.run(
            [sys.executable, "-c", IMPORT_AND_REPORT_PEAK, str(peak_file), "directory", "import",
             "--members", str(members), "--postcodes", str(onspd)],
            cwd=REPO, env={**os.environ, "DATABASE_URL": url, "DEARMP_DATA_DIR": str(work)},
            check=True,
        )  # fmt: skip
        elapsed = time.perf_counter() - start
        peak = int(peak_file.read_text()) / 1024
        print(
            f"PostgreSQL import: {args.rows:,} rows in {elapsed:.1f} s "
            f"({args.rows / elapsed:,.0f} rows/s), command start-up included; "
            f"peak memory of the importing process {peak:.0f} MB"
        )
        engine = make_engine(url)
        with engine.connect() as conn:
            size = conn.execute(text("SELECT pg_size_pretty(pg_total_relation_size('postcodes'))"))
            print(f"postcodes table with its index: {size.scalar()}")
        engine.dispose()
        report(f"PostgreSQL lookup, {args.lookups:,}", *time_lookups(url, live, args.lookups))

        sqlite_url = f"sqlite:///{work / 'bench.sqlite3'}"
        migrate(sqlite_url)
        small = SHARED / "postcodes_gb_sample.csv"
        small = small if small.exists() else SAMPLE / "postcodes.csv"
        run_import(sqlite_url, members, small)
        with small.open() as fh:
            real = [r["postcode"] for r in csv.DictReader(fh) if r.get("status", "live") == "live"]
        if members.parent == SHARED:
            timings = time_lookups(sqlite_url, real, args.lookups)
            report(f"SQLite lookup, {args.lookups:,} ({small.name})", *timings)
        python = platform.python_version()
        print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {python}")
    finally:
        if cluster is not None:
            cluster.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
