"""``dearmp outbox``: everything DearMP sends (letters, emails to supporters, webhooks) that an
operator looks at, and sends again once the cause of a failure is fixed."""

from __future__ import annotations

import json

import click
from rich.console import Console
from rich.table import Table

from workers.cli.base import Cli, app_for_cli, pass_cli
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
@click.option("--json", "as_json", is_flag=True)
def outbox_list(statuses: tuple[str, ...], limit: int, as_json: bool) -> None:
    """Items with their kind, status, failures, next attempt and error (masked)."""
    from workers.database.engine import session_scope
    from workers.outbox.sending import listing

    app = app_for_cli()
    with session_scope(app.sessions) as session:
        rows = listing(session, statuses or UNFINISHED, limit)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    table = Table("id", "kind", "status", "failures", "next attempt", "error")
    for row in rows:
        table.add_row(
            *(str(row[key] or "") for key in ("id", "kind", "status")),
            str(row["failures"]),
            str(row["next_attempt_at"] or ""),
            str(row["error"] or ""),
        )
    Console(width=200).print(table)


@outbox.command("retry")
@click.option("--kind", default=None, help="Only items of this kind (confirm, bounce, webhook...).")
@click.option("--dry-run", is_flag=True, help="Say what would be retried; change nothing.")
@pass_cli
def outbox_retry(cli: Cli, kind: str | None, dry_run: bool) -> None:
    """Send given-up items again with a fresh count of failures (after the cause is fixed).
    Exits non-zero when there is none."""
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
        ids = retry_failed(session, kind, dry_run)
        found = select(OutboxItem.id, OutboxItem.kind).where(OutboxItem.id.in_(ids))
        kind_of: dict[str, str] = {item_id: k for item_id, k in session.execute(found)}
    if ids and not dry_run:  # after the commit; else the reconciler
        sends: dict[Stage, list[str]] = {}
        for item_id in ids:
            sends.setdefault(stage_of(kind_of[item_id]), []).append(item_id)
        dispatch_groups(cli.broker, sends)
    click.echo(f"{'would retry' if dry_run else 'retried'} {len(ids)}")
    if not ids:
        raise SystemExit(1)
