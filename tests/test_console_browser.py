"""The operators' console in a real headless browser (Debian's Chromium driven by Playwright)
against the real HTTP service on loopback: log in, see the overview, open a campaign, pause and
resume it; at 390 px wide no page scrolls sideways (wide tables scroll on their own)."""

from __future__ import annotations

from typing import Any

import dramatiq
import pytest
from pydantic import SecretStr

from tests.test_browser import browser, server  # noqa: F401  (fixtures)
from tests.test_console import ACCOUNTS, PASSWORD, SLUG, dead_letter, delivered
from workers.pipeline.app import App

NARROW = {"width": 390, "height": 844}


@pytest.fixture
def console_data(app: App, stub_broker: Any, stub_worker: dramatiq.Worker) -> list[str]:
    """Accounts configured (before the server's first request), and letters delivered."""
    app.settings.console_accounts = SecretStr(ACCOUNTS)
    ids = delivered(app, stub_broker, stub_worker, 3)
    dead_letter(app, ids[0], text="renderer exploded on a very long line " * 5)
    return ids


def fits(page: Any) -> None:
    """Nothing wider than the viewport: the page does not scroll sideways."""
    width = page.evaluate("document.documentElement.scrollWidth")
    assert width <= NARROW["width"], f"{page.url} is {width} px wide"


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)  # the page, not the database
def test_an_operator_pauses_and_resumes_a_campaign_at_390_px(
    console_data: list[str],
    server: str,  # noqa: F811
    browser: Any,  # noqa: F811
) -> None:
    from playwright.sync_api import expect

    page = browser.new_page(viewport=NARROW)
    page.goto(f"{server}/console/")
    expect(page.get_by_role("heading", level=1)).to_have_text("Log in")
    fits(page)
    page.get_by_label("Name").fill("ada")
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Log in").click()

    expect(page.get_by_role("heading", level=1)).to_contain_text("Overview")
    # The stylesheet is served and allowed by the page's policy.
    expect(page.locator("header.top")).to_have_css("background-color", "rgb(29, 59, 83)")
    fits(page)

    with page.expect_navigation():
        page.get_by_role("link", name="Campaigns").click()
    fits(page)
    page.get_by_role("link", name=SLUG).click()
    expect(page.get_by_role("heading", level=1)).to_have_text(
        "Stand with Palestinian political prisoners"
    )
    expect(page.locator("svg rect.sent")).to_have_count(30)
    fits(page)

    page.get_by_role("button", name="Pause its letters").click()
    expect(page.get_by_role("status")).to_have_text("Paused: letters wait until it is resumed.")
    fits(page)
    page.get_by_role("link", name="Pauses").click()
    expect(page.get_by_role("cell", name=f"campaign {SLUG}")).to_be_visible()
    fits(page)
    page.get_by_role("button", name="Resume").click()
    expect(page.get_by_role("status")).to_contain_text("Resumed")
    expect(page.get_by_role("button", name="Pause its letters")).to_be_visible()

    for name in ("Dead letters", "Waiting", "Overview"):
        with page.expect_navigation():  # measured once the new page is there, not mid-way
            page.get_by_role("link", name=name, exact=True).click()
        fits(page)
    page.get_by_role("link", name="Dead letters").click()
    page.get_by_role("link", name=console_data[0]).click()
    expect(page.get_by_text("[hidden]").first).to_be_visible()
    fits(page)
    page.get_by_role("button", name="Show personal data (logged)").click()
    expect(page.get_by_text("Amira Haddad", exact=True)).to_be_visible()
    fits(page)
