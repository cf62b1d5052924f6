"""Payload factories: a valid submission, changed only where a test says."""

from __future__ import annotations

import copy
import uuid
from typing import Any

from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker

from workers.database.engine import session_scope
from workers.database.models import OutboxItem
from workers.letters.mail import DkimSigner, Mailer
from workers.letters.rate_limits import Limiter
from workers.outbox.sending import OutboxPolicy, send_group
from workers.receiving.addresses import ReturnAddresses
from workers.stages import delivery
from workers.stages.delivery import DeliveryPolicy
from workers.stages.stage import Deferred

WORDING = "2024-03-contact-v2"

VALID: dict[str, Any] = {
    "schema_version": 1,
    "campaign": "political-prisoners",
    "idempotency_key": "will-be-replaced",
    "supporter": {
        "name": "Amira Haddad",
        "email": "amira.haddad@example.com",
        "postcode": "DM1 1AA",
        "address_lines": ["12 Mill Lane", "Millbrook"],
        "phone": "+44 20 7946 0000",
    },
    "letter": {
        "subject": "Please act for Palestinian political prisoners",
        "body": "As your constituent I ask you to stand with Palestinian political prisoners.",
    },
    "contact_preferences": {
        "email": "granted",
        "phone": "refused",
        "sms": "not_asked",
        "post": "granted",
        "wording_version": WORDING,
    },
    "source_url": "https://campaign.example.org/political-prisoners",
    "user_agent": "Mozilla/5.0 (test)",
    "client_ip": "203.0.113.7",
}


def submission(**changes: Any) -> dict[str, Any]:
    """A valid payload with a fresh idempotency key; ``supporter__email=...`` sets nested fields."""
    payload = copy.deepcopy(VALID)
    payload["idempotency_key"] = str(uuid.uuid4())
    for key, value in changes.items():
        target = payload
        *parents, leaf = key.split("__")
        for parent in parents:
            target = target[parent]
        if value is DELETE:
            target.pop(leaf, None)
        else:
            target[leaf] = value
    return payload


DELETE = object()


def send_letter(
    sessions: sessionmaker[Session],
    submission_id: str,
    mailer: Mailer,
    policy: DeliveryPolicy | None = None,
    limiter: Limiter | None = None,
    signer: DkimSigner | None = None,
    returns: ReturnAddresses | None = None,
) -> None:
    """Send one rendered letter through the outbox, as the delivery actor does, due now. A
    failed attempt's error is raised (not the wait the outbox made of it); a refusal for good
    too."""
    [(_, error)] = send_letters(sessions, [submission_id], mailer, policy, limiter, signer, returns)
    if isinstance(error, Deferred) and isinstance(error.__cause__, Exception):
        raise error.__cause__
    if error is not None:
        raise error


def send_letters(
    sessions: sessionmaker[Session],
    submission_ids: list[str],
    mailer: Mailer,
    policy: DeliveryPolicy | None = None,
    limiter: Limiter | None = None,
    signer: DkimSigner | None = None,
    returns: ReturnAddresses | None = None,
) -> list[tuple[str, BaseException | None]]:
    """The letters of one delivery message through the outbox, each due now (a test is the
    deferred message that comes when a letter waited)."""
    policy = policy or DeliveryPolicy()
    kind = delivery.kind(mailer, policy, limiter, signer, returns)
    timing = OutboxPolicy(max_attempts=policy.max_attempts)
    with session_scope(sessions) as session:
        session.execute(
            update(OutboxItem).where(OutboxItem.id.in_(submission_ids)).values(next_attempt_at=None)
        )
        return send_group(session, submission_ids, mailer, {delivery.KIND: kind}, timing)
