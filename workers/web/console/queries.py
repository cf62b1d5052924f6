"""What the console shows, read with the operations the command line uses (health, queues,
dead letters), and per campaign figures whose states and outcomes come from the pipeline table
(:mod:`workers.pipeline.states`). Plain functions: the views only render what they return."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

import redis
from sqlalchemy import case, func, select
from sqlalchemy.orm import Session

from workers.database.models import (
    Campaign,
    ConsentEvent,
    Constituency,
    Letter,
    LetterEvent,
    OutboxItem,
    OutboxStatus,
    Submission,
    utcnow,
)
from workers.logging import mask_text
from workers.mp.directory import current_version_id
from workers.pipeline import checks
from workers.pipeline.app import App
from workers.pipeline.dead_letters import QueueDepth, dead_counts, mail_pause, queue_depths
from workers.pipeline.heartbeat import live_workers
from workers.pipeline.states import OUTCOMES, SENT, STATES, State
from workers.privacy.hashing import mask_supporter
from workers.stages.consent import page_of

# Letters that reached the MP's server: delivered, and what may follow delivery (bounced).
ANSWERS = ("yes", "not_yet", "no")  # the survey's (workers.stages.survey)
CHART_DAYS = 30


@dataclass(frozen=True)
class Overview:
    status: str
    checks: list[checks.Check]
    depths: list[QueueDepth] | None  # None: Redis is away
    workers: list[dict[str, Any]]
    mail_pause: dict[str, str] | None


def overview(app: App, client: redis.Redis | None, namespace: str, why: str) -> Overview:
    """What `dearmp health` and `dearmp queues` say; ``client`` None: Redis away (``why``)."""
    if client is None:
        found = [checks.Check("redis", checks.DOWN, why)]
        return Overview(checks.overall(found), found, None, [], None)
    found = checks.run(app, client, namespace, max_dead=0, max_age=300.0)
    depths = queue_depths(client, namespace, dead_counts(app.sessions))
    return Overview(
        checks.overall(found),
        found,
        depths,
        live_workers(client, namespace),
        mail_pause(client, namespace),
    )


@dataclass(frozen=True)
class CampaignRow:
    slug: str
    title: str
    mode: str
    paused_at: datetime | None
    submissions: int


def _counts(session: Session, key: Any, *where: Any) -> dict[Any, int]:
    """How many rows per value of ``key``."""
    rows = session.execute(select(key, func.count()).where(*where).group_by(key))
    return {value: int(n) for value, n in rows}


def campaigns(session: Session) -> list[CampaignRow]:
    counts = _counts(session, Submission.campaign_slug)
    rows = session.execute(
        select(Campaign.slug, Campaign.title, Campaign.mode, Campaign.paused_at).order_by(
            Campaign.slug
        )
    ).all()
    return [CampaignRow(*row, submissions=counts.get(row.slug, 0)) for row in rows]


def campaign_page(session: Session, slug: str) -> dict[str, Any] | None:
    """Everything a campaign's page shows; None if there is no such campaign."""
    row = next((c for c in campaigns(session) if c.slug == slug), None)
    if row is None:
        return None
    return {
        "campaign": row,
        "states": by_state(session, slug),
        "seats": by_constituency(session, slug),
        "days": per_day(session, slug),
        "sources": sources(session, slug),
        "recent": recent(session, slug),
    }


@dataclass(frozen=True)
class StateCount:
    state: str
    outcome: str
    count: int


def by_state(session: Session, slug: str) -> list[StateCount]:
    """Every state of the pipeline table in its order, with its outcome and how many are in it."""
    counts = _counts(session, Submission.state, Submission.campaign_slug == slug)
    return [StateCount(s.value, OUTCOMES[s], counts.get(s.value, 0)) for s in STATES]


@dataclass(frozen=True)
class Seat:
    name: str
    submissions: int
    delivered: int
    bounced: int
    replied: int
    survey: dict[str, int]


def by_constituency(session: Session, slug: str) -> list[Seat]:
    """Per constituency: submissions, letters delivered (bounced ones included: they were
    sent), bounced, replied to, and the survey's answers; the most submissions first."""
    replied = select(LetterEvent.submission_id).where(LetterEvent.kind == "reply")
    survey = (
        select(LetterEvent.submission_id, LetterEvent.detail)
        .where(LetterEvent.kind == "survey")
        .subquery()
    )

    version = current_version_id(session)
    named = (Constituency.gss_code == Submission.constituency_code) & (
        Constituency.version_id == version
    )

    def count_if(condition: Any) -> Any:
        return func.sum(case((condition, 1), else_=0))

    rows = session.execute(
        select(
            Submission.constituency_code,
            Constituency.name,
            func.count(),
            count_if(Submission.state.in_(SENT)),
            count_if(Submission.state == State.BOUNCED),
            count_if(Submission.id.in_(replied)),
            *(count_if(survey.c.detail == answer) for answer in ANSWERS),
        )
        .outerjoin(survey, survey.c.submission_id == Submission.id)
        .outerjoin(Constituency, named)
        .where(Submission.campaign_slug == slug)
        .group_by(Submission.constituency_code, Constituency.name)
        .order_by(func.count().desc(), Submission.constituency_code)
    ).all()
    return [
        Seat(
            name=(name or code) if code else "(not yet resolved)",
            submissions=int(total),
            delivered=int(delivered or 0),
            bounced=int(bounced or 0),
            replied=int(replies or 0),
            survey={a: int(n or 0) for a, n in zip(ANSWERS, answers, strict=True)},
        )
        for code, name, total, delivered, bounced, replies, *answers in rows
    ]


@dataclass(frozen=True)
class Day:
    day: date
    received: int
    sent: int


def per_day(session: Session, slug: str, days: int = CHART_DAYS) -> list[Day]:
    """Submissions received and letters sent per day (UTC) over the last ``days`` days."""
    start = (utcnow() - timedelta(days=days - 1)).date()
    since = datetime.combine(start, datetime.min.time(), UTC)
    ours = Submission.campaign_slug == slug
    received = _by_day(session, Submission.created_at, since, ours)
    sent = _by_day(
        session,
        OutboxItem.sent_at,
        since,
        ours,
        OutboxItem.kind == "letter",
        OutboxItem.status == OutboxStatus.SENT,
        OutboxItem.submission_id == Submission.id,
    )
    return [
        Day(d, received.get(d, 0), sent.get(d, 0))
        for d in (start + timedelta(days=n) for n in range(days))
    ]


def _by_day(session: Session, column: Any, since: datetime, *where: Any) -> dict[date, int]:
    # PostgreSQL's date of a time with zone is in the session's TimeZone: the UTC day asked.
    utc = func.timezone("UTC", column) if session.get_bind().dialect.name != "sqlite" else column
    counts = _counts(session, func.date(utc), column >= since, *where)
    # SQLite gives text, PostgreSQL a date.
    return {d if isinstance(d, date) else date.fromisoformat(str(d)): n for d, n in counts.items()}


def sources(session: Session, slug: str, limit: int = 20) -> list[tuple[str, int]]:
    """Where supporters wrote from: the page recorded with their consent (the consent ledger's
    ``source_url``), as host and path only (a query string may carry anything), masked."""
    rows = session.execute(
        select(ConsentEvent.source_url, func.count(func.distinct(ConsentEvent.submission_id)))
        .where(ConsentEvent.campaign_slug == slug, ConsentEvent.submission_id.is_not(None))
        .group_by(ConsentEvent.source_url)
    ).all()
    found: Counter[str] = Counter()
    for url, count in rows:
        found[_page(url)] += int(count)
    return sorted(found.items(), key=lambda item: (-item[1], item[0]))[:limit]


def _page(url: str | None) -> str:
    """The page that asked, as the consent ledger keeps it (no query, fragment or credentials:
    they may carry the supporter's name or address), masked."""
    if not url:
        return "(not recorded)"
    return mask_text(page_of(url) or "(unreadable)")[:200]


def recent(session: Session, slug: str, limit: int = 20) -> list[tuple[str, str, datetime]]:
    """The campaign's newest submissions: id, state and when received (nothing personal)."""
    query = (
        select(Submission.id, Submission.state, Submission.created_at)
        .where(Submission.campaign_slug == slug)
        .order_by(Submission.created_at.desc(), Submission.id.desc())
        .limit(limit)
    )
    return list(session.execute(query).all())


HIDDEN = "[hidden]"


def record(session: Session, submission_id: str, reveal: bool) -> dict[str, Any] | None:
    """One submission for an operator: its history, and the supporter's details and letter,
    masked unless ``reveal`` (the caller logs a reveal)."""
    sub = session.get(Submission, submission_id)
    if sub is None:
        return None
    payload = sub.payload or {}
    supporter = payload.get("supporter") or {}
    shown = ("name", "email", "phone", "postcode", "address_lines")

    def hide(text: str) -> str:
        return text if reveal else mask_supporter(text, payload)

    details = {
        key: (supporter.get(key) if reveal else HIDDEN) for key in shown if supporter.get(key)
    }
    letter = session.get(Letter, submission_id)
    return {
        "id": sub.id,
        "campaign": sub.campaign_slug,
        "state": sub.state,
        "outcome": OUTCOMES.get(State(sub.state), "") if sub.state in STATES else "",
        "constituency": sub.constituency_code,
        "created_at": sub.created_at,
        "failure_reason": hide(sub.failure_reason) if sub.failure_reason else None,
        "erased": sub.erased_at is not None,
        "revealed": reveal,
        "supporter": details,
        "source": _page(payload.get("source_url")) if not reveal else payload.get("source_url"),
        "letter": letter
        and {
            "to": f"{letter.to_name} <{letter.to_email}>",
            "subject": hide(letter.subject),
            "body": hide(letter.body_text or ""),
        },
        "history": [(e.at, e.state, hide(e.detail or "")) for e in sub.events],
    }
