"""``dearmp outbox``: everything DearMP sends (letters, emails to supporters, webhooks) that an
operator looks at, and sends again once the cause of a failure is fixed; ``dearmp deliveries``:
the letters to MPs."""

from __future__ import annotations

import click
from rich.console import Console
from rich.table import Table
from sqlalchemy import select

from workers.cli.base import (
    Cli,
    Nothing,
    cell,
    command,
    confirm,
    dry_run_option,
    main,
    yes_option,
)
from workers.cli.queues import clear_dead, redis_client
from workers.database.models import OutboxItem
from workers.outbox.kinds import stage_of
from workers.outbox.sending import due_now, listing, retry_failed
from workers.pipeline.dead_letters import resume_mail
from workers.stages import digests
from workers.stages.delivery import KIND as LETTER
from workers.stages.delivery import reopen_failed
from workers.stages.digests import TO_MPS
from workers.stages.stage import Stage
from workers.wording import counted

# Without --status: the items not yet ended, and those given up.
UNFINISHED = ("pending", "sending", "failed")
STATUSES = ("pending", "sending", "sent", "failed", "skipped")


@main.group()
def outbox() -> None:
    """What DearMP sends: letters, emails to supporters (confirmations, notices, forwards,
    surveys), webhooks."""


@command(outbox, "list")
@click.option(
    "--status",
    "statuses",
    multiple=True,
    type=click.Choice(STATUSES),
    help="Only items in this status (repeatable) [pending, sending, failed].",
)
@click.option("--limit", default=100, show_default=True, help="At most this many, oldest first.")
def outbox_list(cli: Cli, statuses: tuple[str, ...], limit: int) -> None:
    """Items with their kind, status, failures, next attempt and error (masked). A --status
    that matches nothing exits 1."""
    with cli.session() as session:
        rows = listing(session, statuses or UNFINISHED, limit)
    table = Table("id", "kind", "status", "failures", "next attempt", "error")
    for row in rows:
        keys = ("id", "kind", "status", "failures", "next_attempt_at", "error")
        table.add_row(*(cell(row[key]) for key in keys))
    cli.say(lambda: Console(width=200).print(table), rows)
    if not rows and statuses:
        raise Nothing(f"no item is {' or '.join(statuses)}")


@command(outbox, "retry")
@click.option("--kind", default=None, help="Only items of this kind (confirm, bounce, webhook...).")
@dry_run_option
@yes_option
def outbox_retry(cli: Cli, kind: str | None, dry_run: bool, yes: bool) -> None:
    """Send given-up items again with a fresh count of failures (after the cause is fixed).
    Asks first (--yes does not); exits 1 when there is none."""
    if kind == LETTER:
        raise click.ClickException(
            "a failed letter failed its submission too: `dearmp deliveries reopen` sends it again"
        )

    def retry(dry: bool) -> dict[str, str]:
        """The items retried (or that would be), with their kinds."""
        with cli.session() as session:
            ids = retry_failed(session, kind, dry)
            found = select(OutboxItem.id, OutboxItem.kind).where(OutboxItem.id.in_(ids))
            kind_of: dict[str, str] = {item_id: k for item_id, k in session.execute(found)}
        return {item_id: kind_of[item_id] for item_id in ids}

    retried = retry(True)
    if not retried:
        raise Nothing(f"no given-up {kind or 'item'} to retry")
    if not dry_run:
        confirm(yes, f"Send {len(retried)} given-up items again?")
        retried = retry(False)
        sends: dict[Stage, list[str]] = {}
        for item_id, item_kind in retried.items():
            sends.setdefault(stage_of(item_kind), []).append(item_id)
        cli.send(sends)
    said = f"{'would retry' if dry_run else 'retried'} {len(retried)}"
    listed = [{"id": item_id, "kind": item_kind} for item_id, item_kind in retried.items()]
    cli.say(said, {"dry_run": dry_run, "retried": listed})


@main.group()
def deliveries() -> None:
    """Deliveries, for an operator."""


@command(deliveries, "reopen")
@click.option("--reason", help="Only failures whose recorded error contains this.")
@click.option("--campaign", help="Only this campaign's letters (its slug).")
@click.option("--mp", "member_id", type=int, help="Only letters to this MP (member id).")
@dry_run_option
@yes_option
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
    every = reason is None and campaign is None and member_id is None

    def reopen(dry: bool) -> tuple[list[str], list[str]]:
        with cli.session() as session:
            letters = reopen_failed(session, reason, campaign, member_id, dry_run=dry)
            return letters, digests.reopen_failed(session, dry_run=dry) if every else []

    found, digest_ids = reopen(True)
    if not found and not digest_ids:
        raise Nothing("no failed letter matches: nothing reopened")
    cleared = 0
    if not dry_run:
        mps = counted(len(digest_ids), "MP's digest", "MPs' digests")
        digests_too = f" and {mps}" if digest_ids else ""
        confirm(yes, f"Send {counted(len(found), 'failed letter')}{digests_too} again?")
        found, digest_ids = reopen(False)
        if found or digest_ids:
            cli.send({Stage.DELIVER: found + digest_ids})
            cleared = clear_dead(cli.app, Stage.DELIVER.actor, set(found))
    said = "would reopen" if dry_run else "reopened"
    lines = [f"{said} {one}" for one in found + digest_ids]
    if cleared:
        lines.append(f"cleared {counted(cleared, 'dead letter')} these supersede")
    lines.append(f"{said} {counted(len(found), 'letter')} and {counted(len(digest_ids), 'digest')}")
    cli.say(
        "\n".join(lines),
        {
            "dry_run": dry_run,
            "reopened": found,
            "digests_reopened": digest_ids,
            "dead_letters_cleared": cleared,
        },
    )


@command(deliveries, "waiting")
@click.option("--limit", default=100, show_default=True, help="At most this many, oldest first.")
def deliveries_waiting(cli: Cli, limit: int) -> None:
    """Letters waiting to be sent or to try again: failures, next attempt and why (masked)."""
    with cli.session() as session:
        lease = cli.app.settings.delivery_lease_seconds
        rows = listing(session, ("pending", "sending"), limit, TO_MPS, lease)
    lines = []
    for row in rows:
        next_at = f"next {row['next_attempt_at'] or 'now'}"
        if row["lapsed"]:
            next_at = f"its worker stopped (taken at {row['claimed_at']}): next try takes it over"
        elif row["status"] == "sending":
            next_at = f"with its server since {row['claimed_at']}"
        lines.append(f"{row['id']}  {row['status']}  failures {row['failures']}  {next_at}")
        if row["error"]:
            lines.append(f"    {row['error']}")
    cli.say("\n".join([*lines, f"{counted(len(rows), 'letter')} waiting"]), rows)


@command(deliveries, "flush")
@dry_run_option
def deliveries_flush(cli: Cli, dry_run: bool) -> None:
    """Try every letter waiting for a later attempt now (once the cause is fixed), as Postfix's
    `postqueue -f` does. Exits 1 when none waits."""
    with cli.session() as session:
        ids = due_now(session, TO_MPS, dry_run)
    if not ids:
        raise Nothing("no letter waits for a later attempt: nothing to try")
    if not dry_run:
        cli.send({Stage.DELIVER: ids})
    said = f"{'would try' if dry_run else 'trying'} {counted(len(ids), 'letter')} now"
    cli.say(said, {"dry_run": dry_run, "trying": list(ids)})


@command(deliveries, "resume")
def deliveries_resume(cli: Cli) -> None:
    """End the mail pause once the relay is fixed (a password, a certificate, a sender): every
    worker process tries again within seconds instead of waiting out its pause. Exits 1 when
    no pause was reported."""
    app = cli.app
    paused = resume_mail(redis_client(app), app.settings.redis_namespace)
    if paused is None:
        raise Nothing("no pause was reported; the workers are told to try anyway")
    said = f"resumed: the workers try again within seconds (paused for {paused['reason']})"
    cli.say(said, {"resumed": True, "paused_for": paused["reason"]})
