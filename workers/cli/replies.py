"""``dearmp inbound``, ``dearmp replies`` and ``dearmp dns``: what comes back to the letters."""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterable
from typing import Any

import click
from rich.console import Console
from rich.table import Table
from sqlalchemy.orm import Session

from workers.cli.base import (
    Cli,
    Nothing,
    cell,
    command,
    confirm,
    dry_run_option,
    main,
    pass_cli,
    refusing,
    until_stopped,
    yes_option,
)
from workers.database.models import Campaign, InboundMessage, InboundStatus
from workers.letters.definitions import load_definitions
from workers.letters.dns import records, zone_lines
from workers.letters.outcomes import report, resend_bounced
from workers.pipeline.app import App
from workers.pipeline.runtime import start_receiver
from workers.stages.inbound import (
    InboundPolicy,
    drop,
    for_the_operator,
    held,
    postmaster,
    readable,
    release,
)
from workers.stages.stage import Stage
from workers.wording import counted


@main.command()
@click.option("--host", default=None, help="Address to listen on [DEARMP_INBOUND_HOST].")
@click.option("--port", default=None, type=int, help="Port [DEARMP_INBOUND_PORT].")
@pass_cli
def inbound(cli: Cli, host: str | None, port: int | None) -> None:
    """Receive bounces and replies by SMTP for the bounce and reply domains."""
    app = cli.app
    if not app.returns.domains:
        raise click.ClickException(
            "set DEARMP_BOUNCE_DOMAIN and/or DEARMP_REPLY_DOMAIN: the receiver takes mail only "
            "for their addresses"
        )
    controller = start_receiver(app, cli.broker, host, port)
    tls = "STARTTLS offered" if app.settings.inbound_tls_cert else "no STARTTLS: no certificate"
    with until_stopped(signal.SIGINT) as stop:
        click.echo(
            f"receiving for {', '.join(sorted(app.returns.domains))} on "
            f"{controller.hostname}:{controller.port} ({tls})"
        )
        stop.wait()
    controller.stop()


@main.group()
def replies() -> None:
    """What came back to the letters: bounces, automatic replies, MPs' replies, the survey."""


@command(replies, "report")
@click.option("--campaign", default=None, help="One campaign's slug.")
def replies_report(cli: Cli, campaign: str | None) -> None:
    """Per campaign and MP: delivered, bounced, acknowledged, replied, and survey answers."""
    with cli.session() as session:
        if campaign is not None and session.get(Campaign, campaign) is None:
            raise click.ClickException(f"no campaign {campaign}")
        rows = report(session, campaign)
    table = Table(
        "campaign", "MP", "delivered", "bounced", "auto-reply", "replied", "yes", "not yet", "no"
    )
    for row in rows:
        table.add_row(
            *map(cell, (row.campaign, row.mp, row.delivered, row.bounced, row.acknowledged)),
            *map(cell, (row.replied, *(row.survey[a] for a in ("yes", "not_yet", "no")))),
        )
    cli.say(lambda: Console().print(table), rows)


@command(replies, "resend-bounced")
@click.option("--member", "member_id", type=int, required=True, help="The MP's member id.")
@click.option("--to", "address", required=True, help="The MP's corrected address.")
@dry_run_option
@yes_option
def replies_resend(cli: Cli, member_id: int, address: str, dry_run: bool, yes: bool) -> None:
    """Write an MP's returned letters again, to a corrected address: each once, recorded.
    Asks first (--yes does not); exits 1 when the MP has no returned letter."""
    signer = cli.app.signer
    with refusing(ValueError):
        with cli.session() as session:
            ids = resend_bounced(session, member_id, address, True, signer)
        if not ids:
            raise Nothing(f"no returned letter to MP {member_id}: nothing to resend")
        if not dry_run:
            confirm(yes, f"Send {counted(len(ids), 'returned letter')} again, to {address}?")
            with cli.session() as session:
                ids = resend_bounced(session, member_id, address, False, signer)
    if not dry_run:
        cli.send({Stage.RENDER: ids})
    said = f"{'would resend' if dry_run else 'resending'} {counted(len(ids), 'returned letter')}"
    cli.say(said, {"dry_run": dry_run, "resending": ids})


def _stored(cli: Cli, find: Callable[[Session], Iterable[InboundMessage]]) -> list[dict[str, Any]]:
    """The messages ``find`` selects, as the operator is shown them (:func:`_listed`)."""
    with cli.session() as session:
        return [_listed(cli.app, row) for row in find(session)]


@command(replies, "held")
def replies_held(cli: Cli) -> None:
    """Replies held for an operator: not plausibly from the MP's office, so not forwarded."""
    rows = _stored(cli, held)
    cli.say(lambda: _print_held(rows), rows)


def _print_held(rows: list[dict[str, Any]]) -> None:
    if not rows:
        click.echo("no replies held")
        return
    for row in rows:  # a few lines each, so that an id is never cut to fit a table
        click.echo(
            f"{row['id']}  received {row['received_at']}  letter {row['submission_id']}  "
            f"{row['size']} bytes  {row['reason']}"
        )
        click.echo(f"  From: {row['from']}\n  Subject: {row['subject']}")
        for line in row["authentication"] or ["(none from our relay)"]:
            click.echo(f"  Authentication-Results: {line}")
    click.echo(
        f"{len(rows)} held: `dearmp replies show ID` shows one, `release ID` forwards it, "
        "`drop ID` deletes it"
    )


@command(replies, "postmaster")
def replies_postmaster(cli: Cli) -> None:
    """Mail to the postmaster, kept for the operator until retention deletes it."""
    rows = _stored(cli, postmaster)
    cli.say(lambda: _print_postmaster(rows), rows)


def _print_postmaster(rows: list[dict[str, Any]]) -> None:
    if not rows:
        click.echo("no mail to the postmaster")
        return
    for row in rows:
        click.echo(f"{row['id']}  received {row['received_at']}  {row['size']} bytes")
        click.echo(f"  From: {row['from']}\n  Subject: {row['subject']}")
    click.echo(f"{len(rows)}: `dearmp replies show ID` shows one, `drop ID` deletes it")


@command(replies, "show")
@click.argument("inbound_id")
def replies_show(cli: Cli, inbound_id: str) -> None:
    """A held, failed or postmaster message: when, its status and why, From, Subject, our
    relay's Authentication-Results and its text (the first 20,000 characters)."""
    with cli.session() as session:
        row = for_the_operator(session, inbound_id)
        shown = _listed(cli.app, row, text=True) if row is not None else None
    if shown is None:
        raise click.ClickException(
            f"no held, failed or postmaster message {inbound_id!r}: `dearmp replies held` "
            "and `dearmp replies postmaster` list them"
        )
    cli.say(lambda: _print_shown(shown), shown)


def _print_shown(shown: dict[str, Any]) -> None:
    for label, key in (
        ("id", "id"),
        ("received", "received_at"),
        ("status", "status"),
        ("reason", "reason"),
        ("letter", "submission_id"),
        ("size", "size"),
        ("From", "from"),
        ("Subject", "subject"),
    ):
        click.echo(f"{label}: {shown[key]}")
    for line in shown["authentication"]:
        click.echo(f"Authentication-Results: {line}")
    if shown["text"] is None:
        click.echo("\n(its text is deleted)")
        return
    click.echo("\n" + shown["text"])
    if shown["more"]:
        click.echo(f"\n({shown['more']} more characters not shown)")


def _listed(app: App, row: InboundMessage, text: bool = False) -> dict[str, Any]:
    """What the operator is shown of a stored message: every value cleaned
    (:func:`workers.stages.inbound.readable`)."""
    read = readable(row, InboundPolicy.from_settings(app.settings).authserv_ids, text)
    listed: dict[str, Any] = {
        "id": row.id,
        "received_at": row.received_at.isoformat(timespec="seconds"),
        "status": row.status,
        "submission_id": row.submission_id,
        "size": row.size,
        "reason": row.reason,
        "from": read.sender,
        "subject": read.subject,
        "authentication": list(read.authentication),
    }
    if text:
        listed["text"] = read.text if row.raw is not None else None
        listed["more"] = read.more
    return listed


@command(replies, "release")
@click.argument("inbound_id")
@yes_option
def replies_release(cli: Cli, inbound_id: str, yes: bool) -> None:
    """Forward a held reply to the supporter (once, within the letter's cap). Asks first
    (--yes does not)."""
    missing = f"no held reply {inbound_id!r}: `dearmp replies held` lists them"
    with cli.session() as session:
        row = session.get(InboundMessage, inbound_id)
        if row is None or row.status != InboundStatus.HELD:
            raise click.ClickException(missing)
    confirm(yes, f"Forward held reply {inbound_id} to the supporter?")
    with cli.session() as session:
        outcome = release(session, inbound_id, InboundPolicy.from_settings(cli.app.settings))
    if outcome is None:
        raise click.ClickException(missing)
    if outcome.notices:
        cli.send({Stage.OUTBOX: list(outcome.notices)})
        said = f"released {inbound_id}: forwarding it to the supporter"
    else:
        said = f"released {inbound_id}, recorded as a reply; not forwarded: {outcome.reason}"
    reason = None if outcome.notices else outcome.reason
    cli.say(said, {"released": inbound_id, "forwarded": bool(outcome.notices), "reason": reason})


@command(replies, "drop")
@click.argument("inbound_id")
@yes_option
def replies_drop(cli: Cli, inbound_id: str, yes: bool) -> None:
    """Delete a held reply without forwarding it (nothing is recorded on the letter), or the
    kept text of a failed message or of mail to the postmaster. Asks first (--yes does not)."""
    missing = (
        f"no held reply, or failed or postmaster message with its text, {inbound_id!r}: "
        "`dearmp replies held` and `dearmp replies postmaster` list them"
    )
    with cli.session() as session:
        row = for_the_operator(session, inbound_id)
        if row is None or row.raw is None:
            raise click.ClickException(missing)
    confirm(yes, f"Delete the text of message {inbound_id} for good?")
    with cli.session() as session:
        dropped = drop(session, inbound_id)
    if not dropped:
        raise click.ClickException(missing)
    cli.say(f"dropped {inbound_id}: its text is deleted", {"dropped": inbound_id})


@command(main)
@click.option("--campaign", default=None, help="One campaign's slug (default: every campaign).")
@click.option("--mx", default=None, help="The host name of the MX (default: DEARMP_PUBLIC_URL's).")
def dns(cli: Cli, campaign: str | None, mx: str | None) -> None:
    """The DNS records to publish: SPF, DKIM, DMARC, and MX for the bounce and reply domains."""
    settings = cli.app.settings
    definitions = load_definitions(settings.campaigns_dir)
    if campaign:
        definitions = [d for d in definitions if d.slug == campaign]
        if not definitions:
            raise click.ClickException(f"no campaign {campaign!r}")
    if mx and not (settings.bounce_domain or settings.reply_domain):
        raise click.ClickException(
            "--mx is for the bounce and reply domains, and neither DEARMP_BOUNCE_DOMAIN nor "
            "DEARMP_REPLY_DOMAIN is set: set them first, then print the records again"
        )
    domains = [str(d.from_email).rsplit("@", 1)[1].lower() for d in definitions]
    with refusing(ValueError):
        found = records(settings, domains, mx)
    cli.say("\n".join(zone_lines(found)), found)
