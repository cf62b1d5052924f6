"""A webhook's body, written from the database when it is sent (so an erased supporter's details
are never sent afterwards, a replay included) and checked against :mod:`schemas.webhooks`."""

from __future__ import annotations

from functools import partial
from typing import Any

import structlog
from pydantic import ValidationError
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from schemas.submission import CHANNELS
from schemas.webhooks import envelope
from workers.database.models import (
    InboundMessage,
    OutboxItem,
    OutboxStatus,
    State,
    Submission,
    SubmissionEvent,
    WebhookEndpoint,
    utcnow,
)
from workers.database.transitions import rowcount
from workers.outbox.sending import Kind
from workers.privacy.ledger import current_preferences
from workers.stages.stage import Deferred
from workers.webhooks.channel import GONE, HttpChannel, Request
from workers.webhooks.events import forget

log = structlog.get_logger(__name__)

DISABLED = "the endpoint was disabled"
DISABLED_WAIT = 3600.0  # a disabled endpoint's webhook is looked at again after this


def kind(timeout: float, threads: int = 8, pause: float = 30.0) -> Kind:
    """The outbox's kind "webhook": composed here, POSTed by :class:`HttpChannel`, by at most
    half of a process's ``threads`` at once (CRMs that hang never hold every thread)."""
    channel = HttpChannel(timeout, pause=pause, all_in_flight=max(1, threads // 2))
    return Kind(partial(compose, channel=channel), done=disable_if_gone, channel=channel)


def disable_if_gone(session: Session, item: OutboxItem, status: str, detail: str | None) -> None:
    """A receiver's 410 asks for nothing more (Standard Webhooks): its endpoint is disabled, its
    other webhooks wait, and ``dearmp webhooks enable`` sends them. The item then says so, which
    makes this once: a late message about the item never disables the endpoint again."""
    if status != OutboxStatus.FAILED or not (detail or "").endswith(GONE):
        return
    session.execute(
        update(OutboxItem).where(OutboxItem.id == item.id).values(error=f"{detail}: {DISABLED}")
    )
    endpoint = WebhookEndpoint.id == item.endpoint_id
    off = update(WebhookEndpoint).where(endpoint, WebhookEndpoint.enabled.is_(True))
    if rowcount(session.execute(off.values(enabled=False))):
        forget()
        log.warning("webhook_endpoint_disabled", endpoint_id=item.endpoint_id, status=410)


def compose(
    session: Session, item: OutboxItem, channel: HttpChannel | None = None
) -> Request | str:
    """The item's signed request, or why it will not be sent (it is skipped). While its endpoint
    is paused or disabled, :class:`Deferred`: it waits, neither claimed nor counted."""
    endpoint = session.get(WebhookEndpoint, item.endpoint_id) if item.endpoint_id else None
    if endpoint is None:
        return "the endpoint was removed"
    if not endpoint.enabled:  # `dearmp webhooks enable` makes it due at once
        raise Deferred(DISABLED_WAIT, "its endpoint is disabled")
    if (wait := channel.paused(endpoint.id) if channel else 0.0) > 0:
        raise Deferred(wait, "its endpoint is paused after a failure")
    submission = session.get(Submission, item.submission_id)
    if submission is None:
        return "the submission is gone"
    event, _, rest = item.key.partition(":")  # <event>:<endpoint>[:<discriminator>]
    # Written from a list of endpoints a few seconds old: what the endpoint asks for now decides.
    campaigns = (None, submission.campaign_slug)
    if event not in endpoint.events.split() or endpoint.campaign_slug not in campaigns:
        return "the endpoint no longer asks for it"
    data = _data(session, event, submission, item, rest.partition(":")[2])
    if event != "supporter.erased" and endpoint.personal_data:
        data["supporter"] = personal_data(session, submission)
    body = {"type": event, "timestamp": item.created_at, "data": data}
    try:
        text = envelope(event).model_validate(body).model_dump_json()
    except ValidationError as exc:  # a bug; its text would carry the values, maybe personal
        fields = ", ".join(".".join(map(str, e["loc"])) for e in exc.errors())
        return f"the body does not match its schema: {fields}"
    rotating = endpoint.previous_until and endpoint.previous_until > utcnow()
    secrets = (endpoint.secret, endpoint.previous_secret) if rotating else (endpoint.secret,)
    return Request(endpoint.id, endpoint.url, item.id, text.encode(), tuple(filter(None, secrets)))


def personal_data(session: Session, submission: Submission) -> dict[str, Any] | None:
    """The supporter's details, if still held, once this submission's consent is in the ledger
    (the proof: so nothing before it is logged, nor for a rejected submission), and if the
    ledger says now that they agree to be contacted by the organisation on some channel this
    submission asked about (a later withdrawal counts)."""
    payload = submission.payload or {}
    person = payload.get("supporter")
    if submission.erased_at is not None or submission.consent_logged_at is None:
        return None
    if not isinstance(person, dict) or "email" not in person:
        return None
    asked = payload.get("contact_preferences") or {}
    recorded = current_preferences(session, submission.supporter_hash or "")
    prefs = {channel: recorded[channel]["choice"] for channel in asked if channel in recorded}
    if not any(prefs.get(channel) == "granted" for channel in CHANNELS):
        return None
    return {
        "name": person.get("name", ""),
        "email": person["email"],
        "postcode": person.get("postcode", ""),
        "address_lines": list(person.get("address_lines") or []),
        "contact_preferences": {c: prefs.get(c, "not_asked") for c in CHANNELS},
    }


def _data(
    session: Session, event: str, submission: Submission, item: OutboxItem, discriminator: str
) -> dict[str, Any]:
    data: dict[str, Any] = {"submission_id": submission.id, "campaign": submission.campaign_slug}
    if event == "supporter.erased":
        return data | {"erased_at": submission.erased_at}
    recipient = submission.recipient or {}
    mp = {"member_id": submission.member_id, "name": recipient.get("name")}
    data |= {
        "state": submission.state,
        "constituency": recipient.get("constituency"),
        "constituency_code": submission.constituency_code,
        "mp": mp if mp["name"] else None,
    }
    if event == "submission.rejected":
        code = select(SubmissionEvent.detail).where(
            SubmissionEvent.submission_id == submission.id, SubmissionEvent.state == State.REJECTED
        )
        data |= {"reasons": sorted(submission.rejection or {}), "code": session.scalar(code)}
    elif event == "reply.received":
        inbound = session.get(InboundMessage, item.inbound_id) if item.inbound_id else None
        data |= {"inbound_id": item.inbound_id or "", "kind": (inbound and inbound.kind) or "reply"}
    elif event == "survey.answered":
        data["answer"] = discriminator.partition(":")[0]  # <answer>:<when it changed>
    elif event == "consent.recorded":
        consent = (submission.payload or {}).get("contact_preferences", {})
        data["wording_version"] = consent.get("wording_version")
    return data
