"""``dearmp submissions``: find submissions by state, campaign, age or supporter, showing no
personal data: a supporter is found by the keyed hash of their email, which is never stored,
printed or logged here."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

import click
from rich.console import Console
from rich.table import Table
from sqlalchemy import select
from sqlalchemy.orm import Session

from workers.cli.base import Cli, Nothing, json_option, pass_cli
from workers.database.models import Submission
from workers.pipeline.states import State
from workers.privacy.hashing import supporter_hash

COLUMNS = ("id", "campaign", "state", "created", "updated")


@dataclass(frozen=True)
class Filters:
    states: tuple[str, ...] = ()
    campaign: str | None = None
    since: datetime | None = None
    supporter: str | None = None  # the keyed hash, never the address
    limit: int = 50


def find(session: Session, filters: Filters) -> list[dict[str, str]]:
    """Submissions matching every filter given, newest first: ids, campaign, state and times."""
    query = select(
        Submission.id,
        Submission.campaign_slug,
        Submission.state,
        Submission.created_at,
        Submission.updated_at,
    )
    if filters.states:
        query = query.where(Submission.state.in_(filters.states))
    if filters.campaign is not None:
        query = query.where(Submission.campaign_slug == filters.campaign)
    if filters.since is not None:
        query = query.where(Submission.created_at >= filters.since)
    if filters.supporter is not None:
        query = query.where(Submission.supporter_hash == filters.supporter)
    query = query.order_by(Submission.created_at.desc(), Submission.id.desc()).limit(filters.limit)
    return [
        dict(zip(COLUMNS, (r[0], r[1], r[2], r[3].isoformat(), r[4].isoformat()), strict=True))
        for r in session.execute(query)
    ]


def iso_time(ctx: click.Context, param: click.Parameter, value: str | None) -> datetime | None:
    """An ISO 8601 date or time; without a zone, UTC."""
    if value is None:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise click.BadParameter(
            f"{value!r} is not an ISO 8601 date or time (e.g. 2026-12-01T09:00)"
        ) from None
    return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)


@click.group()
def submissions() -> None:
    """Find submissions (no personal data shown)."""


@submissions.command("list")
@click.option(
    "--state",
    "states",
    multiple=True,
    type=click.Choice([s.value for s in State]),
    help="Only submissions in this state (repeatable).",
)
@click.option("--campaign", help="Only this campaign's (its slug).")
@click.option(
    "--since",
    callback=iso_time,
    metavar="ISO-TIME",
    help="Only those received at or after this time (without a zone: UTC).",
)
@click.option("--email", help="Only this supporter's (matched by its keyed hash; never shown).")
@click.option(
    "--limit", default=50, show_default=True, type=click.IntRange(min=1), help="At most this many."
)
@json_option
@pass_cli
def submissions_list(
    cli: Cli,
    states: tuple[str, ...],
    campaign: str | None,
    since: datetime | None,
    email: str | None,
    limit: int,
) -> None:
    """Submissions newest first: full id, campaign, state, received and last changed. A filter
    that matches nothing says so and exits 1."""
    from workers.database.engine import session_scope

    app = cli.app
    supporter = supporter_hash(app.secret, email) if email is not None else None
    filters = Filters(states, campaign, since, supporter, limit)
    with session_scope(app.sessions) as session:
        rows = find(session, filters)
    table = Table(*COLUMNS)
    for row in rows:
        table.add_row(*(row[column] for column in COLUMNS))
    if rows or cli.as_json:
        cli.say(lambda: Console(width=200).print(table), rows)
    if not rows:
        raise Nothing("no submission matches these filters")
