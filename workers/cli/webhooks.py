"""``dearmp webhooks``: the CRM endpoints that hear of events, their secrets and deliveries."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import timedelta
from typing import Any, TypeVar

import click

from workers.cli.base import Cli, Nothing, app_for_cli, confirm, json_option, pass_cli, yes_option
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
@json_option
@pass_cli
def add(
    cli: Cli, url: str, events: tuple[str, ...], campaign: str | None, personal_data: bool
) -> None:
    """Add an endpoint; its secret is printed once (keep it in the receiver)."""
    added = _run(lambda s: endpoints.add(s, url, events, campaign, personal_data))
    cli.say(f"endpoint {added.id}\nsecret {added.secret}", {"id": added.id, "secret": added.secret})


@webhooks.command("list")
@json_option  # its answer is JSON either way
@pass_cli
def list_(cli: Cli) -> None:
    """Every endpoint (URLs masked)."""
    found = _run(endpoints.describe)
    cli.say(json.dumps(found, indent=2), found)


@webhooks.command("show")
@click.argument("endpoint_id", type=int)
@click.option("--limit", default=20, show_default=True, help="Latest deliveries shown.")
@json_option  # its answer is JSON either way
@pass_cli
def show(cli: Cli, endpoint_id: int, limit: int) -> None:
    """An endpoint and its latest deliveries and failures (no personal data)."""
    found = _run(lambda s: endpoints.describe(s, endpoint_id, limit))
    cli.say(json.dumps(found, indent=2), found)


@webhooks.command("rotate")
@click.argument("endpoint_id", type=int)
@click.option("--overlap-hours", default=24.0, show_default=True, help="The old secret signs too.")
@json_option
@pass_cli
def rotate(cli: Cli, endpoint_id: int, overlap_hours: float) -> None:
    """A new secret, printed once; both sign every delivery during the overlap."""
    overlap = timedelta(hours=overlap_hours)
    secret = _run(lambda s: endpoints.rotate(s, endpoint_id, overlap))
    cli.say(f"secret {secret}", {"id": endpoint_id, "secret": secret})


@webhooks.command("replay")
@click.argument("webhook_ids", nargs=-1, required=True)
@json_option
@pass_cli
def replay(cli: Cli, webhook_ids: tuple[str, ...]) -> None:
    """Send delivered or given-up webhooks again, with the same webhook-id (from ``show``)."""
    ids = _run(lambda s: endpoints.replay(s, webhook_ids))
    _send(cli, ids)
    cli.say(f"replayed {len(ids)}", {"replayed": ids})
    if len(ids) < len(webhook_ids):
        raise click.ClickException("some were not replayed: not webhooks, or not sent or given up")


@webhooks.command("remove")
@click.argument("endpoint_id", type=int)
@yes_option
@json_option
@pass_cli
def remove(cli: Cli, endpoint_id: int, yes: bool) -> None:
    """Delete an endpoint and its deliveries. Asks first (--yes does not)."""
    _run(lambda s: endpoints.get(s, endpoint_id))  # one that is not there is not asked about
    confirm(yes, f"Delete webhook endpoint {endpoint_id} and its deliveries?")
    gone = _run(lambda s: endpoints.remove(s, endpoint_id))
    cli.say(f"removed, with {gone} deliveries", {"removed": endpoint_id, "deliveries": gone})


def _switch(session: Any, endpoint_id: int, enabled: bool) -> list[str]:
    """``endpoints.enable``, or :class:`Nothing` when the endpoint is so already."""
    if endpoints.get(session, endpoint_id).enabled == enabled:
        raise Nothing(f"endpoint {endpoint_id} is {'en' if enabled else 'dis'}abled already")
    return endpoints.enable(session, endpoint_id, enabled=enabled)


@webhooks.command("disable")
@click.argument("endpoint_id", type=int)
@json_option
@pass_cli
def disable(cli: Cli, endpoint_id: int) -> None:
    """Send an endpoint nothing: no new webhooks, and its pending ones wait until enabled.
    Exits 1 when it is disabled already."""
    _run(lambda s: _switch(s, endpoint_id, enabled=False))
    cli.say(f"endpoint {endpoint_id} disabled", {"id": endpoint_id, "enabled": False})


@webhooks.command("enable")
@click.argument("endpoint_id", type=int)
@json_option
@pass_cli
def enable(cli: Cli, endpoint_id: int) -> None:
    """Send to a disabled endpoint again, its waiting webhooks at once. Exits 1 when it is
    enabled already."""
    ids = _run(lambda s: _switch(s, endpoint_id, enabled=True))
    _send(cli, ids)
    said = f"endpoint {endpoint_id} enabled; {len(ids)} waiting webhooks sent"
    cli.say(said, {"id": endpoint_id, "enabled": True, "sent": ids})
