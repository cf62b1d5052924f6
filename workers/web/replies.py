"""Mailgun's delivery events, over HTTP (the "did your MP reply?" links are
:mod:`workers.web.supporter_pages`')."""

from __future__ import annotations

import json
from typing import Any

import structlog
from fastapi import APIRouter
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import select

from workers.database.engine import session_scope
from workers.database.models import Letter
from workers.pipeline.dispatch import dispatch_groups
from workers.receiving import mailgun
from workers.receiving.store import Replayed, forget_tokens, store
from workers.stages import digests
from workers.stages.stage import Stage
from workers.web.bodies import Errors, problem
from workers.web.dependencies import AppDep, IntakeDep

log = structlog.get_logger(__name__)
router = APIRouter()


class MailgunSignature(BaseModel):
    timestamp: str = Field(max_length=200)
    token: str = Field(max_length=200)
    signature: str = Field(max_length=200)


class MailgunEvent(BaseModel):
    """Mailgun's webhook body (its JSON form)."""

    model_config = ConfigDict(populate_by_name=True)

    signature: MailgunSignature
    event_data: dict[str, Any] = Field(alias="event-data")


WEBHOOK_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "Stored (or stored already): Mailgun need not send it again."},
    404: {"model": Errors, "description": "Mailgun webhooks are not configured here."},
    406: {
        "model": Errors,
        "description": "The signature is not Mailgun's, or was used before: not retried.",
    },
    422: {"model": Errors, "description": "Not a Mailgun event."},
    503: {"model": Errors, "description": "The database cannot be reached just now."},
}


@router.post("/v1/webhooks/mailgun", responses=WEBHOOK_RESPONSES)
def mailgun_webhook(body: MailgunEvent, app: AppDep, intake: IntakeDep) -> Any:
    """A Mailgun delivery event (failed permanently or temporarily, delivered), verified by its
    signature, its token remembered, and stored before the answer; the inbound stage ties it to
    its letter."""
    key = app.settings.mailgun_signing_key
    if key is None:
        return problem(404, {"request": "Mailgun webhooks are not configured here."})
    signature = body.signature.model_dump()
    if not mailgun.verify(key.get_secret_value().encode(), signature):
        # 406: Mailgun does not retry it.
        return problem(406, {"signature": "The signature does not match."})
    event = body.event_data
    kind = mailgun.event_kind(event)
    if kind is None:
        return problem(422, {"event-data.event": "Not the name of a Mailgun event."})
    message_id = mailgun.message_id(event)
    with session_scope(app.sessions) as session:
        submission_id = (
            session.scalar(select(Letter.submission_id).where(Letter.message_id == message_id))
            or digests.letter_named(session, message_id)  # an MP's digest: its letters'
            if message_id
            else None
        )
    raw = json.dumps(mailgun.kept_fields(event)).encode()
    try:
        ids = store(
            app.sessions,
            "mailgun",
            [f"mailgun:{kind}"],
            raw,
            external_id=mailgun.event_id(event),
            submission_id=submission_id,
            token=signature["token"],
        )
    except Replayed:
        log.warning("webhook_replay_refused")
        return problem(406, {"signature": "This signature was used before: a replay is refused."})
    forget_tokens(app.sessions, older_than=2 * mailgun.MAX_AGE)
    if ids:
        dispatch_groups(intake.broker, {Stage.INBOUND: ids})
    return JSONResponse({"stored": bool(ids)})
