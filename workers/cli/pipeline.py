"""``dearmp`` commands that run and watch the pipeline: workers, the reconciler, queues,
dead letters, health, campaigns and deliveries."""

from __future__ import annotations

import json
import signal
import sys
import threading
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from config.settings import get_settings, masked_url
from workers.cli.base import (
    Cli,
    Nothing,
    confirm,
    dry_run_option,
    json_option,
    main,
    pass_cli,
    yes_option,
)
from workers.pipeline.app import App


@main.command()
@json_option
@pass_cli
def init(cli: Cli) -> None:
    """Migrate the database, load campaigns, import the sample directory if there is none."""
    from workers.pipeline.runtime import prepare

    app = cli.app
    prepare(app)
    database = masked_url(app.settings.resolved_database_url)
    cli.say(f"ready: {database}", {"ready": True, "database": database})


@main.command()
@pass_cli
def migrate(cli: Cli) -> None:
    """Apply Alembic migrations to DATABASE_URL (or the embedded SQLite file)."""
    from workers.database.engine import migrate as run_migrations

    run_migrations(cli.app.settings.resolved_database_url)


@main.command()
@click.option("--processes", default=2, show_default=True, help="Worker processes.")
@click.option("--threads", default=8, show_default=True, help="Threads per process.")
def worker(processes: int, threads: int) -> None:
    """Run the stage actors (dramatiq workers) against REDIS_URL and DATABASE_URL."""
    from dramatiq.cli import main as dramatiq_main

    from workers.logging import configure_logging

    # dramatiq's own process (it starts the worker processes and tells of one that dies) logs
    # JSON like them: --skip-logging leaves its records to the handler set up here.
    configure_logging(get_settings().log_level)
    args = [
        "dramatiq",
        "workers.pipeline.actors:setup",
        "--processes",
        str(processes),
        "--threads",
        str(threads),
        "--skip-logging",
        # dramatiq waits this long for its children to boot before it notices one that died
        # booting (30 s by default); no fork processes wait on it here.
        "--worker-fork-timeout",
        "1000",
    ]
    sys.argv = args
    sys.exit(dramatiq_main())  # type: ignore[no-untyped-call]


@main.command()
@click.option("--once", is_flag=True, help="One pass, then exit (for cron).")
@json_option
@pass_cli
def reconcile(cli: Cli, once: bool) -> None:
    """Resend submissions that have stopped moving (every DEARMP_RECONCILE_INTERVAL seconds).
    --json answers for --once; the loop prints nothing."""
    from workers.pipeline.reconciler import reconcile_once, run_forever
    from workers.pipeline.runtime import reconciler_options

    app = cli.app
    options = reconciler_options(app.settings)
    if once:
        resent = reconcile_once(app.sessions, cli.broker, **options)
        cli.say(f"resent {resent}", {"resent": resent})
        return
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        run_forever(app.sessions, cli.broker, app.settings.reconcile_interval, stop=stop, **options)
    except KeyboardInterrupt:
        stop.set()


@main.command()
@click.argument("file", type=click.File("rb"))
@json_option
@pass_cli
def submit(cli: Cli, file: Any) -> None:
    """Submit a JSON file: one submission object, or a list of them. Prints the ids, each
    accepted, duplicate (its key and body seen before) or conflict (its key seen before with
    another body: nothing stored; exits 1)."""
    from workers.database.engine import session_scope
    from workers.pipeline.dispatch import dispatch
    from workers.pipeline.intake import accept
    from workers.stages.stage import Stage

    data = json.load(file)
    answers = []
    for item in data if isinstance(data, list) else [data]:
        with session_scope(cli.app.sessions) as session:
            found = accept(session, item, cli.app.secret)
        if found.created:  # after the commit; else the reconciler
            dispatch(cli.broker, [Stage.VALIDATE], found.submission_id)
        outcome = "accepted" if found.created else "conflict" if found.conflict else "duplicate"
        answers.append({"id": found.submission_id, "outcome": outcome})
    cli.say("\n".join(f"{a['id']} {a['outcome']}" for a in answers), answers)
    conflicts = sum(a["outcome"] == "conflict" for a in answers)
    if conflicts:
        raise click.ClickException(
            f"{conflicts} conflict{'s' if conflicts > 1 else ''}: an idempotency key already "
            "used with a different body; nothing stored for it (send a new key for a new letter)"
        )


@main.group()
def submission() -> None:
    """One submission, for an operator."""


@submission.command("show")
@click.argument("submission_id")
@json_option
@click.option("--reveal", is_flag=True, help="The letter unmasked (the reveal is logged).")
@pass_cli
def show(cli: Cli, submission_id: str, reveal: bool = False) -> None:
    """A submission's state history, without personal data."""
    import structlog

    from workers.database.engine import session_scope
    from workers.database.models import Letter, OutboxItem, Submission
    from workers.pipeline.states import OUTCOMES, State
    from workers.privacy.hashing import mask_supporter

    app = cli.app
    with session_scope(app.sessions) as session:
        sub = session.get(Submission, submission_id)
        if sub is None:
            raise click.ClickException(f"no submission {submission_id}")
        delivery = session.get(OutboxItem, submission_id)  # the letter's item
        info: dict[str, Any] = {
            "id": sub.id,
            "campaign": sub.campaign_slug,
            "state": sub.state,
            "outcome": OUTCOMES[State(sub.state)],
            "rejection": sub.rejection,
            "failure_reason": sub.failure_reason,
            "constituency": sub.constituency_code,
            "member_id": sub.member_id,
            "consent_logged_at": sub.consent_logged_at and sub.consent_logged_at.isoformat(),
            "delivery": delivery
            and {
                "status": delivery.status,
                "attempts": delivery.attempts,
                "response": delivery.response,
                "error": delivery.error,
            },
            "history": [
                {"state": e.state, "at": e.at.isoformat(), "detail": e.detail} for e in sub.events
            ],
        }
        letter = session.get(Letter, submission_id)
        if letter is not None:
            hide = (lambda t: t) if reveal else (lambda t: mask_supporter(t, sub.payload))
            info["letter"] = {
                "message_id": letter.message_id,
                "to": f"{letter.to_name} <{letter.to_email}>",
                "subject": hide(letter.subject),
                "body": hide(letter.body_text or ""),
                "content_sha256": letter.content_sha256,
            }
    if reveal:
        structlog.get_logger("workers").warning("letter_revealed", submission_id=submission_id)
    cli.say(lambda: _print_submission(info), info)


def _print_submission(info: dict[str, Any]) -> None:
    from rich.text import Text

    console = Console()
    table = Table(title=f"Submission {info['id']} ({info['state']})")
    for col in ("at", "state", "detail"):
        table.add_column(col)
    for event in info["history"]:  # Text: a detail is shown as it is, never as markup
        table.add_row(event["at"], event["state"], Text(event["detail"] or ""))
    console.print(table)
    details = ("outcome", "rejection", "failure_reason", "constituency", "member_id")
    for key in (*details, "delivery", "letter"):
        value = info.get(key)
        if not value:
            continue
        if not isinstance(value, dict):
            console.print(Text(f"{key}: {value}"))
            continue
        console.print(Text(f"{key}:", style="bold"))
        for name, item in value.items():
            if isinstance(item, str) and "\n" in item:  # the letter's body, line by line
                console.print(Text(f"  {name}:"))
                console.print(Text("\n".join(f"    {line}" for line in item.splitlines())))
            else:
                console.print(Text(f"  {name}: {'' if item is None else item}"))


main.add_command(show, name="show")  # the short form of `dearmp submission show`


@main.command()
@click.option("--threads", type=int, default=None, help="Worker threads (DEARMP_WORKER_THREADS).")
@pass_cli
def run(cli: Cli, threads: int | None) -> None:
    """Run everything in one process (embedded Redis unless REDIS_URL): Ctrl-C stops it."""
    from workers.pipeline.runtime import prepare, running_pipeline

    app = cli.app
    prepare(app)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with running_pipeline(app, cli.broker, threads or app.settings.worker_threads):
        click.echo("pipeline running; Ctrl-C to stop")
        try:
            while not stop.wait(1):
                pass
        except KeyboardInterrupt:
            pass


@main.command()
@click.option("--count", default=40, show_default=True, help="How many submissions to feed.")
@click.option("--timeout", default=300.0, show_default=True, help="Seconds to wait for all.")
@json_option
@pass_cli
def demo(cli: Cli, count: int, timeout: float) -> None:
    """The main job: start the pipeline, feed a sample batch, wait for final states, summarise."""
    from workers.cli.demo import print_summary, run_demo, summary
    from workers.pipeline.runtime import prepare, running_pipeline

    settings = get_settings()
    log_file = settings.data_dir / "logs" / "dearmp.jsonl"
    cli.log_file = log_file
    app, broker = cli.app, cli.broker
    console = Console(stderr=cli.as_json)  # with --json, the progress is for people
    console.print(
        f"[bold]DearMP demo[/bold]: data in {settings.data_dir.resolve()}, logs in {log_file}"
    )
    prepare(app)
    with running_pipeline(app, broker, app.settings.worker_threads):
        result = run_demo(app, broker, count, timeout, console)
    cli.say(lambda: print_summary(result, app, console), summary(result, app))
    if not result.finished:
        raise SystemExit(1)


def _redis(app: App) -> tuple[Any, Any, str]:
    """A Redis client, a broker to enqueue on, and the namespace: operators' commands need Redis."""
    import redis
    from dramatiq.brokers.redis import RedisBroker

    url, namespace = app.settings.resolved_redis_url, app.settings.redis_namespace
    client = redis.Redis.from_url(url, socket_connect_timeout=3, socket_timeout=10)
    try:
        client.ping()
    except redis.RedisError as exc:
        raise click.ClickException(redis_unreachable(app, exc)) from None
    broker = RedisBroker(url=url, namespace=namespace)  # type: ignore[no-untyped-call]
    return client, broker, namespace


def redis_unreachable(app: App, exc: Exception) -> str:
    """One line for an operator: what could not be reached, where, and what to start."""
    from sqlalchemy.engine import make_url

    settings = app.settings
    where = make_url(settings.resolved_redis_url).render_as_string(hide_password=True)
    start = (
        "start it with `dearmp run` (or `python3 dev.py demo`), which runs the embedded Redis"
        if settings.redis_url is None
        else "start that Redis server, or set REDIS_URL to one that runs"
    )
    return f"cannot reach Redis at {where} ({type(exc).__name__}): {start}."


@main.command()
@json_option
@pass_cli
def queues(cli: Cli) -> None:
    """Per queue: messages waiting, delayed, in progress and dead."""
    from dataclasses import asdict

    from workers.pipeline.dead_letters import dead_counts, queue_depths

    app = cli.app
    client, _, namespace = _redis(app)
    depths = queue_depths(client, namespace, dead_counts(app.sessions))
    table = Table(title="Queues")
    for col in ("queue", "waiting", "delayed", "in progress", "dead"):
        table.add_column(col, justify="left" if col == "queue" else "right")
    for d in depths:
        table.add_row(d.queue, str(d.waiting), str(d.delayed), str(d.in_progress), str(d.dead))
    cli.say(lambda: Console().print(table), [asdict(d) for d in depths])


@main.group()
def dlq() -> None:
    """Dead letters: list, show and requeue them."""


def _dead(
    app: App, queue: str | None, actor: str | None, reason: str | None, since: Any
) -> list[Any]:
    """The dead letters matching the filters (``since`` a naive UTC time, from the option):
    the database's record, with what Redis holds when it can be reached (said on stderr when
    it cannot)."""
    from datetime import UTC

    from workers.pipeline.dead_letters import find_dead

    try:
        client, _, namespace = _redis(app)
    except click.ClickException as exc:
        click.echo(f"the database's record only: {exc.message}", err=True)
        client, namespace = None, app.settings.redis_namespace
    since = since.replace(tzinfo=UTC) if since is not None else None
    return find_dead(
        client, namespace, app.sessions, queue=queue, actor=actor, reason=reason, since=since
    )


def _one_dead(app: App, message_id: str) -> Any:
    """The dead letter whose message id is, or starts with, ``message_id`` (a unique prefix)."""
    found = [f for f in _dead(app, None, None, None, None) if f.message_id.startswith(message_id)]
    if not found:
        raise click.ClickException(f"no dead letter {message_id}")
    if len(found) > 1:
        raise click.ClickException(f"{len(found)} dead letters start with {message_id}: say more")
    return found[0]


_FILTERS = [
    click.option("--queue", help="Only this queue, e.g. dearmp.deliver."),
    click.option("--actor", help="Only this actor, e.g. deliver_submission."),
    click.option("--reason", help="Only failures whose exception type contains this."),
    click.option("--since", type=click.DateTime(), help="Only dead letters since (UTC)."),
]


def _filters(fn: Any) -> Any:
    for option in reversed(_FILTERS):
        fn = option(fn)
    return fn


@dlq.command("list")
@_filters
@json_option
@pass_cli
def dlq_list(
    cli: Cli, queue: str | None, actor: str | None, reason: str | None, since: Any
) -> None:
    """Dead letters grouped by reason, with the answer (masked), oldest first: full ids.
    Filters that match nothing exit 1."""
    from workers.pipeline.dead_letters import by_reason

    listed = [
        {
            "message_id": found.message_id,
            "queue": found.queue,
            "actor": found.actor,
            "submission_id": found.submission_id,
            "dead_at": found.dead_at.isoformat(),
            "in_redis": found.dead is not None,
            "reason": found.reason,
            "answer": found.answer,
            "attempts": found.failure.attempts if found.failure else None,
        }
        for _, group in by_reason(_dead(cli.app, queue, actor, reason, since))
        for found in group
    ]
    cli.say(lambda: _print_dead(listed), listed)
    if not listed and any(f is not None for f in (queue, actor, reason, since)):
        raise Nothing("no dead letter matches these filters")


def _print_dead(listed: list[dict[str, Any]]) -> None:
    from rich.markup import escape

    if not listed:
        click.echo("no dead letters")
        return
    groups: dict[str, list[dict[str, Any]]] = {}  # in by_reason's order: the largest first
    for item in listed:
        groups.setdefault(str(item["reason"]), []).append(item)
    columns = ("message_id", "actor", "submission_id", "dead_at", "attempts")
    for why, items in groups.items():
        click.echo(f"{why}: {len(items)} (the answer: {items[0]['answer']})")
        table = Table()
        for col in columns:  # ids whole, to paste into `dlq show`
            table.add_column(col, overflow="fold", no_wrap=col.endswith("_id"))
        for item in items:
            table.add_row(*(escape(str(item[c] or "")) for c in columns))
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
    import structlog

    from workers.database.engine import session_scope
    from workers.database.models import Submission
    from workers.logging import mask_text

    app = cli.app
    found = _one_dead(app, message_id)
    failure = found.failure
    dead = found.dead
    history = []
    if found.submission_id:
        with session_scope(app.sessions) as session:
            sub = session.get(Submission, found.submission_id)
            if sub is not None:
                history = [{"state": e.state, "at": e.at.isoformat()} for e in sub.events]
    if reveal:
        structlog.get_logger("workers").warning("dead_letter_revealed", dead_message_id=message_id)
    show_text = (lambda t: t) if reveal else mask_text
    info = {
        "message_id": found.message_id,
        "queue": found.queue,
        "actor": found.actor,
        "args": show_text(json.dumps(dead.message.args)) if dead and dead.message else None,
        "dead_at": found.dead_at.isoformat(),
        "submission_id": found.submission_id,
        "in_redis": dead is not None,
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


@dlq.command("requeue")
@click.argument("message_ids", nargs=-1)
@click.option("--all", "everything", is_flag=True, help="Every dead letter matching the filters.")
@_filters
@dry_run_option
@yes_option
@json_option
@pass_cli
def dlq_requeue(
    cli: Cli,
    message_ids: tuple[str, ...],
    everything: bool,
    queue: str | None,
    actor: str | None,
    reason: str | None,
    since: Any,
    dry_run: bool,
    yes: bool,
) -> None:
    """Put dead letters back on their queues (the copy is enqueued before the dead one goes).
    --all asks first (--yes does not). Exits 1 when none is requeued."""
    from workers.pipeline.dead_letters import refusal, requeue

    if not message_ids and not everything:
        raise click.UsageError("name message ids, or --all (with filters)")
    app = cli.app
    client, broker, namespace = _redis(app)
    rows = _dead(app, queue, actor, reason, since)
    chosen = [f for f in rows if everything or any(f.message_id.startswith(m) for m in message_ids)]
    missing = sorted(m for m in message_ids if not any(f.message_id.startswith(m) for f in chosen))
    if everything and chosen and not dry_run:
        confirm(yes, f"Requeue {len(chosen)} dead letters?")
    done: list[dict[str, Any]] = []
    refused: list[dict[str, Any]] = []
    for found in chosen:
        why = refusal(found)
        if why is not None:
            refused.append({"message_id": found.message_id, "why": why})
            cli.tell(f"not requeued {found.message_id}: {why}")
            continue
        if dry_run:
            done.append({"message_id": found.message_id, "queue": found.queue, "new_id": None})
            cli.tell(f"would requeue {found.message_id} on {found.queue}")
            continue
        try:
            new_id = requeue(client, broker, namespace, app.sessions, found)
        except ValueError as exc:
            refused.append({"message_id": found.message_id, "why": str(exc)})
            cli.tell(f"cannot requeue {found.message_id}: {exc}")
            continue
        done.append({"message_id": found.message_id, "queue": found.queue, "new_id": new_id})
        cli.tell(f"requeued {found.message_id} on {found.queue} as {new_id}")
    for message_id in missing:
        cli.tell(f"not found {message_id}")
    said = "would requeue" if dry_run else "requeued"
    cli.say(
        f"{said} {len(done)}, not found {len(missing)}",
        {"dry_run": dry_run, "requeued": done, "not_requeued": refused, "not_found": missing},
    )
    if not done:
        raise Nothing("no dead letter requeued")


@dlq.command("purge")
@_filters
@dry_run_option
@yes_option
@json_option
@pass_cli
def dlq_purge(
    cli: Cli,
    queue: str | None,
    actor: str | None,
    reason: str | None,
    since: Any,
    dry_run: bool,
    yes: bool,
) -> None:
    """Delete dead letters matching the filters, recording each one in the database. Asks
    first (--yes does not); exits 1 when none matches."""
    from workers.pipeline.dead_letters import purge

    app = cli.app
    client, _, namespace = _redis(app)
    rows = _dead(app, queue, actor, reason, since)
    if not rows:
        raise Nothing("nothing to purge: no dead letter matches")
    ids = [found.message_id for found in rows]
    if dry_run:
        cli.say(f"would purge {len(rows)}: {', '.join(ids)}", {"dry_run": True, "purged": ids})
        return
    confirm(yes, f"Delete {len(rows)} dead letters for good?")
    for found in rows:
        purge(client, namespace, app.sessions, found)
    said = f"purged {len(rows)} (recorded in purged_dead_letters)"
    cli.say(said, {"dry_run": False, "purged": ids})


@main.command()
@click.option("--max-dead", default=0, show_default=True, help="Dead letters tolerated.")
@click.option(
    "--max-age",
    default=300.0,
    show_default=True,
    help="Seconds the oldest waiting message (or a letter, an email) may be late.",
)
@json_option
@pass_cli
def health(cli: Cli, max_dead: int, max_age: float) -> None:
    """Whether letters can go out, and what to look at. Exits 0 healthy, 1 degraded (something
    to look at; letters still go), 2 down (nothing can go out)."""
    from workers.pipeline import checks

    app = cli.app
    try:
        client, _, namespace = _redis(app)
    except click.ClickException as exc:
        found = [checks.Check("redis", checks.DOWN, exc.message)]
    else:
        found = checks.run(app, client, namespace, max_dead, max_age)
    status = checks.overall(found)
    cli.say(lambda: _say_health(found, status), checks.as_json(found))
    if status != checks.OK:
        sys.exit(checks.ORDER[status])


def _say_health(found: list[Any], status: str) -> None:
    """One line, for cron and a container's health check: on stderr when something is wrong."""
    from workers.pipeline import checks

    problems = [c.detail for c in found if c.status != checks.OK]
    if problems:
        click.echo(
            f"{'down' if status == checks.DOWN else 'degraded'}: {'; '.join(problems)}", err=True
        )
    else:
        said = {c.name: c.detail for c in found}
        click.echo("healthy: " + "; ".join(said[name] for name in SUMMARY if name in said))


# What `dearmp health` says when all is well.
SUMMARY = ("dead letters", "queues", "given up", "workers", "mail server", "reconciler")


def _watch_view(snap: Any) -> Any:
    from rich.console import Group

    queues = Table(title="Queues", expand=True)
    for col in ("queue", "waiting", "delayed", "in progress", "dead", "done / min"):
        queues.add_column(col, justify="left" if col == "queue" else "right")
    for d in snap.depths:
        stage = d.queue.split(".", 1)[1]
        row = (d.waiting, d.delayed, d.in_progress, d.dead, snap.per_minute.get(stage, 0))
        queues.add_row(d.queue, *(str(v) for v in row), style="red" if d.dead else None)
    failures = Table(title="Newest failures", expand=True)
    for col in ("last failed", "actor", "exception", "submission"):
        failures.add_column(col)
    for at, actor, kind, sid in snap.newest_failures:
        failures.add_row(at.strftime("%H:%M:%S"), actor, kind.rsplit(".", 1)[-1], sid or "")
    return Group(queues, failures)


@main.command()
@click.option("--interval", default=1.0, show_default=True, help="Seconds between refreshes.")
@click.option("--iterations", type=int, default=None, help="Stop after this many (default: never).")
@pass_cli
def watch(cli: Cli, interval: float, iterations: int | None) -> None:
    """A live view of queues, work per stage, dead letters and the newest failures."""
    import itertools
    import time

    from rich.live import Live

    from workers.pipeline.dead_letters import snapshot

    app = cli.app
    client, _, namespace = _redis(app)
    console = Console()
    with Live(console=console, refresh_per_second=4, screen=False) as live:
        for n in itertools.count() if iterations is None else range(iterations):
            if n:
                time.sleep(interval)
            live.update(_watch_view(snapshot(client, namespace, app.sessions)))


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=9464, show_default=True)
@pass_cli
def metrics(cli: Cli, host: str, port: int) -> None:
    """Serve Prometheus metrics: queue and dead-letter depths, submissions, letters."""
    from prometheus_client import start_http_server
    from prometheus_client.core import REGISTRY

    from workers.pipeline.metrics import DearmpCollector

    app = cli.app
    client, _, namespace = _redis(app)
    REGISTRY.register(DearmpCollector(client, namespace, app.sessions))
    server, _thread = start_http_server(port, addr=host)
    click.echo(f"metrics on http://{host}:{port}/metrics")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        stop.wait()
    except KeyboardInterrupt:
        pass
    server.shutdown()


@main.group()
def schema() -> None:
    """The submission JSON Schema for front ends."""


@schema.command("export")
@click.option("--check", is_flag=True, help="Fail if the committed files are out of date.")
@json_option
@pass_cli
def schema_export(cli: Cli, check: bool) -> None:
    """Write the JSON Schema files (schemas/json/), or --check that they are up to date."""
    from schemas import JSON_SCHEMA_DIR, export_json_schemas, json_schemas

    if check:
        stale = [
            n
            for n, t in json_schemas().items()
            if not (JSON_SCHEMA_DIR / n).exists() or (JSON_SCHEMA_DIR / n).read_text() != t
        ]
        cli.say("schemas up to date" if not stale else "", {"stale": stale})
        if stale:
            raise click.ClickException(f"out of date: {', '.join(stale)}; run dearmp schema export")
        return
    written = [str(path) for path in export_json_schemas()]
    cli.say("\n".join(f"wrote {path}" for path in written), {"written": written})


@main.group()
def campaigns() -> None:
    """Campaign definitions (config/campaigns/*.toml)."""


@campaigns.command("sync")
@json_option
@pass_cli
def campaigns_sync(cli: Cli) -> None:
    """Load campaign files into the database (nothing to change is not a failure: a deploy
    runs it every time)."""
    from workers.database.engine import session_scope
    from workers.letters.definitions import load_definitions, sync_campaigns

    app = cli.app
    folder = app.settings.campaigns_dir
    definitions = load_definitions(folder) if folder.is_dir() else []
    if not definitions:
        raise click.ClickException(f"no campaign files (*.toml) in {folder} (DEARMP_CAMPAIGNS_DIR)")
    with session_scope(app.sessions) as session:
        changed = sync_campaigns(session, definitions)
    cli.say(f"changed: {', '.join(changed) or 'none'}", {"changed": list(changed)})


@campaigns.command("mode")
@click.argument("slug")
@click.argument("mode", type=click.Choice(["sandbox", "live"]))
@json_option
@pass_cli
def campaigns_mode(cli: Cli, slug: str, mode: str) -> None:
    """Switch a campaign between sandbox (letters to DEARMP_SANDBOX_ADDRESS) and live. Exits 1
    when it is in that mode already."""
    from workers.database.engine import session_scope
    from workers.database.models import Campaign

    app = cli.app
    with session_scope(app.sessions) as session:
        row = session.get(Campaign, slug)
        if row is None:
            raise click.ClickException(f"no campaign {slug}")
        if row.mode == mode:
            raise Nothing(f"{slug} is in {mode} mode already: nothing changed")
        before, row.mode = row.mode, mode
    cli.say(
        f"{slug}: {before} -> {mode} (letters rendered from now on)",
        {"campaign": slug, "before": before, "mode": mode},
    )


@campaigns.command("pause")
@click.argument("slug")
@json_option
@pass_cli
def campaigns_pause(cli: Cli, slug: str) -> None:
    """Hold a campaign's letters: submissions are still taken and prepared, and its letters
    wait, never lost, until `dearmp campaigns resume` (`dearmp health` names it meanwhile)."""
    from workers.database.engine import session_scope
    from workers.stages.pauses import pause_campaign

    with session_scope(cli.app.sessions) as session:
        try:
            if not pause_campaign(session, slug):
                raise click.ClickException(f"{slug} is paused already")
        except LookupError as e:
            raise click.ClickException(str(e)) from None
    said = f"{slug}: paused; its letters wait until `dearmp campaigns resume {slug}`"
    cli.say(said, {"campaign": slug, "paused": True})


@campaigns.command("resume")
@click.argument("slug")
@json_option
@pass_cli
def campaigns_resume(cli: Cli, slug: str) -> None:
    """Send a paused campaign's letters again: those waiting go at once."""
    from workers.database.engine import session_scope
    from workers.pipeline.dispatch import dispatch_groups
    from workers.stages.pauses import resume_campaign
    from workers.stages.stage import Stage

    with session_scope(cli.app.sessions) as session:
        try:
            ids = resume_campaign(session, slug)
        except LookupError as e:
            raise click.ClickException(str(e)) from None
    if ids:
        dispatch_groups(cli.broker, {Stage.DELIVER: ids})  # after the commit; else the reconciler
    said = f"{slug}: resumed; {len(ids)} letters waiting go now"
    cli.say(said, {"campaign": slug, "paused": False, "sent": list(ids)})


@main.group()
def deliveries() -> None:
    """Deliveries, for an operator."""


@deliveries.command("reopen")
@click.option("--reason", help="Only failures whose recorded error contains this.")
@click.option("--campaign", help="Only this campaign's letters (its slug).")
@click.option("--mp", "member_id", type=int, help="Only letters to this MP (member id).")
@dry_run_option
@yes_option
@json_option
@pass_cli
def deliveries_reopen(
    cli: Cli,
    reason: str | None,
    campaign: str | None,
    member_id: int | None,
    dry_run: bool,
    yes: bool,
) -> None:
    """Send failed letters again with a fresh count of attempts (after a configuration fix),
    and, without filters, MPs' digests given up with their letters. Asks first (--yes does
    not); exits 1 when no failed letter matches."""
    from workers.database.engine import session_scope
    from workers.pipeline.dispatch import dispatch_groups
    from workers.stages import digests
    from workers.stages.delivery import reopen_failed
    from workers.stages.stage import Stage

    every = reason is None and campaign is None and member_id is None

    def reopen(dry: bool) -> tuple[list[str], list[str]]:
        with session_scope(cli.app.sessions) as session:
            letters = reopen_failed(session, reason, campaign, member_id, dry_run=dry)
            return letters, digests.reopen_failed(session, dry_run=dry) if every else []

    found, digest_ids = reopen(True)
    if not found and not digest_ids:
        raise Nothing("no failed letter matches: nothing reopened")
    if not dry_run:
        digests_too = f" and {len(digest_ids)} MPs' digests" if digest_ids else ""
        confirm(yes, f"Send {len(found)} failed letters{digests_too} again?")
        found, digest_ids = reopen(False)
    cleared = 0
    if (found or digest_ids) and not dry_run:  # after the commit; else the reconciler
        dispatch_groups(cli.broker, {Stage.DELIVER: found + digest_ids})
        cleared = _clear_dead(cli.app, Stage.DELIVER.actor, set(found))
    said = "would reopen" if dry_run else "reopened"
    lines = [f"{said} {one}" for one in found + digest_ids]
    if cleared:
        lines.append(f"cleared {cleared} dead letters these supersede")
    cli.say(
        "\n".join([*lines, f"{said} {len(found)} letters and {len(digest_ids)} digests"]),
        {
            "dry_run": dry_run,
            "reopened": found,
            "digests_reopened": digest_ids,
            "dead_letters_cleared": cleared,
        },
    )


def _clear_dead(app: App, actor: str, submission_ids: set[str]) -> int:
    """Purge (recording) the dead letters of ``actor`` about these submissions: what was done
    for them since supersedes them. How many."""
    from workers.pipeline.dead_letters import purge

    found = [f for f in _dead(app, None, actor, None, None) if f.submission_id in submission_ids]
    try:
        client, _, namespace = _redis(app)
    except click.ClickException:  # Redis away: the database's record, and Redis's copy stays
        client, namespace = None, app.settings.redis_namespace
    for dead in found:
        purge(client, namespace, app.sessions, dead)
    return len(found)


@deliveries.command("waiting")
@click.option("--limit", default=100, show_default=True, help="At most this many, oldest first.")
@json_option
@pass_cli
def deliveries_waiting(cli: Cli, limit: int) -> None:
    """Letters waiting to be sent or to try again: failures, next attempt and why (masked)."""
    from workers.database.engine import session_scope
    from workers.outbox.sending import listing
    from workers.stages.delivery import KIND as LETTER

    with session_scope(cli.app.sessions) as session:
        rows = listing(session, ("pending", "sending"), limit, LETTER)
    lines = []
    for row in rows:
        next_at = row["next_attempt_at"] or "now"
        lines.append(f"{row['id']}  {row['status']}  failures {row['failures']}  next {next_at}")
        if row["error"]:
            lines.append(f"    {row['error']}")
    cli.say("\n".join([*lines, f"{len(rows)} letters waiting"]), rows)


@deliveries.command("flush")
@dry_run_option
@json_option
@pass_cli
def deliveries_flush(cli: Cli, dry_run: bool) -> None:
    """Try every letter waiting for a later attempt now (once the cause is fixed), as Postfix's
    `postqueue -f` does. Exits 1 when none waits."""
    from workers.database.engine import session_scope
    from workers.outbox.sending import due_now
    from workers.pipeline.dispatch import dispatch_groups
    from workers.stages.delivery import KIND as LETTER
    from workers.stages.stage import Stage

    with session_scope(cli.app.sessions) as session:
        ids = due_now(session, LETTER, dry_run)
    if ids and not dry_run:
        dispatch_groups(cli.broker, {Stage.DELIVER: ids})  # after the commit; else the reconciler
    if not ids:
        raise Nothing("no letter waits for a later attempt: nothing to try")
    said = f"{'would try' if dry_run else 'trying'} {len(ids)} letters now"
    cli.say(said, {"dry_run": dry_run, "trying": list(ids)})


@deliveries.command("resume")
@json_option
@pass_cli
def deliveries_resume(cli: Cli) -> None:
    """End the mail pause once the relay is fixed (a password, a certificate, a sender): every
    worker process tries again within seconds instead of waiting out its pause. Exits 1 when
    no pause was reported."""
    from workers.pipeline.dead_letters import resume_mail

    client, _, namespace = _redis(cli.app)
    paused = resume_mail(client, namespace)
    if paused is None:
        raise Nothing("no pause was reported; the workers are told to try anyway")
    said = f"resumed: the workers try again within seconds (paused for {paused['reason']})"
    cli.say(said, {"resumed": True, "paused_for": paused["reason"]})
