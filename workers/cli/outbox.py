"""``dearmp outbox``: everything DearMP sends (letters, emails to supporters, webhooks) that an
operator looks at, and sends again once the cause of a failure is fixed."""

from __future__ import annotations

import click
from rich.console import Console
from rich.table import Table

from workers.cli.base import (
    Cli,
    Nothing,
    confirm,
    dry_run_option,
    json_option,
    pass_cli,
    yes_option,
)
from workers.stages.stage import Stage

# Without --status: the items not yet ended, and those given up.
UNFINISHED = ("pending", "sending", "failed")
STATUSES = ("pending", "sending", "sent", "failed", "skipped")


@click.group()
def outbox() -> None:
    """What DearMP sends: letters, emails to supporters (confirmations, notices, forwards,
    surveys), webhooks."""


@outbox.command("list")
@click.option(
    "--status",
    "statuses",
    multiple=True,
    type=click.Choice(STATUSES),
    help="Only items in this status (repeatable) [pending, sending, failed].",
)
@click.option("--limit", default=100, show_default=True, help="At most this many, oldest first.")
@json_option
@pass_cli
def outbox_list(cli: Cli, statuses: tuple[str, ...], limit: int) -> None:
    """Items with their kind, status, failures, next attempt and error (masked). A --status
    that matches nothing exits 1."""
    from workers.database.engine import session_scope
    from workers.outbox.sending import listing

    with session_scope(cli.app.sessions) as session:
        rows = listing(session, statuses or UNFINISHED, limit)
    table = Table("id", "kind", "status", "failures", "next attempt", "error")
    for row in rows:
        table.add_row(
            *(str(row[key] or "") for key in ("id", "kind", "status")),
            str(row["failures"]),
            str(row["next_attempt_at"] or ""),
            str(row["error"] or ""),
        )
    cli.say(lambda: Console(width=200).print(table), rows)
    if not rows and statuses:
        raise Nothing(f"no item is {' or '.join(statuses)}")


@outbox.command("retry")
@click.option("--kind", default=None, help="Only items of this kind (confirm, bounce, webhook...).")
@dry_run_option
@yes_option
@json_option
@pass_cli
def outbox_retry(cli: Cli, kind: str | None, dry_run: bool, yes: bool) -> None:
    """Send given-up items again with a fresh count of failures (after the cause is fixed).
    Asks first (--yes does not); exits 1 when there is none."""
    from sqlalchemy import select

    from workers.database.engine import session_scope
    from workers.database.models import OutboxItem
    from workers.outbox.kinds import stage_of
    from workers.outbox.sending import retry_failed
    from workers.pipeline.dispatch import dispatch_groups
    from workers.stages.delivery import KIND as LETTER

    if kind == LETTER:
        raise click.ClickException(
            "a failed letter failed its submission too: `dearmp deliveries reopen` sends it again"
        )
    with session_scope(cli.app.sessions) as session:
        ids = retry_failed(session, kind, dry_run=True)
    if not ids:
        raise Nothing(f"no given-up {kind or 'item'} to retry")
    if not dry_run:
        confirm(yes, f"Send {len(ids)} given-up items again?")
    with session_scope(cli.app.sessions) as session:
        ids = retry_failed(session, kind, dry_run)
        found = select(OutboxItem.id, OutboxItem.kind).where(OutboxItem.id.in_(ids))
        kind_of: dict[str, str] = {item_id: k for item_id, k in session.execute(found)}
    if ids and not dry_run:  # after the commit; else the reconciler
        sends: dict[Stage, list[str]] = {}
        for item_id in ids:
            sends.setdefault(stage_of(kind_of[item_id]), []).append(item_id)
        dispatch_groups(cli.broker, sends)
    said = f"{'would retry' if dry_run else 'retried'} {len(ids)}"
    cli.say(said, {"dry_run": dry_run, "retried": [{"id": i, "kind": kind_of[i]} for i in ids]})
