"""Own-words share and near-duplicate fingerprints (workers/letters/originality.py)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from workers.letters import originality as o
from workers.letters.originality import SHINGLE, Template, own_words_share

REPO = Path(__file__).resolve().parent.parent
DRAFT = tomllib.loads((REPO / "config/campaigns/political-prisoners.toml").read_text())[
    "draft_body"
]
# Two vocabularies with no word in common, and none a greeting or a closing.
TEMPLATE_WORDS = ["prisoners", "rights", "urge", "government", "law", "charge", "trial", "ask"]
OWN_WORDS = ["brother", "held", "years", "village", "school", "doctor", "night", "river"]

template_words = st.lists(st.sampled_from(TEMPLATE_WORDS), min_size=SHINGLE, max_size=120)
own_words = st.lists(st.sampled_from(OWN_WORDS), min_size=1, max_size=80)
hostile = st.one_of(
    st.text(),
    st.text(alphabet=st.characters(codec="utf-8")),
    st.text(alphabet="\u200b\u200d\u200e\u200f\u202e\u2066\ufeff\x00\x07\r\n\t .,;!?'\"-"),
    st.text(alphabet="abc абв αβγ אבג عرب 中文 ١٢٣ e\u0301\u200b\n"),
)
fast = settings(max_examples=60, deadline=None)


def paragraphs(*parts: list[str]) -> str:
    return "\n\n".join(" ".join(part) for part in parts)


@fast
@given(template_words)
def test_the_template_itself_has_no_own_words(text: list[str]) -> None:
    """A letter that is the template, word for word, scores 0 % own words."""
    assert own_words_share(" ".join(text), " ".join(text)) == 0.0


def test_the_sample_campaign_unedited_has_no_own_words() -> None:
    """The sample campaign's draft body sent as it is scores 0 %."""
    assert own_words_share(DRAFT, DRAFT) == 0.0


@fast
@given(template_words, template_words, own_words)
def test_an_own_paragraph_scores_its_share_of_words(
    before: list[str], after: list[str], own: list[str]
) -> None:
    """A paragraph of N own words between template paragraphs scores about N / total words.

    Own words are never covered; a template word can lose its cover only in a run of fewer than
    SHINGLE words beside the paragraph, so at most SHINGLE - 1 words on each side count as own.
    """
    template = paragraphs(before, after)
    total = len(before) + len(own) + len(after)
    share = own_words_share(paragraphs(before, own, after), template)
    assert len(own) / total <= share <= (len(own) + 2 * (SHINGLE - 1)) / total


def test_an_own_paragraph_in_the_sample_campaign() -> None:
    """Twenty words of the supporter's own after the draft body score 20 / (draft + 20)."""
    own = "my brother was held for two years without charge and our family still waits " * 2
    own = " ".join(own.split()[:20])
    share = own_words_share(f"{DRAFT}\n\n{own}", DRAFT)
    assert share == pytest.approx(20 / (len(o.words(DRAFT)) + 20))


@fast
@given(template_words, own_words, st.sampled_from(["Jane Smith MP", "Sir or Madam", "Mr Khan"]))
def test_salutation_and_sign_off_do_not_change_the_score(
    text: list[str], own: list[str], mp: str
) -> None:
    """ "Dear ..." at the start and a closing with a name at the end are not letter words."""
    body = paragraphs(text, own)
    for signed in (
        f"Dear {mp},\n\n{body}\n\nYours sincerely,\nJane Doe",
        f"Dear {mp}\n{body}\nKind regards\n\nJane Doe\nN1 1AA",
        f"{body}\n\nThanks,\nJ. Doe",
        f"Hello {mp},\n{body}\nBest wishes, Jane",
    ):
        assert o.words(signed) == o.words(body)
        assert own_words_share(signed, " ".join(text)) == own_words_share(body, " ".join(text))


@pytest.mark.parametrize(
    "body",
    [
        "Dear me. I never thought I would write to an MP.",
        "Hello, I have lived in your constituency for thirty years and I care about this.",
        "Please act.\n\nThanks to your vote last year, my brother came home safely from prison.",
        "Please act.\n\nBest of all would be a debate in the House on this question soon.",
    ],
)
def test_real_content_is_not_taken_for_a_salutation_or_a_sign_off(body: str) -> None:
    """A sentence that begins like a greeting or a closing keeps all its words."""
    assert len(o.words(body)) == len(body.split())


def test_words_are_normalised() -> None:
    """Case, compatibility forms, apostrophes and invisible characters do not make new words."""
    assert o.words("Don\u2019t  DETAIN\u200b them \u2014 \uff35\uff2b law!") == o.words(
        "dont detain them uk law"
    )
    assert o.words("pri\u200bso\u00adners") == ["prisoners"]


def test_edges() -> None:
    """An empty template leaves every word the supporter's own; an empty letter has none."""
    assert own_words_share("Free them.", "") == 1.0
    assert own_words_share("", DRAFT) == 0.0
    assert own_words_share("!!! ...", DRAFT) == 0.0
    assert o.words("Thank you for standing up for prisoners.") != []
    assert own_words_share("", "") == 0.0


def test_a_template_shorter_than_a_shingle_still_counts() -> None:
    """A three-word template copied into a letter is covered by three-word runs."""
    assert own_words_share("Free them all. Our own words.", "Free them all") == 0.5


@fast
@given(hostile)
def test_hostile_text_never_raises_and_stays_in_range(text: str) -> None:
    """Any text scores in [0, 1] and gets a full signature and band keys that fit a BIGINT."""
    assert 0.0 <= own_words_share(text, DRAFT) <= 1.0
    assert 0.0 <= own_words_share(DRAFT, text) <= 1.0
    sig = o.signature(o.words(text))
    assert len(sig) == o.NUM_PERM
    assert all(0 <= key < 2**63 for key in o.bands(sig))
    assert o.similarity(sig, sig) == 1.0


def test_a_huge_body_is_scored() -> None:
    """A 100 kB body of mixed scripts and control characters is scored without trouble."""
    body = ("Free them \u200b now! абв 中文 عرب \x00\x1b[31m " * 2500)[:100_000]
    assert 0.0 <= own_words_share(body, DRAFT) <= 1.0
    assert len(o.bands(o.signature(o.words(body)))) == o.BANDS


def test_signatures_are_the_same_in_every_process() -> None:
    """Another process (with another hash seed) computes the same signature and band keys."""
    code = (
        "import json, sys; from workers.letters import originality as o; "
        "s = o.signature(o.words(sys.stdin.read())); print(json.dumps([s, o.bands(s)]))"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run(
        [sys.executable, "-c", code], input=DRAFT, capture_output=True, text=True, check=True,
        cwd=REPO, env=env,
    ).stdout  # fmt: skip
    sig = o.signature(o.words(DRAFT))
    assert json.loads(out) == [list(sig), o.bands(sig)]


def test_signatures_and_band_keys_are_those_stored_by_earlier_releases() -> None:
    """Stored signatures and band keys are compared with new ones: a change to any constant or
    hash of ``originality`` fails here, and then needs a migration that computes the stored ones
    again (the comparison window), not only new code."""
    text = (
        "Dear Jane Smith MP, I am writing as your constituent to ask you to press the Foreign "
        "Secretary on the detention without trial of political prisoners. Please reply and tell "
        "me what you will do. Yours sincerely, Ada"
    )
    sig = o.signature(o.words(text))
    assert hashlib.sha256(o.pack(sig)).hexdigest()[:16] == "229fa536e75316ab"
    assert hashlib.sha256(repr(o.bands(sig)).encode()).hexdigest()[:16] == "a8a2d9282bdbbe3f"


def test_similarity_of_a_letter_with_itself_and_with_an_unrelated_one() -> None:
    """A letter is wholly similar to itself and barely to a letter on another subject."""
    other = (
        "The new bus timetable leaves our village without a service after six in the evening, "
        "so my daughter cannot get home from her college course. Please ask the council to "
        "restore the late bus, which many older residents also relied on for appointments."
    )
    sig = o.signature(o.words(DRAFT))
    assert o.similarity(sig, sig) == 1.0
    assert o.similarity(sig, o.signature(o.words(other))) <= 0.1


def test_a_lightly_edited_letter_is_a_near_duplicate() -> None:
    """One changed word in the draft body keeps the estimate near the exact Jaccard (~0.92)."""
    edited = DRAFT.replace("urge", "press")
    a, b = o.words(DRAFT), o.words(edited)
    grams_a = set(zip(*(a[i:] for i in range(SHINGLE)), strict=False))
    grams_b = set(zip(*(b[i:] for i in range(SHINGLE)), strict=False))
    exact = len(grams_a & grams_b) / len(grams_a | grams_b)
    estimate = o.similarity(o.signature(a), o.signature(b))
    assert abs(estimate - exact) <= 0.15
    assert set(o.bands(o.signature(a))) & set(o.bands(o.signature(b)))


def test_band_keys_carry_their_band_number() -> None:
    """Each band key names its band, so two letters collide only in the same band."""
    keys = o.bands(o.signature(o.words(DRAFT)))
    assert [o.band_number(key) for key in keys] == list(range(o.BANDS))


@fast
@given(st.lists(st.integers(min_value=0, max_value=2**32 - 1), min_size=64, max_size=64))
def test_pack_round_trip(values: list[int]) -> None:
    """A signature packed for the database unpacks to itself."""
    sig = tuple(values)
    assert o.unpack(o.pack(sig)) == sig
    assert len(o.pack(sig)) == 4 * o.NUM_PERM


def test_unpack_refuses_a_wrong_length() -> None:
    """Bytes of another length are not a signature."""
    with pytest.raises(ValueError, match="bytes"):
        o.unpack(b"\x00" * 10)
    with pytest.raises(ValueError):
        o.similarity((1, 2), (1, 2, 3))


def test_template_is_built_once() -> None:
    """own_words_share builds a campaign's Template once and reuses it."""
    assert o.template(DRAFT) is o.template(DRAFT)
    assert isinstance(o.template(DRAFT), Template)


def test_the_passages_a_writer_added_are_quoted_as_written() -> None:
    """What an MP's digest shows of each letter: its own words, even inside a sentence of the
    template, apostrophes and capitals as typed; not a word changed here and there."""
    draft = Template(DRAFT)
    first = DRAFT.strip().splitlines()[0]
    extended = f"{first.rstrip('.')} and to urge the Government to act."
    assert draft.added(extended) == ["and to urge the Government to act"]
    own = f"{DRAFT}\n\nMy cousin wasn\u2019t charged.\n\nYours sincerely,\nAmira"
    assert draft.added(own) == ["My cousin wasn\u2019t charged"]
    assert draft.added(f"Dear Alex,\n{DRAFT}") == []
    assert draft.added("") == [] and Template("").added("Two words") == []
