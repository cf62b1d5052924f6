"""``dearmp queues``, ``dlq``, ``health``, ``watch`` and ``metrics``: what waits on Redis, what
died, and whether letters can go out."""

from __future__ import annotations

import itertools
import json
import sys
import time
from datetime import UTC
from typing import Any

import click
import redis
import structlog
from dramatiq.brokers.redis import RedisBroker
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from sqlalchemy.engine import make_url

from config.settings import ConfigurationError
from workers.cli.base import (
    Cli,
    Nothing,
    cell,
    command,
    confirm,
    dry_run_option,
    json_option,
    main,
    pass_cli,
    until_stopped,
    yes_option,
)
from workers.database.models import Submission
from workers.pipeline import checks
from workers.pipeline import dead_letters as dead
from workers.pipeline.app import App
from workers.privacy.hashing import mask_supporter
from workers.wording import counted, one_line

# What `dearmp health` says when all is well.
SUMMARY = ("dead letters", "queues", "retries", "given up", "workers", "mail server", "reconciler")


def redis_client(app: App) -> redis.Redis:
    """A Redis client that answers (operators' commands need Redis), or one line saying what
    could not be reached, where, and what to start."""
    settings = app.settings
    client = redis.Redis.from_url(
        settings.resolved_redis_url, socket_connect_timeout=3, socket_timeout=10
    )
    try:
        client.ping()
    except redis.RedisError as exc:
        where = make_url(settings.resolved_redis_url).render_as_string(hide_password=True)
        start = (
            "start it with `dearmp run` (or `python3 dev.py demo`), which runs the embedded Redis"
            if settings.redis_url is None
            else "start that Redis server, or set REDIS_URL to one that runs"
        )
        raise click.ClickException(
            f"cannot reach Redis at {where} ({type(exc).__name__}): {start}."
        ) from None
    return client


def _reachable(app: App) -> redis.Redis | None:
    """A Redis client, or None (said on stderr) when only the database's record can be read."""
    try:
        return redis_client(app)
    except click.ClickException as exc:
        click.echo(f"the database's record only: {exc.message}", err=True)
        return None


def find_dead(app: App, client: redis.Redis | None, **filters: Any) -> list[dead.Found]:
    """The dead letters matching ``filters``: the database's record, with what Redis holds when
    ``client`` is given."""
    return dead.find_dead(client, app.settings.redis_namespace, app.sessions, **filters)


def clear_dead(app: App, actor: str, submission_ids: set[str]) -> int:
    """Purge (recording) the dead letters of ``actor`` about these submissions: what was done
    for them since supersedes them. How many. (Redis away: Redis's copy stays.)"""
    client = _reachable(app)
    found = [f for f in find_dead(app, client, actor=actor) if f.submission_id in submission_ids]
    for one in found:
        dead.purge(client, app.settings.redis_namespace, app.sessions, one)
    return len(found)


@command(main)
def queues(cli: Cli) -> None:
    """Per queue: messages waiting, delayed, in progress and dead."""
    app = cli.app
    client = redis_client(app)
    depths = dead.queue_depths(client, app.settings.redis_namespace, dead.dead_counts(app.sessions))
    table = Table(title="Queues")
    for col in ("queue", "waiting", "delayed", "in progress", "dead"):
        table.add_column(col, justify="left" if col == "queue" else "right")
    for d in depths:
        table.add_row(d.queue, str(d.waiting), str(d.delayed), str(d.in_progress), str(d.dead))
    cli.say(lambda: Console().print(table), depths)


@main.group()
def dlq() -> None:
    """Dead letters: list, show and requeue them."""


_FILTERS = [
    click.option("--queue", help="Only this queue, e.g. dearmp.deliver."),
    click.option("--actor", help="Only this actor, e.g. deliver_submission."),
    click.option("--reason", help="Only failures whose exception type contains this."),
    click.option(
        "--since",
        type=click.DateTime(),
        callback=lambda _ctx, _param, since: since and since.replace(tzinfo=UTC),
        help="Only dead letters since (UTC).",
    ),
]


def _filters(fn: Any) -> Any:
    for option in reversed(_FILTERS):
        fn = option(fn)
    return fn


@command(dlq, "list")
@_filters
def dlq_list(cli: Cli, **filters: Any) -> None:
    """Dead letters grouped by reason, with the answer (masked), oldest first: full ids.
    Filters that match nothing exit 1."""
    found = find_dead(cli.app, _reachable(cli.app), **filters)
    listed = [
        {
            "message_id": one.message_id,
            "queue": one.queue,
            "actor": one.actor,
            "submission_id": one.submission_id,
            "dead_at": one.dead_at.isoformat(),
            "in_redis": one.dead is not None,
            "reason": one.reason,
            "answer": one.answer,
            "attempts": one.failure.attempts if one.failure else None,
        }
        for _, group in dead.by_reason(found)
        for one in group
    ]
    cli.say(lambda: _print_dead(listed), listed)
    if not listed and any(f is not None for f in filters.values()):
        raise Nothing("no dead letter matches these filters")


def _print_dead(listed: list[dict[str, Any]]) -> None:
    if not listed:
        click.echo("no dead letters")
        return
    columns = ("message_id", "actor", "submission_id", "dead_at", "attempts")
    # listed is in by_reason's order: each reason's letters together, the largest group first
    for why, grouped in itertools.groupby(listed, key=lambda item: item["reason"]):
        items = list(grouped)
        answer = one_line(items[0]["answer"] or "none recorded")  # a failure never recorded
        click.echo(f"{one_line(why or 'unknown')}: {len(items)} (the answer: {answer})")
        table = Table()
        for col in columns:  # ids whole, to paste into `dlq show`
            table.add_column(col, overflow="fold", no_wrap=col.endswith("_id"))
        for item in items:
            table.add_row(*(cell(item[c]) for c in columns))
        Console(width=max(160, Console().width)).print(table)


@dlq.command("show")
@click.argument("message_id")
@json_option  # its answer is JSON either way
@click.option(
    "--reveal", is_flag=True, help="Show personal data in the failure (the reveal is logged)."
)
@pass_cli
def dlq_show(cli: Cli, message_id: str, reveal: bool) -> None:
    """One dead letter: the message, its submission's state history, and the recorded failure."""
    app = cli.app
    matching = [f for f in find_dead(app, _reachable(app)) if f.message_id.startswith(message_id)]
    if not matching:
        raise click.ClickException(f"no dead letter {message_id}")
    if len(matching) > 1:
        many = len(matching)
        raise click.ClickException(f"{many} dead letters start with {message_id}: say more")
    found = matching[0]
    failure, message = found.failure, found.dead.message if found.dead else None
    history, payload = [], None
    if found.submission_id:
        with cli.session() as session:
            sub = session.get(Submission, found.submission_id)
            if sub is not None:
                history = [{"state": e.state, "at": e.at.isoformat()} for e in sub.events]
                payload = sub.payload
    if reveal:
        structlog.get_logger("workers").warning("dead_letter_revealed", dead_message_id=message_id)

    def show_text(text: str) -> str:
        """Unless revealed: the supporter's own details hidden (an error can quote them), and
        anything email- or postcode-shaped."""
        return text if reveal else mask_supporter(text, payload)

    info = {
        "message_id": found.message_id,
        "queue": found.queue,
        "actor": found.actor,
        "args": show_text(json.dumps(message.args)) if message is not None else None,
        "dead_at": found.dead_at.isoformat(),
        "submission_id": found.submission_id,
        "in_redis": found.dead is not None,
        "history": history,
        "failure": failure
        and {
            "exception_type": failure.exception_type,
            "message": show_text(failure.exception_message),
            "attempts": failure.attempts,
            "first_failed_at": failure.first_failed_at.isoformat(),
            "last_failed_at": failure.last_failed_at.isoformat(),
            "traceback": show_text(failure.traceback),
        },
    }
    cli.say(json.dumps(info, indent=2), info)


@command(dlq, "requeue")
@click.argument("message_ids", nargs=-1)
@click.option("--all", "everything", is_flag=True, help="Every dead letter matching the filters.")
@_filters
@dry_run_option
@yes_option
def dlq_requeue(
    cli: Cli,
    message_ids: tuple[str, ...],
    everything: bool,
    dry_run: bool,
    yes: bool,
    **filters: Any,
) -> None:
    """Put dead letters back on their queues (the copy is enqueued before the dead one goes).
    --all asks first (--yes does not). Exits 1 when none is requeued."""
    if not message_ids and not everything:
        raise click.UsageError("name message ids, or --all (with filters)")
    app = cli.app
    url, namespace = app.settings.resolved_redis_url, app.settings.redis_namespace
    client = redis_client(app)
    broker = RedisBroker(url=url, namespace=namespace)  # type: ignore[no-untyped-call]
    rows = find_dead(app, client, **filters)
    chosen = [f for f in rows if everything or any(f.message_id.startswith(m) for m in message_ids)]
    missing = sorted(m for m in message_ids if not any(f.message_id.startswith(m) for f in chosen))
    if everything and chosen and not dry_run:
        confirm(yes, f"Requeue {counted(len(chosen), 'dead letter')}?")
    done: list[dict[str, Any]] = []
    refused: list[dict[str, Any]] = []
    for found in chosen:
        mid, on = found.message_id, found.queue
        try:
            new_id = dead.replay(client, broker, namespace, app.sessions, found, dry_run=dry_run)
        except ValueError as exc:
            said = "not requeued" if isinstance(exc, dead.RequeueRefused) else "cannot requeue"
            refused.append({"message_id": mid, "why": str(exc)})
            cli.tell(f"{said} {mid}: {exc}")
            continue
        done.append({"message_id": mid, "queue": on, "new_id": new_id})
        cli.tell(
            f"would requeue {mid} on {on}" if dry_run else f"requeued {mid} on {on} as {new_id}"
        )
    for message_id in missing:
        cli.tell(f"not found {message_id}")
    said = "would requeue" if dry_run else "requeued"
    cli.say(
        f"{said} {len(done)}, not found {len(missing)}",
        {"dry_run": dry_run, "requeued": done, "not_requeued": refused, "not_found": missing},
    )
    if not done:
        raise Nothing("no dead letter requeued")


@command(dlq, "purge")
@_filters
@dry_run_option
@yes_option
def dlq_purge(cli: Cli, dry_run: bool, yes: bool, **filters: Any) -> None:
    """Delete dead letters matching the filters, recording each one in the database. Asks
    first (--yes does not); exits 1 when none matches."""
    app = cli.app
    client = redis_client(app)
    rows = find_dead(app, client, **filters)
    if not rows:
        raise Nothing("nothing to purge: no dead letter matches")
    ids = [found.message_id for found in rows]
    if dry_run:
        cli.say(f"would purge {len(rows)}: {', '.join(ids)}", {"dry_run": True, "purged": ids})
        return
    confirm(yes, f"Delete {counted(len(rows), 'dead letter')} for good?")
    for found in rows:
        dead.purge(client, app.settings.redis_namespace, app.sessions, found)
    said = f"purged {len(rows)} (recorded in purged_dead_letters)"
    cli.say(said, {"dry_run": False, "purged": ids})


@command(main)
@click.option("--max-dead", default=0, show_default=True, help="Dead letters tolerated.")
@click.option(
    "--max-age",
    default=300.0,
    show_default=True,
    help="Seconds the oldest waiting message (or a letter, an email) may be late.",
)
def health(cli: Cli, max_dead: int, max_age: float) -> None:
    """Whether letters can go out, and what to look at. Exits 0 healthy, 1 degraded (something
    to look at; letters still go), 2 down (nothing can go out)."""
    try:
        app = cli.app
    except ConfigurationError as exc:  # nothing can start with these settings: down, not degraded
        found = [checks.Check("configuration", checks.DOWN, "; ".join(exc.problems))]
    else:
        try:
            client = redis_client(app)
        except click.ClickException as exc:
            found = [checks.Check("redis", checks.DOWN, exc.message)]
        else:
            found = checks.run(app, client, app.settings.redis_namespace, max_dead, max_age)
    status = checks.overall(found)
    cli.say(lambda: _say_health(found, status), checks.as_json(found))
    if status != checks.OK:
        sys.exit(checks.ORDER[status])


def _say_health(found: list[checks.Check], status: str) -> None:
    """One line, for cron and a container's health check: on stderr when something is wrong."""
    problems = [one_line(c.detail) for c in found if c.status != checks.OK]
    if problems:
        click.echo(
            f"{'down' if status == checks.DOWN else 'degraded'}: {'; '.join(problems)}",
            err=True,
        )
    else:
        said = {c.name: c.detail for c in found}
        click.echo("healthy: " + "; ".join(one_line(said[n]) for n in SUMMARY if n in said))


def _watch_view(snap: dead.Snapshot) -> Any:
    queues = Table(title="Queues", expand=True)
    for col in ("queue", "waiting", "delayed", "in progress", "dead", "done / min"):
        queues.add_column(col, justify="left" if col == "queue" else "right")
    for d in snap.depths:
        stage = d.queue.split(".", 1)[1]
        row = (d.waiting, d.delayed, d.in_progress, d.dead, snap.per_minute.get(stage, 0))
        queues.add_row(d.queue, *(str(v) for v in row), style="red" if d.dead else None)
    failures = Table(title="Newest failures", expand=True)
    for col in ("last failed", "actor", "error", "submission"):
        failures.add_column(col)
    for at, actor, error, sid in snap.newest_failures:
        failures.add_row(*map(cell, (at.strftime("%H:%M:%S"), actor, error, sid)))
    return Group(queues, failures)


@main.command()
@click.option("--interval", default=1.0, show_default=True, help="Seconds between refreshes.")
@click.option("--iterations", type=int, default=None, help="Stop after this many (default: never).")
@pass_cli
def watch(cli: Cli, interval: float, iterations: int | None) -> None:
    """A live view of queues, work per stage, dead letters and the newest failures (on a
    terminal; elsewhere only with --iterations, the last view printed when they are done)."""
    if iterations is None and not sys.stdout.isatty():
        raise click.UsageError(
            "watch is a live view for a terminal, which it would never print to here: "
            "give --iterations, or use `dearmp queues` or `dearmp health --json`"
        )
    app = cli.app
    client = redis_client(app)
    with Live(console=Console(), refresh_per_second=4, screen=False) as live:
        for n in itertools.count() if iterations is None else range(iterations):
            if n:
                time.sleep(interval)
            snap = dead.snapshot(client, app.settings.redis_namespace, app.sessions)
            live.update(_watch_view(snap))


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=9464, show_default=True)
@pass_cli
def metrics(cli: Cli, host: str, port: int) -> None:
    """Serve Prometheus metrics: queue and dead-letter depths, submissions, letters."""
    # Imported here: a worker's metrics need prometheus_client imported after dramatiq's
    # middleware has set up its multiprocess mode.
    from prometheus_client import start_http_server
    from prometheus_client.core import REGISTRY

    from workers.pipeline.metrics import DearmpCollector

    app = cli.app
    client = redis_client(app)
    REGISTRY.register(DearmpCollector(client, app.settings.redis_namespace, app.sessions))
    server, _thread = start_http_server(port, addr=host)
    click.echo(f"metrics on http://{host}:{port}/metrics")
    with until_stopped() as stop:
        stop.wait()
    server.shutdown()
