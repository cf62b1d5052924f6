"""Own-words prompts: a campaign's questions, answered in the supporter's own words, are letter
text (checked as the body is, never a template), go into the letter where the campaign's template
places them, and count as the supporter's own words."""

from __future__ import annotations

from email import message_from_bytes, policy
from typing import Any

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from schemas.campaign import CampaignDefinition, Prompt
from schemas.submission import MAX_ANSWER, SubmissionV1, parse_submission
from tests.conftest import ApiClient
from tests.factories import submission
from tests.test_api import SLUG, posted
from tests.test_rendering import MP, campaign, payload
from tests.test_stages import get, step, store
from workers.database.engine import session_scope
from workers.database.models import Letter, LetterPrint, State
from workers.letters import originality
from workers.letters.definitions import update_definition
from workers.letters.mail.messages import letter_bytes
from workers.pipeline.app import App
from workers.stages.comparison import compare, letter_body
from workers.stages.rendering import compose, render
from workers.stages.resolution import resolve
from workers.stages.stage import Stage
from workers.stages.validation import campaign_errors, validate
from workers.web.api import create_app

WHY = Prompt(key="why", question="Why does this matter to you?", min_chars=20, max_chars=200)
FAMILY = Prompt(key="family", question="How does it affect your family?", required=True)
ANSWER = "My grandmother was held for two years without charge, and we still feel it every day."


def answer_share(draft: str) -> tuple[float, float]:
    """The bounds of the own-words share of the draft followed by ANSWER: the answer's words,
    give or take the few at its start that a shingle shares with the draft's end."""
    added, total = len(originality.words(ANSWER)), len(originality.words(f"{draft}\n\n{ANSWER}"))
    return added / total, (added + 6) / total


def asking(*prompts: Prompt, **changes: Any) -> CampaignDefinition:
    """The sample campaign with these questions."""
    return campaign(prompts=list(prompts), **changes)


def answered(answers: dict[str, Any], **changes: Any) -> SubmissionV1:
    parsed = parse_submission(submission(letter__answers=answers, **changes))
    assert isinstance(parsed, SubmissionV1), parsed
    return parsed


# The campaign's questions


def test_the_sample_campaign_asks_one_optional_question() -> None:
    assert [(p.key, p.required) for p in campaign().prompts] == [("why", False)]


@pytest.mark.parametrize(
    ("prompts", "refused"),
    [
        ([WHY, WHY], "a key of its own"),
        ([{"key": "why", "question": "Why?", "min_chars": 50, "max_chars": 10}], "min_chars"),
        ([{"key": "Why Me", "question": "Why?"}], "key"),
        ([{"key": "why", "question": ""}], "question"),
        ([{"key": "why", "question": "Why?", "max_chars": MAX_ANSWER + 1}], "max_chars"),
        ([{"key": f"q{n}", "question": "Why?"} for n in range(6)], "prompts"),
    ],
)
def test_a_campaigns_questions_are_checked_when_it_is_loaded(
    prompts: list[Any], refused: str
) -> None:
    data = campaign().model_dump(mode="json") | {"prompts": prompts}
    with pytest.raises(ValidationError, match=refused):
        CampaignDefinition.model_validate(data)


@pytest.mark.parametrize("template", ["letter_template", "letter_template_html"])
def test_a_template_that_leaves_the_answers_out_is_refused_so_none_is_silently_lost(
    template: str,
) -> None:
    data = campaign().model_dump(mode="json") | {template: "{{ salutation }}\n\n{{ body }}\n"}
    with pytest.raises(ValidationError, match=f"{template} must place the answers"):
        CampaignDefinition.model_validate(data)
    data["prompts"] = []  # without questions, a template need not name them
    CampaignDefinition.model_validate(data)


# Validation: the answers are letter text, and each question's rules hold


def test_an_answer_is_letter_text_kept_without_the_spaces_around_it() -> None:
    parsed = answered({"why": "  Line one\r\n\tline two  \r\n"})
    assert parsed.letter.answers == {"why": "Line one\n\tline two"}
    assert answered({}).letter.answers == {}
    absent = submission()
    assert "answers" not in absent["letter"]  # schema version 1 as it was: still valid
    assert isinstance(parse_submission(absent), SubmissionV1)


@pytest.mark.parametrize(
    ("answers", "field", "message"),
    [
        ({"why": "a\x00b"}, "letter.answers.why", "contains control characters"),
        ({"why": "a\x1b[2Jb"}, "letter.answers.why", "contains control characters"),
        ({"why": "a\u202eb"}, "letter.answers.why", "contains control characters"),
        ({"why": "broken \ud800 emoji"}, "letter.answers.why", "not valid text"),
        ({"why": "x" * (MAX_ANSWER + 1)}, "letter.answers.why", "too long"),
        ({"why": 7}, "letter.answers.why", "must be text"),
        ({"Not A Key!": "x"}, "letter.answers", "not one of the campaign's questions"),
        ({f"q{n}": "x" for n in range(6)}, "letter.answers", "at most 5"),
    ],
)
def test_an_answer_that_is_not_letter_text_is_refused_at_its_field(
    answers: dict[str, Any], field: str, message: str
) -> None:
    errors = parse_submission(submission(letter__answers=answers))
    assert isinstance(errors, dict)
    assert message in errors[field], errors


def test_each_questions_rules_are_said_at_its_field() -> None:
    definition = asking(WHY, FAMILY)
    cases = [
        ({"family": ANSWER, "other": ANSWER}, "letter.answers.other", "not one of the campaign's"),
        ({"family": ANSWER, "why": "Too short."}, "letter.answers.why", "at least 20 characters"),
        ({"family": ANSWER, "why": "x" * 201}, "letter.answers.why", "201 characters, the limit"),
        ({"why": ANSWER}, "letter.answers.family", "Please answer the question: How does it"),
        ({"family": "   \n ", "why": ANSWER}, "letter.answers.family", "Please answer"),
    ]
    for answers, field, message in cases:
        errors = campaign_errors(definition, answered(answers))
        assert list(errors) == [field] and message in errors[field], (answers, errors)
    # An optional question may be left empty (the page posts every box); a required one answered.
    assert campaign_errors(definition, answered({"family": ANSWER, "why": ""})) == {}


# Rendering: where the answers go, as data


def test_the_default_template_puts_each_answer_after_the_body_before_the_sign_off() -> None:
    definition = asking(WHY, FAMILY, letter_template_html=None)
    letter = compose(
        definition, "s-1", payload(letter__answers={"family": "Second.", "why": ANSWER}), MP
    )
    body = "As your constituent I ask you to stand with Palestinian political prisoners."
    # In the campaign's order, whatever the order posted; a paragraph each, questions unsaid.
    assert f"{body}\n\n{ANSWER}\n\nSecond.\n\nYours sincerely,\n" in letter.body_text
    assert WHY.question not in letter.body_text


def test_without_answers_the_letter_is_as_it_was_before_questions() -> None:
    plain = compose(campaign(prompts=[]), "s-1", payload(), MP)
    assert compose(campaign(), "s-1", payload(letter__answers={"why": ""}), MP) == plain


def test_an_answer_is_never_a_template_and_is_escaped_in_the_html() -> None:
    typed = "{{ 7*7 }} {% include 'secrets.txt' %} {{ mp.__class__ }} <script>alert(1)</script>"
    letter = compose(campaign(), "s-1", payload(letter__answers={"why": typed}), MP)
    assert f"\n\n{typed}\n\nYours sincerely," in letter.body_text  # literally, in the text
    assert letter.body_html is not None
    assert "<p>{{ 7*7 }} {% include &#39;secrets.txt&#39; %}" in letter.body_html
    assert "49" not in letter.body_html and "<script>" not in letter.body_html
    assert "&lt;script&gt;" in letter.body_html
    again = compose(campaign(), "s-1", payload(letter__answers={"why": typed}), MP)
    assert again == letter  # same inputs, same bytes


def test_a_campaign_template_may_place_the_answers_with_their_questions() -> None:
    template = (
        "{{ body }}\n{% for a in answers %}\n{{ a.question }}\n{{ a.text }}\n{% endfor %}\n"
        "{{ sign_off }}\n"
    )
    definition = asking(WHY, letter_template=template, letter_template_html=None)
    letter = compose(definition, "s-1", payload(letter__answers={"why": ANSWER}), MP)
    assert f"\n\n{WHY.question}\n{ANSWER}\n\nYours sincerely,\n" in letter.body_text


# The answers are the supporter's own words


def test_the_answers_are_compared_as_the_letter_has_them() -> None:
    definition = campaign()
    draft = {"letter": {"body": definition.draft_body}}
    with_answer = {"letter": {"body": definition.draft_body, "answers": {"why": ANSWER}}}
    assert letter_body(definition, with_answer) == f"{definition.draft_body.strip()}\n\n{ANSWER}"
    scored = originality.template(definition.draft_body)
    low, high = answer_share(definition.draft_body)
    assert scored.share(letter_body(definition, draft)) == 0.0
    assert low <= scored.share(letter_body(definition, with_answer)) <= high
    fixed = campaign(editable=["subject"])  # the body is the draft; the answer is still theirs
    own = {"letter": {"body": "ignored", "answers": {"why": ANSWER}}}
    assert low <= scored.share(letter_body(fixed, own)) <= high


def test_a_letter_with_an_answer_scores_its_own_words_and_the_mp_reads_the_answer(
    app: App,
) -> None:
    definition = campaign()
    scores = {}
    for answers in ({}, {"why": ANSWER}):
        sid = store(
            app,
            submission(
                letter__body=definition.draft_body,
                letter__answers=answers,
                supporter__email=f"a{len(answers)}@example.com",
            ),
        )
        assert step(app, validate, sid) == [Stage.RESOLVE, Stage.CONSENT]
        assert step(app, resolve, sid) == [Stage.COMPARE]
        assert step(app, compare, sid) == [Stage.RENDER]
        assert step(app, render, sid) == [Stage.DELIVER]
        with session_scope(app.sessions) as session:
            found = session.get(LetterPrint, sid)
            letter = session.get(Letter, sid)
            assert found is not None and letter is not None
            scores[bool(answers)] = found.own_words
            email = message_from_bytes(letter_bytes(letter), policy=policy.SMTP)
        assert (ANSWER in letter.body_text) == bool(answers)
        assert email["X-Own-Words"] == f"{round(found.own_words * 100)}%"
    low, high = answer_share(definition.draft_body)
    assert scores[False] == 0.0 and low <= scores[True] <= high


# The HTTP API: the page's questions, the live score, the answers' errors


def test_the_campaign_gives_a_page_its_questions(client: TestClient) -> None:
    data = client.get(f"/v1/campaigns/{SLUG}").json()
    assert data["prompts"] == [
        {
            "key": "why",
            "question": "Why does this matter to you?",
            "required": False,
            "min_chars": 20,
            "max_chars": 1500,
        }
    ]


def test_the_preview_counts_the_answers_as_own_words(client: TestClient) -> None:
    def own_words(**letter: Any) -> float:
        body = {"name": "A", "postcode": "dm11aa", **letter}
        reply = client.post(f"/v1/campaigns/{SLUG}/preview", json=body)
        assert reply.status_code == 200, reply.text
        return float(reply.json()["own_words"])

    assert own_words() == own_words(answers={"why": ""}) == 0.0
    assert own_words(answers={"why": ANSWER}) > 0.1  # the draft, and an answer of one's own
    assert own_words(body="My own short letter.", answers={"why": ANSWER}) == 1.0
    too_many = {f"q{n}": "x" for n in range(6)}
    reply = client.post(
        f"/v1/campaigns/{SLUG}/preview",
        json={"name": "A", "postcode": "dm11aa", "answers": too_many},
    )
    assert reply.status_code == 422


def test_the_api_refuses_a_bad_answer_at_its_field(app: App, stub_broker: Any) -> None:
    with session_scope(app.sessions) as session:
        update_definition(
            session,
            SLUG,
            prompts=[WHY.model_dump(), FAMILY.model_dump()],
        )
    with ApiClient(create_app(lambda: app, stub_broker)) as client:
        reply = client.post(
            "/v1/submissions",
            json=posted(letter__answers={"why": "Too short.", "nope": "x"}),
        )
        assert reply.status_code == 422
        assert reply.json()["errors"] == {
            "letter.answers.nope": "This is not one of the campaign's questions. "
            "Please reload the page.",
            "letter.answers.why": "Your answer is too short: write at least 20 characters.",
            "letter.answers.family": "Please answer the question: How does it affect your family?",
        }
        # A key that cannot be a question's is refused at the answers, not under the key.
        bad_key = client.post("/v1/submissions", json=posted(letter__answers={"Why?\n": "x"}))
        assert bad_key.json()["errors"] == {
            "letter.answers": "This is not one of the campaign's questions. Please reload the page."
        }
        accepted = client.post(
            "/v1/submissions", json=posted(letter__answers={"family": ANSWER, "why": ""})
        )
        assert accepted.status_code == 202, accepted.text
    assert get(app, accepted.json()["id"]).state == State.RECEIVED


@pytest.fixture
def client(app: App, stub_broker: Any) -> Any:
    with ApiClient(create_app(lambda: app, stub_broker)) as test_client:
        yield test_client
