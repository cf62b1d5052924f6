"""The submission schema: what it accepts, and a specific human message for each bad field."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import idna
import pytest
from hypothesis import given
from hypothesis import strategies as st

from schemas import JSON_SCHEMA_DIR, json_schemas
from schemas.submission import SubmissionV1, normalise_postcode, parse_submission
from tests.factories import DELETE, submission
from workers.privacy.hashing import canonical_email


def errors_for(**changes: object) -> dict[str, str]:
    result = parse_submission(submission(**changes))
    assert isinstance(result, dict), "expected a rejection"
    return result


def test_valid_submission_parses_and_normalises() -> None:
    parsed = parse_submission(submission(supporter__postcode=" dm11aa ", supporter__name=" Amira "))
    assert isinstance(parsed, SubmissionV1)
    assert parsed.supporter.postcode == "DM1 1AA"
    assert parsed.supporter.name == "Amira"


@pytest.mark.parametrize(
    ("changes", "field", "fragment"),
    [
        ({"supporter__email": "not-an-email"}, "supporter.email", "not a valid email address"),
        ({"supporter__email": ""}, "supporter.email", "Please enter your email address"),
        ({"supporter__postcode": "12345"}, "supporter.postcode", "not a UK postcode"),
        ({"supporter__postcode": ""}, "supporter.postcode", "Please enter your postcode"),
        ({"supporter__name": "Eve\r\nBcc: x@example.com"}, "supporter.name", "one line"),
        ({"supporter__name": ""}, "supporter.name", "Please enter your full name"),
        ({"supporter__name": "x" * 101}, "supporter.name", "at most 100 characters"),
        ({"supporter__address_lines": []}, "supporter.address_lines", "at least 1"),
        ({"supporter__phone": "call me"}, "supporter.phone", "not a phone number"),
        ({"letter__subject": "Hi\nBcc: x@example.com"}, "letter.subject", "one line"),
        ({"letter__body": "   "}, "letter.body", "Your letter is empty"),
        ({"letter__body": "bad \x00 byte"}, "letter.body", "control characters"),
        ({"contact_preferences__email": "maybe"}, "contact_preferences.email", "granted, refused"),
        ({"idempotency_key": "short"}, "idempotency_key", "8 to 128"),
        ({"campaign": "Not A Slug!"}, "campaign", "slug"),
        ({"client_ip": "999.1.1.1"}, "client_ip", "not an IPv4 or IPv6 address"),
        ({"supporter": DELETE}, "supporter", "Supporter is required"),
        ({"surprise": 1}, "surprise", "not part of the submission schema"),
        # Text that shows nothing: a letter signed with an invisible name.
        ({"supporter__name": "\u200b\u200b"}, "supporter.name", "Please enter your full name"),
        ({"supporter__name": "\ufeff"}, "supporter.name", "Please enter your full name"),
        ({"supporter__name": "\u3164\u115f"}, "supporter.name", "Please enter your full name"),
        ({"supporter__name": "\u2800 "}, "supporter.name", "Please enter your full name"),
        ({"letter__body": "\u200b\n\u2060"}, "letter.body", "Your letter is empty"),
        # An address a mail reader could decode as another ("boss@attacker.org"@example.com).
        (
            {"supporter__email": "=?utf-8?q?boss=40attacker.org?=@example.com"},
            "supporter.email",
            "not a valid email address",
        ),
        # "$" matches before a final line break: the whole value is checked.
        ({"idempotency_key": "abcdefgh\n"}, "idempotency_key", "8 to 128"),
        ({"campaign": "political-prisoners\n"}, "campaign", "slug"),
    ],
)
def test_each_invalid_field_gets_a_specific_message(
    changes: dict[str, object], field: str, fragment: str
) -> None:
    errors = errors_for(**changes)
    assert field in errors, errors
    assert fragment.lower() in errors[field].lower()


def test_non_object_and_unknown_version_are_refused_with_reasons() -> None:
    assert parse_submission(["a list"]) == {"submission": "A submission must be a JSON object."}
    assert "schema_version" in parse_submission(submission(schema_version=2))  # type: ignore[operator]


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("sw1a1aa", "SW1A 1AA"),
        (" SW1A  1AA ", "SW1A 1AA"),
        ("m11ad", "M1 1AD"),
        ("EC1A1BB", "EC1A 1BB"),
    ],
)
def test_postcode_normalisation(raw: str, expected: str) -> None:
    assert normalise_postcode(raw) == expected


def test_every_live_postcode_in_the_shared_files_passes_the_format(shared_data: Path) -> None:
    for name in ("postcodes_gb_sample.csv", "postcodes_onspd_seed_sample.csv"):
        with (shared_data / name).open() as fh:
            for row in csv.DictReader(fh):
                # Crown dependencies are well-formed but have no MP: refused with their own reason.
                if row.get("status", "live") == "live" and row["pcon24cd"] != "L99999999":
                    for form in (row["postcode"], row["postcode_compact"].lower()):
                        errors = parse_submission(submission(supporter__postcode=form))
                        assert isinstance(errors, SubmissionV1), (form, errors)


def test_committed_json_schemas_are_up_to_date() -> None:
    for name, text in json_schemas().items():
        assert (JSON_SCHEMA_DIR / name).read_text() == text, f"run: dearmp schema export ({name})"
    schema = json.loads(json_schemas()["submission.v1.schema.json"])
    assert set(schema["required"]) >= {"campaign", "idempotency_key", "supporter", "letter"}


def _through_idna(domain: str) -> str:
    try:
        return str(idna.encode(domain, uts46=True).decode("ascii"))
    except idna.IDNAError:
        return domain


@given(
    st.text(st.characters(codec="ascii"), max_size=40)
    | st.text(st.sampled_from("abc-.xn_0ÄÖüé\u200d"), max_size=30).map(lambda d: f"xn--{d}")
    | st.text(st.sampled_from("abc-.ÄÖüéß\u200d"), max_size=30)
)
def test_a_supporters_domain_is_canonical_as_idna_gives_it(domain: str) -> None:
    local, _, lowered = f"Bob@{domain}".strip().lower().rpartition("@")
    assert canonical_email(f"Bob@{domain}") == f"{local}@{_through_idna(lowered)}"


def test_the_same_mailbox_in_unicode_and_in_idna_is_one_supporter() -> None:
    assert canonical_email(" Bob@München.DE ") == canonical_email("bob@xn--mnchen-3ya.de")
