"""``dearmp submissions``: find submissions by state, campaign, age or supporter, showing no
personal data (a supporter is found by the keyed hash of their email, which is never stored,
printed or logged here); ``dearmp submission show``: one submission."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import click
import structlog
from rich.console import Console
from rich.table import Table
from rich.text import Text
from sqlalchemy import select

from workers.cli.base import Cli, Nothing, cell, command, json_option, main, pass_cli
from workers.database.models import Letter, OutboxItem, Submission
from workers.pipeline.states import OUTCOMES, State
from workers.privacy.hashing import mask_supporter, supporter_hash
from workers.wording import one_line, printable

COLUMNS = ("id", "campaign", "state", "created", "updated")


def iso_time(ctx: click.Context, param: click.Parameter, value: str | None) -> datetime | None:
    """An ISO 8601 date or time; without a zone, UTC."""
    if value is None:
        return None
    try:
        parsed = datetime.fromisoformat(value)
        return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)
    except (ValueError, OverflowError):  # (0001-01-01T00:00+01:00 is before year 1 in UTC)
        raise click.BadParameter(
            f"{value!r} is not an ISO 8601 date or time (e.g. 2026-12-01T09:00)"
        ) from None


@main.group()
def submissions() -> None:
    """Find submissions (no personal data shown)."""


@command(submissions, "list")
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
    query = select(
        Submission.id,
        Submission.campaign_slug,
        Submission.state,
        Submission.created_at,
        Submission.updated_at,
    )
    if states:
        query = query.where(Submission.state.in_(states))
    if campaign is not None:
        query = query.where(Submission.campaign_slug == campaign)
    if since is not None:
        query = query.where(Submission.created_at >= since)
    if email is not None:  # by the keyed hash, never the address
        query = query.where(Submission.supporter_hash == supporter_hash(cli.app.secret, email))
    query = query.order_by(Submission.created_at.desc(), Submission.id.desc()).limit(limit)
    with cli.session() as session:
        rows = [
            dict(zip(COLUMNS, (*r[:3], r[3].isoformat(), r[4].isoformat()), strict=True))
            for r in session.execute(query)
        ]
    table = Table(*COLUMNS)
    for row in rows:
        table.add_row(*(cell(row[column]) for column in COLUMNS))
    if rows or cli.as_json:
        cli.say(lambda: Console(width=200).print(table), rows)
    if not rows:
        raise Nothing("no submission matches these filters")


@main.group()
def submission() -> None:
    """One submission, for an operator."""


@submission.command("show")
@click.argument("submission_id")
@json_option
@click.option("--reveal", is_flag=True, help="The letter unmasked (the reveal is logged).")
@pass_cli
def show(cli: Cli, submission_id: str, reveal: bool = False) -> None:
    """A submission's state history, without personal data."""
    with cli.session() as session:
        sub = session.get(Submission, submission_id)
        if sub is None:
            raise click.ClickException(f"no submission {submission_id}")
        delivery = session.get(OutboxItem, submission_id)  # the letter's item
        payload = sub.payload

        def hide(text: str | None) -> str | None:
            """Their details hidden wherever they may be: servers' answers can quote them."""
            return text if reveal or not text else mask_supporter(text, payload)

        info: dict[str, Any] = {
            "id": sub.id,
            "campaign": sub.campaign_slug,
            "state": sub.state,
            "outcome": OUTCOMES[State(sub.state)],
            "rejection": sub.rejection,
            "failure_reason": hide(sub.failure_reason),
            "constituency": sub.constituency_code,
            "member_id": sub.member_id,
            "consent_logged_at": sub.consent_logged_at and sub.consent_logged_at.isoformat(),
            "delivery": delivery
            and {
                "status": delivery.status,
                "attempts": delivery.attempts,
                "response": hide(delivery.response),
                "error": hide(delivery.error),
            },
            "history": [
                {"state": e.state, "at": e.at.isoformat(), "detail": hide(e.detail)}
                for e in sub.events
            ],
        }
        letter = session.get(Letter, submission_id)
        if letter is not None:
            info["letter"] = {
                "message_id": letter.message_id,
                "to": f"{letter.to_name} <{letter.to_email}>",
                "subject": hide(letter.subject),
                "body": hide(letter.body_text or ""),
                "content_sha256": letter.content_sha256,
            }
    if reveal:
        structlog.get_logger("workers").warning("letter_revealed", submission_id=submission_id)
    cli.say(lambda: _print_submission(info), info)


def _print_submission(info: dict[str, Any]) -> None:
    console = Console()
    table = Table("at", "state", "detail", title=f"Submission {info['id']} ({info['state']})")
    for event in info["history"]:
        table.add_row(event["at"], event["state"], cell(event["detail"]))
    console.print(table)
    details = ("outcome", "rejection", "failure_reason", "constituency", "member_id")
    for key in (*details, "delivery", "letter"):
        value = info.get(key)
        if not value:
            continue
        if not isinstance(value, dict):
            console.print(Text(f"{key}: {one_line(str(value))}"))
            continue
        console.print(Text(f"{key}:", style="bold"))
        for name, item in value.items():
            if isinstance(item, str) and "\n" in item:  # the letter's body, line by line
                console.print(Text(f"  {name}:"))
                console.print(
                    Text("\n".join(f"    {line}" for line in printable(item).split("\n")))
                )
            else:
                console.print(Text(f"  {name}: {one_line('' if item is None else str(item))}"))


main.add_command(show, name="show")  # the short form of `dearmp submission show`
