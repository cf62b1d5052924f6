"""``dearmp inbound``, ``dearmp replies`` and ``dearmp dns``: what comes back to the letters."""

from __future__ import annotations

import signal
import threading
from dataclasses import asdict
from typing import Any

import click
from rich.console import Console
from rich.table import Table

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


@main.command()
@click.option("--host", default=None, help="Address to listen on [DEARMP_INBOUND_HOST].")
@click.option("--port", default=None, type=int, help="Port [DEARMP_INBOUND_PORT].")
@pass_cli
def inbound(cli: Cli, host: str | None, port: int | None) -> None:
    """Receive bounces and replies by SMTP for the bounce and reply domains."""
    from workers.pipeline.runtime import start_receiver

    app = cli.app
    if not app.returns.domains:
        raise click.ClickException(
            "set DEARMP_BOUNCE_DOMAIN and/or DEARMP_REPLY_DOMAIN: the receiver takes mail only "
            "for their addresses"
        )
    controller = start_receiver(app, cli.broker, host, port)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    tls = "STARTTLS offered" if app.settings.inbound_tls_cert else "no STARTTLS: no certificate"
    click.echo(
        f"receiving for {', '.join(sorted(app.returns.domains))} on "
        f"{controller.hostname}:{controller.port} ({tls})"
    )
    stop.wait()
    controller.stop()


@click.group()
def replies() -> None:
    """What came back to the letters: bounces, automatic replies, MPs' replies, the survey."""


@replies.command("report")
@click.option("--campaign", default=None, help="One campaign's slug.")
@json_option
@pass_cli
def replies_report(cli: Cli, campaign: str | None) -> None:
    """Per campaign and MP: delivered, bounced, acknowledged, replied, and survey answers."""
    from workers.database.engine import session_scope
    from workers.database.models import Campaign
    from workers.letters.outcomes import report

    app = cli.app
    with session_scope(app.sessions) as session:
        if campaign is not None and session.get(Campaign, campaign) is None:
            raise click.ClickException(f"no campaign {campaign}")
        rows = report(session, campaign)
    table = Table(
        "campaign", "MP", "delivered", "bounced", "auto-reply", "replied", "yes", "not yet", "no"
    )
    for row in rows:
        table.add_row(
            row.campaign,
            row.mp,
            *(str(n) for n in (row.delivered, row.bounced, row.acknowledged, row.replied)),
            *(str(row.survey[a]) for a in ("yes", "not_yet", "no")),
        )
    cli.say(lambda: Console().print(table), [asdict(row) for row in rows])


@replies.command("resend-bounced")
@click.option("--member", "member_id", type=int, required=True, help="The MP's member id.")
@click.option("--to", "address", required=True, help="The MP's corrected address.")
@dry_run_option
@yes_option
@json_option
@pass_cli
def replies_resend(cli: Cli, member_id: int, address: str, dry_run: bool, yes: bool) -> None:
    """Write an MP's returned letters again, to a corrected address: each once, recorded.
    Asks first (--yes does not); exits 1 when the MP has no returned letter."""
    from workers.database.engine import session_scope
    from workers.letters.outcomes import resend_bounced
    from workers.pipeline.dispatch import dispatch_groups
    from workers.stages.stage import Stage

    app = cli.app
    try:
        with session_scope(app.sessions) as session:
            ids = resend_bounced(session, member_id, address, True, app.signer)
        if not ids:
            raise Nothing(f"no returned letter to MP {member_id}: nothing to resend")
        if not dry_run:
            confirm(yes, f"Send {len(ids)} returned letters again, to {address}?")
            with session_scope(app.sessions) as session:
                ids = resend_bounced(session, member_id, address, False, app.signer)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    if ids and not dry_run:
        dispatch_groups(cli.broker, {Stage.RENDER: ids})
    said = f"{'would resend' if dry_run else 'resending'} {len(ids)} returned letters"
    cli.say(said, {"dry_run": dry_run, "resending": ids})


@replies.command("held")
@json_option
@pass_cli
def replies_held(cli: Cli) -> None:
    """Replies held for an operator: not plausibly from the MP's office, so not forwarded."""
    from workers.database.engine import session_scope
    from workers.stages.inbound import held

    app = cli.app
    with session_scope(app.sessions) as session:
        rows = [_listed(app, row) for row in held(session)]
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


@replies.command("postmaster")
@json_option
@pass_cli
def replies_postmaster(cli: Cli) -> None:
    """Mail to the postmaster, kept for the operator until retention deletes it."""
    from workers.database.engine import session_scope
    from workers.stages.inbound import postmaster

    app = cli.app
    with session_scope(app.sessions) as session:
        rows = [_listed(app, row) for row in postmaster(session)]
    cli.say(lambda: _print_postmaster(rows), rows)


def _print_postmaster(rows: list[dict[str, Any]]) -> None:
    if not rows:
        click.echo("no mail to the postmaster")
        return
    for row in rows:
        click.echo(f"{row['id']}  received {row['received_at']}  {row['size']} bytes")
        click.echo(f"  From: {row['from']}\n  Subject: {row['subject']}")
    click.echo(f"{len(rows)}: `dearmp replies show ID` shows one, `drop ID` deletes it")


@replies.command("show")
@click.argument("inbound_id")
@json_option
@pass_cli
def replies_show(cli: Cli, inbound_id: str) -> None:
    """A held, failed or postmaster message: when, its status and why, From, Subject, our
    relay's Authentication-Results and its text (the first 20,000 characters)."""
    from workers.database.engine import session_scope
    from workers.stages.inbound import for_the_operator

    app = cli.app
    with session_scope(app.sessions) as session:
        row = for_the_operator(session, inbound_id)
        shown = _listed(app, row, text=True) if row is not None else None
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


def _listed(app: Any, row: Any, text: bool = False) -> dict[str, Any]:
    """What the operator is shown of a stored message: every value cleaned
    (:func:`workers.stages.inbound.readable`)."""
    from workers.stages.inbound import InboundPolicy, readable

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


@replies.command("release")
@click.argument("inbound_id")
@yes_option
@json_option
@pass_cli
def replies_release(cli: Cli, inbound_id: str, yes: bool) -> None:
    """Forward a held reply to the supporter (once, within the letter's cap). Asks first
    (--yes does not)."""
    from workers.database.engine import session_scope
    from workers.database.models import InboundMessage, InboundStatus
    from workers.pipeline.dispatch import dispatch_groups
    from workers.stages.inbound import InboundPolicy, release
    from workers.stages.stage import Stage

    app = cli.app
    missing = f"no held reply {inbound_id!r}: `dearmp replies held` lists them"
    with session_scope(app.sessions) as session:
        row = session.get(InboundMessage, inbound_id)
        if row is None or row.status != InboundStatus.HELD:
            raise click.ClickException(missing)
    confirm(yes, f"Forward held reply {inbound_id} to the supporter?")
    with session_scope(app.sessions) as session:
        outcome = release(session, inbound_id, InboundPolicy.from_settings(app.settings))
    if outcome is None:
        raise click.ClickException(missing)
    if outcome.notices:
        dispatch_groups(cli.broker, {Stage.OUTBOX: list(outcome.notices)})
        said = f"released {inbound_id}: forwarding it to the supporter"
    else:
        said = f"released {inbound_id}, recorded as a reply; not forwarded: {outcome.reason}"
    cli.say(
        said,
        {
            "released": inbound_id,
            "forwarded": bool(outcome.notices),
            "reason": None if outcome.notices else outcome.reason,
        },
    )


@replies.command("drop")
@click.argument("inbound_id")
@yes_option
@json_option
@pass_cli
def replies_drop(cli: Cli, inbound_id: str, yes: bool) -> None:
    """Delete a held reply without forwarding it (nothing is recorded on the letter), or the
    kept text of a failed message or of mail to the postmaster. Asks first (--yes does not)."""
    from workers.database.engine import session_scope
    from workers.stages.inbound import drop, for_the_operator

    app = cli.app
    missing = (
        f"no held reply, or failed or postmaster message with its text, {inbound_id!r}: "
        "`dearmp replies held` and `dearmp replies postmaster` list them"
    )
    with session_scope(app.sessions) as session:
        row = for_the_operator(session, inbound_id)
        if row is None or row.raw is None:
            raise click.ClickException(missing)
    confirm(yes, f"Delete the text of message {inbound_id} for good?")
    with session_scope(app.sessions) as session:
        dropped = drop(session, inbound_id)
    if not dropped:
        raise click.ClickException(missing)
    cli.say(f"dropped {inbound_id}: its text is deleted", {"dropped": inbound_id})


@main.command()
@click.option("--campaign", default=None, help="One campaign's slug (default: every campaign).")
@click.option("--mx", default=None, help="The host name of the MX (default: DEARMP_PUBLIC_URL's).")
@json_option
@pass_cli
def dns(cli: Cli, campaign: str | None, mx: str | None) -> None:
    """The DNS records to publish: SPF, DKIM, DMARC, and MX for the bounce and reply domains."""
    from workers.letters.definitions import load_definitions
    from workers.letters.dns import records, zone_lines

    app = cli.app
    definitions = load_definitions(app.settings.campaigns_dir)
    if campaign:
        definitions = [d for d in definitions if d.slug == campaign]
        if not definitions:
            raise click.ClickException(f"no campaign {campaign!r}")
    settings = app.settings
    if mx and not (settings.bounce_domain or settings.reply_domain):
        raise click.ClickException(
            "--mx is for the bounce and reply domains, and neither DEARMP_BOUNCE_DOMAIN nor "
            "DEARMP_REPLY_DOMAIN is set: set them first, then print the records again"
        )
    domains = [str(d.from_email).rsplit("@", 1)[1].lower() for d in definitions]
    try:
        found = records(settings, domains, mx)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    cli.say("\n".join(zone_lines(found)), [asdict(record) for record in found])
