"""The pages a supporter opens from an email: confirm a letter, answer the survey. One Jinja2
layout names the campaign and its organisation (a supporter sees whose page it is) and escapes
every value. Opening a link changes nothing, so a mail scanner that fetches links acts for no
one: only the page's button, which POSTs back to the same URL, does."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fastapi import APIRouter
from fastapi.responses import HTMLResponse
from jinja2 import Environment, FileSystemLoader, StrictUndefined
from sqlalchemy import select
from sqlalchemy.orm import Session

from schemas.campaign import CampaignDefinition
from workers.database.engine import session_scope
from workers.database.models import Submission
from workers.letters.definitions import get_definition
from workers.pipeline.app import App
from workers.pipeline.dispatch import dispatch
from workers.stages import confirmation, survey
from workers.stages.stage import Stage
from workers.web.bodies import CONFIRM_RESPONSES, status_path
from workers.web.dependencies import AppDep, IntakeDep

router = APIRouter()
CONFIRM_TEXTS: dict[str, tuple[int, str]] = {
    "ready": (200, "Please confirm that you wrote this letter to your MP."),
    "confirmed": (200, "Thank you: your letter is on its way to your MP."),
    "already": (200, "This letter was already confirmed."),
    "expired": (410, "This link has expired, so the letter was not sent."),
    "withdrawn": (200, "This letter was withdrawn at your request, so nothing was sent."),
    "not_sent": (200, "This letter was not sent."),
    "invalid": (404, "This link is not valid."),
}
SURVEY_TEXTS: dict[str, tuple[int, str]] = {
    "ready": (200, "Did your MP reply to your letter?"),
    "recorded": (200, "Thank you: your answer is recorded."),
    "erased": (200, "Your answer cannot be recorded: your details were erased at your request."),
    "not_delivered": (
        200,
        "Your answer cannot be recorded: your letter has not been delivered to your MP.",
    ),
    "invalid": (404, "This link is not valid."),
}
ANSWER_WORDS = {"yes": "Yes, they replied", "not_yet": "Not yet", "no": "No"}


def environment(folder: Path) -> Environment:
    """Templates whose every value is escaped, whatever the template's name."""
    return Environment(
        loader=FileSystemLoader(folder),
        autoescape=True,
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )


_templates = environment(Path(__file__).resolve().parent / "templates")


def campaign_of(session: Session, submission_id: str | None) -> CampaignDefinition | None:
    """The campaign a page names; None when there is no such submission. Callers pass only the
    id of a genuine (signed) token, so a forged link learns nothing."""
    if submission_id is None:
        return None
    slug = session.scalar(select(Submission.campaign_slug).where(Submission.id == submission_id))
    return None if slug is None else get_definition(session, slug)


def page(
    texts: tuple[int, str],
    campaign: CampaignDefinition | None,
    lines: Sequence[str] = (),
    button: str | None = None,
) -> HTMLResponse:
    """A page with its status and heading (``texts``), lines of text and an optional button,
    under the campaign's title and organisation."""
    status, heading = texts
    text = _templates.get_template("page.html.j2").render(
        heading=heading, campaign=campaign, lines=lines, button=button
    )
    return HTMLResponse(text, status_code=status)


def _confirming(session: Session, secret: bytes, token: str) -> CampaignDefinition | None:
    """The campaign of a genuine token's submission, expired or not; None for a forged one."""
    read = confirmation.read_token(secret, token)
    return campaign_of(session, read[0] if read is not None else None)


def _confirm_page(
    app: App, result: str, sid: str | None, campaign: CampaignDefinition | None
) -> HTMLResponse:
    """The confirmation link's page for ``result``; a letter not sent points to its status,
    which says why."""
    lines: tuple[str, ...] = ()
    if result == "not_sent" and sid is not None:
        status_url = app.settings.public_url.rstrip("/") + status_path(sid)
        lines = (f"Why: see its status at {status_url}",)
    button = "Send my letter to my MP" if result == "ready" else None
    return page(CONFIRM_TEXTS[result], campaign, lines=lines, button=button)


@router.get("/v1/confirm/{token}", response_class=HTMLResponse, responses=CONFIRM_RESPONSES)
def confirm_page(token: str, app: AppDep) -> Any:
    """The link in the confirmation email: a page whose button confirms."""
    with session_scope(app.sessions) as session:
        result, sid = confirmation.check_token(session, app.secret, token[:300])
        campaign = _confirming(session, app.secret, token[:300])
    return _confirm_page(app, result, sid, campaign)


@router.post("/v1/confirm/{token}", response_class=HTMLResponse, responses=CONFIRM_RESPONSES)
def confirm_link(token: str, app: AppDep, intake: IntakeDep) -> Any:
    """The confirmation page's button."""
    with session_scope(app.sessions) as session:
        result, sid = confirmation.confirm(session, app.secret, token[:300])
        campaign = _confirming(session, app.secret, token[:300])
    if result == "confirmed" and sid is not None:
        dispatch(intake.broker, [Stage.VALIDATE], sid)
    return _confirm_page(app, result, sid, campaign)


@router.get(
    "/v1/replied/{token}/{answer}", response_class=HTMLResponse, responses=CONFIRM_RESPONSES
)
def survey_page(token: str, answer: str, app: AppDep) -> Any:
    """The survey email's link: a page whose button records the answer."""
    submission_id = survey.read_token(app.secret, token[:300], answer)
    if submission_id is None:  # forged, or signed for another answer
        return page(SURVEY_TEXTS["invalid"], None)
    with session_scope(app.sessions) as session:
        result = survey.answerable(session, submission_id)  # as the button's will be
        found = survey.campaign_survey_mp(session, submission_id)
        campaign = get_definition(session, found[0]) if found is not None else None
    if found is None:  # no such submission
        return page(SURVEY_TEXTS["invalid"], None)
    if result != "ready":
        return page(SURVEY_TEXTS[result], campaign)
    return page(
        SURVEY_TEXTS["ready"],
        campaign,
        lines=(f"Your letter to {found[1]}.",),
        button=f"Record my answer: {ANSWER_WORDS[answer]}",
    )


@router.post(
    "/v1/replied/{token}/{answer}", response_class=HTMLResponse, responses=CONFIRM_RESPONSES
)
def survey_answer(token: str, answer: str, app: AppDep) -> Any:
    """The survey page's button: the answer becomes an event on the letter."""
    with session_scope(app.sessions) as session:
        result = survey.answer(session, app.secret, token[:300], answer)
        campaign = campaign_of(session, survey.read_token(app.secret, token[:300], answer))
    return page(SURVEY_TEXTS[result], campaign)
