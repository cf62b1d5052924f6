"""The MP's daily digest: with a campaign's ``digest`` policy for similar letters, the day's
near-identical letters to one MP go as one email (the common text once, then each constituent's
name, postcode, own words and reply address). Rendering leaves each letter ``in_digest``;
:func:`build_due` makes a digest per campaign and MP once a day; once it is sent its letters are
delivered and each supporter told, and a bounce of it returns them all (:func:`mates`).

A digest is composed from its letters' rows at each attempt, signed at its own Date: a resend
is the same bytes unless a constituent was erased or the campaign edited in between (then it
goes without them, or as the campaign is now).
"""

from __future__ import annotations

import re
from dataclasses import replace
from datetime import datetime, time
from typing import Any, TypeVar

from sqlalchemy import Select, exists, insert, select, update
from sqlalchemy.orm import Session

from schemas.campaign import CampaignDefinition, campaign_template
from workers.database.engine import insert_on_conflict
from workers.database.models import (
    AddressHealth,
    Campaign,
    Digest,
    Letter,
    LetterPrint,
    OutboxItem,
    OutboxStatus,
    State,
    Submission,
    utcnow,
)
from workers.database.transitions import AlreadyMoved, rowcount
from workers.letters import originality
from workers.letters.definitions import get_definition
from workers.letters.mail import DkimSigner, Draft, Mailer, from_domain, outgoing_email
from workers.letters.rate_limits import Limiter
from workers.mp import health
from workers.outbox.sending import Kind, enqueue
from workers.receiving.addresses import ReturnAddresses
from workers.stages import delivery
from workers.stages.comparison import letter_body
from workers.stages.rendering import SANDBOX, SANDBOX_NAME, list_id
from workers.wording import counted, one_line

KIND = KEY = "digest"
TO_MPS = (delivery.KIND, KIND)  # what goes to MPs: letters, and digests of them
_Query = TypeVar("_Query", bound=Select[*tuple[Any, ...]])
NOTICE = "digested"  # the supporter's notice that their letter went in the digest


def build_due(session: Session, now: datetime | None = None, force: bool = False) -> list[str]:
    """Make the digests that are due: per campaign and MP with letters waiting, from the
    campaign's ``digest_hour`` (UTC), at most one a day (``force``: now, for an operator). The
    new digests' ids, which are their outbox items' (the caller sends them after the commit).
    Letters rendered for another address (the sandbox's, while the campaign was in sandbox mode,
    or the MP's before a directory update) go in a digest of their own to that address."""
    now = now or utcnow()
    waiting = session.execute(
        select(Submission.campaign_slug, Submission.member_id, Letter.to_email, Submission.id)
        .join(LetterPrint, LetterPrint.submission_id == Submission.id)
        .join(Letter, Letter.submission_id == Submission.id)
        .where(Submission.state == State.IN_DIGEST, LetterPrint.digest_id.is_(None))
        .order_by(Submission.created_at, Submission.id)
    ).all()
    groups: dict[tuple[str, int, str], list[str]] = {}
    for slug, member_id, to_email, submission_id in waiting:
        if member_id is not None:  # a letter in a digest went to an MP resolution named
            groups.setdefault((slug, member_id, to_email), []).append(submission_id)
    today = datetime.combine(now.date(), time(0), now.tzinfo)
    made = []
    for (slug, member_id, to_email), ids in groups.items():
        definition = get_definition(session, slug)
        hour = definition.similar_letters.digest_hour if definition else 0
        sent_today = session.scalar(
            select(
                exists().where(
                    Digest.campaign_slug == slug,
                    Digest.member_id == member_id,
                    Digest.to_email == to_email,
                    Digest.created_at >= today,
                )
            )
        )
        if not force and (now.hour < hour or sent_today):
            continue
        made.append(_make(session, slug, member_id, ids, now))
    return made


def _make(session: Session, slug: str, member_id: int, ids: list[str], now: datetime) -> str:
    first = session.get(Letter, ids[0])
    assert first is not None  # stored by rendering with the move to in_digest
    digest = Digest(
        campaign_slug=slug,
        member_id=member_id,
        to_name=first.to_name,
        to_email=first.to_email,
        letters=len(ids),
        created_at=now,
    )
    session.add(digest)
    session.flush()
    taken = session.execute(
        update(LetterPrint)
        .where(LetterPrint.submission_id.in_(ids), LetterPrint.digest_id.is_(None))
        .values(digest_id=digest.id)
        .execution_options(synchronize_session=False)
    )
    if rowcount(taken) != len(ids):  # another pass took some: this one makes nothing
        raise AlreadyMoved(f"letters for {slug} to MP {member_id} went in another digest")
    session.execute(
        insert(OutboxItem).values(id=digest.id, submission_id=ids[0], key=KEY, kind=KIND)
    )
    return digest.id


def _with_letters(query: _Query) -> _Query:
    """``query`` over the digests' outbox items joined to their letters' submissions."""
    return (
        query.join(LetterPrint, LetterPrint.digest_id == OutboxItem.id)
        .join(Submission, Submission.id == LetterPrint.submission_id)
        .where(OutboxItem.kind == KIND)
    )


def stalled(session: Session) -> list[str]:
    """Digests that ended (sent, given up) with letters still waiting in them: the worker
    that sent one stopped before its letters moved on. Sent to delivery again, the outbox
    makes their move (as for a letter whose move was lost)."""
    return list(
        session.scalars(
            _with_letters(select(OutboxItem.id))
            .where(
                OutboxItem.status.not_in((OutboxStatus.PENDING, OutboxStatus.SENDING)),
                Submission.state == State.IN_DIGEST,
            )
            .distinct()
        )
    )


def reopen_failed(session: Session, dry_run: bool = False) -> list[str]:
    """Digests given up, back to waiting with a fresh count, their letters with them (the
    caller sends them to delivery after the commit): ``dearmp deliveries reopen``'s, for
    letters that went in a digest. The digests reopened (or that would be)."""
    failed = session.execute(
        _with_letters(select(OutboxItem.id, Submission.id)).where(
            OutboxItem.status.in_((OutboxStatus.FAILED, OutboxStatus.SKIPPED)),
            Submission.state == State.FAILED,
            Submission.erased_at.is_(None),
        )
    ).all()
    digest_ids = sorted({digest_id for digest_id, _ in failed})
    if dry_run:
        return digest_ids
    letters = [submission_id for _, submission_id in failed]
    return delivery.reopen(
        session, letters, digest_ids, State.IN_DIGEST, "digest reopened by an operator"
    )


_DIGEST_ID = re.compile(r"digest-([0-9a-f-]{36})@")


def letter_named(session: Session, message_id: str) -> str | None:
    """A letter of the digest a Message-ID names (``<digest-ID@domain>``), if one is there: a
    provider's report about the digest (Mailgun's) is about its letters (:func:`mates`)."""
    found = _DIGEST_ID.search(message_id)
    if found is None:
        return None
    return session.scalar(
        select(LetterPrint.submission_id)
        .where(LetterPrint.digest_id == found.group(1))
        .order_by(LetterPrint.created_at)
        .limit(1)
    )


def mates(session: Session, submission_id: str) -> list[str]:
    """The other letters that went in the same digest as ``submission_id``'s (none if it went
    on its own): a bounce of the digest returns them all."""
    digest_id = select(LetterPrint.digest_id).where(LetterPrint.submission_id == submission_id)
    return list(
        session.scalars(
            select(LetterPrint.submission_id).where(
                LetterPrint.digest_id == digest_id.scalar_subquery(),
                LetterPrint.submission_id != submission_id,
            )
        )
    )


def digest_of(session: Session, submission_id: str) -> str | None:
    """The digest the letter went in (or waits in), if it did: its outbox item's id."""
    return session.scalar(
        select(LetterPrint.digest_id).where(LetterPrint.submission_id == submission_id)
    )


def carriers(session: Session, submission_id: str) -> list[str]:
    """The outbox items that carry the letter: its own, and its digest's if it went in one."""
    return [i for i in (submission_id, digest_of(session, submission_id)) if i]


def message_id(session: Session, submission_id: str, letter_message_id: str) -> str | None:
    """The Message-ID of the digest the letter went in (on its letter's domain), if it did: a
    report about that email is about the letter."""
    digest_id = digest_of(session, submission_id)
    return None if digest_id is None else f"<digest-{digest_id}@{letter_message_id.split('@')[-1]}"


def draft(definition: CampaignDefinition, digest: Digest, letters: list[Any]) -> Draft:
    """The digest's email, from its letters' rows (submission, letter): the same rows, the
    same bytes. Letters written for the sandbox mailbox make a digest marked so, as they are."""
    first = letters[0].Submission
    recipient = first.recipient or {}
    mp_name = recipient.get("name") or digest.to_name
    context = {
        "mp": {"name": mp_name, "constituency": recipient.get("constituency", "")},
        "campaign": {"title": definition.title, "organisation": definition.organisation},
    }
    count, sandbox = len(letters), letters[0].Letter.to_name == SANDBOX_NAME
    suggested = originality.template(definition.draft_body)
    entries = []
    for number, row in enumerate(letters, 1):
        supporter = row.Submission.payload["supporter"]
        added = suggested.added(letter_body(definition, row.Submission.payload))
        entries.append(
            f"{number}. {supporter['name']}, {supporter['postcode']}\n"
            f"   Reply to: {row.Letter.reply_to}\n"
            + (
                "   What they wrote themselves:\n" + "\n".join(f'   "{p}"' for p in added)
                if added
                else "   (the campaign's letter, with no words of their own)"
            )
        )
    note = (
        f"{SANDBOX}Campaign '{definition.slug}' is in sandbox mode. This digest was meant for "
        f"{mp_name}, MP for {recipient.get('constituency', '')}.\n\n"
    )
    text = (
        (note if sandbox else "")
        + f"{campaign_template(definition.salutation).render(context)}\n\n"
        f"{count} of your constituents wrote to you through {definition.organisation} about "
        f'"{definition.title}". Each sent the campaign\'s suggested letter below, in whole or in '
        "part; after it, each constituent: their name and postcode, the passages they wrote "
        "themselves, and the address that reaches them.\n\n"
        f"The campaign's suggested letter:\n\n{definition.draft_body.strip()}\n\n"
        "Your constituents:\n\n" + "\n\n".join(entries) + "\n"
    )
    return Draft(
        from_name=one_line(definition.organisation, 120),
        from_email=str(definition.from_email),
        to_name=digest.to_name,
        to_email=digest.to_email,
        subject=one_line(
            f"{SANDBOX if sandbox else ''}{counted(count, 'constituent')} wrote to you: "
            f"{definition.title}",
            200,
        ),
        date=digest.created_at,
        message_id=f"<digest-{digest.id}@{from_domain(str(definition.from_email))}>",
        text=text,
        headers=(("List-Id", list_id(definition)),),
    )


def kind(
    mailer: Mailer,
    policy: delivery.DeliveryPolicy,
    limiter: Limiter | None,
    signer: DkimSigner | None,
    returns: ReturnAddresses | None,
) -> Kind:
    """The digest's kind of outbox item: sent as a letter (the per-MP limits, the letter's
    channel), its letters moved on in the commit that ends it."""

    def compose(session: Session, item: OutboxItem) -> delivery.LetterMail | str:
        digest = session.get(Digest, item.id)
        definition = get_definition(session, digest.campaign_slug) if digest else None
        if digest is None or definition is None:
            return "the digest or its campaign is gone"
        letters = list(  # those whose supporters were not erased, oldest first
            session.execute(
                select(Submission, Letter)
                .join(LetterPrint, LetterPrint.submission_id == Submission.id)
                .join(Letter, Letter.submission_id == Submission.id)
                .where(LetterPrint.digest_id == item.id, Submission.erased_at.is_(None))
                .order_by(Submission.created_at, Submission.id)
            )
        )
        if not letters:
            return "every letter in it was erased"
        campaign = session.get(Campaign, digest.campaign_slug)
        address = session.get(AddressHealth, health.key(digest.to_email))
        delivery.wait_while_held(
            definition,
            campaign is not None and campaign.paused_at is not None,
            address is not None and address.status == health.PAUSED,
        )
        limits = delivery.limits_for(policy, definition, digest.member_id, mailer.name)
        delivery.wait_for_limits(limiter, item.id, limits)
        # Its return address: its first letter's still there (a report names that letter, and
        # mates() the others; the item's own submission may have been erased since).
        first = letters[0].Submission.id
        bounce = returns.bounce(first) if returns is not None else None
        mail = outgoing_email(draft(definition, digest, letters), signer, bounce)
        return delivery.LetterMail(item.id, mail, limits)

    return replace(
        delivery.kind(mailer, policy, limiter, signer, returns), compose=compose, done=_done
    )


def _done(session: Session, item: OutboxItem, status: str, detail: str | None) -> None:
    """Its letters delivered (each with its letter item marked sent, for the survey) and their
    supporters told; or failed with the reason."""
    sent = status == OutboxStatus.SENT
    now, in_digest = utcnow(), f"in the MP's digest {item.id}"
    ids = session.scalars(select(LetterPrint.submission_id).where(LetterPrint.digest_id == item.id))
    for submission_id in ids.all():
        moved = delivery.moved_on(
            session, submission_id, State.IN_DIGEST, sent, in_digest if sent else detail
        )
        if moved and sent:
            session.execute(  # made again by a repair: there already
                insert_on_conflict(session, OutboxItem)
                .values(
                    **delivery.item_row(submission_id),
                    status=OutboxStatus.SENT,
                    sent_at=now,
                    response=in_digest,
                )
                .on_conflict_do_nothing()
            )
            enqueue(session, submission_id, NOTICE, NOTICE)


def notice_text(definition: CampaignDefinition, mp_name: str, count: int) -> str:
    """What a supporter is told when their letter went in the MP's digest of ``count``."""
    others = count - 1
    with_them = (
        f"in one email with the letter{'s' if others > 1 else ''} of "
        f"{counted(others, 'other constituent')} who wrote"
        if others
        else "in the email that gathers constituents' letters"
    )
    return (
        f'Your letter went to {mp_name} today, {with_them} about "{definition.title}".\n\n'
        "MPs' offices filter many copies of the same letter; one email that gives your name, "
        "your postcode and your own words is read. Replies from your MP come to you as "
        "usual.\n\n"
        f"{definition.organisation}\n"
    )
