"""The pages a supporter opens from an email (confirm a letter, answer the survey), in one
Jinja2 layout that names the campaign and its organisation and links the reference page's
stylesheet: a supporter sees whose page it is. Jinja2 escapes every value put in it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from fastapi.responses import HTMLResponse
from jinja2 import Environment, FileSystemLoader, StrictUndefined
from sqlalchemy import select
from sqlalchemy.orm import Session

from workers.database.models import Submission
from workers.letters.definitions import get_definition

TEMPLATES = Path(__file__).resolve().parent / "templates"
_templates = Environment(
    loader=FileSystemLoader(TEMPLATES),
    autoescape=True,
    undefined=StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)


@dataclass(frozen=True)
class Masthead:
    """The names a page carries: the campaign's title and the organisation running it."""

    title: str
    organisation: str


def masthead(session: Session, slug: str) -> Masthead | None:
    definition = get_definition(session, slug)
    return None if definition is None else Masthead(definition.title, definition.organisation)


def masthead_of(session: Session, submission_id: str | None) -> Masthead | None:
    """The names for a submission's page; None when there is no such submission. Callers pass
    only the id of a genuine (signed) token, so a forged link learns nothing."""
    if submission_id is None:
        return None
    slug = session.scalar(select(Submission.campaign_slug).where(Submission.id == submission_id))
    return None if slug is None else masthead(session, slug)


def page(
    status: int,
    heading: str,
    campaign: Masthead | None,
    lines: Sequence[str] = (),
    button: str | None = None,
) -> HTMLResponse:
    """A page: its heading, lines of text and, to act, a form whose one button POSTs back to
    the page's own URL (opening a link changes nothing; only the button does)."""
    text = _templates.get_template("page.html.j2").render(
        heading=heading, campaign=campaign, lines=lines, button=button
    )
    return HTMLResponse(text, status_code=status)
