"""Rendering: the campaign's template and the supporter's words become one stored letter.

Templates belong to the campaign and run in Jinja2's sandbox. What the supporter typed is passed
in as data (``body``; ``answers``: ``key``, ``question`` and ``text`` of each answered question,
in the campaign's order) and never parsed as a template: ``{{ 7*7 }}`` arrives as written.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from email.utils import formataddr
from typing import Any

from sqlalchemy import insert
from sqlalchemy.orm import Session

from schemas.campaign import CampaignDefinition, campaign_template
from workers.database.models import (
    LETTER_PRINTS,
    LETTERS,
    SUBMISSIONS,
    Constituency,
    Letter,
    Member,
    State,
    utcnow,
)
from workers.database.transitions import (
    Apply,
    advance,
    done,
    move,
    one,
    read_one,
    submission_read,
    writes_of,
)
from workers.letters.definitions import get_definition
from workers.letters.mail import DkimSigner
from workers.receiving.addresses import ReturnAddresses
from workers.stages import delivery
from workers.stages.stage import Stage
from workers.wording import one_line

SANDBOX = "[SANDBOX] "  # what a sandbox letter's subject and text begin with
SANDBOX_NAME = "DearMP sandbox"  # a sandbox letter's To: name (only rendering writes it)


@dataclass(frozen=True)
class Recipient:
    name: str
    email: str
    constituency: str


@dataclass(frozen=True)
class RenderedLetter:
    subject: str
    body_text: str
    body_html: str | None
    from_name: str
    from_email: str
    reply_to: str
    to_name: str
    to_email: str
    message_id: str

    @property
    def content_sha256(self) -> str:
        parts = (self.subject, self.body_text, self.from_email, self.to_email, self.message_id)
        return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()

    def row_values(self, submission_id: str) -> dict[str, Any]:
        """The columns of the row that stores this letter, once."""
        return {
            "submission_id": submission_id,
            **vars(self),  # its fields, all strings (asdict would deep-copy them)
            "content_sha256": self.content_sha256,
            "created_at": utcnow(),
        }


def list_id(definition: CampaignDefinition) -> str:
    """The campaign's List-Id (RFC 2919), for an office's mail rules: the organisation and
    campaign by name (RFC 2047 words when not ASCII), the campaign's slug on its From domain."""
    name = one_line(f"{definition.organisation}: {definition.title}", 120)
    domain = str(definition.from_email).rsplit("@", 1)[1].encode("idna").decode("ascii")
    return formataddr((name, f"{definition.slug}.{domain}"))


def choose_subject(definition: CampaignDefinition, submission_id: str, typed: str) -> str:
    """The supporter's subject where the campaign allows it, else a variant fixed per submission."""
    if "subject" in definition.editable and typed.strip():
        return typed.strip()
    digest = int(hashlib.sha256(submission_id.encode()).hexdigest(), 16)
    return definition.subject_variants[digest % len(definition.subject_variants)]


def compose(
    definition: CampaignDefinition,
    submission_id: str,
    payload: dict[str, Any],
    mp: Recipient,
    sandbox_address: str | None = None,
    reply_to: str | None = None,
) -> RenderedLetter:
    """The letter for one submission: same inputs, same letter, byte for byte.

    With ``sandbox_address`` (a campaign in sandbox mode) the letter goes there instead, with the
    MP it was meant for noted at the top. ``reply_to``: the letter's relay address (campaigns
    with ``replies = "relay"``); otherwise replies go to the supporter.
    """
    supporter = payload["supporter"]
    body = payload["letter"]["body"] if "body" in definition.editable else definition.draft_body
    context: dict[str, Any] = {
        "mp": {"name": mp.name, "constituency": mp.constituency},
        "campaign": {"title": definition.title, "organisation": definition.organisation},
    }
    salutation = campaign_template(definition.salutation).render(context)
    letter_context = {
        **context,
        "salutation": salutation,
        "body": body.strip(),
        "sign_off": definition.sign_off,
        "answers": [
            {"key": prompt.key, "question": prompt.question, "text": text}
            for prompt, text in definition.answered(payload["letter"].get("answers") or {})
        ],
        "supporter": {k: supporter[k] for k in ("name", "address_lines", "postcode", "email")},
    }
    text = campaign_template(definition.letter_template).render(letter_context)
    html = None
    if definition.letter_template_html:
        html = campaign_template(definition.letter_template_html, html=True).render(letter_context)
    subject = choose_subject(definition, submission_id, payload["letter"]["subject"])
    to_name, to_email = mp.name, mp.email
    if sandbox_address:
        note = (
            f"{SANDBOX}Campaign '{definition.slug}' is in sandbox mode. This letter was meant "
            f"for {mp.name} <{mp.email}>, MP for {mp.constituency}.\n\n"
        )
        text, subject = note + text, f"{SANDBOX}{subject}"
        to_name, to_email = SANDBOX_NAME, sandbox_address
    from_name = campaign_template(definition.sender_name).render(
        supporter_name=supporter["name"], organisation=definition.organisation
    )
    domain = str(definition.from_email).rsplit("@", 1)[1]
    return RenderedLetter(
        subject=subject,
        body_text=text,
        body_html=html,
        from_name=from_name.strip(),
        from_email=str(definition.from_email),
        reply_to=reply_to or supporter["email"],
        to_name=to_name,
        to_email=to_email,
        message_id=f"<{submission_id}@{domain}>",
    )


# The submission, and whether its letter is stored (by an attempt whose state change was lost).
_READ = (
    submission_read(
        "payload", "recipient", "directory_version_id", "member_id", "constituency_code"
    )
    .add_columns(
        LETTERS.c.submission_id.label("stored_letter"),
        LETTER_PRINTS.c.own_words,
        LETTER_PRINTS.c.decision,
    )
    .outerjoin(LETTERS, LETTERS.c.submission_id == SUBMISSIONS.c.id)
    .outerjoin(LETTER_PRINTS, LETTER_PRINTS.c.submission_id == SUBMISSIONS.c.id)
)
_STORE_LETTER = insert(LETTERS)


def plan(
    session: Session,
    submission_id: str,
    sandbox_address: str = "sandbox@localhost",
    signer: DkimSigner | None = None,
    returns: ReturnAddresses | None = None,
) -> Apply[list[Stage]]:
    """Compose the letter: what to write (the letter, its outbox item, the move to rendered)."""
    submission = read_one(session, _READ, submission_id)
    if submission is None or submission.state != State.COMPARED or submission.payload is None:
        return done([])
    if submission.stored_letter is not None:  # a returned letter, to send again as it is
        return _rendered(submission, None)
    definition = get_definition(session, submission.campaign_slug, submission.definition_sha256)
    recipient = submission.recipient or {}
    if not recipient.get("email"):  # resolved before recipients were recorded
        version = submission.directory_version_id
        member = session.get(Member, (version, submission.member_id))
        seat = session.get(Constituency, (version, submission.constituency_code))
        if member is not None and seat is not None:
            recipient = {"name": member.name, "email": member.email, "constituency": seat.name}
    if definition is None or submission.mode is None or not recipient.get("email"):
        reason = "campaign or MP no longer in the database"
        return move(submission, State.FAILED, reason, failure_reason=reason)
    letter = compose(
        definition,
        submission_id,
        submission.payload,
        Recipient(recipient["name"], recipient["email"], recipient["constituency"]),
        sandbox_address if submission.mode == "sandbox" else None,
        reply_to=(
            returns.reply(submission_id)
            if returns is not None and definition.replies == "relay"
            else None
        ),
    )
    row = letter.row_values(submission_id)
    row["list_id"] = list_id(definition)
    if submission.own_words is not None:
        row["own_words"] = round(submission.own_words * 100)
    if submission.decision == "digest":  # stored for the MP's daily digest, not sent alone
        return _rendered(submission, row, digest=True)
    if signer is not None:  # signed once: every attempt sends these bytes
        row["dkim_signature"] = signer.letter_signature(Letter(**row))
    return _rendered(submission, row)


def _rendered(
    submission: Any, letter: dict[str, Any] | None, digest: bool = False
) -> Apply[list[Stage]]:
    """The move to rendered with the letter (unless it is stored) and its outbox item; or, for
    the MP's daily digest (:mod:`workers.stages.digests`), to in_digest with the letter only."""

    def write(session: Session) -> list[Stage]:
        # The guarded state change first: of two workers rendering at once, the second stops
        # here (AlreadyMoved) before it writes anything. Then the letter, then its item.
        advance(session, submission, State.IN_DIGEST if digest else State.RENDERED)
        writes = writes_of(session)  # made with the group's other letters
        if letter is not None:
            writes.insert(_STORE_LETTER, letter)
        if digest:
            return []
        writes.insert(delivery.NEW_ITEM, delivery.item_row(submission.id))
        return [Stage.DELIVER]

    return write


def render(
    session: Session,
    submission_id: str,
    sandbox_address: str = "sandbox@localhost",
    signer: DkimSigner | None = None,
    returns: ReturnAddresses | None = None,
) -> list[Stage]:
    return one(
        session, submission_id, lambda s, sid: plan(s, sid, sandbox_address, signer, returns)
    )
