"""Own words and near-duplicates: detection accuracy against exact Jaccard, and the CPU a
submission adds (workers/letters/originality.py).

    .venv/bin/python -m bench.originality            # 2,000 letters judged, 100,000 indexed
    .venv/bin/python -m bench.originality --quick    # 800 judged, 10,000 indexed

The corpus is generated here, from nothing on the network: the sample campaign's draft body with
random edits of 0 to 60 % of its words (substitutions, insertions, deletions and an own
paragraph, in words drawn from the repository's documentation), one letter in ten unedited, and
unrelated letters (passages of that documentation).

Accuracy: every pair of letters whose exact Jaccard similarity of shingles is at least the
threshold should be found; a pair is found when the two share an LSH band key and their
signatures' estimated similarity is at least the threshold.

CPU: each submission is timed in this one thread (process CPU) for what the comparison stage
computes (workers/stages/comparison.py): words, own-words share, signature, and the similarity
to the distinct letters its MP had most within the window, at most MOST_COMPARED of them, drawn
from the letters indexed (unpacking each stored signature, as the database's row gives it, as if
each submission were alone in its group). The database's side of that read is measured by
``--database`` (see docs/performance.md).
"""

from __future__ import annotations

import argparse
import gc
import random
import re
import sys
import time
import tomllib
from itertools import combinations
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.common import machine  # noqa: E402
from workers.letters import originality as o  # noqa: E402
from workers.stages.comparison import MOST_COMPARED  # noqa: E402

CANDIDATES = MOST_COMPARED
THRESHOLDS = (0.5, 0.9)
MARGIN = 0.05


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="a smaller run")
    parser.add_argument("--seed", type=int, default=29)
    parser.add_argument(
        "--database", action="store_true", help="the stage's read of counts, on PostgreSQL"
    )
    args = parser.parse_args()
    judged, indexed, timed = (800, 10_000, 1_000) if args.quick else (2_000, 100_000, 2_000)
    corpus = Corpus(random.Random(args.seed))
    print(machine())
    print(
        f"shingles of {o.SHINGLE} words; one-permutation MinHash, {o.NUM_PERM} values; "
        f"{o.BANDS} bands x {o.ROWS} rows"
    )
    if args.database:
        database(indexed, 650)
        database(indexed, 1)
        return
    accuracy(corpus, judged)
    cpu(corpus, indexed, timed)


def database(letters: int, mps: int, groups: int = 300) -> None:
    """The comparison stage's read for a group of six letters (to six MPs, or to one), with
    ``letters`` distinct letters to ``mps`` MPs in the window, one count row each: its time (the
    statement and the signatures it returns unpacked) and PostgreSQL's CPU per group."""
    from datetime import UTC, datetime, timedelta
    from tempfile import TemporaryDirectory

    from sqlalchemy import create_engine, insert

    from bench.pipeline import CpuMeter
    from tests.services import PostgresCluster
    from workers.database.models import PRINT_COUNTS, Base
    from workers.stages.comparison import RECENT_COUNTS, _counts_read

    rng = random.Random(letters + mps)
    now = datetime.now(UTC)
    with TemporaryDirectory(prefix="dearmp-bench-") as folder:
        cluster = PostgresCluster(Path(folder) / "pg").start()
        try:
            engine = create_engine(cluster.url())
            Base.metadata.create_all(engine)
            rows = [
                {
                    "member_id": i % mps,
                    "signature": rng.randbytes(4 * o.NUM_PERM),
                    "hour": (now - timedelta(hours=rng.randrange(30 * 24))).replace(
                        minute=0, second=0, microsecond=0
                    ),
                    "letters": 1,
                }
                for i in range(letters)
            ]
            with engine.begin() as conn:
                conn.execute(insert(PRINT_COUNTS), rows)
                conn.exec_driver_sql("ANALYZE print_counts")
            meter = CpuMeter(database=cluster.postmaster_pid())
            with engine.connect() as conn:
                meter.start()
                wall = time.perf_counter()
                returned = 0
                for _ in range(groups):
                    members = sorted({rng.randrange(mps) for _ in range(6)})
                    params = {f"m{i}": member for i, member in enumerate(members)}
                    window = now - timedelta(days=30, hours=1)
                    recent = now - timedelta(hours=25)
                    params |= {"window": window, "recent": recent, "newest": RECENT_COUNTS}
                    rows = conn.execute(
                        _counts_read(len(members)), params | {"most": MOST_COMPARED}
                    )
                    returned += len([o.unpack(row.signature) for row in rows])
                wall = time.perf_counter() - wall
                server = meter.stop().get("database", 0.0)
            engine.dispose()
        finally:
            cluster.stop()
    print(
        f"\nthe stage's read, {letters:,} distinct letters to {mps} MP(s) in the window: "
        f"{wall / groups * 1000:.2f} ms a group of six, PostgreSQL {server / groups * 1000:.2f} ms "
        f"({server / groups / 6 * 1000:.2f} ms a submission), {returned / groups:.0f} compared"
    )


class Corpus:
    """Letters made from the sample campaign's draft body and the repository's documentation."""

    def __init__(self, rng: random.Random) -> None:
        campaign = tomllib.loads((REPO / "config/campaigns/political-prisoners.toml").read_text())
        self.rng = rng
        self.template = str(campaign["draft_body"]).strip()
        prose = " ".join(p.read_text() for p in sorted((REPO / "docs").glob("*.md")))
        self.prose = re.findall(r"[A-Za-z][A-Za-z']*[,.]?", prose)
        self.vocabulary = sorted({w.strip(",.") for w in self.prose})

    def passage(self, low: int, high: int) -> str:
        start = self.rng.randrange(len(self.prose) - high)
        return " ".join(self.prose[start : start + self.rng.randint(low, high)])

    def edited(self) -> str:
        """The template with 0 to 60 % of its words edited (one letter in ten unedited)."""
        words = self.template.split(" ")
        if self.rng.random() < 0.1:
            return self.template
        edits = round(self.rng.uniform(0, 0.6) * len(words))
        if edits >= 20 and self.rng.random() < 0.5:  # an own paragraph of up to half the edits
            own = self.rng.randint(10, edits // 2)
            words.insert(self.rng.randrange(len(words)), "\n\n" + self.passage(own, own) + "\n\n")
            edits -= own
        for _ in range(edits):
            at = self.rng.randrange(len(words))
            kind = self.rng.random()
            if kind < 0.5:
                words[at] = self.rng.choice(self.vocabulary)
            elif kind < 0.75:
                words.insert(at, self.rng.choice(self.vocabulary))
            elif len(words) > 10:
                del words[at]
        return " ".join(words)

    def letter(self) -> str:
        """Four letters in five edit the template; the fifth is unrelated."""
        return self.edited() if self.rng.random() < 0.8 else self.passage(60, 160)


def shingles(words: list[str]) -> set[tuple[str, ...]]:
    n = min(o.SHINGLE, len(words))
    return set(zip(*(words[i:] for i in range(n)), strict=False))


def jaccard(a: set[tuple[str, ...]], b: set[tuple[str, ...]]) -> float:
    common = len(a & b)
    return common / (len(a) + len(b) - common) if a or b else 1.0


def accuracy(corpus: Corpus, n: int) -> None:
    letters = [o.words(corpus.letter()) for _ in range(n)]
    sets = [shingles(words) for words in letters]
    sigs = [o.signature(words) for words in letters]
    keys = [set(o.bands(sig)) for sig in sigs]
    # Per threshold: pairs at or above it, of them LSH candidates, pairs found, of them right.
    truth, candidate, found, right = ([0] * len(THRESHOLDS) for _ in range(4))
    # Away from the threshold: pairs at least MARGIN above it found, found pairs MARGIN below.
    clear, clear_found, wrong = ([0] * len(THRESHOLDS) for _ in range(3))
    candidates = 0
    for i, j in combinations(range(n), 2):
        exact = jaccard(sets[i], sets[j])
        estimate = o.similarity(sigs[i], sigs[j])
        collide = not keys[i].isdisjoint(keys[j])
        candidates += collide
        for k, t in enumerate(THRESHOLDS):
            near, detected = exact >= t, collide and estimate >= t
            truth[k] += near
            candidate[k] += near and collide
            found[k] += detected
            right[k] += near and detected
            clear[k] += exact >= t + MARGIN
            clear_found[k] += exact >= t + MARGIN and detected
            wrong[k] += exact < t - MARGIN and detected
    print(f"\naccuracy: {n:,} letters, {n * (n - 1) // 2:,} pairs, {candidates:,} LSH candidates")
    print(
        f"threshold  pairs >= t  LSH recall  recall  precision  "
        f"recall >= t+{MARGIN}  found < t-{MARGIN}"
    )
    for k, t in enumerate(THRESHOLDS):
        print(
            f"{t:9.2f}  {truth[k]:10,}  {candidate[k] / max(truth[k], 1):10.4f}  "
            f"{right[k] / max(truth[k], 1):6.4f}  {right[k] / max(found[k], 1):9.4f}  "
            f"{clear_found[k] / max(clear[k], 1):16.4f}  {wrong[k] / max(found[k], 1):14.4f}"
        )


def cpu(corpus: Corpus, indexed: int, timed: int) -> None:
    template = o.Template(corpus.template)
    rng = random.Random(indexed)
    stored = [o.pack(o.signature(o.words(corpus.letter()))) for _ in range(indexed)]
    # The letters stand in for the database's: keep the collector from walking them each time.
    gc.collect()
    gc.freeze()
    bodies = [corpus.letter() for _ in range(timed)]
    bodies.append(((corpus.template + "\n\n") * 20)[:5000])
    times, counts = [], []
    for body in bodies:
        mps_letters = rng.sample(stored, CANDIDATES)  # the distinct letters its MP had most
        start = time.process_time_ns()
        words = o.words(body)
        template.share_of(words)
        sig = template.signature_of(words)
        near = sum(o.similarity(sig, o.unpack(other)) >= THRESHOLDS[-1] for other in mps_letters)
        times.append(time.process_time_ns() - start)
        counts.append(near)
    longest_ms = times.pop() / 1e6
    times.sort()

    def ms(q: float) -> float:
        return times[min(int(len(times) * q), len(times) - 1)] / 1e6

    print(
        f"\nCPU per submission: {indexed:,} letters indexed, {timed:,} submissions, "
        f"each compared with {CANDIDATES} distinct letters to its MP"
    )
    print(f"p50 {ms(0.5):.3f} ms  p99 {ms(0.99):.3f} ms  max {times[-1] / 1e6:.3f} ms")
    print(f"a 5,000-character letter (the campaign's limit): {longest_ms:.3f} ms")
    print(f"near-duplicates >= {THRESHOLDS[-1]} per submission (of those compared): "
          f"mean {sum(counts[:-1]) / timed:.1f}")  # fmt: skip


if __name__ == "__main__":
    main()
