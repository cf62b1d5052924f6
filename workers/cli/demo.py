"""The main job on embedded defaults: feed a sample batch through the pipeline and report."""

from __future__ import annotations

import copy
import json
import random
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import dramatiq
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from sqlalchemy import select

from config.settings import masked_url
from workers.database.engine import session_scope
from workers.database.models import Submission
from workers.logging import mask_text
from workers.pipeline.app import App
from workers.pipeline.runtime import SAMPLE_DIR, count_final, state_counts, submit

FIRST = "Aisha Bryony Callum Deepa Ewan Farah Gethin Hollie Imran Jodie".split()
LAST = "Ahmed Brennan Clarke Dhillon Evans Fraser Gill Hughes Iqbal Jones".split()
POSTCODES = ["DM1 1AA", "DM2 1AB", "DM3 2BD", "DM4 3GE", "DM5 4DF", "DM6 1AA", "DM1 4DF"]


def sample_batch(count: int, run_id: str) -> list[dict[str, Any]]:
    """The shipped samples (valid and invalid), then generated valid ones up to ``count``."""
    samples: list[dict[str, Any]] = json.loads((SAMPLE_DIR / "submissions.json").read_text())
    template = samples[0]
    rng = random.Random(run_id)
    batch = []
    for i in range(max(count, 1)):
        if i < len(samples):
            item = copy.deepcopy(samples[i])
        else:
            first, last = rng.choice(FIRST), rng.choice(LAST)
            item = copy.deepcopy(template)
            item["idempotency_key"] = f"generated-{i:06d}"
            item["supporter"].update(
                name=f"{first} {last}",
                email=f"{first}.{last}.{i}@example.com".lower(),
                postcode=rng.choice(POSTCODES),
                address_lines=[f"{rng.randint(1, 200)} High Street"],
            )
        if isinstance(item.get("idempotency_key"), str):
            item["idempotency_key"] = f"{run_id}-{item['idempotency_key']}"
        batch.append(item)
    return batch


@dataclass
class DemoResult:
    submitted: int
    unique: int
    counts: dict[str, int]
    finished: bool
    seconds: float
    reasons: Counter[str] = field(default_factory=Counter)
    examples: dict[str, str] = field(default_factory=dict)


def run_demo(
    app: App, broker: dramatiq.Broker, count: int, timeout: float, console: Console
) -> DemoResult:
    run_id = uuid.uuid4().hex[:8]
    batch = sample_batch(count, run_id)
    ids: list[str] = []
    started = time.monotonic()
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console, transient=False) as progress:
        feeding = progress.add_task("Submitting", total=len(batch))
        for item in batch:
            ids.append(submit(app, broker, item)[0])
            progress.advance(feeding)
        unique = sorted(set(ids))
        finishing = progress.add_task("Final state", total=len(unique))
        counts = state_counts(app, unique)
        while count_final(counts) < len(unique) and time.monotonic() - started < timeout:
            progress.update(finishing, completed=count_final(counts))
            time.sleep(0.2)
            counts = state_counts(app, unique)
        progress.update(finishing, completed=count_final(counts))
    result = DemoResult(
        submitted=len(batch),
        unique=len(unique),
        counts=counts,
        finished=count_final(counts) == len(unique),
        seconds=time.monotonic() - started,
    )
    with session_scope(app.sessions) as session:
        rows = session.execute(
            select(
                Submission.id, Submission.state, Submission.rejection, Submission.failure_reason
            ).where(Submission.id.in_(unique))
        ).all()
    for submission_id, state, rejection, failure in rows:
        result.examples.setdefault(state, submission_id)
        for path, why in (rejection or {}).items():  # the supporter's own reason, masked
            result.reasons[f"rejected: {path}: {mask_text(str(why))[:120]}"] += 1
        if failure:
            result.reasons[f"failed: {failure}"] += 1
    return result


def summary(result: DemoResult, app: App) -> dict[str, Any]:
    """The demo's result for ``--json``: what :func:`print_summary` prints."""
    return {
        "letters_to": _letters_to(app),
        "database": masked_url(app.settings.resolved_database_url),
        "submitted": result.submitted,
        "unique": result.unique,
        "counts": result.counts,
        "finished": result.finished,
        "seconds": round(result.seconds, 1),
        "reasons": dict(result.reasons.most_common()),
        "examples": result.examples,
    }


def print_summary(result: DemoResult, app: App, console: Console) -> None:
    table = Table(title="Submissions by final state")
    table.add_column("state")
    table.add_column("count", justify="right")
    for state, n in sorted(result.counts.items()):
        table.add_row(state, str(n))
    console.print(table)
    if result.reasons:
        reasons = Table(title="Why (field or reason → count)")
        reasons.add_column("reason")
        reasons.add_column("count", justify="right")
        for reason, n in result.reasons.most_common():
            reasons.add_row(escape(reason), str(n))
        console.print(reasons)
    console.print(
        f"{result.submitted} submitted ({result.unique} unique by idempotency key), "
        f"{sum(result.counts.values())} tracked, all final: {result.finished}, "
        f"in {result.seconds:.1f}s.\nLetters went to {_letters_to(app)}.\n"
        f"Database: {masked_url(app.settings.resolved_database_url)}\n"
        "The history of one submission, e.g.:"
    )
    for state, submission_id in sorted(result.examples.items()):
        console.print(f"  .venv/bin/dearmp show {submission_id}   ({state})")


def _letters_to(app: App) -> str:
    if app.settings.mail_backend == "outbox":
        return f"the outbox {app.settings.resolved_outbox_dir.resolve()} (one .eml per letter)"
    return f"SMTP server {app.settings.smtp_host}:{app.settings.smtp_port}"
