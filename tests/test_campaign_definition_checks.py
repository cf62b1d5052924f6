"""Campaign files are hostile input: a definition that cannot work (a header field on two lines,
a template that does not compile, names what it is not given, or gives a From name on two lines)
is refused when it is loaded, with one line naming the file, the campaign and the field, and
nothing changes; before, each supporter's letter failed or was retried until dead-lettered."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from pydantic import ValidationError

from config.settings import CONFIG_DIR, ConfigurationError
from schemas.campaign import LOADING, CampaignDefinition
from tests.test_rendering import MP, payload
from workers.cli import main
from workers.database.engine import session_scope
from workers.database.models import Campaign
from workers.letters.definitions import load_definitions
from workers.pipeline.app import App
from workers.stages import rendering

SAMPLE = CONFIG_DIR / "campaigns" / "political-prisoners.toml"
SLUG = "political-prisoners"


def sample(**changes: Any) -> dict[str, Any]:
    """The shipped sample campaign's file, as data, with ``changes``."""
    return tomllib.loads(SAMPLE.read_text()) | changes


def refusal(**changes: Any) -> str:
    """The one problem the sample campaign with ``changes`` is refused for."""
    with pytest.raises(ValidationError) as refused:
        CampaignDefinition.model_validate(sample(**changes), context=LOADING)
    [error] = refused.value.errors(include_url=False)
    message = str(error["msg"]).removeprefix("Value error, ")
    return ".".join(str(p) for p in error["loc"]) + f": {message}" if error["loc"] else message


def write(folder: Path, name: str, data: dict[str, Any]) -> None:
    """A campaign file: the sample's text with these top-level keys set (or replaced)."""
    text = SAMPLE.read_text()
    for key, value in data.items():
        line = f"{key} = {_toml(value)}\n"
        found = re.search(rf"^{key} = (?:\[.*?\]|.*?)\n", text, re.M | re.S)
        text = text.replace(found[0], line, 1) if found else line + text
    (folder / name).write_text(text)


def _toml(value: Any) -> str:
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    return '"' + escaped.replace("\r", "\\r").replace("\n", "\\n") + '"'


# What works


def test_the_shipped_campaigns_load() -> None:
    assert [d.slug for d in load_definitions(CONFIG_DIR / "campaigns")] == [SLUG]


def test_a_definition_with_templates_of_its_own_that_work_is_accepted() -> None:
    definition = CampaignDefinition.model_validate(
        sample(
            salutation="Dear {{ mp.name }} ({{ mp.constituency }}),",
            letter_template=(
                "{{ salutation }}\n\n{{ body }}\n\n{% for a in answers %}{{ a.question }}\n"
                "{{ a.text }}\n{% endfor %}{{ sign_off }}\n{{ supporter.name }}\n"
                "{{ supporter.address_lines | join(', ') }}, {{ supporter.postcode }}\n"
                "{% if supporter.address_lines | length > 1 %}{{ supporter.address_lines[1] }}"
                "{% endif %}{{ campaign.title }}, {{ campaign.organisation }}\n"
            ),
            sender_name="{{ supporter_name }}\n",  # stripped as rendering does: one line
            title="  Free them  ",
        )
    )
    assert definition.title == "Free them"  # kept without the spaces around it, as a supporter's
    letter = rendering.compose(definition, "s-1", payload(), MP)
    assert letter.from_name == "Amira Haddad"


# One-line fields


@pytest.mark.parametrize(
    ("field", "value", "refused"),
    [
        (
            "subject_variants",
            ["Please act", "Free them\r\nBcc: everyone@example.net"],
            "subject_variants.1: Subject variant must be on one line",
        ),
        ("organisation", "Example\nBcc: x@example.net", "organisation: Organisation must be on"),
        ("title", "Free them\rBcc: x@example.net", "title: Title must be on one line"),
        ("title", "Free \u202ethem", "title: Title must be on one line"),
        ("subject_variants", [" "], "subject_variants.0: Please enter your subject variant."),
    ],
)
def test_a_header_field_on_more_than_one_line_is_refused(
    field: str, value: Any, refused: str
) -> None:
    assert refusal(**{field: value}).startswith(refused)


def test_a_from_name_template_that_gives_two_lines_is_refused() -> None:
    assert refusal(sender_name="{{ supporter_name }}\nvia {{ organisation }}") == (
        "sender_name: The From name it gives must be on one line, without control characters."
    )


def test_a_from_name_longer_than_a_letter_can_store_for_the_longest_name_is_refused() -> None:
    too_long = refusal(sender_name="{{ supporter_name }} and " * 3 + "{{ organisation }}")
    assert too_long == "sender_name: The From name it gives must be at most 300 characters."


# Templates


NOT_WORKING = [
    (
        "letter_template",
        "{{ answers }}{{ supporter.nickname }}",
        "'dict object' has no attribute 'nickname'",
    ),
    ("letter_template", "{{ body }", "unexpected '}' (line 1)"),
    ("letter_template", "{{ answers }}\n{% if body %}", "Unexpected end of template. Jinja was"),
    ("letter_template", "{{ answers }} {{ signature }}", "'signature' is undefined"),
    (
        "letter_template_html",
        "{{ mp.party }}{{ answers }}",
        "'dict object' has no attribute 'party'",
    ),
    (
        "letter_template_html",
        "{% for a in answers %}{{ a.x }}{% endfor %}",
        "'dict object' has no attribute 'x'",
    ),
    ("salutation", "Dear {{ mp.name }", "unexpected '}' (line 1)"),
    ("salutation", "Dear {{ supporter.name }},", "'supporter' is undefined"),
    ("sender_name", "{{ supporter.name }}", "'supporter' is undefined"),
    ("sender_name", "{{ supporter_name }} via {{ campaign.title }}", "'campaign' is undefined"),
]


@pytest.mark.parametrize(("field", "source", "refused"), NOT_WORKING)
def test_a_template_that_does_not_compile_or_names_what_it_is_not_given_is_refused(
    field: str, source: str, refused: str
) -> None:
    assert refusal(**{field: source}).startswith(f"{field}: {refused}")


# One address line and no answer to an optional question are what many supporters send.
FEWEST = [
    ("{{ supporter.address_lines[1] }}{{ answers }}", "list object has no element 1"),
    ("{{ answers[0].text }}", "list object has no element 0"),
]


@pytest.mark.parametrize(("source", "refused"), FEWEST)
def test_a_template_that_fails_for_the_fewest_lines_or_answers_a_supporter_sends_is_refused(
    source: str, refused: str
) -> None:
    assert refusal(letter_template=source) == f"letter_template: {refused}"


@pytest.mark.parametrize(
    "source",
    [
        "{{ mp.__class__.__mro__ }}{{ answers }}",
        "{{ body.__class__ }}{{ answers }}",
        "{% include 'secrets.txt' %}{{ answers }}",
        "{{ 1 / 0 }}{{ answers }}",
    ],
)
def test_a_template_that_raises_in_the_sandbox_is_refused_on_one_line(source: str) -> None:
    refused = refusal(letter_template=source)
    assert refused.startswith("letter_template: ") and "\n" not in refused


# Loading files: one line per problem, naming the file, the campaign and the field


def test_a_bad_campaign_file_is_refused_with_one_line_naming_file_campaign_and_field(
    tmp_path: Path,
) -> None:
    write(tmp_path, "a-good.toml", {})
    write(tmp_path, "b-bad.toml", {"subject_variants": ["Free them\r\nBcc: everyone@example.net"]})
    with pytest.raises(ConfigurationError) as refused:
        load_definitions(tmp_path)
    assert refused.value.problems == [
        f"b-bad.toml: campaign {SLUG}: subject_variants[0]: Subject variant must be on one "
        "line, without control characters."
    ]


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        ({"letter_template": "{{ supporter.nickname }}{{ answers }}"},
         f"campaign {SLUG}: letter_template: 'dict object' has no attribute 'nickname'"),
        ({"sender_name": "{{ supporter_name }}\nvia {{ organisation }}"},
         f"campaign {SLUG}: sender_name: The From name it gives must be on one line"),
        ({"slug": "Not A Slug\nx"}, "slug: String should match pattern"),
    ],
)  # fmt: skip
def test_each_problem_in_a_file_is_one_line(
    tmp_path: Path, data: dict[str, Any], problem: str
) -> None:
    write(tmp_path, "c.toml", data)
    with pytest.raises(ConfigurationError) as refused:
        load_definitions(tmp_path)
    [line] = refused.value.problems
    assert line.startswith(f"c.toml: {problem}") and "\n" not in line


def test_two_files_for_one_campaign_are_refused_naming_both(tmp_path: Path) -> None:
    write(tmp_path, "a.toml", {})
    write(tmp_path, "b.toml", {"title": "Another title"})
    with pytest.raises(ConfigurationError) as refused:
        load_definitions(tmp_path)
    assert refused.value.problems == [f"b.toml: campaign {SLUG} is in a.toml too"]


@pytest.mark.parametrize(
    ("field", "text", "problem"),
    [
        ("no_email_message", "Write to {member} at {contact}.", "no placeholder {member} here"),
        ("vacant_message", "{mp} has gone.", "no placeholder {mp} here; it may use {constituency}"),
    ],
)
def test_a_targets_message_with_a_placeholder_it_is_not_given_is_refused(
    field: str, text: str, problem: str
) -> None:
    targets = sample()["targets"] | {field: text}
    assert refusal(targets=targets).startswith(f"targets.{field}: {problem}")


def test_a_file_that_is_not_toml_is_refused_with_one_line(tmp_path: Path) -> None:
    (tmp_path / "broken.toml").write_text('slug = "x\ntitle = \n')
    with pytest.raises(ConfigurationError) as refused:
        load_definitions(tmp_path)
    [line] = refused.value.problems
    assert line.startswith("broken.toml: not a TOML file: ") and "\n" not in line


def test_campaigns_sync_refuses_a_bad_file_in_one_line_and_changes_nothing(
    app: App, tmp_path: Path
) -> None:
    with session_scope(app.sessions) as session:
        before = session.get(Campaign, SLUG)
        assert before is not None
        stored = (before.title, before.definition_sha256)
    write(tmp_path, "p.toml", {"title": "New title", "letter_template": "{{ body }"})
    app.settings.campaigns_dir = tmp_path
    synced = CliRunner().invoke(main, ["campaigns", "sync"])
    assert synced.exit_code == 1
    assert synced.stderr == (
        f"Error: configuration: p.toml: campaign {SLUG}: letter_template: unexpected '}}' "
        "(line 1)\n"
    )
    with session_scope(app.sessions) as session:
        after = session.get(Campaign, SLUG)
        assert after is not None and (after.title, after.definition_sha256) == stored


def test_new_consent_words_under_a_version_already_used_are_refused_at_sync(
    app: App, tmp_path: Path
) -> None:
    """The ledger proves a consent by its wording's version: new words need a new version, and
    going back to a version the ledger holds means going back to its words."""
    from tests.test_consent_ledger import logged

    logged(app)  # the ledger holds consents under 2024-03-contact-v2
    text = SAMPLE.read_text()
    by_email = "Yes, I'd like to receive updates about campaigns and fundraising by email."
    v2, v3 = 'version = "2024-03-contact-v2"', 'version = "2024-03-contact-v3"'
    reworded = text.replace(by_email, "Yes, email me about everything.")
    app.settings.campaigns_dir = tmp_path

    def sync(campaign: str) -> Any:
        (tmp_path / "p.toml").write_text(campaign)
        return CliRunner().invoke(main, ["campaigns", "sync"])

    refused = sync(reworded)
    assert refused.exit_code == 1
    assert refused.stderr == (
        f"Error: configuration: campaign {SLUG}: its consent wording for email changed but its "
        "version (2024-03-contact-v2) did not: give the new wording a new [consent] version\n"
    )
    assert sync(reworded.replace(v2, v3)).stdout.strip() == f"changed: {SLUG}"
    back = sync(reworded)  # v2 again, with v3's words: the ledger says otherwise
    assert back.exit_code == 1 and "for email changed" in back.stderr
    assert sync(text).stdout.strip() == f"changed: {SLUG}"  # v2's own words: fine
    email, phone = (
        f'channel = "{ch}"\nwording = "Yes, I\'d like to receive updates about campaigns and '
        f'fundraising by {by}."'
        for ch, by in (("email", "email"), ("phone", "phone"))
    )
    assert email in text and phone in text
    reordered = text.replace(email, "<swap>").replace(phone, email).replace("<swap>", phone)
    moved = sync(reordered)
    assert moved.exit_code == 0, moved.stderr  # the same words in another order: no change


@pytest.mark.parametrize(
    ("changes", "refused"),
    [
        (
            {"quiet_hours": {"start": "00:00:00Z", "end": "06:00:00+01:00"}},
            "quiet_hours: quiet hours are UK time: give them without an offset or Z",
        ),
        (
            {"rate_limit": {"per_mp": 5, "window_seconds": float("inf")}},
            "rate_limit.window_seconds",
        ),
        ({"rate_limit": {"per_mp": 5, "window_seconds": 1e300}}, "rate_limit.window_seconds"),
        ({"body_min_chars": 500, "body_max_chars": 10}, "body_min_chars must be at most"),
        ({"body_max_chars": -1}, "body_max_chars: Input should be greater than or equal to 1"),
        ({"retention": {"delivered_days": 2**63 - 1}}, "retention: delivered_days must be at most"),
        ({"letter_template_html": "<p>{{ body|safe }}</p>"}, "letter_template_html: `safe`"),
        (
            {"letter_template_html": "{% filter safe %}{{ body }}{% endfilter %}"},
            "letter_template_html: `safe` and `autoescape` are refused",
        ),
        (
            {"letter_template_html": "{% autoescape false %}{{ body }}{% endautoescape %}"},
            "letter_template_html: `safe` and `autoescape` are refused",
        ),
        ({"privacy_notice_url": "javascript:alert(1)"}, "privacy_notice_url: must be an http://"),
        ({"allowed_origins": ["null"]}, "allowed_origins.0: 'null' is not an origin"),
        ({"allowed_origins": ["*"]}, "allowed_origins.0: '*' is not an origin"),
        ({"allowed_origins": ["https://a.org/"]}, "'https://a.org/' is not an origin"),
        (
            {
                "letter_template_html": "{{ (body|e)|replace('&lt;', '<'|safe) }}{{ answers }}",
            },
            "letter_template_html: `safe` and `autoescape` are refused",  # folded by the optimiser
        ),
        (
            {
                "letter_template_html": "{{ body }}"
                "{{ answers|map(attribute='text')|map('safe')|join }}"
            },
            "letter_template_html: `safe` and `autoescape` are refused",
        ),
        (
            {"letter_template_html": "{{ ('a'|e)|indent(supporter.name, true) }}{{ answers }}"},
            "letter_template_html: a width must be a whole number",
        ),
        ({"salutation": "{{ ('%-999999999s' % 'x')|length }}"}, "width or precision over 999"),
        ({"salutation": "{{ '%0999999999d'|format(1) }}"}, "width or precision over 999"),
        ({"salutation": "{{ 'x'|center(10**9) }}"}, "a width must be a whole number up to 1,000"),
        ({"salutation": "{{ 'x'|indent(10**9) }}"}, "a width must be a whole number up to 1,000"),
        ({"salutation": "{{ 10**64**64**64 }}"}, "a power over 2**64 to the 64th is refused"),
        ({"salutation": "{{ 'x' * 300000000 }}"}, "salutation: a * making over 10,000"),
        ({"salutation": "{{ 10 ** 100000 }}"}, "salutation: a power over"),
        ({"salutation": "{% for i in range(100000) %}x{% endfor %}"}, "a range over 1,000"),
        ({"salutation": "{{ lipsum(100000) }}"}, "salutation: 'lipsum' is undefined"),
        (
            {
                "letter_template": "{{ body }}{{ answers }}{% for i in range(1000) %}"
                "{% for j in range(200) %}x{% endfor %}{% endfor %}"
            },
            "letter_template: it makes a letter of over 100,000 characters",
        ),
    ],
)
def test_a_setting_that_would_break_every_letter_or_exhaust_a_worker_is_refused(
    changes: dict[str, Any], refused: str
) -> None:
    """Each of these loaded, then failed every letter (a time with an offset, an endless
    window), let a supporter's HTML reach the MP, or filled memory or hung the sync."""
    assert refused in refusal(**changes)


def test_a_channel_asked_twice_is_refused() -> None:
    """The ledger recorded the first wording while the version check saw the last."""
    consent = sample()["consent"]
    twice = consent | {"questions": [*consent["questions"], consent["questions"][0]]}
    assert refusal(consent=twice) == "consent: questions: channel email is asked more than once"


def test_a_from_address_a_letter_cannot_carry_is_refused(tmp_path: Path) -> None:
    write(tmp_path, "p.toml", {"from_email": "jürgen@campaign.example.org"})
    with pytest.raises(ConfigurationError) as refused:
        load_definitions(tmp_path)
    assert refused.value.problems == [
        "p.toml: from_email: an address with a non-ASCII local part needs SMTPUTF8"
    ]


def test_a_file_that_cannot_be_read_is_one_line(tmp_path: Path) -> None:
    """Not UTF-8, a folder or a dangling link named .toml, nested past the parser's depth."""
    (tmp_path / "latin1.toml").write_bytes('title = "Write for \xa3 fairness"\n'.encode("latin-1"))
    (tmp_path / "folder.toml").mkdir()
    (tmp_path / "gone.toml").symlink_to(tmp_path / "nowhere")
    (tmp_path / "deep.toml").write_text("x = " + "[" * 100_000 + "]" * 100_000 + "\n")
    with pytest.raises(ConfigurationError) as refused:
        load_definitions(tmp_path)
    problems = sorted(refused.value.problems)
    assert len(problems) == 4 and all("\n" not in p for p in problems), problems
    assert problems[0] == "deep.toml: not a TOML file: nested too deeply"
    assert problems[1].startswith("folder.toml: cannot be read: ")
    assert problems[2].startswith("gone.toml: cannot be read: ")
    assert problems[3].startswith("latin1.toml: not a TOML file: ")


def test_a_new_lawful_basis_under_a_version_already_used_is_refused_at_sync(
    app: App, tmp_path: Path
) -> None:
    """The ledger's events of a version give one lawful basis: another needs a new version."""
    from tests.test_consent_ledger import logged

    logged(app)
    basis = 'lawful_basis = "consent"'
    text = SAMPLE.read_text()
    assert text.count(basis) == 1
    (tmp_path / "p.toml").write_text(text.replace(basis, 'lawful_basis = "contract"'))
    app.settings.campaigns_dir = tmp_path
    refused = CliRunner().invoke(main, ["campaigns", "sync"])
    assert refused.exit_code == 1
    assert "its consent wording for lawful basis changed" in refused.stderr


def test_a_definition_stored_before_the_newer_checks_still_reads(app: App) -> None:
    """What a later check refuses in a file is still read from the database, so that a stored
    campaign's letters and retention go on while its file is fixed (retention read every
    campaign, and one such campaign stopped it for all)."""
    from workers.letters.definitions import get_definition
    from workers.privacy.rights import run_retention

    older = sample(
        slug="retired-2023",
        allowed_origins=["https://www.example.org/"],
        privacy_notice_url="/privacy",
        retention=sample()["retention"] | {"delivered_days": 5000},
        letter_template_html="<p>{{ body|safe }}{{ answers }}</p>",
    )
    stored = CampaignDefinition.model_validate(older)  # as it was stored: no context
    with pytest.raises(ValidationError):
        CampaignDefinition.model_validate(older, context=LOADING)
    with session_scope(app.sessions) as session:
        session.add(
            Campaign(
                slug="retired-2023",
                title=stored.title,
                mode="live",
                definition=stored.model_dump(mode="json"),
                definition_sha256="older",
            )
        )
    with session_scope(app.sessions) as session:
        found = get_definition(session, "retired-2023")
        assert found is not None and found.retention.delivered_days == 5000
        run_retention(session)
