"""Submissions: a supporter's letter stored before its 202, and its state, without personal
data. The stage message is sent after the commit; the reconciler resends it if that fails."""

from __future__ import annotations

from datetime import timedelta
from typing import Annotated, Any

import anyio.to_thread
import structlog
from fastapi import APIRouter, Body, Header, Request
from sqlalchemy import select

from schemas.campaign import CampaignDefinition
from workers.database.engine import session_scope
from workers.database.models import State, Submission, utcnow
from workers.pipeline.app import App
from workers.privacy.hashing import limiter_email, supporter_hash
from workers.stages.validation import campaign_errors
from workers.web.bodies import (
    ERROR_RESPONSES,
    HONEYPOT,
    KEY_HEADER,
    OUTCOMES,
    SUBMIT_RESPONSES,
    AcceptedOut,
    StatusOut,
    SubmissionIn,
    accepted,
    no_campaign,
    problem,
    retry_after,
)
from workers.web.clients import authenticated, client_ip, client_key, over_limit, user_agent
from workers.web.dependencies import MISSING, AppDep, Intake, IntakeDep
from workers.web.honeypot import Fake, fake_state, fake_submission_id, read_fake

log = structlog.get_logger(__name__)
router = APIRouter()


@router.post(
    "/v1/submissions",
    status_code=202,
    response_model=AcceptedOut,
    responses=SUBMIT_RESPONSES,
)
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
    """Store a supporter's final submission; 202 once it is in the database."""
    key_valid = authenticated(app, x_dearmp_key)
    if key_valid is False:
        return problem(401, {KEY_HEADER: "This key is not valid for this deployment."})
    definition = intake.cached_definition(body.campaign)
    if definition is MISSING:
        definition = await anyio.to_thread.run_sync(intake.definition, body.campaign)
    if not isinstance(definition, CampaignDefinition):
        return no_campaign(body.campaign)
    if (
        origin
        and origin != f"{request.url.scheme}://{request.headers.get('host', '')}"
        and not intake.origins.allows(body.campaign, origin)
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
    wait = await anyio.to_thread.run_sync(over_limit, app, *checks) if limited else 0.0
    if wait > 0:
        message = "Too many letters from here. Please try again later."
        return problem(429, {"body": message}, retry_after(wait))
    state = State.UNCONFIRMED if definition.confirmation else State.RECEIVED
    if body.website and body.website.strip():  # a robot filled the trap: keep nothing
        log.info("honeypot_filled")
        # A key already stored is answered as a real repeat is (it stores nothing either).
        stored_id = await anyio.to_thread.run_sync(
            _stored, app, body.campaign, body.idempotency_key
        )
        if stored_id is not None:
            return accepted(stored_id, state.value, duplicate=True)
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
    # Stored (with others that arrived meanwhile) and committed before the 202; the stage
    # message follows the commit.
    stored = await intake.batcher.submit(payload, state)
    return accepted(stored.submission_id, state.value, duplicate=not stored.created)


def _stored(app: App, campaign: str, idempotency_key: str) -> str | None:
    with session_scope(app.sessions) as session:
        return session.scalar(
            select(Submission.id).where(
                Submission.campaign_slug == campaign,
                Submission.idempotency_key == idempotency_key,
            )
        )


@router.get("/v1/submissions/{submission_id}", response_model=StatusOut, responses=ERROR_RESPONSES)
def status(submission_id: str, app: AppDep, intake: IntakeDep) -> Any:
    """A submission's state, without personal data."""
    with session_scope(app.sessions) as session:
        sub = session.get(Submission, submission_id[:64])
        if sub is None:
            fake = read_fake(app.secret, submission_id, intake.origins.slugs())
            if fake is not None:
                return _fake_status(app, intake, submission_id, fake)
            return problem(404, {"submission": "There is no such submission."})
        recipient = sub.recipient or {}
        state = State(sub.state)
        return StatusOut(
            id=sub.id,
            campaign=sub.campaign_slug,
            state=state.value,
            final=state.is_final,
            received_at=sub.created_at.isoformat(),
            updated_at=sub.updated_at.isoformat(),
            mp={"name": recipient["name"], "constituency": recipient["constituency"]}
            if recipient.get("name")
            else None,
            errors=sub.rejection if state == State.REJECTED else None,
            outcome=OUTCOMES[state],
        )


def _fake_status(app: App, intake: Intake, submission_id: str, fake: Fake) -> StatusOut:
    """A robot's letter's status, moving on as a real one's would (see workers.web.honeypot)."""
    definition = intake.definition(fake.campaign)
    confirmation = definition is not None and definition.confirmation
    valid = timedelta(days=app.settings.confirm_valid_days)
    state, since = fake_state(fake, confirmation, valid, utcnow())
    return StatusOut(
        id=submission_id,
        campaign=fake.campaign,
        state=state.value,
        final=state.is_final,
        received_at=fake.received_at.isoformat(),
        updated_at=since.isoformat(),
        outcome=OUTCOMES[state],
    )
