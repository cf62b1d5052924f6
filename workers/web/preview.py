"""A campaign for its page: what the form needs, the preview of a supporter's letter, and the
reference page (``/demo/SLUG``) with its files."""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any, Literal

import structlog
from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, HTMLResponse

from schemas.campaign import campaign_template
from schemas.postcode import PostcodeProblem, check_format
from workers.database.engine import session_scope
from workers.letters.originality import template
from workers.mp.live_sources import SourceUnavailable
from workers.mp.lookup import Found, find, prefetch
from workers.stages.comparison import letter_body
from workers.stages.rendering import choose_subject
from workers.stages.resolution import MEMBER_FIELD, POSTCODE_FIELD, Refuse, decide
from workers.web.bodies import (
    ERROR_RESPONSES,
    HONEYPOT,
    CampaignOut,
    ConsentQuestionOut,
    DraftOut,
    MpOut,
    PreviewIn,
    PreviewOut,
    PromptOut,
    no_campaign,
    problem,
    retry_after,
)
from workers.web.clients import client_ip, client_key, over_limit
from workers.web.dependencies import AppDep, IntakeDep

STATIC = Path(__file__).resolve().parent / "static"
SOURCE_WAIT = 10  # seconds a page is asked to wait when a live source did not answer
router = APIRouter()
log = structlog.get_logger(__name__)


@router.get("/v1/campaigns/{slug}", response_model=CampaignOut, responses=ERROR_RESPONSES)
def campaign(slug: str, intake: IntakeDep) -> Any:
    """What a page needs to draw the form."""
    definition = intake.definition(slug)
    if definition is None:
        return no_campaign(slug)
    return CampaignOut(
        slug=definition.slug,
        title=definition.title,
        organisation=definition.organisation,
        introduction=definition.introduction.strip(),
        subject_variants=definition.subject_variants,
        draft_body=definition.draft_body.strip(),
        editable=list(definition.editable),
        body_min_chars=definition.body_min_chars,
        body_max_chars=definition.body_max_chars,
        consent_version=definition.consent.version,
        consent_questions=[
            ConsentQuestionOut.model_validate(q, from_attributes=True)
            for q in definition.consent.questions
        ],
        mp_notice=definition.consent.mp_notice,
        privacy_notice_url=definition.privacy_notice_url,
        privacy_notice_version=definition.privacy_notice_version,
        confirmation_required=definition.confirmation,
        prompts=[PromptOut.model_validate(p, from_attributes=True) for p in definition.prompts],
        honeypot_field=HONEYPOT,
        example_postcode=intake.example_postcode(),
    )


@router.post("/v1/campaigns/{slug}/preview", response_model=PreviewOut, responses=ERROR_RESPONSES)
def preview(slug: str, body: PreviewIn, request: Request, app: AppDep, intake: IntakeDep) -> Any:
    """The supporter's MP and the draft letter to edit (the page's second step)."""
    definition = intake.definition(slug)
    if definition is None:
        return no_campaign(slug)
    # Counted apart from submissions: a supporter editing their letter previews again and again.
    limit, window = app.settings.api_ip_limit * 4, app.settings.api_ip_window
    wait = over_limit(app, ("preview", client_key(app, client_ip(request)), limit, window))
    if wait > 0:
        return problem(429, {"body": "Too many requests. Please wait a moment."}, retry_after(wait))
    postcode, bad = check_format(body.postcode)
    if bad is not None:
        return problem(422, {"postcode": bad.message})
    order, live = app.settings.resolution_order, app.live_sources and app.live_sources.once
    try:
        prefetch(app.sessions, postcode, order, live)  # the network first, no transaction open
        with session_scope(app.sessions) as session:
            answer = find(session, postcode, order, live)
    except SourceUnavailable as exc:
        log.warning("preview_source_unavailable", error=str(exc))
        message = "We cannot look up your MP just now. Please try again in a moment."
        return problem(503, {MEMBER_FIELD: message}, retry_after(SOURCE_WAIT))
    # A preview tells the supporter now what a held letter would wait for.
    targets = definition.targets.model_copy(update={"vacant_seat": "reject", "no_email": "reject"})
    outcome = decide(targets, postcode, answer)
    if isinstance(outcome, Refuse):
        field = "postcode" if outcome.field == POSTCODE_FIELD else MEMBER_FIELD
        # A postcode the directory does not know is not found; the rest are refusals.
        unknown = outcome.code == f"postcode:{PostcodeProblem.UNKNOWN}"
        return problem(404 if unknown else 422, {field: outcome.message})
    if not isinstance(outcome, Found):
        message = "We cannot find an MP to write to for this postcode just now."
        return problem(422, {MEMBER_FIELD: message})
    context = {
        "mp": {"name": outcome.member.name, "constituency": outcome.seat.name},
        "campaign": {"title": definition.title, "organisation": definition.organisation},
    }
    # The letter as the supporter has it so far, as the comparison stage will score it.
    typed = definition.draft_body if body.body is None else body.body
    letter = letter_body(definition, {"letter": {"body": typed, "answers": body.answers}})
    return PreviewOut(
        postcode=postcode,
        mp=MpOut(**context["mp"], party=outcome.member.party),
        letter=DraftOut(
            subject=choose_subject(definition, secrets.token_hex(8), ""),
            salutation=campaign_template(definition.salutation).render(context),
            body=definition.draft_body.strip(),
            sign_off=definition.sign_off,
        ),
        own_words=round(template(definition.draft_body).share(letter), 3),
    )


@router.get("/demo/{slug}", response_class=HTMLResponse, include_in_schema=False)
def demo_page(slug: str) -> Any:
    return FileResponse(STATIC / "demo.html", media_type="text/html")


@router.get("/static/{name}", include_in_schema=False)
def static(name: Literal["demo.js", "demo.css"]) -> Any:
    media = "text/javascript" if name.endswith(".js") else "text/css"
    return FileResponse(STATIC / name, media_type=media)
