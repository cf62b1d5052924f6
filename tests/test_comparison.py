"""The comparison stage: each letter's share of own words and its near-identical letters to the
same MP, stored in the database; the headers an office sorts on; a campaign that holds
near-identical letters for review, released or rejected by an operator; erasure forgets the
fingerprint."""

from __future__ import annotations

import json
from email import message_from_bytes, policy
from typing import Any

import dramatiq
from click.testing import CliRunner
from sqlalchemy import func, select

from schemas.campaign import SimilarLetters
from tests.conftest import drain
from tests.factories import submission
from tests.test_stages import get, step, store
from workers.cli import main
from workers.database.engine import session_scope
from workers.database.models import Letter, LetterBand, LetterPrint, State
from workers.letters import originality
from workers.letters.definitions import get_definition, update_definition
from workers.letters.mail.messages import letter_bytes
from workers.pipeline.app import App
from workers.pipeline.runtime import state_counts, submit
from workers.stages.comparison import compare
from workers.stages.rendering import render
from workers.stages.resolution import resolve
from workers.stages.stage import Stage
from workers.stages.validation import validate

SLUG = "political-prisoners"
OWN = (
    "My grandmother was held for two years without charge and my family still carries what "
    "that did to her every single day of our lives."
)


def _draft(app: App) -> str:
    with session_scope(app.sessions) as session:
        definition = get_definition(session, SLUG)
        assert definition is not None
        return definition.draft_body


def _compared(app: App, body: str, email: str = "a@example.com") -> str:
    sid = store(app, submission(letter__body=body, supporter__email=email))
    step(app, validate, sid)
    assert step(app, resolve, sid) == [Stage.COMPARE]
    return sid


def _print(app: App, sid: str) -> LetterPrint:
    with session_scope(app.sessions) as session:
        found = session.get(LetterPrint, sid)
        assert found is not None
        session.expunge(found)
        return found


def test_the_draft_as_it_is_scores_no_own_words_and_the_letter_says_so_in_its_headers(
    app: App,
) -> None:
    draft = _draft(app)
    sid = _compared(app, draft)
    assert step(app, compare, sid) == [Stage.RENDER]
    assert step(app, compare, sid) == []  # safe to run twice
    found = _print(app, sid)
    assert (found.own_words, found.decision, found.similar) == (0.0, "send", 0)
    assert originality.unpack(found.signature) == originality.signature(originality.words(draft))
    with session_scope(app.sessions) as session:
        assert session.scalar(select(func.count()).select_from(LetterBand)) == originality.BANDS
    assert step(app, render, sid) == [Stage.DELIVER]
    with session_scope(app.sessions) as session:
        letter = session.get(Letter, sid)
        assert letter is not None and letter.own_words == 0
        email = message_from_bytes(letter_bytes(letter), policy=policy.SMTP)
    assert email["X-Own-Words"] == "0%"
    assert email["List-Id"] == (
        '"Example Solidarity Campaign: Stand with Palestinian political prisoners" '
        "<political-prisoners.campaign.example.org>"
    )


def test_a_paragraph_of_ones_own_scores_its_share_and_near_identical_letters_are_counted(
    app: App,
) -> None:
    draft = _draft(app)
    first = _compared(app, draft, "first@example.com")
    step(app, compare, first)
    own = _compared(app, f"{draft.strip()}\n\n{OWN}", "own@example.com")
    step(app, compare, own)
    share = _print(app, own).own_words
    added, total = len(originality.words(OWN)), len(originality.words(draft + " " + OWN))
    assert added / total <= share <= (added + 6) / total
    # The second copy of the draft finds the first (and the letter with its own paragraph is
    # not near-identical at 0.9).
    again = _compared(app, draft, "again@example.com")
    step(app, compare, again)
    assert (_print(app, again).similar, _print(app, again).similar_recent) == (1, 1)
    assert _print(app, again).similar_anywhere >= 2  # LSH candidates, whatever the MP


def test_a_campaign_that_holds_near_identical_letters_sends_them_to_review_until_an_operator_acts(
    app: App, stub_broker: Any, stub_worker: dramatiq.Worker
) -> None:
    with session_scope(app.sessions) as session:
        update_definition(
            session, SLUG, similar_letters=SimilarLetters(policy="hold", hold_after=1)
        )
    draft = _draft(app)
    ids = []
    for i in range(4):  # one after another: each is compared with those stored before it
        ids.append(
            submit(
                app,
                stub_broker,
                submission(letter__body=draft, supporter__email=f"s{i}@example.com"),
            )[0]
        )
        drain(stub_broker, stub_worker)
    own = submit(app, stub_broker, submission(letter__body=f"{draft}\n\n{OWN}"))[0]
    drain(stub_broker, stub_worker)
    assert [get(app, sid).state for sid in ids] == ["delivered"] * 2 + ["in_review"] * 2
    assert get(app, own).state == State.DELIVERED  # in the supporter's own words: sent

    cli = CliRunner()
    listed = json.loads(cli.invoke(main, ["review", "list", "--json"]).stdout)
    assert [r["id"] for r in listed] == ids[2:] and listed[0]["similar_recent"] == 2
    released = cli.invoke(main, ["review", "release", ids[2]])
    assert released.exit_code == 0 and "released 1 letters" in released.output
    again = cli.invoke(main, ["review", "release", ids[2]])
    assert again.exit_code == 1 and "not in review" in again.output
    no_reason = cli.invoke(main, ["review", "reject", ids[3], "--reason", " "])
    assert no_reason.exit_code == 2
    reason = "Please write to your MP in your own words: identical letters are filtered."
    assert cli.invoke(main, ["review", "reject", ids[3], "--reason", reason]).exit_code == 0
    drain(stub_broker, stub_worker)
    assert state_counts(app, ids) == {"delivered": 3, "rejected": 1}
    assert get(app, ids[3]).rejection == {"letter.body": reason}  # what the supporter is told

    report = json.loads(cli.invoke(main, ["review", "report", SLUG, "--json"]).stdout)
    assert report["own_words"]["0-10%"] == 4 and sum(report["own_words"].values()) == 5
    assert report["per_mp"][0]["letters"] == 5 and report["per_mp"][0]["held"] == 2
    unknown = cli.invoke(main, ["review", "report", "nope"])
    assert unknown.exit_code == 1


def test_erasure_forgets_the_letters_fingerprint(app: App) -> None:
    from workers.privacy.rights import erase_supporter

    sid = _compared(app, _draft(app), "erase.me@example.com")
    step(app, compare, sid)
    with session_scope(app.sessions) as session:
        erase_supporter(session, app.secret, "erase.me@example.com")
    with session_scope(app.sessions) as session:
        assert session.get(LetterPrint, sid) is None
        assert session.scalar(select(func.count()).select_from(LetterBand)) == 0
