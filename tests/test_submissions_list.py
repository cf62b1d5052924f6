"""``dearmp submissions list`` finds submissions by state, campaign, age and supporter (by the
keyed hash of the email) newest first, printing full ids and no personal data; ``--version``."""

from __future__ import annotations

import importlib.metadata
import json
from datetime import timedelta

import pytest
from click.testing import CliRunner
from sqlalchemy import update

from tests.factories import submission
from workers.cli import main
from workers.database.engine import session_scope
from workers.database.models import Submission, utcnow
from workers.pipeline.app import App
from workers.pipeline.intake import accept

EMAIL = "amira.haddad@example.com"
SLUG = "political-prisoners"


@pytest.fixture
def ids(app: App) -> list[str]:
    """Three submissions, oldest first: Amira's delivered 3 days ago, another's received
    2 days ago, and one for another campaign received an hour ago."""
    payloads = [
        (submission(supporter__email=EMAIL), "delivered", 72),
        (submission(supporter__email="someone@example.com"), "received", 48),
        (submission(campaign="another-campaign", supporter__email="c@example.com"), "received", 1),
    ]
    found = []
    with session_scope(app.sessions) as session:
        for payload, state, hours in payloads:
            sid = accept(session, payload, app.secret).submission_id
            at = utcnow() - timedelta(hours=hours)
            session.execute(
                update(Submission)
                .where(Submission.id == sid)
                .values(state=state, created_at=at, updated_at=at)
            )
            found.append(sid)
    return found


def listed(*args: str) -> list[str]:
    result = CliRunner().invoke(main, ["submissions", "list", "--json", *args])
    assert result.exit_code == 0, result.output
    return [row["id"] for row in json.loads(result.stdout)]


def test_the_list_is_newest_first_with_full_ids_and_no_personal_data(ids: list[str]) -> None:
    result = CliRunner().invoke(main, ["submissions", "list"], catch_exceptions=False)
    assert result.exit_code == 0
    lines = [line for line in result.stdout.splitlines() if any(i in line for i in ids)]
    assert [next(i for i in ids if i in line) for line in lines] == ids[::-1]
    assert "another-campaign" in lines[0] and "delivered" in lines[2]
    for detail in ("Amira", "amira", "someone@", "Mill Lane", "DM1 1AA"):
        assert detail not in result.stdout


def test_each_filter_narrows_the_list(ids: list[str]) -> None:
    assert listed("--state", "delivered") == [ids[0]]
    assert listed("--state", "received", "--state", "delivered") == ids[::-1]
    assert listed("--campaign", SLUG) == [ids[1], ids[0]]
    since = (utcnow() - timedelta(hours=50)).replace(tzinfo=None).isoformat()
    assert listed("--since", since) == [ids[2], ids[1]]  # without a zone: UTC
    assert listed("--limit", "1") == [ids[2]]


def test_email_finds_a_supporter_by_the_keyed_hash_and_is_never_printed(ids: list[str]) -> None:
    assert listed("--email", " Amira.Haddad@EXAMPLE.com") == [ids[0]]
    result = CliRunner().invoke(main, ["submissions", "list", "--email", EMAIL])
    assert ids[0] in result.stdout and "amira" not in result.output.lower()


def test_json_rows_hold_id_campaign_state_and_times(ids: list[str]) -> None:
    result = CliRunner().invoke(main, ["submissions", "list", "--json", "--state", "delivered"])
    [row] = json.loads(result.stdout)
    assert set(row) == {"id", "campaign", "state", "created", "updated"}
    assert [row["id"], row["campaign"], row["state"]] == [ids[0], SLUG, "delivered"]


def test_a_filter_matching_nothing_says_so_and_exits_1(ids: list[str]) -> None:
    for args in (["--campaign", "nope"], ["--email", "nobody@example.com"]):
        result = CliRunner().invoke(main, ["submissions", "list", *args])
        assert result.exit_code == 1 and "no submission matches" in result.stderr
        assert "nobody" not in result.output
    as_json = CliRunner().invoke(main, ["submissions", "list", "--json", "--state", "bounced"])
    assert (as_json.exit_code, json.loads(as_json.stdout)) == (1, [])


def test_a_bad_since_or_state_is_refused_with_usage(ids: list[str]) -> None:
    before_year_1 = ["--since", "0001-01-01T00:00+01:00"]  # in UTC: an OverflowError
    for args in (["--since", "last tuesday"], before_year_1, ["--state", "lost"], ["--limit", "0"]):
        assert CliRunner().invoke(main, ["submissions", "list", *args]).exit_code == 2


def test_version_is_the_installed_distributions() -> None:
    result = CliRunner().invoke(main, ["--version"])
    assert result.exit_code == 0
    assert result.stdout.strip() == f"dearmp, version {importlib.metadata.version('dearmp')}"
