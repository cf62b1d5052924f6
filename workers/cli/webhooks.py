"""``dearmp webhooks``: the CRM endpoints that hear of events, their secrets and deliveries."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import timedelta
from typing import Any, TypeVar

import click

from workers.cli.base import Cli, app_for_cli, pass_cli
from workers.webhooks import endpoints
from workers.webhooks.events import EVENTS

T = TypeVar("T")


def _run(work: Callable[[Any], T]) -> T:
    """``work(session)`` in a transaction; refused configuration is one line and exit 1."""
    from workers.database.engine import session_scope

    try:
        with session_scope(app_for_cli().sessions) as session:
            return work(session)
    except endpoints.Refused as exc:
        raise click.ClickException(str(exc)) from None


def _send(cli: Cli, ids: list[str]) -> None:
    """Webhooks to their queue, after the commit (if not, the reconciler sends them)."""
    from workers.pipeline.dispatch import dispatch_groups
    from workers.stages.stage import Stage

    if ids:
        dispatch_groups(cli.broker, {Stage.WEBHOOK: ids})


@click.group()
def webhooks() -> None:
    """Signed webhooks to a CRM (Standard Webhooks)."""


@webhooks.command("add")
@click.argument("url")
@click.option("--event", "events", multiple=True, required=True, help=f"Repeatable: {EVENTS}.")
@click.option("--campaign", default=None, help="Only this campaign's events [every campaign].")
@click.option("--personal-data", is_flag=True, help="Send supporters' details (if they agreed).")
def add(url: str, events: tuple[str, ...], campaign: str | None, personal_data: bool) -> None:
    """Add an endpoint; its secret is printed once (keep it in the receiver)."""
    added = _run(lambda s: endpoints.add(s, url, events, campaign, personal_data))
    click.echo(f"endpoint {added.id}\nsecret {added.secret}")


@webhooks.command("list")
def list_() -> None:
    """Every endpoint (URLs masked)."""
    click.echo(json.dumps(_run(endpoints.describe), indent=2))


@webhooks.command("show")
@click.argument("endpoint_id", type=int)
@click.option("--limit", default=20, show_default=True, help="Latest deliveries shown.")
def show(endpoint_id: int, limit: int) -> None:
    """An endpoint and its latest deliveries and failures (no personal data)."""
    click.echo(json.dumps(_run(lambda s: endpoints.describe(s, endpoint_id, limit)), indent=2))


@webhooks.command("rotate")
@click.argument("endpoint_id", type=int)
@click.option("--overlap-hours", default=24.0, show_default=True, help="The old secret signs too.")
def rotate(endpoint_id: int, overlap_hours: float) -> None:
    """A new secret, printed once; both sign every delivery during the overlap."""
    overlap = timedelta(hours=overlap_hours)
    click.echo(f"secret {_run(lambda s: endpoints.rotate(s, endpoint_id, overlap))}")


@webhooks.command("replay")
@click.argument("webhook_ids", nargs=-1, required=True)
@pass_cli
def replay(cli: Cli, webhook_ids: tuple[str, ...]) -> None:
    """Send delivered or given-up webhooks again, with the same webhook-id (from ``show``)."""
    ids = _run(lambda s: endpoints.replay(s, webhook_ids))
    _send(cli, ids)
    click.echo(f"replayed {len(ids)}")
    if len(ids) < len(webhook_ids):
        raise click.ClickException("some were not replayed: not webhooks, or not sent or given up")


@webhooks.command("remove")
@click.argument("endpoint_id", type=int)
def remove(endpoint_id: int) -> None:
    """Delete an endpoint and its deliveries."""
    click.echo(f"removed, with {_run(lambda s: endpoints.remove(s, endpoint_id))} deliveries")


@webhooks.command("disable")
@click.argument("endpoint_id", type=int)
def disable(endpoint_id: int) -> None:
    """Send an endpoint nothing: no new webhooks, and its pending ones wait until enabled."""
    _run(lambda s: endpoints.enable(s, endpoint_id, enabled=False))
    click.echo(f"endpoint {endpoint_id} disabled")


@webhooks.command("enable")
@click.argument("endpoint_id", type=int)
@pass_cli
def enable(cli: Cli, endpoint_id: int) -> None:
    """Send to a disabled endpoint again, its waiting webhooks at once."""
    ids = _run(lambda s: endpoints.enable(s, endpoint_id))
    _send(cli, ids)
    click.echo(f"endpoint {endpoint_id} enabled; {len(ids)} waiting webhooks sent")
