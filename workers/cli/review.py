"""``dearmp review``: letters held because they are near-identical to many others to the same MP
(campaigns whose ``similar_letters`` policy is ``hold``), the MPs' daily digests (``digest``),
and what the comparison found."""

from __future__ import annotations

from datetime import timedelta

import click
from sqlalchemy import case, func, select

from schemas.campaign import SimilarLetters
from workers.cli.base import Cli, command, confirm, main, yes_option
from workers.database.models import LetterPrint, State, Submission, utcnow
from workers.letters.definitions import get_definition
from workers.stages import comparison, digests
from workers.stages.stage import Stage
from workers.wording import counted

# The own-words shares a report counts letters in, as [low, high) in per cent.
BUCKETS = ((0, 10), (10, 25), (25, 50), (50, 101))


@main.group()
def review() -> None:
    """Letters held for review, and what the comparison of letters found."""


def _in_review(cli: Cli, ids: tuple[str, ...]) -> set[str]:
    """Those of ``ids`` held for review now."""
    query = select(Submission.id).where(Submission.id.in_(ids), Submission.state == State.IN_REVIEW)
    with cli.session() as session:
        return set(session.scalars(query))


@command(review, "list")
@click.option("--campaign", help="Only this campaign's letters.")
def review_list(cli: Cli, campaign: str | None) -> None:
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
    with cli.session() as session:
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
    cli.say("\n".join([*lines, f"{counted(len(rows), 'letter')} in review"]), rows)


@command(review, "release")
@click.argument("ids", nargs=-1, required=True)
@yes_option
def review_release(cli: Cli, ids: tuple[str, ...], yes: bool) -> None:
    """Send letters held for review on to their MPs. Asks first (--yes does not); exits 1 if
    one was not in review."""
    held = _in_review(cli, ids)
    if held:
        confirm(yes, f"Send {counted(len(held), 'letter')} held for review on to their MPs?")
    with cli.session() as session:
        released = [sid for sid in ids if comparison.release(session, sid)]
    cli.send({Stage.RENDER: released})
    missed = [sid for sid in ids if sid not in released]
    text = f"released {counted(len(released), 'letter')}" + (
        f"; not in review: {', '.join(missed)}" if missed else ""
    )
    cli.say(text, {"released": released, "not_in_review": missed})
    if missed:
        raise SystemExit(1)


@command(review, "reject")
@click.argument("submission_id")
@click.option("--reason", required=True, help="What the supporter is told (no personal data).")
@yes_option
def review_reject(cli: Cli, submission_id: str, reason: str, yes: bool) -> None:
    """Reject a letter held for review; the supporter's status page gives ``--reason``. Asks
    first (--yes does not)."""
    if not reason.strip():
        raise click.UsageError("--reason must say something to the supporter")
    if not _in_review(cli, (submission_id,)):
        raise click.ClickException(f"{submission_id} is not in review")
    confirm(yes, f"Reject letter {submission_id} (it is never sent)?")
    with cli.session() as session:
        rejected = comparison.reject(session, submission_id, reason.strip())
    if not rejected:
        raise click.ClickException(f"{submission_id} is not in review")
    cli.say(f"{submission_id} rejected", {"rejected": submission_id})


@command(review, "digest")
@click.option("--now", is_flag=True, help="Make them now, whatever the campaigns' digest hour.")
def review_digest(cli: Cli, now: bool) -> None:
    """Make the MPs' digests that are due (the reconciler does this each pass), or every one
    with letters waiting (``--now``), and send them. Exits 1 when none was made."""
    with cli.session() as session:
        made = digests.build_due(session, force=now)
    cli.send({Stage.DELIVER: made})
    cli.say(f"{counted(len(made), 'digest')} made", {"digests": made})
    if not made:
        raise SystemExit(1)


@command(review, "report")
@click.argument("campaign")
def review_report(cli: Cli, campaign: str) -> None:
    """A campaign's letters by their share of the supporter's own words, and per MP: letters
    compared, sent on their own, held for review, put in digests, and their average share of
    own words; and the letters near-identical to a letter to another MP."""
    share, of_campaign = LetterPrint.own_words * 100, LetterPrint.campaign_slug == campaign
    held, digested = (
        func.sum(case((LetterPrint.decision == decision, 1), else_=0))
        for decision in ("hold", "digest")
    )
    per_mp_query = (
        select(LetterPrint.member_id, func.count(), held, digested, func.avg(LetterPrint.own_words))
        .where(of_campaign)
        .group_by(LetterPrint.member_id)
        .order_by(func.count().desc())
    )
    with cli.session() as session:
        buckets = {
            f"{low}-{min(high, 100)}%": session.scalar(
                select(func.count()).where(of_campaign, share >= low, share < high)
            )
            or 0
            for low, high in BUCKETS
        }
        per_mp = []
        for member, count, holds, in_digests, average in session.execute(per_mp_query):
            holds, in_digests = int(holds or 0), int(in_digests or 0)
            per_mp.append(
                {
                    "member_id": member,
                    "letters": count,
                    "sent_on_their_own": count - holds - in_digests,
                    "held": holds,
                    "digested": in_digests,
                    "average_own_words": round(float(average or 0) * 100),
                }
            )
        definition = get_definition(session, campaign)
        rules = definition.similar_letters if definition else SimilarLetters()
        since = utcnow() - timedelta(days=rules.window_days)
        anywhere = comparison.near_identical_anywhere(session, campaign, rules.threshold, since)
    if not per_mp:
        raise click.ClickException(f"no letters of {campaign} have been compared")
    text = "\n".join(
        [
            "own words: " + ", ".join(f"{k} {v}" for k, v in buckets.items()),
            f"near-identical to a letter to another MP: {anywhere}",
            *(
                f"MP {r['member_id']}: {counted(r['letters'], 'letter')}, "
                f"{r['sent_on_their_own']} sent on their own, {r['held']} held, "
                f"{r['digested']} in digests, "
                f"{r['average_own_words']}% own words on average"
                for r in per_mp
            ),
        ]
    )
    said = {"own_words": buckets, "near_identical_to_other_mps": anywhere, "per_mp": per_mp}
    cli.say(text, {"campaign": campaign, **said})
