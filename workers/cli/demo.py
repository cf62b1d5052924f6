"""``dearmp demo``, the main job on embedded defaults: feed a sample batch through the pipeline
and report."""

from __future__ import annotations

import copy
import json
import random
import time
import uuid
from collections import Counter
from collections.abc import Iterable
from typing import Any

import click
import dramatiq
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Column, Table
from sqlalchemy import select

from config.settings import get_settings, masked_url
from workers.cli.base import Cli, cell, command, main
from workers.database.engine import session_scope
from workers.database.models import Submission
from workers.logging import mask_text
from workers.pipeline.app import App
from workers.pipeline.runtime import (
    SAMPLE_DIR,
    count_final,
    prepare,
    running_pipeline,
    state_counts,
    submit,
)

FIRST = "Aisha Bryony Callum Deepa Ewan Farah Gethin Hollie Imran Jodie".split()
LAST = "Ahmed Brennan Clarke Dhillon Evans Fraser Gill Hughes Iqbal Jones".split()
POSTCODES = ["DM1 1AA", "DM2 1AB", "DM3 2BD", "DM4 3GE", "DM5 4DF", "DM6 1AA", "DM1 4DF"]


def sample_batch(count: int, run_id: str) -> list[dict[str, Any]]:
    """The shipped samples (valid and invalid), then generated valid ones up to ``count``."""
    samples: list[dict[str, Any]] = json.loads((SAMPLE_DIR / "submissions.json").read_text())
    rng = random.Random(run_id)
    batch = []
    for i in range(max(count, 1)):
        item = copy.deepcopy(samples[i] if i < len(samples) else samples[0])
        if i >= len(samples):
            first, last = rng.choice(FIRST), rng.choice(LAST)
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


def run_demo(
    app: App, broker: dramatiq.Broker, count: int, timeout: float, console: Console
) -> dict[str, Any]:
    """Feed a sample batch, wait until every submission is final (or ``timeout``): the summary
    that ``--json`` gives and :func:`print_summary` prints."""
    batch = sample_batch(count, uuid.uuid4().hex[:8])
    started = time.monotonic()
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn())
    with Progress(*columns, TimeElapsedColumn(), console=console) as progress:
        fed = progress.track(batch, description="Submitting")
        unique = sorted({submit(app, broker, item)[0] for item in fed})
        finishing = progress.add_task("Final state", total=len(unique))
        counts = state_counts(app, unique)
        while count_final(counts) < len(unique) and time.monotonic() - started < timeout:
            progress.update(finishing, completed=count_final(counts))
            time.sleep(0.2)
            counts = state_counts(app, unique)
        progress.update(finishing, completed=count_final(counts))
    seconds = time.monotonic() - started
    query = select(
        Submission.id, Submission.state, Submission.rejection, Submission.failure_reason
    ).where(Submission.id.in_(unique))
    with session_scope(app.sessions) as session:
        rows = session.execute(query).all()
    reasons: Counter[str] = Counter()
    examples: dict[str, str] = {}
    for submission_id, state, rejection, failure in rows:
        examples.setdefault(state, submission_id)
        for path, why in (rejection or {}).items():  # the supporter's own reason, masked
            reasons[f"rejected: {path}: {mask_text(str(why))[:120]}"] += 1
        if failure:
            reasons[f"failed: {failure}"] += 1
    settings = app.settings
    return {
        "letters_to": (
            f"the outbox {settings.resolved_outbox_dir.resolve()} (one .eml per letter)"
            if settings.mail_backend == "outbox"
            else f"SMTP server {settings.smtp_host}:{settings.smtp_port}"
        ),
        "database": masked_url(settings.resolved_database_url),
        "submitted": len(batch),
        "unique": len(unique),
        "counts": counts,
        "finished": count_final(counts) == len(unique),
        "seconds": round(seconds, 1),
        "reasons": dict(reasons.most_common()),
        "examples": examples,
    }


def _counts(title: str, column: str, counted: Iterable[tuple[str, int]]) -> Table:
    table = Table(column, Column("count", justify="right"), title=title)
    for name, n in counted:
        table.add_row(cell(name), str(n))
    return table


def print_summary(said: dict[str, Any], console: Console) -> None:
    console.print(_counts("Submissions by final state", "state", sorted(said["counts"].items())))
    if said["reasons"]:
        console.print(_counts("Why (field or reason → count)", "reason", said["reasons"].items()))
    console.print(
        f"{said['submitted']} submitted ({said['unique']} unique by idempotency key), "
        f"{sum(said['counts'].values())} tracked, all final: {said['finished']}, "
        f"in {said['seconds']:.1f}s.\nLetters went to {said['letters_to']}.\n"
        f"Database: {said['database']}\n"
        "The history of one submission, e.g.:"
    )
    for state, submission_id in sorted(said["examples"].items()):
        console.print(f"  .venv/bin/dearmp show {submission_id}   ({state})")


@command(main)
@click.option(
    "--count",
    default=40,
    show_default=True,
    type=click.IntRange(min=1),
    help="How many submissions to feed (at least 1).",
)
@click.option("--timeout", default=300.0, show_default=True, help="Seconds to wait for all.")
def demo(cli: Cli, count: int, timeout: float) -> None:
    """The main job: start the pipeline, feed a sample batch, wait for final states, summarise."""
    settings = get_settings()
    cli.log_file = settings.data_dir / "logs" / "dearmp.jsonl"
    app, broker = cli.app, cli.broker
    console = Console(stderr=cli.as_json)  # with --json, the progress is for people
    console.print(
        f"[bold]DearMP demo[/bold]: data in {settings.data_dir.resolve()}, logs in {cli.log_file}"
    )
    prepare(app)
    with running_pipeline(app, broker, app.settings.worker_threads):
        said = run_demo(app, broker, count, timeout, console)
    cli.say(lambda: print_summary(said, console), said)
    if not said["finished"]:
        raise SystemExit(1)
