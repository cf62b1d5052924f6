"""The link in a sender-confirmation email: a page, and its button that confirms."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

from workers.database.engine import session_scope
from workers.pipeline.dispatch import dispatch
from workers.stages.confirmation import check_token, confirm
from workers.stages.stage import Stage
from workers.web.bodies import CONFIRM_RESPONSES
from workers.web.dependencies import AppDep, IntakeDep

router = APIRouter()


@router.get("/v1/confirm/{token}", response_class=HTMLResponse, responses=CONFIRM_RESPONSES)
def confirm_page(token: str, app: AppDep) -> Any:
    """The link in the confirmation email: a page whose button confirms. Opening the link
    changes nothing, so mail scanners that fetch links cannot confirm for the supporter."""
    with session_scope(app.sessions) as session:
        result = check_token(session, app.secret, token[:300])
    if result != "ready":
        return _confirm_page(result)
    return _confirm_page(
        "ready",
        '<form method="post"><button type="submit">Send my letter to my MP</button></form>',
    )


@router.post("/v1/confirm/{token}", response_class=HTMLResponse, responses=CONFIRM_RESPONSES)
def confirm_link(token: str, app: AppDep, intake: IntakeDep) -> Any:
    """The confirmation page's button."""
    with session_scope(app.sessions) as session:
        result, sid = confirm(session, app.secret, token[:300])
    if result == "confirmed" and sid is not None:
        dispatch(intake.broker, [Stage.VALIDATE], sid)
    return _confirm_page(result)


CONFIRM_TEXTS: dict[str, tuple[int, str]] = {
    "ready": (200, "Please confirm that you wrote this letter to your MP."),
    "confirmed": (200, "Thank you: your letter is on its way to your MP."),
    "already": (200, "This letter was already confirmed."),
    "expired": (410, "This link has expired, so the letter was not sent."),
    "invalid": (404, "This link is not valid."),
}


def _confirm_page(result: str, form: str = "") -> HTMLResponse:
    return link_page(*CONFIRM_TEXTS[result], form)


def link_page(code: int, text: str, form: str = "") -> HTMLResponse:
    """The page a link in an email opens: a heading and, to act, a form with one button."""
    page = (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        f"<title>DearMP</title></head><body><main><h1>{text}</h1>{form}</main></body></html>"
    )
    return HTMLResponse(page, status_code=code)
