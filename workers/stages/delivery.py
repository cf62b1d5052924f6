"""Delivery: the letter to the MP, an outbox item (:mod:`workers.outbox`) whose id is its
submission's. It is written from its stored row (a resend is the same email), waits for pauses,
quiet hours and the rate limits before it is claimed (costing no attempt), and its submission
moves to delivered, or failed with the reason, in the commit that ends its item.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from sqlalchemy import func, insert, select
from sqlalchemy.orm import Session

from config.settings import Settings, default
from schemas.campaign import CampaignDefinition
from workers.database.models import (
    ADDRESS_HEALTH,
    CAMPAIGNS,
    LETTERS,
    OUTBOX,
    SUBMISSIONS,
    OutboxItem,
    OutboxStatus,
    State,
    utcnow,
)
from workers.database.transitions import AlreadyMoved, At, advance, read_one
from workers.letters.definitions import get_definition
from workers.letters.mail import DkimSigner, Mailer, Outgoing, outgoing
from workers.letters.rate_limits import Limit, Limiter, seconds_until_open
from workers.mp.health import PAUSED
from workers.outbox.sending import Kind, send_again
from workers.receiving.addresses import ReturnAddresses
from workers.stages.stage import Deferred

KIND = KEY = "letter"  # the letter's outbox item: kind and key
PAUSED_LOOK = 600.0  # a paused letter looks again after this (resume: at once)


@dataclass(frozen=True)
class DeliveryPolicy:
    max_attempts: int = default("delivery_max_attempts")
    mp_limit: int = default("mp_limit")
    mp_limit_window: float = default("mp_limit_window")
    send_rate: float = default("send_rate_per_second")

    @classmethod
    def from_settings(cls, settings: Settings) -> DeliveryPolicy:
        return cls(
            max_attempts=settings.delivery_max_attempts,
            mp_limit=settings.mp_limit,
            mp_limit_window=settings.mp_limit_window,
            send_rate=settings.send_rate_per_second,
        )


def limits_for(
    policy: DeliveryPolicy, definition: CampaignDefinition, member_id: int | None, account: str
) -> list[Limit]:
    """Every limit that applies to one letter: per MP, per campaign and MP, per sending account."""
    limits = []
    if policy.mp_limit and member_id is not None:
        limits.append(Limit(f"mp:{member_id}", policy.mp_limit, policy.mp_limit_window))
    if definition.rate_limit and member_id is not None:
        rl = definition.rate_limit
        limits.append(
            Limit(f"campaign:{definition.slug}:mp:{member_id}", rl.per_mp, rl.window_seconds)
        )
    if rate := policy.send_rate:  # below one a second: one per interval
        count, window = (math.floor(rate), 1.0) if rate >= 1 else (1, 1 / rate)
        limits.append(Limit(f"account:{account}", count, window))
    return limits


# The letter's outbox item, written with the letter and the move to rendered (item_row).
NEW_ITEM = insert(OUTBOX)


def item_row(submission_id: str) -> dict[str, str]:
    return {"id": submission_id, "submission_id": submission_id, "key": KEY, "kind": KIND}


# Everything the letter is written from, in one statement.
_READ = select(
    SUBMISSIONS.c.id,
    SUBMISSIONS.c.state,
    SUBMISSIONS.c.campaign_slug,
    SUBMISSIONS.c.member_id,
    CAMPAIGNS.c.definition_sha256,
    CAMPAIGNS.c.paused_at,
    ADDRESS_HEALTH.c.status.label("address_status"),
    *LETTERS.c,
).select_from(
    SUBMISSIONS.join(LETTERS, LETTERS.c.submission_id == SUBMISSIONS.c.id)
    .outerjoin(CAMPAIGNS, CAMPAIGNS.c.slug == SUBMISSIONS.c.campaign_slug)
    .outerjoin(ADDRESS_HEALTH, ADDRESS_HEALTH.c.email == func.lower(LETTERS.c.to_email))
)


@dataclass(frozen=True)
class LetterMail:
    """A letter to send, and the limits whose slots it took."""

    submission_id: str
    mail: Outgoing
    limits: list[Limit]


@dataclass(frozen=True)
class LetterChannel:
    """The mailer, for letters."""

    mailer: Mailer

    def waiting(self) -> float:
        return self.mailer.waiting()

    def send(self, letter: LetterMail) -> object:
        return self.mailer.send(letter.mail)


def kind(
    mailer: Mailer,
    policy: DeliveryPolicy,
    limiter: Limiter | None,
    signer: DkimSigner | None,
    returns: ReturnAddresses | None,
) -> Kind:
    """The letter's kind of outbox item."""

    def compose(session: Session, item: OutboxItem) -> LetterMail | str:
        """The letter's bytes, once nothing makes it wait (:class:`Deferred`); or why it will
        not be sent."""
        found = read_one(session, _READ, item.submission_id)  # a message's letters: one statement
        if found is None:
            return "the letter is gone"
        if found.state != State.RENDERED:
            return f"the submission is {found.state}"
        definition = get_definition(session, found.campaign_slug, found.definition_sha256)
        if definition is None:
            return "the campaign is gone"
        wait_while_held(definition, found.paused_at is not None, found.address_status == PAUSED)
        limits = limits_for(policy, definition, found.member_id, mailer.name)
        wait_for_limits(limiter, item.submission_id, limits)
        bounce = returns.bounce(item.submission_id) if returns is not None else None
        return LetterMail(item.submission_id, outgoing(found, signer, bounce), limits)

    def sent(letter: LetterMail) -> None:
        """Its rate-limit slots dated from the moment it left (after its sent mark's commit:
        nothing stands between the server's answer and that)."""
        if limiter is not None and letter.limits:
            limiter.mark_sent(letter.submission_id, letter.limits)

    return Kind(
        compose,
        done=_done,
        channel=LetterChannel(mailer),
        max_attempts=policy.max_attempts,
        sent=sent,
    )


def wait_while_held(definition: CampaignDefinition, paused: bool, address_paused: bool) -> None:
    """What makes a letter (or an MP's digest) wait before it is claimed, costing no attempt
    (:class:`Deferred`): its campaign paused (`dearmp campaigns resume` sends it at once), its
    MP's address paused (`dearmp directory address EMAIL --ok`), the campaign's quiet hours."""
    if paused:
        raise Deferred(PAUSED_LOOK, "the campaign is paused")
    if address_paused:
        raise Deferred(PAUSED_LOOK, "the MP's address is paused")
    if quiet := definition.quiet_hours:
        wait = seconds_until_open(utcnow(), quiet.start, quiet.end)
        if wait > 0:
            raise Deferred(wait, "quiet hours")


def wait_for_limits(limiter: Limiter | None, key: str, limits: list[Limit]) -> None:
    """Take the limits' slots for ``key`` (a letter, a digest), or wait (:class:`Deferred`,
    costing no attempt) while one is full."""
    if limiter is not None and limits and (wait := limiter.reserve(key, limits)) > 0:
        raise Deferred(wait, "rate limit")


def moved_on(
    session: Session, submission_id: str, from_state: State, sent: bool, detail: str | None
) -> bool:
    """The submission moves on with its letter: delivered (``detail``), or failed with the
    reason; False if it was moved meanwhile (erased: withdrawn)."""
    try:
        advance(
            session,
            At(submission_id, from_state),
            State.DELIVERED if sent else State.FAILED,
            (detail or "")[:500],
            **({} if sent else {"failure_reason": (detail or "not sent")[:2000]}),
        )
    except AlreadyMoved:
        return False
    return True


def _done(session: Session, item: OutboxItem, status: str, detail: str | None) -> None:
    moved_on(session, item.submission_id, State.RENDERED, status == OutboxStatus.SENT, detail)


def reopen_failed(
    session: Session,
    reason: str | None = None,
    campaign: str | None = None,
    member_id: int | None = None,
    dry_run: bool = False,
) -> list[str]:
    """Failed letters back to ``rendered`` with a fresh count of attempts (the caller sends
    them to delivery after the commit): a mistake in configuration costs nothing once fixed.
    ``reason``: part of the recorded error; returns the submissions reopened (or that would be)."""
    query = (
        select(SUBMISSIONS.c.id)
        .select_from(SUBMISSIONS.join(OUTBOX, OUTBOX.c.id == SUBMISSIONS.c.id))
        .where(
            SUBMISSIONS.c.state == State.FAILED.value,
            OUTBOX.c.status.in_((OutboxStatus.FAILED.value, OutboxStatus.SKIPPED.value)),
            SUBMISSIONS.c.erased_at.is_(None),  # its letter is gone, or going
            SUBMISSIONS.c.scrubbed_at.is_(None),
        )
        .order_by(SUBMISSIONS.c.updated_at)
    )
    if reason:
        query = query.where(OUTBOX.c.error.contains(reason, autoescape=True))
    if campaign:
        query = query.where(SUBMISSIONS.c.campaign_slug == campaign)
    if member_id is not None:
        query = query.where(SUBMISSIONS.c.member_id == member_id)
    ids = list(session.scalars(query))
    if not dry_run:
        reopen(session, ids, ids, State.RENDERED, "delivery reopened by an operator")
    return ids


def reopen(
    session: Session, submission_ids: list[str], items: list[str], to: State, detail: str
) -> list[str]:
    """Failed submissions back to ``to``, and their outbox ``items`` to pending with a fresh
    count (the caller sends them after the commit); the items changed."""
    for submission_id in submission_ids:
        advance(session, At(submission_id, State.FAILED), to, detail, failure_reason=None)
    return send_again(session, items, (OutboxStatus.FAILED, OutboxStatus.SKIPPED))
