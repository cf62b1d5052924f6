"""Validation: turn a stored payload into a valid submission, or a rejection with reasons."""

from __future__ import annotations

from sqlalchemy.orm import Session

from schemas.campaign import CampaignDefinition
from schemas.submission import SubmissionV1, parse_submission
from workers.database.models import State
from workers.database.transitions import WITH_PAYLOAD, Apply, current, done, move, one
from workers.letters.definitions import get_definition
from workers.stages.stage import Stage


def campaign_errors(definition: CampaignDefinition, submission: SubmissionV1) -> dict[str, str]:
    """What the campaign's own rules refuse in an otherwise well-formed submission."""
    errors = {}
    body, least, most = submission.letter.body, definition.body_min_chars, definition.body_max_chars
    if "body" in definition.editable and (error := _length_error("letter", body, least, most)):
        errors["letter.body"] = error
    errors.update(answer_errors(definition, submission.letter.answers))
    if submission.contact_preferences.wording_version != definition.consent.version:
        errors["contact_preferences.wording_version"] = (
            "The contact-preference wording has changed since this page was loaded. "
            "Please reload the page and choose again."
        )
    return errors


def answer_errors(definition: CampaignDefinition, answers: dict[str, str]) -> dict[str, str]:
    """What the campaign's questions refuse in the answers (already letter text, stripped)."""
    errors: dict[str, str] = {}
    for key in sorted(answers.keys() - {p.key for p in definition.prompts}):
        errors[f"letter.answers.{key}"] = (
            "This is not one of the campaign's questions. Please reload the page."
        )
    for prompt in definition.prompts:
        text, field = answers.get(prompt.key, ""), f"letter.answers.{prompt.key}"
        if not text:
            if prompt.required:
                errors[field] = f"Please answer the question: {prompt.question}"
        elif error := _length_error("answer", text, prompt.min_chars, prompt.max_chars):
            errors[field] = error
    return errors


def _length_error(what: str, text: str, least: int, most: int) -> str | None:
    if len(text) < least:
        return f"Your {what} is too short: write at least {least} characters."
    if len(text) > most:
        return f"Your {what} is too long: {len(text)} characters, the limit is {most}."
    return None


def plan(session: Session, submission_id: str) -> Apply[list[Stage]]:
    """Validate a received submission: what to write, and the stages to send it on to."""
    submission = current(session, submission_id, WITH_PAYLOAD)
    if submission is None or submission.state != State.RECEIVED:
        return done([])
    parsed = parse_submission(submission.payload)
    if isinstance(parsed, dict):
        errors = parsed
    else:
        same = parsed.campaign == submission.campaign_slug  # read with the submission
        digest = submission.definition_sha256 if same else None
        definition = get_definition(session, parsed.campaign, digest)
        if definition is None:
            errors = {"campaign": f"There is no campaign called '{parsed.campaign}'."}
        else:
            errors = campaign_errors(definition, parsed)
    if isinstance(parsed, dict) or errors:
        return move(submission, State.REJECTED, "invalid input", rejection=errors)
    payload = parsed.model_dump(mode="json")
    return move(submission, State.VALIDATED, then=[Stage.RESOLVE, Stage.CONSENT], payload=payload)


def validate(session: Session, submission_id: str) -> list[Stage]:
    """Validate a received submission; returns the stages to send it on to."""
    return one(session, submission_id, plan)
