"""The pages a supporter opens from an email (confirm the letter, answer the survey) name the
campaign and its organisation, in the reference page's look, with outside text escaped."""

from __future__ import annotations

import html
import re
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import update

from tests.conftest import ApiClient
from tests.test_api import SLUG
from tests.test_api_hardening import link_path, stored, survey_answers
from tests.test_webhooks import add, items
from workers.database.engine import session_scope
from workers.database.models import State, Submission, utcnow
from workers.database.transitions import At, advance
from workers.letters.definitions import update_definition
from workers.pipeline.app import App
from workers.stages import confirmation
from workers.stages.confirmation import make_token
from workers.stages.stage import Stage
from workers.web.api import create_app

TITLE = "Stand with Palestinian political prisoners"
ORGANISATION = "Example Solidarity Campaign"
NAMED = f"{TITLE} — {ORGANISATION}"


@pytest.fixture
def client(app: App, stub_broker: Any) -> Iterator[TestClient]:
    with ApiClient(create_app(lambda: app, stub_broker)) as api:
        yield api


def confirm_path(app: App, sid: str, valid: timedelta = timedelta(days=1)) -> str:
    return f"/v1/confirm/{make_token(app.secret, sid, utcnow() + valid)}"


def title(page: httpx.Response) -> str:
    found = re.search(r"<title>(.*?)</title>", page.text, re.S)
    assert found is not None
    return html.unescape(found.group(1))


def masthead(page: httpx.Response) -> str:
    """The header's text, tags dropped; empty when the page has no header."""
    found = re.search(r'<header class="masthead">(.*?)</header>', page.text, re.S)
    text = re.sub(r"<[^>]+>", " ", found.group(1)) if found else ""
    return " ".join(html.unescape(text).split())


def assert_named(page: httpx.Response) -> None:
    """The page's title and header name the sample campaign and its organisation, and it
    links the reference page's stylesheet."""
    assert title(page) == NAMED
    assert masthead(page) == f"{ORGANISATION} {TITLE}"
    assert '<link rel="stylesheet" href="/static/demo.css">' in page.text
    assert "DearMP" not in page.text


def assert_anonymous(page: httpx.Response) -> None:
    """A page for a link that is not genuine: the same look, and no campaign named."""
    assert title(page) == "Email your MP"
    assert masthead(page) == ""
    assert '<link rel="stylesheet" href="/static/demo.css">' in page.text
    assert TITLE not in page.text and ORGANISATION not in page.text


def test_the_confirmation_pages_name_the_campaign_and_organisation(
    app: App, client: TestClient
) -> None:
    path = confirm_path(app, stored(app, State.UNCONFIRMED))
    ready = client.get(path)
    assert ready.status_code == 200
    assert_named(ready)
    assert '<form method="post"><button type="submit">Send my letter' in ready.text
    confirmed = client.post(path)
    assert confirmed.status_code == 200 and "on its way" in confirmed.text
    assert_named(confirmed)
    for again in (client.get(path), client.post(path)):
        assert again.status_code == 200 and "already confirmed" in again.text
        assert_named(again)
        assert "<form" not in again.text


@pytest.mark.parametrize(
    ("moved_to", "status", "heading"),
    [
        (State.RECEIVED, 200, "This letter was already confirmed."),  # the other click
        (State.EXPIRED, 410, "This link has expired, so the letter was not sent."),
        (State.WITHDRAWN, 200, "withdrawn at your request, so nothing was sent"),  # erased
    ],
)
def test_a_click_moved_first_by_another_gets_the_page_for_where_it_is_now(
    app: App,
    client: TestClient,
    stub_broker: Any,
    monkeypatch: pytest.MonkeyPatch,
    moved_to: State,
    status: int,
    heading: str,
) -> None:
    """A double click, the expiry stage or an erasure moves the submission between this
    click's read and its move: the click loses, and says what happened instead."""
    sid = stored(app, State.UNCONFIRMED)
    read, moved = confirmation._read, []

    def racing(session: Any, secret: bytes, token: str) -> Any:
        found = read(session, secret, token)
        if not moved:
            with session_scope(app.sessions) as other:  # the other, in between
                advance(other, At(sid, State.UNCONFIRMED), moved_to)
            moved.append(moved_to)
        return found

    monkeypatch.setattr(confirmation, "_read", racing)
    lost = client.post(confirm_path(app, sid))
    assert moved == [moved_to]
    assert lost.status_code == status and heading in html.unescape(lost.text), lost.text
    assert_named(lost)
    assert "<form" not in lost.text
    assert stub_broker.queues[Stage.VALIDATE.queue].qsize() == 0  # this click sent nothing on
    with session_scope(app.sessions) as session:
        assert session.get(Submission, sid).state == moved_to  # type: ignore[union-attr]


def test_a_confirmation_link_says_a_letter_withdrawn_or_not_sent_was_not_sent(
    app: App, client: TestClient
) -> None:
    erased = stored(app, State.WITHDRAWN, erased_at=utcnow(), payload={"erased": True})
    for page in (client.get(confirm_path(app, erased)), client.post(confirm_path(app, erased))):
        text = html.unescape(page.text)
        assert page.status_code == 200 and "already confirmed" not in text
        assert "This letter was withdrawn at your request, so nothing was sent." in text
        assert "<form" not in page.text
    for state in (State.REJECTED, State.FAILED):
        sid = stored(app, state)
        status_url = f"{app.settings.public_url.rstrip('/')}/v1/submissions/{sid}"
        for page in (client.get(confirm_path(app, sid)), client.post(confirm_path(app, sid))):
            text = html.unescape(page.text)
            assert page.status_code == 200 and "already confirmed" not in text, state
            assert "This letter was not sent." in text and status_url in text
            assert "<form" not in page.text
        assert client.get(f"/v1/submissions/{sid}").status_code == 200  # the page it points to


def test_an_expired_confirmation_link_names_the_campaign(app: App, client: TestClient) -> None:
    path = confirm_path(app, stored(app, State.UNCONFIRMED), valid=-timedelta(hours=1))
    for page in (client.get(path), client.post(path)):
        assert page.status_code == 410 and "expired" in page.text
        assert_named(page)
        assert "<form" not in page.text


def test_a_forged_link_gets_the_same_look_and_names_nothing(app: App, client: TestClient) -> None:
    sid = stored(app, State.UNCONFIRMED)
    forged = confirm_path(app, sid)[:-3] + "AAA"
    survey_forged = link_path(app, sid, "yes").replace("/yes", "/no")
    for page in (
        client.get(forged),
        client.post(forged),
        client.get("/v1/confirm/not-a-token"),
        client.get(survey_forged),
        client.post(survey_forged),
    ):
        assert page.status_code == 404 and "not valid" in page.text
        assert_anonymous(page)


def test_the_survey_pages_name_the_campaign_and_organisation(app: App, client: TestClient) -> None:
    path = link_path(app, stored(app, State.DELIVERED), "not_yet")
    ready = client.get(path)
    assert ready.status_code == 200 and "Your letter to Alex Rivers." in ready.text
    assert_named(ready)
    assert '<form method="post"><button type="submit">Record my answer: Not yet' in ready.text
    recorded = client.post(path)
    assert recorded.status_code == 200 and "your answer is recorded" in recorded.text
    assert_named(recorded)


def test_a_survey_link_of_an_erased_supporter_records_nothing_and_tells_no_crm(
    app: App, client: TestClient
) -> None:
    add(app, "https://crm.example/hook")  # every event
    sid = stored(app, State.DELIVERED, erased_at=utcnow(), payload={"erased": True})
    path = link_path(app, sid, "no")
    for page in (client.get(path), client.post(path)):
        assert page.status_code == 200
        assert "Your answer cannot be recorded: your details were erased at your request." in (
            html.unescape(page.text)
        )
        assert "<form" not in page.text
        assert_named(page)
    assert survey_answers(app, sid) == [] and items(app) == []


def test_a_survey_page_offers_its_button_only_where_the_answer_can_be_recorded(
    app: App, client: TestClient
) -> None:
    """The page and its button ask the same question: a letter not delivered (rejected,
    withdrawn, still on its way, failed...) gets a page that says so, and no button."""
    heading = "Your answer cannot be recorded: your letter has not been delivered to your MP."
    for state in State:
        sid = stored(app, state)
        path = link_path(app, sid, "yes")
        if state in (State.DELIVERED, State.BOUNCED):
            assert "<form" in client.get(path).text
            assert client.post(path).status_code == 200 and survey_answers(app, sid) == ["yes"]
            continue
        for page in (client.get(path), client.post(path)):
            assert page.status_code == 200 and heading in html.unescape(page.text), state
            assert "<form" not in page.text
            assert_named(page)
        assert survey_answers(app, sid) == []


def test_outside_text_is_escaped_and_never_evaluated(app: App, client: TestClient) -> None:
    hostile = "<script>alert(1)</script> {{ 7*7 }}"
    with session_scope(app.sessions) as session:
        update_definition(session, SLUG, title=hostile, organisation="Tom & <b>Jerry</b>")
    mp = {"name": "<img src=x onerror=alert(2)>", "constituency": "Millbrook", "email": "a@b.c"}
    sid = stored(app, State.DELIVERED)
    with session_scope(app.sessions) as session:
        session.execute(update(Submission).where(Submission.id == sid).values(recipient=mp))
    for page in (client.get(confirm_path(app, sid)), client.get(link_path(app, sid, "yes"))):
        assert "<script>" not in page.text and "<b>" not in page.text and "<img" not in page.text
        assert "&lt;script&gt;alert(1)&lt;/script&gt; {{ 7*7 }}" in page.text
        assert "49" not in page.text
        assert title(page) == f"{hostile} — Tom & <b>Jerry</b>"
    assert "&lt;img src=x onerror=alert(2)&gt;" in page.text


def test_the_pages_may_load_their_stylesheet_and_nothing_else(app: App, client: TestClient) -> None:
    sid = stored(app, State.DELIVERED)
    for path in (confirm_path(app, sid), link_path(app, sid, "yes")):
        headers = client.get(path).headers
        csp = headers["content-security-policy"]
        assert "default-src 'none'" in csp and "style-src 'self'" in csp
        assert "script-src" not in csp and "frame-ancestors 'none'" in csp
        assert headers["cache-control"] == "no-store"
        assert headers["referrer-policy"] == "no-referrer"  # the token stays off the CSS request
    stylesheet = client.get("/static/demo.css")
    assert stylesheet.status_code == 200 and ".masthead" in stylesheet.text
