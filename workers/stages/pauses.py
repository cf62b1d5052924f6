"""Pauses an operator sets: a campaign's letters (its ``paused_at``), or every letter to one MP
address (its address-health row ``paused``, :mod:`workers.mp.health`), wait in the outbox,
never lost and counting no attempt, until resumed; then those waiting go at once. Delivery reads
both with the letter; ``dearmp health`` names every pause meanwhile.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Select, func, select, update
from sqlalchemy.orm import Session

from workers.database.models import (
    LETTERS,
    SUBMISSIONS,
    AddressHealth,
    Campaign,
    OutboxItem,
    OutboxStatus,
    utcnow,
)
from workers.database.transitions import rowcount
from workers.mp import health
from workers.outbox.sending import due_now
from workers.stages.digests import TO_MPS  # a digest's item's submission: its first letter's


@dataclass(frozen=True)
class Pause:
    what: str  # "campaign" or "address"
    name: str
    since: datetime
    reason: str | None
    waiting: int  # letters waiting for the resume


def _of_campaign(slug: str) -> Select[tuple[str]]:
    return select(SUBMISSIONS.c.id).where(SUBMISSIONS.c.campaign_slug == slug)


def _to_address(address: str) -> Select[tuple[str]]:
    return select(LETTERS.c.submission_id).where(
        func.lower(LETTERS.c.to_email) == health.key(address)
    )


def pause_campaign(session: Session, slug: str) -> bool:
    """Hold a campaign's letters. False if it was paused already; LookupError if no such one."""
    row = session.get(Campaign, slug, with_for_update=True)
    if row is None:
        raise LookupError(f"no campaign {slug}")
    if row.paused_at is not None:
        return False
    row.paused_at = utcnow()
    return True


def resume_campaign(session: Session, slug: str) -> list[str]:
    """End a campaign's pause: its waiting letters are due now (the caller sends them to
    delivery after the commit). LookupError if there is no such campaign or it is not paused."""
    found = session.execute(
        update(Campaign)
        .where(Campaign.slug == slug, Campaign.paused_at.is_not(None))
        .values(paused_at=None)
        .execution_options(synchronize_session=False)
    )
    if rowcount(found) != 1:
        raise LookupError(
            f"{slug} is not paused" if session.get(Campaign, slug) else f"no campaign {slug}"
        )
    return _due(session, _of_campaign(slug))


def pause_address(session: Session, address: str, reason: str) -> bool:
    """Hold every letter to ``address``. False if it was paused already; LookupError if it is
    marked failing (its new letters are held at resolution already)."""
    key = health.key(address)
    row = session.get(AddressHealth, key, with_for_update=True)
    if row is None:
        session.add(AddressHealth(email=key, status=health.PAUSED, reason=reason[:500]))
        return True
    if row.status == health.PAUSED:
        return False
    if row.status == health.FAILING:  # its letters are held already; its mark must stay
        raise LookupError(f"{address} is marked failing: `--ok` once it works, then pause it")
    row.status, row.reason, row.changed_at = health.PAUSED, reason[:500], utcnow()
    return True


def resume_address(session: Session, address: str) -> list[str]:
    """End an address's pause: its waiting letters are due now (the caller sends them after
    the commit). LookupError if it is not paused."""
    row = session.get(AddressHealth, health.key(address), with_for_update=True)
    if row is None or row.status != health.PAUSED:
        raise LookupError(f"{address} is not paused")
    row.status, row.reason, row.changed_at = health.OK, "resumed by an operator", utcnow()
    return _due(session, _to_address(address))


def _due(session: Session, of: Select[tuple[str]]) -> list[str]:
    """The letters, and MPs' digests, of the submissions ``of`` selects, due now."""
    return due_now(session, TO_MPS, of=of)


def _waiting(session: Session, of: Select[tuple[str]]) -> int:
    return (
        session.scalar(
            select(func.count())
            .select_from(OutboxItem)
            .where(
                OutboxItem.kind.in_(TO_MPS),
                OutboxItem.status == OutboxStatus.PENDING,
                OutboxItem.submission_id.in_(of),
            )
        )
        or 0
    )


def paused(session: Session) -> list[Pause]:
    """Every pause in force, campaigns first, with the letters waiting for it."""
    campaigns = session.execute(
        select(Campaign.slug, Campaign.paused_at)
        .where(Campaign.paused_at.is_not(None))
        .order_by(Campaign.slug)
    ).all()
    addresses = session.execute(
        select(AddressHealth.email, AddressHealth.changed_at, AddressHealth.reason)
        .where(AddressHealth.status == health.PAUSED)
        .order_by(AddressHealth.email)
    ).all()
    return [
        Pause("campaign", slug, since, None, _waiting(session, _of_campaign(slug)))
        for slug, since in campaigns
        if since is not None
    ] + [
        Pause("address", email, since, reason, _waiting(session, _to_address(email)))
        for email, since, reason in addresses
    ]
