"""What became of the letters per campaign and MP (delivered, returned, acknowledged, replied,
survey answers), and resending an MP's returned letters to a mended address as new messages (a
late report naming the old Message-ID cannot return the new one)."""

from __future__ import annotations

import secrets
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import ColumnElement, delete, select, update
from sqlalchemy.orm import Session

from schemas.submission import check_email
from workers.database.models import (
    Letter,
    LetterEvent,
    LetterPrint,
    OutboxItem,
    State,
    Submission,
    utcnow,
)
from workers.database.transitions import At, advance
from workers.letters.mail import DkimSigner, wire_address
from workers.pipeline.states import SENT
from workers.stages.rendering import RenderedLetter


@dataclass
class Row:
    campaign: str
    member_id: int | None
    mp: str
    delivered: int = 0  # reached the MP's server (bounced ones included: they were sent)
    bounced: int = 0  # returned, and not resent since
    acknowledged: int = 0  # an automatic reply came back
    replied: int = 0  # a person's reply was detected
    survey: dict[str, int] = field(default_factory=lambda: {"yes": 0, "not_yet": 0, "no": 0})


def report(session: Session, campaign: str | None = None) -> list[Row]:
    """One row per campaign and MP, and a total row per campaign (``member_id`` None)."""
    where: list[ColumnElement[bool]] = [Submission.state.in_(SENT)]
    if campaign:
        where.append(Submission.campaign_slug == campaign)
    sent = select(
        Submission.id,
        Submission.campaign_slug,
        Submission.member_id,
        Submission.recipient,
        Submission.state,
    ).where(*where)
    letters = {
        sid: (slug, member_id, str((recipient or {}).get("name") or ""), state)
        for sid, slug, member_id, recipient, state in session.execute(sent)
    }
    events: dict[str, dict[str, Any]] = defaultdict(dict)
    if letters:
        query = (
            select(LetterEvent.submission_id, LetterEvent.kind, LetterEvent.detail)
            .join(Submission, Submission.id == LetterEvent.submission_id)
            .where(*where)
            .order_by(LetterEvent.id)
        )
        for sid, kind, detail in session.execute(query):
            events[sid][kind] = detail if kind == "survey" else True  # the latest answer
    rows: dict[tuple[str, int | None], Row] = {}
    for sid, (slug, member_id, name, state) in letters.items():
        for key in ((slug, member_id), (slug, None)):
            row = rows.get(key)
            if row is None:
                row = rows[key] = Row(slug, key[1], name if key[1] is not None else "(all MPs)")
            row.delivered += 1
            seen = events.get(sid, {})
            # By its state: a letter returned, resent and delivered is delivered.
            row.bounced += state == State.BOUNCED
            row.acknowledged += "auto_reply" in seen
            row.replied += "reply" in seen
            answer = seen.get("survey")
            if answer in row.survey:
                row.survey[answer] += 1
    return sorted(rows.values(), key=lambda r: (r.campaign, r.member_id is not None, r.mp))


def resend_bounced(
    session: Session,
    member_id: int,
    to: str,
    dry_run: bool = False,
    signer: DkimSigner | None = None,
) -> list[str]:
    """An MP's returned letters, to be sent again to ``to``: each moves from ``bounced`` to
    ``resolved`` once with the new address, and its letter becomes a new message with its
    delivery to do again. The caller sends them to rendering after the commit. Returns the
    submissions (or those that would be)."""
    try:
        address = check_email(to)  # the rule for every address a letter goes to
    except ValueError as exc:
        raise ValueError(f"not an email address: {exc}") from None
    ids = list(
        session.scalars(
            select(Submission.id)
            .where(
                Submission.state == State.BOUNCED,
                Submission.member_id == member_id,
                Submission.erased_at.is_(None),  # its letter is gone: never sent again
                Submission.scrubbed_at.is_(None),
            )
            .order_by(Submission.updated_at)
        )
    )
    if dry_run:
        return ids
    for submission_id in ids:
        submission = session.get(Submission, submission_id)
        if submission is None:
            continue
        recipient = dict(submission.recipient or {})
        returned_to = str(recipient.get("email") or "")
        recipient["email"] = address
        advance(
            session,
            At(submission_id, State.BOUNCED),
            State.COMPARED,  # to rendering, as it was compared already
            "returned letter to be sent again to a corrected address",
            recipient=recipient,
            failure_reason=None,
        )
        # Its item goes: rendering writes the letter's item afresh with the move to rendered.
        session.execute(delete(OutboxItem).where(OutboxItem.id == submission_id))
        # Sent again on its own: no longer one of a digest's letters (a later bounce of it
        # returns it alone).
        session.execute(
            update(LetterPrint)
            .where(LetterPrint.submission_id == submission_id)
            .values(digest_id=None)
        )
        letter = session.get(Letter, submission_id)
        if letter is None:  # rendered afresh
            continue
        if letter.to_email.lower() == returned_to.lower():  # not a sandbox copy
            letter.to_email = address
        readdress(letter, signer)
    return ids


def readdress(letter: Letter, signer: DkimSigner | None = None) -> None:
    """Make a stored letter a new message: a new Message-ID and Date, its content hash, and its
    signature made again (or none, and the delivery signs it when it goes)."""
    domain = wire_address(letter.from_email).rsplit("@", 1)[1]
    letter.message_id = f"<{letter.submission_id}@resent-{secrets.token_hex(4)}.{domain}>"
    letter.created_at = utcnow()
    letter.content_sha256 = RenderedLetter(
        subject=letter.subject,
        body_text=letter.body_text or "",
        body_html=letter.body_html,
        from_name=letter.from_name,
        from_email=letter.from_email,
        reply_to=letter.reply_to or "",
        to_name=letter.to_name,
        to_email=letter.to_email,
        message_id=letter.message_id,
    ).content_sha256
    letter.dkim_signature = signer.letter_signature(letter) if signer is not None else None
