"""``dearmp consent``, ``dearmp supporter`` and ``dearmp retention``: data protection commands."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import click

from schemas.submission import CHANNELS
from workers.cli.base import Cli, confirm, json_option, pass_cli, yes_option
from workers.pipeline.app import App
from workers.privacy.rights import writable


def _outbox(app: App) -> Path | None:
    return app.settings.resolved_outbox_dir if app.settings.mail_backend == "outbox" else None


@click.group()
def consent() -> None:
    """The consent ledger: verify it, record withdrawals, receipts and exports."""


@consent.command("verify")
@json_option
@pass_cli
def consent_verify(cli: Cli) -> None:
    """Walk the hash chain; exit 1 and name the first broken link if anything was altered."""
    from workers.database.engine import session_scope
    from workers.privacy.ledger import verify

    app = cli.app
    with session_scope(app.sessions) as session:
        result = verify(session)
    said = (
        f"intact: {result.events} events, head {result.head}"
        if result.intact
        else f"BROKEN at event {result.broken_at}: {result.reason} "
        f"({result.events} events before it verified)"
    )
    cli.say(said, {"intact": result.intact, **dataclasses.asdict(result)})
    if not result.intact:
        sys.exit(1)


@consent.command("withdraw")
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
@json_option
@pass_cli
def consent_withdraw(
    cli: Cli, email: str, channels: tuple[str, ...], source: str, anyway: bool
) -> None:
    """Record that a supporter withdrew consent (a new event; nothing earlier changes)."""
    from workers.database.engine import session_scope
    from workers.privacy.rights import holds_anything, withdraw

    app = cli.app
    with session_scope(app.sessions) as session:
        if not anyway and not holds_anything(session, app.secret, email):
            raise click.ClickException(
                "nothing is held about that address (a typo?): nothing recorded; "
                "--anyway records the withdrawal all the same"
            )
        written = withdraw(session, app.secret, email, list(channels or CHANNELS), source=source)
    cli.say(f"recorded {written} withdrawal events", {"recorded": written})


@consent.command("receipt")
@click.argument("email")
@json_option  # its answer is JSON either way
@pass_cli
def consent_receipt_command(cli: Cli, email: str) -> None:
    """A consent receipt for a supporter (Kantara Consent Receipt Specification v1.1), as JSON."""
    from workers.database.engine import session_scope
    from workers.privacy.rights import consent_receipt

    app = cli.app
    with session_scope(app.sessions) as session:
        receipt = consent_receipt(session, app.secret, email)
    if receipt is None:
        raise click.ClickException("no consent recorded for this address")
    cli.say(writable(json.dumps(receipt, indent=2, ensure_ascii=False)), receipt)


@consent.command("export")
@click.option("--output", "-o", type=click.Path(dir_okay=False, path_type=Path), default=None)
@json_option
@pass_cli
def consent_export(cli: Cli, output: Path | None) -> None:
    """Current contact preferences per supporter as CSV, for a CRM (stdout or --output);
    with --json, a JSON list of the same rows."""
    import csv

    from workers.database.engine import session_scope
    from workers.privacy.rights import consent_csv

    app = cli.app
    with session_scope(app.sessions) as session:
        if cli.as_json:
            rows = list(csv.DictReader(writable("".join(consent_csv(session))).splitlines()))
            text = json.dumps(rows, indent=2)
            if output is None:
                click.echo(text)
                return
            output.write_text(text + "\n")
        elif output is None:
            for chunk in consent_csv(session):
                click.echo(writable(chunk), nl=False)
            return
        else:
            with output.open("w", newline="") as fh:
                for chunk in consent_csv(session):
                    fh.write(writable(chunk))
    click.echo(f"written {output}", err=True)


@click.group()
def supporter() -> None:
    """A supporter's rights: see everything held about them, or erase it."""


@supporter.command("export")
@click.argument("email")
@json_option  # its answer is JSON either way
@pass_cli
def supporter_export(cli: Cli, email: str) -> None:
    """Everything held about a person (submissions, letters and what was sent, consent) as JSON."""
    from workers.database.engine import session_scope
    from workers.privacy.rights import export_supporter

    app = cli.app
    with session_scope(app.sessions) as session:
        data = export_supporter(session, app.secret, email)
    cli.say(writable(json.dumps(data, indent=2, ensure_ascii=False)), data)


@supporter.command("erase")
@click.argument("email")
@yes_option
@json_option  # its answer is JSON either way
@pass_cli
def supporter_erase(cli: Cli, email: str, yes: bool) -> None:
    """Erase a person's details everywhere; keep the consent proof and the delivery facts.
    Asks first (--yes does not)."""
    from workers.database.engine import session_scope
    from workers.privacy.rights import erase_supporter, holds_anything

    app = cli.app
    with session_scope(app.sessions) as session:
        if not holds_anything(session, app.secret, email):
            raise click.ClickException("nothing is held about that address: nothing to erase")
    confirm(yes, "Erase everything held about 1 supporter, for good?")
    with session_scope(app.sessions) as session:
        report = erase_supporter(session, app.secret, email, _outbox(app))
    cli.say(json.dumps(report.as_dict(), indent=2), report.as_dict())


@click.group()
def retention() -> None:
    """Retention of personal details after a submission ends."""


@retention.command("run")
@click.option(
    "--every",
    type=float,
    default=None,
    help="Run again every this many seconds (a long-running service) instead of once (cron).",
)
@json_option  # its answer (a line per run) is JSON either way
@pass_cli
def retention_run(cli: Cli, every: float | None) -> None:
    """Scrub letter bodies and postal addresses past each campaign's retention period, and
    delete the live postcode lookups' answers past their time to live (keyed by postcode)."""
    import time

    from workers.database.engine import session_scope
    from workers.mp.live_sources import expire_cache
    from workers.privacy.rights import run_retention

    app = cli.app
    while True:
        with session_scope(app.sessions) as session:
            done = run_retention(session, outbox_dir=_outbox(app))
            expired = expire_cache(session)
        said = {"scrubbed": done, "expired_lookups": expired}
        cli.say(json.dumps(said), said)
        if every is None:
            return
        time.sleep(every)
