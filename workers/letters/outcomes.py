"""What became of the letters: per campaign and MP, delivered, returned, acknowledged, replied,
and the supporters' survey answers; and resending an MP's returned letters to a mended address.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict, dataclass, field
from typing import Any

from email_validator import EmailNotValidError, validate_email
from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from workers.database.models import Delivery, Letter, LetterEvent, State, Submission
from workers.database.transitions import At, advance


@dataclass
class Row:
    campaign: str
    member_id: int | None
    mp: str
    delivered: int = 0  # reached the MP's server (bounced ones included: they were sent)
    bounced: int = 0
    acknowledged: int = 0  # an automatic reply came back
    replied: int = 0  # a person's reply was detected
    survey: dict[str, int] = field(default_factory=lambda: {"yes": 0, "not_yet": 0, "no": 0})

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def report(session: Session, campaign: str | None = None) -> list[Row]:
    """One row per campaign and MP, and a total row per campaign (``member_id`` None)."""
    sent = select(
        Submission.id, Submission.campaign_slug, Submission.member_id, Submission.recipient
    ).where(Submission.state.in_([State.DELIVERED.value, State.BOUNCED.value]))
    if campaign:
        sent = sent.where(Submission.campaign_slug == campaign)
    letters = {
        sid: (slug, member_id, str((recipient or {}).get("name") or ""))
        for sid, slug, member_id, recipient in session.execute(sent)
    }
    events: dict[str, dict[str, Any]] = defaultdict(dict)
    if letters:
        query = (
            select(LetterEvent.submission_id, LetterEvent.kind, LetterEvent.detail)
            .join(Submission, Submission.id == LetterEvent.submission_id)
            .where(Submission.state.in_([State.DELIVERED.value, State.BOUNCED.value]))
            .order_by(LetterEvent.id)
        )
        if campaign:
            query = query.where(Submission.campaign_slug == campaign)
        for sid, kind, detail in session.execute(query):
            events[sid][kind] = detail if kind == "survey" else True  # the latest answer
    rows: dict[tuple[str, int | None], Row] = {}
    for sid, (slug, member_id, name) in letters.items():
        for key in ((slug, member_id), (slug, None)):
            row = rows.get(key)
            if row is None:
                row = rows[key] = Row(slug, key[1], name if key[1] is not None else "(all MPs)")
            row.delivered += 1
            seen = events.get(sid, {})
            row.bounced += "bounce" in seen
            row.acknowledged += "auto_reply" in seen
            row.replied += "reply" in seen
            answer = seen.get("survey")
            if answer in row.survey:
                row.survey[answer] += 1
    return sorted(rows.values(), key=lambda r: (r.campaign, r.member_id is not None, r.mp))


def bounced_letters(session: Session, member_id: int) -> list[str]:
    return list(
        session.scalars(
            select(Submission.id)
            .where(Submission.state == State.BOUNCED, Submission.member_id == member_id)
            .order_by(Submission.updated_at)
        )
    )


def resend_bounced(session: Session, member_id: int, to: str, dry_run: bool = False) -> list[str]:
    """An MP's returned letters, to be written again to ``to`` (a mended address): each moves
    from ``bounced`` to ``resolved`` once (the guarded move), its returned letter removed and
    the new address recorded; the caller sends them to rendering after the commit. The address
    is marked ok. Returns the submissions (or those that would be)."""
    try:
        address = validate_email(to, check_deliverability=False).normalized
    except EmailNotValidError as exc:
        raise ValueError(f"not an email address: {exc}") from None
    ids = bounced_letters(session, member_id)
    if dry_run:
        return ids
    for submission_id in ids:
        submission = session.get(Submission, submission_id)
        if submission is None:
            continue
        recipient = dict(submission.recipient or {})
        recipient["email"] = address
        advance(
            session,
            At(submission_id, State.BOUNCED),
            State.RESOLVED,
            "returned letter to be sent again to a corrected address",
            recipient=recipient,
            failure_reason=None,
        )
        session.execute(delete(Delivery).where(Delivery.submission_id == submission_id))
        session.execute(delete(Letter).where(Letter.submission_id == submission_id))
    return ids
