"""Rendering and the email on the wire: the letter's shape, injection safety, sandbox, DKIM."""

from __future__ import annotations

import email
import email.policy
from datetime import UTC, datetime
from typing import Any

import dkim
import pytest

from config.settings import CONFIG_DIR
from schemas.campaign import CampaignDefinition
from tests.factories import submission
from tests.services import dkim_keys
from workers.database.models import Letter
from workers.letters.definitions import load_definitions
from workers.letters.mail import DkimSigner, outgoing
from workers.letters.mail.messages import letter_bytes
from workers.stages.rendering import Recipient, choose_subject, compose

MP = Recipient("Alex Baker", "alex.baker.mp@parliament.uk", "Aldershot")


def campaign(**changes: Any) -> CampaignDefinition:
    base = load_definitions(CONFIG_DIR / "campaigns")[0]
    return base.model_copy(update=changes)


def payload(**changes: Any) -> dict[str, Any]:
    data = submission(**changes)
    data["supporter"]["postcode"] = "GU12 4LW"
    return data


def stored(letter: Any) -> Letter:
    return Letter(
        submission_id="s-1",
        message_id=letter.message_id,
        subject=letter.subject,
        body_text=letter.body_text,
        body_html=letter.body_html,
        from_name=letter.from_name,
        from_email=letter.from_email,
        reply_to=letter.reply_to,
        to_name=letter.to_name,
        to_email=letter.to_email,
        content_sha256=letter.content_sha256,
        created_at=datetime(2026, 11, 23, 12, 0, tzinfo=UTC),
    )


def test_a_constituents_letter_salutation_body_then_name_address_postcode_email() -> None:
    letter = compose(campaign(), "s-1", payload(), MP)
    lines = letter.body_text.splitlines()
    assert lines[0] == "Dear Alex Baker,"
    body_at = lines.index(
        "As your constituent I ask you to stand with Palestinian political prisoners."
    )
    tail = lines[body_at + 1 :]
    assert [line for line in tail if line] == [
        "Yours sincerely,",
        "Amira Haddad",
        "12 Mill Lane",
        "Millbrook",
        "GU12 4LW",
        "amira.haddad@example.com",
    ]
    assert letter.from_name == "Amira Haddad via Example Solidarity Campaign"
    assert letter.to_email == MP.email and letter.reply_to == "amira.haddad@example.com"


def test_what_the_supporter_typed_is_never_a_template() -> None:
    typed = "{{ 7*7 }} {% include 'secrets.txt' %} {{ mp.__class__ }} <script>alert(1)</script>"
    letter = compose(campaign(), "s-1", payload(letter__body=typed), MP)
    assert typed in letter.body_text  # literally, in the plain text
    assert letter.body_html is not None
    assert "{{ 7*7 }}" in letter.body_html and "49" not in letter.body_html
    assert "<script>" not in letter.body_html and "&lt;script&gt;" in letter.body_html


def test_subject_is_the_supporters_edit_or_a_variant_fixed_per_submission() -> None:
    definition = campaign()
    assert choose_subject(definition, "s-1", "My own subject") == "My own subject"
    picks = {choose_subject(definition, f"s-{i}", "") for i in range(30)}
    assert picks <= set(definition.subject_variants) and len(picks) > 1
    assert choose_subject(definition, "s-7", "") == choose_subject(definition, "s-7", "")
    locked = campaign(editable=["body"])
    assert choose_subject(locked, "s-1", "Mine") in locked.subject_variants


def test_a_body_the_campaign_does_not_let_supporters_edit_is_the_draft() -> None:
    letter = compose(campaign(editable=["subject"]), "s-1", payload(letter__body="changed"), MP)
    assert "changed" not in letter.body_text
    assert "As your constituent, I am writing" in letter.body_text


def test_sandbox_letters_go_to_the_test_address_with_the_mp_noted() -> None:
    letter = compose(campaign(), "s-1", payload(), MP, sandbox_address="test@campaign.example.org")
    assert letter.to_email == "test@campaign.example.org"
    assert letter.subject.startswith("[SANDBOX] ")
    first = letter.body_text.splitlines()[0]
    assert "Alex Baker <alex.baker.mp@parliament.uk>" in first and "Aldershot" in first


def test_rendering_is_deterministic() -> None:
    one, two = (compose(campaign(), "s-1", payload(), MP) for _ in range(2))
    assert one == two and one.content_sha256 == two.content_sha256


def test_headers_are_encoded_for_non_ascii_names_and_stable_across_retries() -> None:
    letter = stored(compose(campaign(), "s-1", payload(supporter__name="Siân Ó Briain"), MP))
    raw = outgoing(letter).data
    assert raw == outgoing(letter).data  # same bytes on every attempt, Date included
    assert b"Si\xc3\xa2n" not in raw.split(b"\r\n\r\n", 1)[0]  # headers are 7-bit encoded
    parsed = email.message_from_bytes(raw, policy=email.policy.default)
    sender = parsed["From"].addresses[0]
    assert sender.display_name == "Siân Ó Briain via Example Solidarity Campaign"
    assert sender.addr_spec == "letters@campaign.example.org"
    assert parsed["Message-ID"] == "<s-1@campaign.example.org>"
    assert parsed.get_body(("html",)) is not None and parsed.get_body(("plain",)) is not None


@pytest.mark.parametrize("field", ["subject", "from_name", "to_name", "reply_to", "message_id"])
def test_a_header_with_a_line_break_is_refused(field: str) -> None:
    letter = stored(compose(campaign(), "s-1", payload(), MP))
    setattr(letter, field, "Hello\r\nBcc: victim@example.com")
    with pytest.raises(ValueError):
        outgoing(letter)
    with pytest.raises(ValueError):
        letter_bytes(letter)


def test_dkim_signature_verifies() -> None:
    pem, record = dkim_keys()
    letter = stored(compose(campaign(), "s-1", payload(), MP))
    signed = outgoing(letter, DkimSigner("dearmp", pem)).data
    assert signed.startswith(b"DKIM-Signature:")

    def dns(name: bytes, timeout: int = 5) -> bytes:
        assert name == b"dearmp._domainkey.campaign.example.org."
        return record

    assert dkim.verify(signed, dnsfunc=dns)
    tampered = signed.replace(b"Yours sincerely", b"Yours insincerely")
    assert not dkim.verify(tampered, dnsfunc=dns)
