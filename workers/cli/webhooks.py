"""``dearmp webhooks``: the CRM endpoints that hear of events, their secrets and deliveries."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import timedelta
from typing import TypeVar

import click
from sqlalchemy.orm import Session

from workers.cli.base import Cli, Nothing, command, confirm, main, refusing, yes_option
from workers.stages.stage import Stage
from workers.webhooks import endpoints
from workers.webhooks.events import EVENTS
from workers.wording import counted

T = TypeVar("T")


def _run(cli: Cli, work: Callable[[Session], T]) -> T:
    """``work(session)`` in a transaction; refused configuration is one line and exit 1."""
    with refusing(endpoints.Refused), cli.session() as session:
        return work(session)


@main.group()
def webhooks() -> None:
    """Signed webhooks to a CRM (Standard Webhooks)."""


@command(webhooks, "add")
@click.argument("url")
@click.option("--event", "events", multiple=True, required=True, help=f"Repeatable: {EVENTS}.")
@click.option("--campaign", default=None, help="Only this campaign's events [every campaign].")
@click.option("--personal-data", is_flag=True, help="Send supporters' details (if they agreed).")
def add(
    cli: Cli, url: str, events: tuple[str, ...], campaign: str | None, personal_data: bool
) -> None:
    """Add an endpoint; its secret is printed once (keep it in the receiver)."""
    added = _run(cli, lambda s: endpoints.add(s, url, events, campaign, personal_data))
    cli.say(f"endpoint {added.id}\nsecret {added.secret}", {"id": added.id, "secret": added.secret})


@command(webhooks, "list")  # its answer is JSON either way
def list_(cli: Cli) -> None:
    """Every endpoint (URLs masked)."""
    found = _run(cli, endpoints.describe)
    cli.say(json.dumps(found, indent=2), found)


@command(webhooks, "show")  # its answer is JSON either way
@click.argument("endpoint_id", type=int)
@click.option("--limit", default=20, show_default=True, help="Latest deliveries shown.")
def show(cli: Cli, endpoint_id: int, limit: int) -> None:
    """An endpoint and its latest deliveries and failures (no personal data)."""
    found = _run(cli, lambda s: endpoints.describe(s, endpoint_id, limit))
    cli.say(json.dumps(found, indent=2), found)


@command(webhooks, "rotate")
@click.argument("endpoint_id", type=int)
@click.option(
    "--overlap-hours",
    default=24.0,
    show_default=True,
    type=click.FloatRange(min=0, max=720),
    help="Hours the old secret signs too, up to 720 (30 days); 0: it stops at once.",
)
def rotate(cli: Cli, endpoint_id: int, overlap_hours: float) -> None:
    """A new secret, printed once; both sign every delivery during the overlap."""
    secret = _run(cli, lambda s: endpoints.rotate(s, endpoint_id, timedelta(hours=overlap_hours)))
    cli.say(f"secret {secret}", {"id": endpoint_id, "secret": secret})


@command(webhooks, "replay")
@click.argument("webhook_ids", nargs=-1, required=True)
def replay(cli: Cli, webhook_ids: tuple[str, ...]) -> None:
    """Send delivered or given-up webhooks again, with the same webhook-id (from ``show``)."""
    ids = _run(cli, lambda s: endpoints.replay(s, webhook_ids))
    cli.send({Stage.WEBHOOK: ids})
    cli.say(f"replayed {len(ids)}", {"replayed": ids})
    if len(ids) < len(webhook_ids):
        raise click.ClickException("some were not replayed: not webhooks, or not sent or given up")


@command(webhooks, "remove")
@click.argument("endpoint_id", type=int)
@yes_option
def remove(cli: Cli, endpoint_id: int, yes: bool) -> None:
    """Delete an endpoint and its deliveries. Asks first (--yes does not)."""
    _run(cli, lambda s: endpoints.get(s, endpoint_id))  # one that is not there is not asked about
    confirm(yes, f"Delete webhook endpoint {endpoint_id} and its deliveries?")
    gone = _run(cli, lambda s: endpoints.remove(s, endpoint_id))
    cli.say(
        f"removed, with {counted(gone, 'delivery', 'deliveries')}",
        {"removed": endpoint_id, "deliveries": gone},
    )


def _switch(cli: Cli, endpoint_id: int, enabled: bool) -> list[str]:
    """``endpoints.enable``, its waiting webhooks sent; :class:`Nothing` if it was so already."""
    ids = _run(cli, lambda s: endpoints.enable(s, endpoint_id, enabled))
    if ids is None:
        raise Nothing(f"endpoint {endpoint_id} is {'en' if enabled else 'dis'}abled already")
    cli.send({Stage.WEBHOOK: ids})
    return ids


@command(webhooks, "disable")
@click.argument("endpoint_id", type=int)
def disable(cli: Cli, endpoint_id: int) -> None:
    """Send an endpoint nothing: no new webhooks, and its pending ones wait until enabled.
    Exits 1 when it is disabled already."""
    _switch(cli, endpoint_id, enabled=False)
    cli.say(f"endpoint {endpoint_id} disabled", {"id": endpoint_id, "enabled": False})


@command(webhooks, "enable")
@click.argument("endpoint_id", type=int)
def enable(cli: Cli, endpoint_id: int) -> None:
    """Send to a disabled endpoint again, its waiting webhooks at once. Exits 1 when it is
    enabled already."""
    ids = _switch(cli, endpoint_id, enabled=True)
    said = f"endpoint {endpoint_id} enabled; {counted(len(ids), 'waiting webhook')} sent"
    cli.say(said, {"id": endpoint_id, "enabled": True, "sent": ids})
