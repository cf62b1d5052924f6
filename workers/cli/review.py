"""``dearmp review``: letters held because they are near-identical to many others to the same MP
(campaigns whose ``similar_letters`` policy is ``hold``), and what the comparison found."""

from __future__ import annotations

import json
from typing import Any

import click
from sqlalchemy import case, func, select

from workers.cli.base import Cli, pass_cli
from workers.database.engine import session_scope
from workers.database.models import LetterPrint, State, Submission
from workers.pipeline.dispatch import dispatch_groups
from workers.stages import comparison
from workers.stages.stage import Stage

# The own-words shares a report counts letters in, as [low, high) in per cent.
BUCKETS = ((0, 10), (10, 25), (25, 50), (50, 101))


@click.group()
def review() -> None:
    """Letters held for review, and what the comparison of letters found."""


def _echo(as_json: bool, text: str, data: Any) -> None:
    click.echo(json.dumps(data, indent=2) if as_json else text)


@review.command("list")
@click.option("--campaign", help="Only this campaign's letters.")
@click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout.")
@pass_cli
def review_list(cli: Cli, campaign: str | None, as_json: bool) -> None:
    """Letters waiting for review, oldest first: near-identical letters to the same MP, and the
    share in the supporter's own words."""
    query = (
        select(Submission.id, Submission.campaign_slug, Submission.member_id, LetterPrint)
        .join(LetterPrint, LetterPrint.submission_id == Submission.id)
        .where(Submission.state == State.IN_REVIEW)
        .order_by(Submission.created_at)
    )
    if campaign:
        query = query.where(Submission.campaign_slug == campaign)
    with session_scope(cli.app.sessions) as session:
        rows = [
            {
                "id": sid,
                "campaign": slug,
                "member_id": member,
                "own_words": round(found.own_words * 100),
                "similar_recent": found.similar_recent,
                "compared_at": found.created_at.isoformat(),
            }
            for sid, slug, member, found in session.execute(query)
        ]
    lines = [
        f"{r['id']}  {r['campaign']}  MP {r['member_id']}  {r['own_words']}% own words  "
        f"{r['similar_recent']} near-identical"
        for r in rows
    ]
    _echo(as_json, "\n".join([*lines, f"{len(rows)} letters in review"]), rows)


@review.command("release")
@click.argument("ids", nargs=-1, required=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout.")
@pass_cli
def review_release(cli: Cli, ids: tuple[str, ...], as_json: bool) -> None:
    """Send letters held for review on to their MPs. Exits 1 if one was not in review."""
    with session_scope(cli.app.sessions) as session:
        released = [sid for sid in ids if comparison.release(session, sid)]
    if released:
        dispatch_groups(cli.broker, {Stage.RENDER: released})  # after the commit
    missed = [sid for sid in ids if sid not in released]
    text = f"released {len(released)} letters" + (
        f"; not in review: {', '.join(missed)}" if missed else ""
    )
    _echo(as_json, text, {"released": released, "not_in_review": missed})
    if missed:
        raise SystemExit(1)


@review.command("reject")
@click.argument("submission_id")
@click.option("--reason", required=True, help="What the supporter is told (no personal data).")
@click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout.")
@pass_cli
def review_reject(cli: Cli, submission_id: str, reason: str, as_json: bool) -> None:
    """Reject a letter held for review; the supporter's status page gives ``--reason``."""
    if not reason.strip():
        raise click.UsageError("--reason must say something to the supporter")
    with session_scope(cli.app.sessions) as session:
        rejected = comparison.reject(session, submission_id, reason.strip())
    if not rejected:
        raise click.ClickException(f"{submission_id} is not in review")
    _echo(as_json, f"{submission_id} rejected", {"rejected": submission_id})


@review.command("report")
@click.argument("campaign")
@click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout.")
@pass_cli
def review_report(cli: Cli, campaign: str, as_json: bool) -> None:
    """A campaign's letters by their share of the supporter's own words, and per MP: letters
    compared, sent on their own, held for review, and their average share of own words."""
    share = LetterPrint.own_words * 100
    held = func.sum(case((LetterPrint.decision == "hold", 1), else_=0))
    with session_scope(cli.app.sessions) as session:
        buckets = {
            f"{low}-{min(high, 100)}%": session.scalar(
                select(func.count())
                .select_from(LetterPrint)
                .where(LetterPrint.campaign_slug == campaign, share >= low, share < high)
            )
            or 0
            for low, high in BUCKETS
        }
        per_mp = [
            {
                "member_id": member,
                "letters": count,
                "sent_on_their_own": count - int(holds or 0),
                "held": int(holds or 0),
                "average_own_words": round(float(average or 0) * 100),
            }
            for member, count, holds, average in session.execute(
                select(LetterPrint.member_id, func.count(), held, func.avg(LetterPrint.own_words))
                .where(LetterPrint.campaign_slug == campaign)
                .group_by(LetterPrint.member_id)
                .order_by(func.count().desc())
            )
        ]
    if not per_mp:
        raise click.ClickException(f"no letters of {campaign} have been compared")
    text = "\n".join(
        [
            "own words: " + ", ".join(f"{k} {v}" for k, v in buckets.items()),
            *(
                f"MP {r['member_id']}: {r['letters']} letters, {r['sent_on_their_own']} sent on "
                f"their own, {r['held']} held, {r['average_own_words']}% own words on average"
                for r in per_mp
            ),
        ]
    )
    _echo(as_json, text, {"campaign": campaign, "own_words": buckets, "per_mp": per_mp})
