"""The HTTP API's request and response bodies, and its answers in one shape."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from schemas.submission import MAX_ANSWER, MAX_PROMPTS, Postcode, SubmissionV1, single_line
from workers.pipeline.states import OUTCOMES as OUTCOMES  # what each state means to the supporter

HONEYPOT = "website"


class Errors(BaseModel):
    errors: dict[str, str] = Field(
        description="One message per field, keyed by its path (e.g. 'supporter.postcode')."
    )


class ConsentQuestionOut(BaseModel):
    channel: str
    wording: str
    sha256: str


class PromptOut(BaseModel):
    """A question the supporter may answer in their own words; the answer is posted as
    ``letter.answers.<key>`` and goes into the letter."""

    key: str
    question: str
    required: bool
    min_chars: int = Field(description="The shortest answer taken (an optional one may be empty).")
    max_chars: int


class CampaignOut(BaseModel):
    slug: str
    title: str
    organisation: str
    introduction: str
    subject_variants: list[str]
    draft_body: str
    editable: list[str]
    body_min_chars: int
    body_max_chars: int
    consent_version: str
    consent_questions: list[ConsentQuestionOut]
    mp_notice: str
    privacy_notice_url: str
    privacy_notice_version: str
    confirmation_required: bool
    prompts: list[PromptOut] = Field(
        default=[], description="Questions to answer in the supporter's own words, in order."
    )
    honeypot_field: str = Field(description="Leave this field empty; it is a trap for robots.")
    example_postcode: str | None = Field(
        default=None, description="A postcode the directory knows, for the form's hint."
    )


class PreviewIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Annotated[str, single_line("Full name", 100), Field(min_length=1, max_length=100)]
    postcode: Postcode
    address_lines: Annotated[
        list[Annotated[str, single_line("Address line", 100, min_len=0), Field(max_length=100)]],
        Field(max_length=5),
    ] = []
    # The letter as the supporter has edited it so far: the answer says how much of it is in
    # their own words (the draft when absent).
    body: str | None = Field(default=None, max_length=10_000)
    # The answers to the campaign's questions so far: their own words too.
    answers: dict[str, Annotated[str, Field(max_length=MAX_ANSWER)]] = Field(
        default={}, max_length=MAX_PROMPTS
    )


class MpOut(BaseModel):
    name: str
    constituency: str
    party: str


class DraftOut(BaseModel):
    subject: str
    salutation: str
    body: str
    sign_off: str


class PreviewOut(BaseModel):
    postcode: str
    mp: MpOut
    letter: DraftOut
    own_words: float = Field(
        description="The share of the letter (``body``, else the draft, and the ``answers``) in "
        "the supporter's own words, 0 to 1: letters in a constituent's own words carry more "
        "weight."
    )


class SubmissionIn(SubmissionV1):
    """A submission as the page posts it: the v1 schema plus the honeypot field."""

    model_config = ConfigDict(extra="forbid", title="Submission request")

    website: str | None = Field(
        default=None, max_length=200, description="Must be empty (a trap for robots)."
    )


class AcceptedOut(BaseModel):
    id: str
    state: str
    status_url: str
    duplicate: bool = False


class StatusOut(BaseModel):
    id: str
    campaign: str
    state: str
    final: bool
    received_at: str
    updated_at: str
    mp: dict[str, str] | None = None
    errors: dict[str, str] | None = None
    outcome: str


def problem(
    status: int, errors: dict[str, str], headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse({"errors": errors}, status_code=status, headers=headers)


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    404: {"model": Errors, "description": "No such campaign, submission or postcode."},
    413: {"model": Errors, "description": "The request body is over the size limit."},
    422: {"model": Errors, "description": "A message per invalid field."},
    429: {"model": Errors, "description": "Too many requests; see Retry-After."},
    503: {
        "model": Errors,
        "description": "The database or Redis cannot be reached just now; see Retry-After.",
    },
}
_PAGE = {"text/html": {"schema": {"type": "string"}}}
CONFIRM_RESPONSES: dict[int | str, dict[str, Any]] = {
    404: {"description": "A page: the link is not valid.", "content": _PAGE},
    410: {"description": "A page: the link has expired.", "content": _PAGE},
    422: {"model": Errors, "description": "The path is not a token."},
    503: {"model": Errors, "description": "The database cannot be reached just now."},
}


def status_path(submission_id: str) -> str:
    """Where a submission's status is read (``GET``)."""
    return f"/v1/submissions/{submission_id}"


def accepted(submission_id: str, state: str, duplicate: bool) -> JSONResponse:
    """The 202 for a stored submission, and the same for a robot's (nothing tells them apart)."""
    status_url = status_path(submission_id)
    body = AcceptedOut(id=submission_id, state=state, status_url=status_url, duplicate=duplicate)
    return JSONResponse(body.model_dump(), status_code=202, headers={"Location": status_url})


def no_campaign(slug: str) -> JSONResponse:
    return problem(404, {"campaign": f"There is no campaign called '{slug[:64]}'."})


def retry_after(wait: float) -> dict[str, str]:
    return {"Retry-After": str(max(1, int(wait + 0.999)))}
