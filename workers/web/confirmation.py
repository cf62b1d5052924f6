"""The link in a sender-confirmation email: a page, and its button that confirms."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import HTMLResponse
from sqlalchemy.orm import Session

from workers.database.engine import session_scope
from workers.pipeline.dispatch import dispatch
from workers.stages.confirmation import check_token, confirm, read_token
from workers.stages.stage import Stage
from workers.web.bodies import CONFIRM_RESPONSES
from workers.web.dependencies import AppDep, IntakeDep
from workers.web.supporter_pages import Masthead, masthead_of, page

router = APIRouter()


@router.get("/v1/confirm/{token}", response_class=HTMLResponse, responses=CONFIRM_RESPONSES)
def confirm_page(token: str, app: AppDep) -> Any:
    """The link in the confirmation email: a page whose button confirms. Opening the link
    changes nothing, so mail scanners that fetch links cannot confirm for the supporter."""
    with session_scope(app.sessions) as session:
        result = check_token(session, app.secret, token[:300])
        campaign = _campaign(session, app.secret, token[:300])
    button = "Send my letter to my MP" if result == "ready" else None
    return _confirm_page(result, campaign, button)


@router.post("/v1/confirm/{token}", response_class=HTMLResponse, responses=CONFIRM_RESPONSES)
def confirm_link(token: str, app: AppDep, intake: IntakeDep) -> Any:
    """The confirmation page's button."""
    with session_scope(app.sessions) as session:
        result, sid = confirm(session, app.secret, token[:300])
        campaign = _campaign(session, app.secret, token[:300])
    if result == "confirmed" and sid is not None:
        dispatch(intake.broker, [Stage.VALIDATE], sid)
    return _confirm_page(result, campaign)


CONFIRM_TEXTS: dict[str, tuple[int, str]] = {
    "ready": (200, "Please confirm that you wrote this letter to your MP."),
    "confirmed": (200, "Thank you: your letter is on its way to your MP."),
    "already": (200, "This letter was already confirmed."),
    "expired": (410, "This link has expired, so the letter was not sent."),
    "invalid": (404, "This link is not valid."),
}


def _campaign(session: Session, secret: bytes, token: str) -> Masthead | None:
    """The campaign of a genuine token's submission, expired or not; None for a forged one."""
    read = read_token(secret, token)
    return masthead_of(session, read[0] if read is not None else None)


def _confirm_page(
    result: str, campaign: Masthead | None, button: str | None = None
) -> HTMLResponse:
    status, heading = CONFIRM_TEXTS[result]
    return page(status, heading, campaign, button=button)
