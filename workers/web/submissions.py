"""Submissions: a supporter's letter stored before its 202, and its state, without personal
data. The stage message is sent after the commit; the reconciler resends it if that fails."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Annotated, Any

import anyio.to_thread
import structlog
from fastapi import APIRouter, Body, Header, Request

from schemas.campaign import CampaignDefinition
from workers.database.engine import session_scope
from workers.database.models import State, Submission, utcnow
from workers.pipeline.intake import Accepted, stored
from workers.privacy.hashing import limiter_email, supporter_hash
from workers.stages.validation import campaign_errors
from workers.web.bodies import (
    ERROR_RESPONSES,
    HONEYPOT,
    OUTCOMES,
    AcceptedOut,
    Errors,
    StatusOut,
    SubmissionIn,
    accepted,
    no_campaign,
    problem,
    retry_after,
)
from workers.web.clients import authenticated, client_ip, client_key, over_limit, user_agent
from workers.web.dependencies import MISSING, AppDep, IntakeDep
from workers.web.honeypot import fake_state, fake_submission_id, read_fake

log = structlog.get_logger(__name__)
router = APIRouter()
# The header a server-side front end authenticates with (DEARMP_API_KEYS).
KEY_HEADER = "X-DearMP-Key"
RESPONSES: dict[int | str, dict[str, Any]] = {
    **ERROR_RESPONSES,
    401: {"model": Errors, "description": "The X-DearMP-Key header holds no valid key."},
    403: {"model": Errors, "description": "This page's origin may not post to the campaign."},
    409: {
        "model": Errors,
        "description": "The consent wording has changed since the page was loaded (reload it), "
        "or the idempotency key was already used with a different body (use a new key).",
    },
}


@router.post("/v1/submissions", status_code=202, response_model=AcceptedOut, responses=RESPONSES)
async def submit(
    request: Request,
    app: AppDep,
    intake: IntakeDep,
    body: Annotated[SubmissionIn, Body()],
    origin: Annotated[str | None, Header()] = None,
    x_dearmp_key: Annotated[
        str | None,
        Header(
            description="A server-side front end's key (DEARMP_API_KEYS): only then are "
            "the body's client_ip and user_agent taken as the consent evidence."
        ),
    ] = None,
) -> Any:
    """Store a supporter's final submission; 202 once it is in the database.

    The idempotency key is bound to the body first posted with it: the same body again is
    answered with the stored submission's current state (``duplicate: true``); another body
    under the same key is a 409 (what counts: :data:`workers.pipeline.intake.NOT_IN_BODY_HASH`)."""
    key_valid = authenticated(app, x_dearmp_key)
    if key_valid is False:
        return problem(401, {KEY_HEADER: "This key is not valid for this deployment."})
    definition = intake.definitions.fresh(body.campaign[:64])  # no thread while it is fresh
    if definition is MISSING:
        definition = await anyio.to_thread.run_sync(intake.definition, body.campaign)
    if not isinstance(definition, CampaignDefinition):
        return no_campaign(body.campaign)
    if (
        origin
        and origin != f"{request.url.scheme}://{request.headers.get('host', '')}"
        and origin not in intake.origins_by_slug().get(body.campaign, set())
    ):
        return problem(403, {"origin": "This page may not post to this campaign."})
    errors = campaign_errors(definition, body)
    if errors:
        # The page's consent wording is out of date: a conflict with the campaign as it is
        # now, which reloading resolves; anything else is the letter's.
        stale = set(errors) == {"contact_preferences.wording_version"}
        return problem(409 if stale else 422, errors)
    address = client_ip(request)
    settings = app.settings
    checks = [
        ("ip", client_key(app, address), settings.api_ip_limit, settings.api_ip_window),
        (
            "email",
            supporter_hash(app.secret, limiter_email(body.supporter.email)),
            settings.api_email_limit,
            settings.api_email_window,
        ),
    ]
    limited = any(limit > 0 for _, _, limit, _ in checks)  # none: no trip to a thread
    if limited and (wait := await anyio.to_thread.run_sync(over_limit, app, *checks)) > 0:
        # A page posting again after a timeout gets its submission back, not a refusal.
        payload = body.model_dump(mode="json")
        found = await anyio.to_thread.run_sync(intake.read, stored, payload, app.secret)
        if found is not None:
            return _answer(found, body.idempotency_key)
        message = "Too many letters from here. Please try again later."
        return problem(429, {"body": message}, retry_after(wait))
    state = State.UNCONFIRMED if definition.confirmation else State.RECEIVED
    if body.website and body.website.strip():  # a robot filled the trap: keep nothing
        log.info("honeypot_filled")
        # A key already stored is answered as a real repeat is (it stores nothing either).
        payload = body.model_dump(mode="json")
        found = await anyio.to_thread.run_sync(intake.read, stored, payload, app.secret)
        if found is not None:
            return _answer(found, body.idempotency_key)
        fake = fake_submission_id(app.secret, body.campaign, utcnow())
        return accepted(fake, state.value, duplicate=False)
    payload = body.model_dump(mode="json", exclude={HONEYPOT})
    # The consent evidence: the request's own, unless an authenticated server-side front
    # end passes its supporter's (anyone else could opt any address in or out).
    if key_valid:
        payload["client_ip"] = payload.get("client_ip") or address
        payload["user_agent"] = payload.get("user_agent") or user_agent(request)
    else:
        payload["client_ip"], payload["user_agent"] = address, user_agent(request)
    # Stored with others that arrived meanwhile (the batcher), committed before the 202.
    return _answer(await intake.batcher.submit(payload, state), body.idempotency_key)


def _answer(found: Accepted, key: str) -> Any:
    """The 202 for a stored submission (as it is now if its key was stored already), or the
    conflict of a key stored with another body."""
    if found.conflict:
        message = (
            f"The idempotency key '{key}' was already used for a different submission to this "
            "campaign. Send a new key for a new letter."
        )
        return problem(409, {"idempotency_key": message})
    return accepted(found.submission_id, found.state, duplicate=not found.created)


@router.get("/v1/submissions/{submission_id}", response_model=StatusOut, responses=ERROR_RESPONSES)
def status(submission_id: str, app: AppDep, intake: IntakeDep) -> Any:
    """A submission's state, without personal data."""
    with session_scope(app.sessions) as session:
        sub = session.get(Submission, submission_id[:64])
        if sub is not None:
            recipient = sub.recipient or {}
            state = State(sub.state)
            return _status(
                sub.id,
                sub.campaign_slug,
                state,
                sub.created_at,
                sub.updated_at,
                mp={"name": recipient["name"], "constituency": recipient["constituency"]}
                if recipient.get("name")
                else None,
                errors=sub.rejection if state == State.REJECTED else None,
            )
    fake = read_fake(app.secret, submission_id, intake.origins_by_slug())
    if fake is None:
        return problem(404, {"submission": "There is no such submission."})
    # A robot's letter moves on as a real one's would (see workers.web.honeypot).
    definition = intake.definition(fake.campaign)
    confirmation = definition is not None and definition.confirmation
    valid = timedelta(days=app.settings.confirm_valid_days)
    state, since = fake_state(fake, confirmation, valid, utcnow())
    return _status(submission_id, fake.campaign, state, fake.received_at, since)


def _status(
    sid: str, campaign: str, state: State, received: datetime, updated: datetime, **more: Any
) -> StatusOut:
    return StatusOut(
        id=sid,
        campaign=campaign,
        state=state.value,
        final=state.is_final,
        received_at=received.isoformat(),
        updated_at=updated.isoformat(),
        outcome=OUTCOMES[state],
        **more,
    )
