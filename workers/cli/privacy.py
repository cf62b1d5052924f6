"""``dearmp consent``, ``dearmp supporter`` and ``dearmp retention``: data protection commands."""

from __future__ import annotations

import csv
import dataclasses
import json
import sys
import time
from collections.abc import Iterable
from pathlib import Path

import click

from schemas.submission import CHANNELS
from workers.cli.base import Cli, Nothing, command, confirm, main, yes_option
from workers.database.engine import forget_old_pages
from workers.mp.live_sources import expire_cache
from workers.pipeline.actors import outbox_for
from workers.pipeline.app import App
from workers.privacy.ledger import verify
from workers.privacy.rights import (
    consent_csv,
    consent_receipt,
    erase_supporter,
    export_supporter,
    holds_anything,
    run_retention,
    withdraw,
    writable,
)
from workers.wording import counted


def _forget_old_pages(app: App) -> None:
    """The SQLite log's copies of what was just erased: gone, or the operator told."""
    if not forget_old_pages(app.engine):
        click.echo(
            "note: a reader kept the SQLite write-ahead log, which still holds the pages as "
            "they were before; run the command again later to truncate it",
            err=True,
        )


@main.group()
def consent() -> None:
    """The consent ledger: verify it, record withdrawals, receipts and exports."""


@command(consent, "verify")
@click.option(
    "--head",
    "recorded",
    default=None,
    help="A head this printed earlier and kept outside the database: it must still be there.",
)
def consent_verify(cli: Cli, recorded: str | None) -> None:
    """Walk the hash chain; exit 1 and name the first broken link if anything was altered.
    Keep the head it prints outside the database (a daily job's log, a ticket): with --head,
    a chain rewritten and hashed again by someone with the database's rights is found too."""
    with cli.session() as session:
        result = verify(session, recorded)
    said = (
        f"intact: {counted(result.events, 'event')}, head {result.head}"
        if result.intact
        else f"BROKEN: {result.reason}"
        if result.broken_at == 0
        else f"BROKEN at event {result.broken_at}: {result.reason} "
        f"({counted(result.events, 'event')} before it verified)"
    )
    cli.say(said, {"intact": result.intact, **dataclasses.asdict(result)})
    if not result.intact:
        sys.exit(1)


@command(consent, "withdraw")
@click.argument("email")
@click.option(
    "--channel",
    "channels",
    type=click.Choice(CHANNELS),
    multiple=True,
    help="Repeat for several; default: every channel.",
)
@click.option("--source", default="operator", show_default=True, help="How the request came.")
@click.option(
    "--anyway", is_flag=True, help="Record it for an address nothing is held about (a suppression)."
)
def consent_withdraw(
    cli: Cli, email: str, channels: tuple[str, ...], source: str, anyway: bool
) -> None:
    """Record that a supporter withdrew consent (a new event; nothing earlier changes)."""
    app = cli.app
    with cli.session() as session:
        if not anyway and not holds_anything(session, app.secret, email):
            raise click.ClickException(
                "nothing is held about that address (a typo?): nothing recorded; "
                "--anyway records the withdrawal all the same"
            )
        written = withdraw(session, app.secret, email, list(channels or CHANNELS), source=source)
    cli.say(f"recorded {counted(written, 'withdrawal event')}", {"recorded": written})


@command(consent, "receipt")  # its answer is JSON either way
@click.argument("email")
def consent_receipt_command(cli: Cli, email: str) -> None:
    """A consent receipt for a supporter (Kantara Consent Receipt Specification v1.1), as JSON."""
    with cli.session() as session:
        receipt = consent_receipt(session, cli.app.secret, email)
    if receipt is None:
        raise click.ClickException("no consent recorded for this address")
    cli.say(writable(json.dumps(receipt, indent=2, ensure_ascii=False)), receipt)


@command(consent, "export")
@click.option("--output", "-o", type=click.Path(dir_okay=False, path_type=Path), default=None)
def consent_export(cli: Cli, output: Path | None) -> None:
    """Current contact preferences per supporter as CSV, for a CRM (stdout or --output);
    with --json, a JSON list of the same rows."""
    with cli.session() as session:
        if cli.as_json:
            rows = list(csv.DictReader(writable("".join(consent_csv(session))).splitlines()))
            chunks: Iterable[str] = [json.dumps(rows, indent=2) + "\n"]
        else:
            chunks = (writable(chunk) for chunk in consent_csv(session))
        if output is None:
            for chunk in chunks:
                click.echo(chunk, nl=False)
            return
        with output.open("w", newline="") as fh:
            fh.writelines(chunks)
    click.echo(f"written {output}", err=True)


@main.group()
def supporter() -> None:
    """A supporter's rights: see everything held about them, or erase it."""


@command(supporter, "export")  # its answer is JSON either way
@click.argument("email")
def supporter_export(cli: Cli, email: str) -> None:
    """Everything held about a person (submissions, letters and what was sent, consent) as JSON.
    Exits 1 when nothing is held about the address (a typo?)."""
    with cli.session() as session:
        if not holds_anything(session, cli.app.secret, email):
            raise Nothing("nothing is held about that address: nothing to export")
        data = export_supporter(session, cli.app.secret, email)
    cli.say(writable(json.dumps(data, indent=2, ensure_ascii=False)), data)


@command(supporter, "erase")  # its answer is JSON either way
@click.argument("email")
@yes_option
def supporter_erase(cli: Cli, email: str, yes: bool) -> None:
    """Erase a person's details everywhere; keep the consent proof and the delivery facts.
    Asks first (--yes does not); exits 1 when they were erased already."""
    app = cli.app
    with cli.session() as session:
        if not holds_anything(session, app.secret, email):
            raise click.ClickException("nothing is held about that address: nothing to erase")
    confirm(yes, "Erase everything held about 1 supporter, for good?")
    # The outbox folder whatever the backend is now: it may have been the file outbox then.
    outbox_dir = app.settings.resolved_outbox_dir
    with cli.session() as session:  # again: what reached their erased submissions since goes
        report = erase_supporter(session, app.secret, email, outbox_for(app)[0], outbox_dir)
    _forget_old_pages(app)
    if report.submissions == 0 and report.consent_events_added == 0:
        raise Nothing("that supporter was erased already: nothing new to erase")
    cli.say(json.dumps(report.as_dict(), indent=2), report.as_dict())


@main.group()
def retention() -> None:
    """Retention of personal details after a submission ends."""


@command(retention, "run")  # its answer (a line per run) is JSON either way
@click.option(
    "--every",
    type=click.FloatRange(min=60),
    default=None,
    help="Run again every this many seconds, at least 60 (a long-running service), instead of "
    "once (cron).",
)
def retention_run(cli: Cli, every: float | None) -> None:
    """Scrub letter bodies and postal addresses past each campaign's retention period, and
    delete the live postcode lookups' answers past their time to live (keyed by postcode)."""
    app = cli.app
    while True:
        with cli.session() as session:
            done = run_retention(session, outbox_dir=app.settings.resolved_outbox_dir)
            expired = expire_cache(session)
        if done:
            _forget_old_pages(app)
        said = {"scrubbed": done, "expired_lookups": expired}
        cli.say(json.dumps(said), said)
        if every is None:
            return
        time.sleep(every)
