"""``dearmp webhooks``: the CRM endpoints that hear of events, their secrets and deliveries."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import timedelta
from typing import Any, TypeVar

import click

from workers.cli.base import Cli, app_for_cli, pass_cli
from workers.webhooks.events import EVENTS

T = TypeVar("T")


def _run(work: Callable[[Any], T]) -> T:
    """``work(session)`` in a transaction; refused configuration is one line and exit 1."""
    from workers.database.engine import session_scope
    from workers.webhooks.endpoints import Refused

    try:
        with session_scope(app_for_cli().sessions) as session:
            return work(session)
    except Refused as exc:
        raise click.ClickException(str(exc)) from None


@click.group()
def webhooks() -> None:
    """Signed webhooks to a CRM (Standard Webhooks)."""


@webhooks.command("add")
@click.argument("url")
@click.option("--event", "events", multiple=True, required=True, help=f"Repeatable: {EVENTS}.")
@click.option("--campaign", default=None, help="Only this campaign's events [every campaign].")
@click.option("--personal-data", is_flag=True, help="Send supporters' details (if they agreed).")
def webhooks_add(
    url: str, events: tuple[str, ...], campaign: str | None, personal_data: bool
) -> None:
    """Add an endpoint; its secret is printed once (keep it in the receiver)."""
    from workers.webhooks.endpoints import add

    def work(session: Any) -> tuple[int, str]:
        endpoint = add(session, url, events, campaign, personal_data)
        return endpoint.id, endpoint.secret

    endpoint_id, secret = _run(work)
    click.echo(f"endpoint {endpoint_id}\nsecret {secret}")


@webhooks.command("list")
def webhooks_list() -> None:
    """Every endpoint (URLs without their query strings)."""
    from workers.webhooks.endpoints import describe

    click.echo(json.dumps(_run(describe), indent=2))


@webhooks.command("show")
@click.argument("endpoint_id", type=int)
@click.option("--limit", default=20, show_default=True, help="Latest deliveries shown.")
def webhooks_show(endpoint_id: int, limit: int) -> None:
    """An endpoint and its latest deliveries and failures (no personal data)."""
    from workers.webhooks.endpoints import describe

    click.echo(json.dumps(_run(lambda s: describe(s, endpoint_id, limit)), indent=2))


@webhooks.command("rotate")
@click.argument("endpoint_id", type=int)
@click.option("--overlap-hours", default=24.0, show_default=True, help="The old secret signs too.")
def webhooks_rotate(endpoint_id: int, overlap_hours: float) -> None:
    """A new secret, printed once; both sign every delivery during the overlap."""
    from workers.webhooks.endpoints import rotate

    secret = _run(lambda s: rotate(s, endpoint_id, timedelta(hours=overlap_hours)))
    click.echo(f"secret {secret}")


@webhooks.command("replay")
@click.argument("webhook_ids", nargs=-1, required=True)
@pass_cli
def webhooks_replay(cli: Cli, webhook_ids: tuple[str, ...]) -> None:
    """Send delivered or given-up webhooks again, with the same webhook-id (from ``show``)."""
    from workers.pipeline.dispatch import dispatch_groups
    from workers.stages.stage import Stage
    from workers.webhooks.endpoints import replay

    ids = _run(lambda s: replay(s, webhook_ids))
    if ids:
        dispatch_groups(cli.broker, {Stage.WEBHOOK: ids})  # after the commit; else the reconciler
    click.echo(f"replayed {len(ids)}")
    if len(ids) < len(webhook_ids):
        raise click.ClickException("some were not replayed: not webhooks, or not sent or given up")


@webhooks.command("remove")
@click.argument("endpoint_id", type=int)
def webhooks_remove(endpoint_id: int) -> None:
    """Delete an endpoint and its deliveries."""
    from workers.webhooks.endpoints import remove

    click.echo(f"removed, with {_run(lambda s: remove(s, endpoint_id))} deliveries")
