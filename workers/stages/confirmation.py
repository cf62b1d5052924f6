"""Sender confirmation: for campaigns that ask, the letter waits until its sender clicks a signed
link in an email (one reminder after a day; the link works for seven, then the submission
expires). The link carries the submission id, its expiry and an HMAC over both: it cannot be
forged or extended, and reveals nothing personal. The email and its reminder are outbox items
(keys "confirm" and "reminder"), sent like every email to a supporter; :func:`compose` writes them.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy.orm import Session

from config.settings import Settings, default
from schemas.submission import stored_email
from workers.database.models import OutboxStatus, State, Submission, utcnow
from workers.database.transitions import AlreadyMoved, advance
from workers.letters.definitions import get_definition
from workers.letters.mail import (
    AUTOMATIC,
    DkimSigner,
    Draft,
    Outgoing,
    from_domain,
    outgoing_email,
    wire_address,
)
from workers.outbox import sending as outbox
from workers.receiving.addresses import ReturnAddresses
from workers.receiving.classify import NOTICE_HEADER
from workers.wording import one_line


@dataclass(frozen=True)
class ConfirmationPolicy:
    public_url: str = default("public_url")
    valid: timedelta = timedelta(days=default("confirm_valid_days"))
    reminder_after: timedelta = timedelta(hours=default("confirm_reminder_hours"))

    @classmethod
    def from_settings(cls, settings: Settings) -> ConfirmationPolicy:
        return cls(
            public_url=settings.public_url,
            valid=timedelta(days=settings.confirm_valid_days),
            reminder_after=timedelta(hours=settings.confirm_reminder_hours),
        )


def _sign(secret: bytes, submission_id: str, expires: int) -> str:
    mac = hmac.new(secret, f"confirm\x00{submission_id}\x00{expires}".encode(), hashlib.sha256)
    return base64.urlsafe_b64encode(mac.digest()[:24]).decode().rstrip("=")


def make_token(secret: bytes, submission_id: str, expires: datetime) -> str:
    stamp = int(expires.timestamp())
    return f"{submission_id}.{stamp}.{_sign(secret, submission_id, stamp)}"


def read_token(secret: bytes, token: str) -> tuple[str, bool] | None:
    """(submission id, still valid) for a genuine token; None for anything forged or malformed."""
    parts = token.split(".")
    # ASCII only: str.isdigit() accepts digits such as "²" that int() refuses.
    if len(parts) != 3 or not token.isascii() or not parts[1].isdigit() or len(parts[0]) > 64:
        return None
    submission_id, stamp, mac = parts[0], int(parts[1]), parts[2]
    if not hmac.compare_digest(mac.encode(), _sign(secret, submission_id, stamp).encode()):
        return None
    return submission_id, utcnow().timestamp() < stamp


def notify(session: Session, submission_id: str, policy: ConfirmationPolicy) -> list[str]:
    """Queue the confirmation email, or the reminder when it is due, in the outbox (at most one
    of each: the outbox's key is unique per submission). The ids of those still to send, for
    the outbox stage after the commit."""
    submission = session.get(Submission, submission_id)
    if submission is None or submission.state != State.UNCONFIRMED:
        return []
    keys = ["confirm"]
    first = outbox.item_of(session, submission_id, "confirm")
    if first is not None and first.status == OutboxStatus.SENT:
        if utcnow() - submission.created_at >= policy.reminder_after:
            keys.append("reminder")
    for key in keys:
        outbox.enqueue(session, submission_id, key, "confirm")
    items = (outbox.item_of(session, submission_id, key) for key in keys)
    unsent = (OutboxStatus.PENDING, OutboxStatus.SENDING)
    return [item.id for item in items if item is not None and item.status in unsent]


def compose(
    session: Session,
    submission_id: str,
    reminder: bool,
    secret: bytes,
    policy: ConfirmationPolicy,
    signer: DkimSigner | None = None,
    returns: ReturnAddresses | None = None,
) -> Outgoing | str:
    """The confirmation email or its reminder on the wire, or why it will not be sent: the same
    bytes every time (its Date is when it was due), signed by ``signer``, its envelope sender a
    notice's address (``returns``), marked automatic (RFC 3834) and ``X-DearMP-Notice``, so
    that one that comes back is never acted on as a letter's."""
    submission = session.get(Submission, submission_id)
    if submission is None or submission.state != State.UNCONFIRMED:
        return "no longer waiting for confirmation"
    definition = get_definition(session, submission.campaign_slug)
    if definition is None:
        return "the campaign is gone"
    to = stored_email(submission.payload)
    if to is None:
        return "the supporter's details were erased"
    # Raises ValueError for a non-ASCII local part stored before validation refused them.
    to = wire_address(to)
    expires = submission.created_at + policy.valid
    token = make_token(secret, submission.id, expires)
    link = f"{policy.public_url.rstrip('/')}/v1/confirm/{token}"
    kind, sender = "reminder" if reminder else "confirm", str(definition.from_email)
    draft = Draft(
        from_name=one_line(definition.organisation, 200),
        from_email=sender,
        to_email=to,
        subject=("Reminder: " if reminder else "") + "Please confirm your letter to your MP",
        date=submission.created_at + (policy.reminder_after if reminder else timedelta(0)),
        message_id=f"<{kind}-{submission.id}@{from_domain(sender)}>",
        text=(
            "Thank you for writing to your MP.\n\n"
            "Please confirm that you sent this letter by opening the link below. Until you do, "
            "it will not be sent.\n\n"
            f"{link}\n\n"
            f"The link works until {expires:%d %B %Y at %H:%M} UTC. If you did not write to your "
            "MP, ignore this email: nothing will be sent, and the details will be deleted.\n"
        ),
        headers=(*AUTOMATIC, (NOTICE_HEADER, f"{kind}-{submission.id}")),
    )
    envelope = returns.notice(submission.id) if returns is not None else None
    return outgoing_email(draft, signer, envelope)


# A link clicked once its submission is past waiting: what the page says. Every other state
# came after a confirmation ("already").
PAST = {
    State.EXPIRED: "expired",
    State.WITHDRAWN: "withdrawn",  # erased at the supporter's request: nothing was sent
    State.REJECTED: "not_sent",
    State.FAILED: "not_sent",
}


def _read(session: Session, secret: bytes, token: str) -> tuple[str, Submission | None]:
    """What a click would do: "ready" | "already" | "expired" | "withdrawn" | "not_sent" |
    "invalid", and the submission."""
    read = read_token(secret, token)
    if read is None:
        return "invalid", None
    submission_id, valid = read
    submission = session.get(Submission, submission_id)
    if submission is None:
        return "invalid", None
    if submission.state != State.UNCONFIRMED:
        return PAST.get(State(submission.state), "already"), submission
    return ("ready" if valid else "expired"), submission


def check_token(session: Session, secret: bytes, token: str) -> tuple[str, str | None]:
    """What a click would do, without doing it (as :func:`_read`), and the submission's id."""
    result, submission = _read(session, secret, token)
    return result, submission.id if submission is not None else None


def confirm(session: Session, secret: bytes, token: str) -> tuple[str, str | None]:
    """Act on a clicked link: ("confirmed", or what :func:`_read` says, submission id)."""
    result, submission = _read(session, secret, token)
    if result != "ready" or submission is None:
        return result, submission.id if submission is not None else None
    try:
        advance(
            session,
            submission,
            State.RECEIVED,
            detail="confirmed by the sender",
            confirmed_at=utcnow(),
        )
    except AlreadyMoved:  # another click, the expiry or an erasure moved it first
        session.expire(submission)
        result, submission = _read(session, secret, token)  # what it is now
        return result, submission.id if submission is not None else None
    return "confirmed", submission.id
