"""``dearmp`` commands that set up and run the pipeline (workers, reconciler, the whole of it in
one process), feed it, and act on campaigns."""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import click
import redis
from sqlalchemy import select

from config.settings import Settings, get_settings, masked_url
from schemas import JSON_SCHEMA_DIR, export_json_schemas, json_schemas
from workers.cli.base import (
    Cli,
    Nothing,
    command,
    main,
    pass_cli,
    refusing,
    until_stopped,
)
from workers.database.engine import check_schema, make_engine
from workers.database.engine import migrate as run_migrations
from workers.database.models import Campaign
from workers.letters.definitions import load_definitions, sync_campaigns
from workers.logging import configure_logging
from workers.pipeline.heartbeat import clock_offset, clock_problem
from workers.pipeline.intake import accept
from workers.pipeline.reconciler import reconcile_once, run_forever
from workers.pipeline.runtime import prepare, reconciler_options, running_pipeline
from workers.stages.pauses import pause_campaign, resume_campaign
from workers.stages.stage import Stage
from workers.wording import counted


@command(main)
def init(cli: Cli) -> None:
    """Migrate the database, load campaigns, import the sample directory if there is none."""
    app = cli.app
    prepare(app)
    database = masked_url(app.settings.resolved_database_url)
    cli.say(f"ready: {database}", {"ready": True, "database": database})


@main.command()
@pass_cli
def migrate(cli: Cli) -> None:
    """Apply Alembic migrations to DATABASE_URL (or the embedded SQLite file)."""
    run_migrations(cli.app.settings.resolved_database_url)


def refuse_a_wrong_clock(settings: Settings) -> None:
    """A process that takes over claims (a worker, the reconciler) does not start on a machine
    whose clock is off Redis's (Redis away: its heartbeat tells health later)."""
    if settings.broker != "redis":
        return
    try:
        with redis.Redis.from_url(
            settings.resolved_redis_url, socket_timeout=3, socket_connect_timeout=3
        ) as client:
            problem = clock_problem(clock_offset(client))
    except (redis.RedisError, ValueError):  # away, or not to be reached: the worker says so
        return
    if problem is not None:
        raise click.ClickException(problem)


THREADS = click.IntRange(1, 64)  # DEARMP_WORKER_THREADS's range


@main.command()
@click.option("--processes", default=2, show_default=True, help="Worker processes.")
@click.option("--threads", type=THREADS, help="Threads per process (DEARMP_WORKER_THREADS).")
def worker(processes: int, threads: int | None) -> None:
    """Run the stage actors (dramatiq workers) against REDIS_URL and DATABASE_URL."""
    from dramatiq.cli import main as dramatiq_main

    if threads is None:
        threads = get_settings().worker_threads
    refuse_a_wrong_clock(get_settings())
    os.environ["DEARMP_WORKER_THREADS"] = str(threads)  # the worker processes' settings agree

    # dramatiq's own process logs JSON like its workers (--skip-logging: to the handler set up
    # here), and notices a worker that died booting after 1 s, not 30 (no fork processes here).
    configure_logging(get_settings().log_level)
    # An engine of its own, closed before the worker processes are forked from this one.
    engine = make_engine(get_settings().resolved_database_url)
    try:
        check_schema(engine)
    finally:
        engine.dispose()
    sys.argv = ["dramatiq", "workers.pipeline.actors:setup"]
    sys.argv += ["--processes", str(processes), "--threads", str(threads)]
    sys.argv += ["--skip-logging", "--worker-fork-timeout", "1000"]
    sys.exit(dramatiq_main())  # type: ignore[no-untyped-call]


@command(main)
@click.option("--once", is_flag=True, help="One pass, then exit (for cron).")
def reconcile(cli: Cli, once: bool) -> None:
    """Resend submissions that have stopped moving (every DEARMP_RECONCILE_INTERVAL seconds).
    --json answers for --once; the loop prints nothing."""
    app = cli.app
    check_schema(app.engine)
    refuse_a_wrong_clock(app.settings)
    options = reconciler_options(app.settings)
    if once:
        resent = reconcile_once(app.sessions, cli.broker, **options)
        cli.say(f"resent {resent}", {"resent": resent})
        return
    with until_stopped() as stop:
        run_forever(app.sessions, cli.broker, app.settings.reconcile_interval, stop=stop, **options)


@command(main)
@click.argument("file", type=click.File("rb"))
def submit(cli: Cli, file: Any) -> None:
    """Submit a JSON file: one submission object, or a list of them. Prints the ids, each
    accepted, duplicate (its key and body seen before) or conflict (its key seen before with
    another body: nothing stored; exits 1)."""
    try:
        data = json.load(file)
    except json.JSONDecodeError as exc:  # one line naming the file and where, not a traceback
        raise click.ClickException(
            f"{file.name}: not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})"
        ) from None
    except UnicodeDecodeError as exc:
        raise click.ClickException(
            f"{file.name}: not valid JSON: not UTF-8 text ({exc.reason})"
        ) from None
    answers, created = [], []
    try:
        for item in data if isinstance(data, list) else [data]:
            with cli.session() as session:
                found = accept(session, item, cli.app.secret)
            if found.created:
                created.append(found.submission_id)
            outcome = "accepted" if found.created else "conflict" if found.conflict else "duplicate"
            answers.append({"id": found.submission_id, "outcome": outcome})
    finally:  # each stored in its own commit: what was stored goes on, in one send
        cli.send({Stage.VALIDATE: created})
    cli.say("\n".join(f"{a['id']} {a['outcome']}" for a in answers), answers)
    conflicts = sum(a["outcome"] == "conflict" for a in answers)
    if conflicts:
        raise click.ClickException(
            f"{counted(conflicts, 'conflict')}: an idempotency key already "
            "used with a different body; nothing stored for it (send a new key for a new letter)"
        )


@main.command()
@click.option("--threads", type=THREADS, help="Worker threads (DEARMP_WORKER_THREADS).")
@pass_cli
def run(cli: Cli, threads: int | None) -> None:
    """Run everything in one process (embedded Redis unless REDIS_URL): Ctrl-C stops it."""
    app = cli.app
    if threads is not None:  # what a process's parts size themselves by (webhooks at once)
        app.settings.worker_threads = threads
    prepare(app)
    check_schema(app.engine)
    with (
        until_stopped() as stop,
        running_pipeline(app, cli.broker, app.settings.worker_threads),
    ):
        click.echo("pipeline running; Ctrl-C to stop")
        while not stop.wait(1):
            pass


@main.group()
def schema() -> None:
    """The submission JSON Schema for front ends."""


@command(schema, "export")
@click.option("--check", is_flag=True, help="Fail if the committed files are out of date.")
def schema_export(cli: Cli, check: bool) -> None:
    """Write the JSON Schema files (schemas/json/), or --check that they are up to date."""
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


@command(campaigns, "sync")
def campaigns_sync(cli: Cli) -> None:
    """Load campaign files into the database (nothing to change is not a failure: a deploy
    runs it every time)."""
    folder = cli.app.settings.campaigns_dir
    definitions = load_definitions(folder) if folder.is_dir() else []
    if not definitions:
        raise click.ClickException(f"no campaign files (*.toml) in {folder} (DEARMP_CAMPAIGNS_DIR)")
    with cli.session() as session:
        changed = sync_campaigns(session, definitions)
    cli.say(f"changed: {', '.join(changed) or 'none'}", {"changed": list(changed)})


@command(campaigns, "list")
def campaigns_list(cli: Cli) -> None:
    """Every campaign, one a line: its slug, mode (sandbox or live), whether it is paused, and
    its title."""
    query = select(Campaign.slug, Campaign.title, Campaign.mode, Campaign.paused_at)
    with cli.session() as session:
        rows = [
            {
                "slug": slug,
                "title": title,
                "mode": mode,
                "paused": since is not None,
                "paused_at": since,
            }
            for slug, title, mode, since in session.execute(query.order_by(Campaign.slug))
        ]
    lines = [
        f"{row['slug']} ({row['mode']}{', paused' if row['paused'] else ''}): {row['title']}"
        for row in rows
    ]
    cli.say("\n".join(lines) or "no campaign: `dearmp campaigns sync` loads them", rows)


@command(campaigns, "mode")
@click.argument("slug")
@click.argument("mode", type=click.Choice(["sandbox", "live"]))
def campaigns_mode(cli: Cli, slug: str, mode: str) -> None:
    """Switch a campaign between sandbox (letters to DEARMP_SANDBOX_ADDRESS) and live. Exits 1
    when it is in that mode already."""
    with cli.session() as session:
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


@command(campaigns, "pause")
@click.argument("slug")
def campaigns_pause(cli: Cli, slug: str) -> None:
    """Hold a campaign's letters: submissions are still taken and prepared, and its letters
    wait, never lost, until `dearmp campaigns resume` (`dearmp health` names it meanwhile)."""
    with refusing(LookupError), cli.session() as session:
        if not pause_campaign(session, slug):
            raise click.ClickException(f"{slug} is paused already")
    said = f"{slug}: paused; its letters wait until `dearmp campaigns resume {slug}`"
    cli.say(said, {"campaign": slug, "paused": True})


@command(campaigns, "resume")
@click.argument("slug")
def campaigns_resume(cli: Cli, slug: str) -> None:
    """Send a paused campaign's letters again: those waiting go at once."""
    with refusing(LookupError), cli.session() as session:
        ids = resume_campaign(session, slug)
    cli.send({Stage.DELIVER: ids})
    said = f"{slug}: resumed; {counted(len(ids), 'waiting letter')} queued to go"
    cli.say(said, {"campaign": slug, "paused": False, "sent": list(ids)})
