"""The supporter's whole journey in a real headless browser (Debian's Chromium driven by
Playwright) against the real HTTP service on loopback, with the pipeline running: fill the form,
edit the letter, send, and see the letter arrive in the outbox."""

from __future__ import annotations

import email.policy
import re
import shutil
import threading
from collections.abc import Iterator
from email import message_from_bytes
from typing import Any

import dramatiq
import pytest
import uvicorn

from tests.services import free_port, unavailable, wait_for
from workers.pipeline.app import App
from workers.web.api import create_app

CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture
def server(app: App, stub_broker: Any, stub_worker: dramatiq.Worker) -> Iterator[str]:
    port = free_port()
    config = uvicorn.Config(
        create_app(lambda: app, stub_broker), host="127.0.0.1", port=port, log_level="warning"
    )
    web = uvicorn.Server(config)
    thread = threading.Thread(target=web.run, daemon=True)
    thread.start()
    assert wait_for(lambda: web.started, 10)
    yield f"http://127.0.0.1:{port}"
    web.should_exit = True
    thread.join(10)


@pytest.fixture
def browser(tmp_path: Any) -> Iterator[Any]:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        unavailable("Debian's chromium package is not installed")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=chromium, headless=True, args=CHROMIUM_FLAGS
        )
        yield browser
        browser.close()


def test_a_supporter_writes_to_their_mp_in_a_real_browser(
    app: App, server: str, browser: Any
) -> None:
    from playwright.sync_api import expect

    page = browser.new_page()
    page.goto(f"{server}/demo/political-prisoners")
    # The hint suggests a postcode this deployment's directory knows.
    expect(page.locator("#postcode-hint")).to_contain_text("for example DM1 1AA")
    expect(page.get_by_role("heading", level=1)).to_have_text(
        "Stand with Palestinian political prisoners"
    )
    page.get_by_label("Full name").fill("Amira Haddad")
    page.get_by_label("Email address").fill("amira.haddad@example.com")
    page.get_by_label("Postcode").fill("dm1 9zz")  # a terminated postcode first
    page.get_by_label("Address line 1").fill("12 Mill Lane")
    page.get_by_label("Address line 2 (optional)").fill("Millbrook")
    page.get_by_label(
        "Yes, I'd like to receive updates about campaigns and fundraising by email."
    ).check()
    page.get_by_role("button", name="Next: see your letter").click()

    # The error is shown next to the field, tied to it for screen readers.
    expect(page.locator("#postcode-error")).to_contain_text("no longer in use")
    expect(page.get_by_label("Postcode")).to_have_attribute("aria-invalid", "true")
    expect(page.get_by_label("Postcode")).to_have_attribute(
        "aria-describedby", "postcode-hint postcode-error"
    )

    page.get_by_label("Postcode").fill("dm1 1aa")
    page.get_by_role("button", name="Next: see your letter").click()
    expect(page.locator("#mp-line")).to_have_text(
        "Alex Rivers is the MP for Millbrook and Eastvale."
    )
    own_words = page.locator("#own-words")  # the draft as it is: none of it the supporter's
    expect(own_words).to_have_text(re.compile(r"^About 0 % in your own words"))
    letter = page.get_by_label("Your letter (edit it as you like)")
    letter.fill(
        "As your constituent in Millbrook, I ask you to raise the treatment of Palestinian "
        "political prisoners with the Foreign Secretary this month."
    )
    expect(own_words).to_have_text(re.compile(r"^About [1-9]\d* % in your own words"))

    # The campaign's question, under the letter: its error shown at it, as for any field.
    answer = page.get_by_label("Why does this matter to you? (optional)")
    expect(answer).to_have_attribute("maxlength", "1500")
    answer.fill("Too short.")
    page.get_by_role("button", name="Send my letter").click()
    expect(page.locator("#answer-why-error")).to_have_text(
        "Your answer is too short: write at least 20 characters."
    )
    expect(answer).to_have_attribute("aria-invalid", "true")
    expect(answer).to_be_focused()
    why = "My grandfather was held for a year without {{ charge }}, and we still feel it."
    with page.expect_response(
        lambda r: r.url.endswith("/preview") and "grandfather" in (r.request.post_data or "")
    ) as scored:
        answer.fill(why)  # the answer counts in the live score as the supporter's own words
    percent = round(scored.value.json()["own_words"] * 100)
    expect(own_words).to_have_text(re.compile(rf"^About {percent} % in your own words"))
    shown = own_words.inner_text().split()[1]  # as the letter's header will say
    page.get_by_role("button", name="Send my letter").click()

    expect(page.locator("#thanks")).to_be_visible()
    expect(page.locator("#status")).to_contain_text("delivered", timeout=30_000)
    reference = page.locator("#reference").inner_text()
    eml = app.settings.resolved_outbox_dir / f"{reference}.eml"
    assert wait_for(eml.exists, 5)
    message = message_from_bytes(eml.read_bytes(), policy=email.policy.default)
    assert message["To"] == "Alex Rivers <alex.rivers.mp@mp.example.org>"
    assert message["X-Own-Words"] == f"{shown}%"
    text = message.get_body(("plain",)).get_content()  # type: ignore[attr-defined]
    assert "raise the treatment of Palestinian political prisoners" in text
    # The answer after the body, as written (the {{ }} too), lines ending CRLF on the wire.
    assert f"this month.\r\n\r\n{why}\r\n\r\nYours sincerely," in text
    assert text.startswith("Dear Alex Rivers,")


def test_without_javascript_the_page_says_so_and_sends_nothing_by_get(
    server: str, browser: Any
) -> None:
    """Without JavaScript the form it cannot use is hidden, the page says how to write to an MP
    instead, and nothing personal leaves the browser even if the form is submitted."""
    from playwright.sync_api import expect

    page = browser.new_context(java_script_enabled=False).new_page()
    requests: list[str] = []
    page.on("request", lambda request: requests.append(f"{request.method} {request.url}"))
    page.goto(f"{server}/demo/political-prisoners")
    expect(page.locator("#details")).to_be_hidden()
    expect(page.get_by_label("Full name")).to_be_hidden()
    # Playwright's text and role locators skip <noscript>: CSS ones find what the browser shows.
    message = page.locator("#no-javascript")
    expect(message).to_be_visible()
    expect(message).to_contain_text("This page needs JavaScript")
    expect(message).to_contain_text("House of Commons, London SW1A 0AA")
    expect(message.locator("a")).to_have_attribute(
        "href", "https://members.parliament.uk/FindYourMP"
    )
    page.get_by_label("Full name").fill("Amira Haddad", force=True)
    page.get_by_label("Email address").fill("amira.haddad@example.com", force=True)
    page.get_by_label("Postcode").fill("DM1 1AA", force=True)
    page.get_by_label("Address line 1").fill("12 Mill Lane", force=True)
    page.get_by_label("Postcode").press("Enter")
    page.wait_for_load_state()
    for seen in [page.url, *requests]:
        for detail in ("Amira", "amira", "Mill", "DM1"):
            assert detail not in seen, seen


def test_the_confirmation_page_names_the_campaign_in_the_reference_look(
    app: App, server: str, browser: Any
) -> None:
    """The emailed link's page loads its stylesheet under its CSP, names the campaign and its
    organisation, and its button confirms."""
    from datetime import timedelta

    from playwright.sync_api import expect

    from tests.test_api_hardening import stored
    from workers.database.models import State, utcnow
    from workers.stages.confirmation import make_token

    sid = stored(app, State.UNCONFIRMED)
    page = browser.new_page()
    blocked: list[str] = []
    page.on("console", lambda message: blocked.append(message.text))
    page.goto(f"{server}/v1/confirm/{make_token(app.secret, sid, utcnow() + timedelta(days=1))}")
    expect(page).to_have_title(
        "Stand with Palestinian political prisoners — Example Solidarity Campaign"
    )
    masthead = page.locator("header.masthead")
    expect(masthead).to_contain_text("Example Solidarity Campaign")
    expect(masthead).to_contain_text("Stand with Palestinian political prisoners")
    expect(masthead).to_have_css("background-color", "rgb(29, 53, 87)")  # demo.css applied
    page.get_by_role("button", name="Send my letter to my MP").click()
    expect(page.get_by_role("heading", level=1)).to_contain_text("on its way")
    expect(page.locator("header.masthead")).to_contain_text("Example Solidarity Campaign")
    assert not [text for text in blocked if "Content Security Policy" in text]


def test_the_page_shows_the_outcome_of_every_state(app: App, server: str, browser: Any) -> None:
    """What the reference page shows while it follows a letter, for each state there is."""
    from playwright.sync_api import expect

    from tests.test_api_hardening import stored
    from workers.database.models import State
    from workers.web.bodies import OUTCOMES

    page = browser.new_page()
    for state in State:  # a new state without an outcome fails here
        sid = stored(app, state)
        page.goto(f"{server}/demo/political-prisoners")
        page.evaluate("url => { poll(url); }", f"/v1/submissions/{sid}")
        expect(page.locator("#status")).to_have_text(f"{state.value}: {OUTCOMES[state]}")
