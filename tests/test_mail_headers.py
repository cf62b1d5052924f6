"""Letters on the wire for every name and subject the API accepts: header lines within RFC 5322's
limit, encoded words within RFC 2047's, addresses a mail client can reply to, DKIM over what a
reader sees; and a letter a server cannot take never spoils the next letter on its connection."""

from __future__ import annotations

import email
import email.policy
import email.utils
import re
from datetime import UTC, datetime
from email.header import decode_header, make_header
from email.message import Message
from email.mime.multipart import MIMEMultipart
from email.mime.nonmultipart import MIMENonMultipart
from pathlib import Path
from typing import Any

import dkim
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from schemas.submission import parse_submission
from tests.factories import send_letter, submission
from tests.services import SmtpSink, dkim_dns, dkim_keys
from tests.test_rendering import MP, campaign, payload, stored
from tests.test_smtp import mailer as smtp_mailer
from tests.test_stages import through_render
from workers.database.engine import session_scope
from workers.database.models import Letter, State, Submission
from workers.letters.mail import DkimSigner, Outgoing, outgoing
from workers.letters.mail.dkim import SIGNED_HEADERS
from workers.letters.mail.messages import (
    UTF8,
    WIRE,
    Draft,
    _envelope_headers,
    letter_bytes,
    letter_draft,
    write,
)
from workers.pipeline.app import App
from workers.stages.delivery import DeliveryPolicy
from workers.stages.rendering import compose

COMPAT32_CRLF = email.policy.compat32.clone(linesep="\r\n")
ENCODED_WORD = re.compile(rb"=\?[^?\s]+\?[bBqQ]\?[^?\s]*\?=")

# Text from every script, emoji with their joiners and modifiers, combining marks: what a
# supporter may type in a name or subject (validation refuses control characters).
_scripts = st.characters(
    codec="utf-8", categories=["L", "M", "N", "P", "S", "Zs"], exclude_characters="\u2028\u2029"
)
_emoji = st.sampled_from(["😀", "👩‍👩‍👧", "👍🏽", "🏳️‍🌈", "e\u0301", "مهدی‌زاده", "ZWJ\u200dX"])
_text = st.lists(_scripts | _emoji, min_size=1, max_size=100).map(lambda xs: "".join(xs))


def generated(draft: Draft, policy: Any = WIRE) -> bytes:
    """The draft as the email package's own objects and generator write it: what
    :func:`write` lays out by hand must be these bytes."""

    def part(text: str, subtype: str) -> MIMENonMultipart:
        made = MIMENonMultipart("text", subtype)
        made.set_payload(text, UTF8)
        return made

    message: Message = part(draft.text, "plain")
    if draft.html:
        parts = (message, part(draft.html, "html"))
        message = MIMEMultipart("alternative", boundary=draft.boundary)
        for one in parts:
            del one["MIME-Version"]
            message.attach(one)
    for name, value in _envelope_headers(draft):
        message[name] = value
    return message.as_bytes(policy=policy)


def letter_with(name: str, subject: str) -> Letter:
    letter = stored(compose(campaign(), "s-1", payload(), MP))
    letter.from_name, letter.to_name = name, name[::-1]
    letter.subject = subject
    return letter


def display_name(data: bytes, header: str) -> str:
    """The display name as the compat32 parser decodes it. (The modern parser puts a space
    between adjacent encoded words of a phrase, which RFC 2047 6.2 says to drop.)"""
    raw = email.message_from_bytes(data, policy=email.policy.compat32)[header]
    if "=?" not in raw:  # plain ASCII, quoted where it has specials
        return email.utils.parseaddr(raw)[0]
    decoded = str(make_header(decode_header(raw)))
    return decoded.rsplit(" <", 1)[0] if decoded.endswith(">") else decoded


def check_wire(data: bytes) -> None:
    head = data.split(b"\r\n\r\n", 1)[0]
    for line in head.split(b"\r\n"):
        assert len(line) <= 998
        for word in ENCODED_WORD.findall(line):
            assert len(word) <= 75, word


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(name=_text.map(lambda t: t.strip()[:100] or "x"), subject=_text.map(lambda t: t[:200]))
@pytest.mark.thorough
def test_every_accepted_name_and_subject_makes_lines_a_server_accepts(
    name: str, subject: str
) -> None:
    subject = subject.strip() or "x"
    letter = letter_with(name, subject)
    pem, _ = dkim_keys()
    data = outgoing(letter, DkimSigner("dearmp", pem)).data
    check_wire(data)
    parsed = email.message_from_bytes(data, policy=email.policy.default)
    assert not parsed.defects
    assert str(parsed["Subject"]) == subject
    assert display_name(data, "From") == name
    assert display_name(data, "To") == name[::-1]
    assert dkim.verify(data, dnsfunc=dkim_dns)
    # The writer gives the bytes the email package's compat32 generator gives.
    assert letter_bytes(letter) == generated(letter_draft(letter), COMPAT32_CRLF)


@settings(max_examples=500, deadline=None)
@given(
    name=st.sampled_from(["Subject", "To", "From", "Reply-To", "Message-ID", "Content-Type"]),
    value=st.text(st.characters(codec="ascii"), max_size=90)
    | st.text(st.sampled_from(" \t=?;,<>()a"), max_size=90),
)
@example(name="Subject", value="a\r\n0:")  # an embedded header: both raise
def test_the_wire_folds_every_header_as_compat32_does(name: str, value: str) -> None:
    def fold(policy: Any) -> bytes | type[Exception]:  # the bytes, or the error compat32 raises
        try:
            return policy.fold_binary(name, value)  # type: ignore[no-any-return]
        except Exception as exc:  # a value with an embedded header: HeaderParseError
            return type(exc)

    assert fold(WIRE) == fold(COMPAT32_CRLF)


def test_a_hundred_emoji_name_is_folded_into_short_encoded_words() -> None:
    data = outgoing(letter_with("😀" * 100, "Subject")).data
    check_wire(data)
    from_lines = data.split(b"\r\n\r\n")[0].split(b"From: ", 1)[1].split(b"\r\nTo:")[0]
    assert from_lines.count(b"\r\n ") >= 5  # many words, each on a line of its own
    assert all(len(line) <= 78 for line in from_lines.split(b"\r\n"))


def test_text_that_looks_like_an_encoded_word_arrives_as_typed() -> None:
    typed = "=?utf-8?b?SGVsbG8=?= please act"
    data = outgoing(letter_with(typed, typed)).data
    parsed = email.message_from_bytes(data, policy=email.policy.default)
    assert str(parsed["Subject"]) == typed
    assert display_name(data, "From") == typed


def test_a_non_ascii_subject_starts_on_the_subject_line() -> None:
    data = outgoing(letter_with("Zoë", "Pour la défense des prisonniers")).data
    assert b"Subject: =?utf-8?" in data
    parsed = email.message_from_bytes(data, policy=email.policy.default)
    assert str(parsed["Subject"]) == "Pour la défense des prisonniers"


def test_an_internationalised_domain_goes_out_as_idna_and_is_replyable() -> None:
    parsed = parse_submission(submission(supporter__email="Zoë.Smith@München.de"))
    assert isinstance(parsed, dict) and "non-Latin" in parsed["supporter.email"]
    parsed = parse_submission(submission(supporter__email="bob@München.de"))
    assert not isinstance(parsed, dict)
    assert parsed.supporter.email == "bob@xn--mnchen-3ya.de"
    letter = letter_with("Bob", "Hello")
    letter.reply_to = "bob@münchen.de"  # as stored before addresses were kept as IDNA
    letter.to_email = "mp@bundestag-münchen.de"
    mail = outgoing(letter)
    assert mail.recipients == ["mp@xn--bundestag-mnchen-tzb.de"]
    assert b"Reply-To: bob@xn--mnchen-3ya.de\r\n" in mail.data
    assert b"=?utf-8?q?" not in mail.data.split(b"Reply-To: ")[1].split(b"\r\n")[0]
    parsed_mail = email.message_from_bytes(mail.data, policy=email.policy.default)
    assert parsed_mail["Reply-To"].addresses[0].addr_spec == "bob@xn--mnchen-3ya.de"


def test_dkim_signs_the_mime_headers_and_over_signs_what_a_reader_sees() -> None:
    pem, _ = dkim_keys()
    data = outgoing(letter_with("Amira", "Hello"), DkimSigner("dearmp", pem)).data
    tags = dict(
        part.strip().split("=", 1)
        for part in data.split(b"\r\n\r\n")[0].decode().split("DKIM-Signature:", 1)[1].split(";")
        if "=" in part
    )
    signed = [h.strip().lower() for h in re.sub(r"\s", "", tags["h"]).split(":")]
    for name in ("mime-version", "content-type", "content-transfer-encoding"):
        assert name in signed
    for name in ("from", "to", "subject", "reply-to"):
        assert signed.count(name) == 2
    assert [h.decode() for h in SIGNED_HEADERS] == signed
    # A relay that adds a second From breaks the signature.
    forged = data.replace(b"\r\nTo:", b"\r\nFrom: someone@else.example\r\nTo:", 1)
    assert dkim.verify(data, dnsfunc=dkim_dns)
    assert not dkim.verify(forged, dnsfunc=dkim_dns)


@pytest.mark.smtp
def test_an_address_the_client_cannot_send_leaves_the_connection_clean_for_the_next_letter(
    tmp_path: Path, smtp_sink: SmtpSink
) -> None:
    smtp = smtp_mailer(tmp_path, smtp_sink)
    data = b"From: a@example.org\r\nTo: b@example.org\r\nSubject: x\r\n\r\nhello\r\n"
    ordinary = Outgoing("a@example.org", ["b@example.org"], data, "<1@example.org>")
    assert smtp.send(ordinary).startswith("250")  # a connection to reuse
    broken = Outgoing("a@example.org", ["bob@münchen.de"], data, "<2@example.org>")
    with pytest.raises(UnicodeEncodeError):  # smtplib cannot write it: not the server's answer
        smtp.send(broken)
    assert smtp.send(ordinary).startswith("250")  # no "503 nested MAIL command"
    assert smtp_sink.received.count() == 2


@pytest.mark.smtp
def test_an_idn_letter_and_an_ordinary_one_on_one_thread_are_both_delivered(
    app: App, tmp_path: Path, smtp_sink: SmtpSink
) -> None:
    smtp = smtp_mailer(tmp_path, smtp_sink)
    policy = DeliveryPolicy()
    idn = through_render(app, submission(supporter__email="bob@münchen.de"))
    with session_scope(app.sessions) as session:
        letter = session.get(Letter, idn)
        assert letter is not None and letter.reply_to == "bob@xn--mnchen-3ya.de"
        letter.to_email = "büro@example.org"  # an MP address only SMTPUTF8 could carry
        letter.reply_to = "bob@münchen.de"
    plain = through_render(app, submission())
    send_letter(app.sessions, idn, smtp, policy)  # not sent: failed, with the reason
    send_letter(app.sessions, plain, smtp, policy)
    with session_scope(app.sessions) as session:
        failed = session.get(Submission, idn)
        assert failed is not None and failed.state == State.FAILED
        assert failed.failure_reason and "SMTPUTF8" in failed.failure_reason
        delivered = session.get(Submission, plain)
        assert delivered is not None and delivered.state == State.DELIVERED
    assert smtp_sink.received.count() == 1

    # With the MP's address as IDNA-able Unicode, the letter goes, punycoded, and so does the next.
    again = through_render(app, submission(supporter__email="bob@münchen.de"))
    with session_scope(app.sessions) as session:
        letter = session.get(Letter, again)
        assert letter is not None
        letter.to_email = "mp@bundestag-münchen.de"
    send_letter(app.sessions, again, smtp, policy)
    send_letter(app.sessions, through_render(app, submission()), smtp, policy)
    assert smtp_sink.received.count() == 3
    assert smtp_sink.received.messages[1]["Reply-To"] == "bob@xn--mnchen-3ya.de"


def test_a_letter_is_signed_once_when_rendered_so_every_attempt_sends_the_same_bytes(
    app: App, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.test_stages import step, store
    from workers.stages.comparison import compare
    from workers.stages.rendering import render
    from workers.stages.resolution import resolve
    from workers.stages.validation import validate

    signer = DkimSigner("dearmp", dkim_keys()[0])
    sid = store(app, submission())
    step(app, validate, sid)
    step(app, resolve, sid)
    step(app, compare, sid)
    step(app, render, sid, "sandbox@campaign.example.org", signer)
    with session_scope(app.sessions) as session:
        letter = session.get(Letter, sid)
        assert letter is not None and letter.dkim_signature is not None
        session.expunge(letter)
    first = outgoing(letter, signer).data

    def no_signing(*args: object, **kwargs: object) -> bytes:
        raise AssertionError("a rendered letter is not signed again")

    monkeypatch.setattr(dkim, "sign", no_signing)
    again = outgoing(letter, signer).data  # a resend, at any later time
    assert again == first and first.startswith(b"DKIM-Signature:")
    monkeypatch.undo()
    assert dkim.verify(first, dnsfunc=dkim_dns)


# Bodies as supporters and templates make them: any script, every kind of line end, long lines,
# lines that start with "From " or a dot, trailing spaces and tabs, "=" signs.
_body = st.lists(
    _scripts
    | _emoji
    | st.sampled_from(["\r\n", "\n", "\r", " ", "\t", "=", ".", "From ", "x" * 80]),
    max_size=60,
).map(lambda xs: "".join(xs))


@settings(max_examples=300, deadline=None)
@given(
    text=_body,
    html=st.none() | _body,
    name=_text.map(lambda t: t.strip()[:100]),
    subject=_text.map(lambda t: t.strip()[:200] or "x"),
    own_words=st.none() | st.integers(0, 100),
)
@example(text="", html="<p>x</p>", name="", subject="x", own_words=None)
def test_the_writer_lays_out_the_bytes_the_email_package_writes(
    text: str, html: str | None, name: str, subject: str, own_words: int | None
) -> None:
    headers = (("List-Id", "<pp.campaign.example.org>"),) + (
        (("X-Own-Words", f"{own_words}%"),) if own_words is not None else ()
    )
    draft = Draft(
        name, "campaign@example.org", "mp@parliament.uk", subject,
        datetime(2026, 12, 6, 23, 0, tzinfo=UTC), "<s-1@example.org>", text,
        to_name="Jo MP", reply_to="jo@example.org", html=html,
        boundary="==dearmp-0123456789abcdef0123456789abcdef==", headers=headers,
    )  # fmt: skip
    data = write(draft)
    assert data == generated(draft)
    parsed = email.message_from_bytes(data, policy=email.policy.default)
    assert not parsed.defects
    body = parsed.get_body(("plain",))
    assert body is not None
    assert body.get_content().replace("\r\n", "\n") == text.replace("\r\n", "\n").replace(
        "\r", "\n"
    )


def test_an_html_draft_without_a_boundary_gets_one_from_its_content() -> None:
    draft = Draft("Jo", "a@example.org", "mp@parliament.uk", "Hi", datetime(2026, 1, 1, tzinfo=UTC),
                  "<m@example.org>", "text", html="<p>text</p>")  # fmt: skip
    assert write(draft) == write(draft)  # the same bytes on every attempt
    parsed = email.message_from_bytes(write(draft), policy=email.policy.default)
    assert parsed.get_content_type() == "multipart/alternative"
    assert parsed.get_boundary().startswith("==dearmp-")


@pytest.mark.parametrize(
    "address",
    [
        "mp\x00@parliament.uk",
        "two words@parliament.uk",
        "mp@parliament.uk\x7f",
        "m\tp@x.uk",
        "mp@parliament.uk,all@example.org",  # a second recipient for an HTTP API's "to"
        "mp@parliament.uk>,<all@example.org",
        '"mp"@parliament.uk',
        "mp@",
    ],
)
def test_an_address_that_is_not_one_plain_mailbox_is_never_written(address: str) -> None:
    """The writer's last guard, for addresses no validation saw (a directory stored earlier)."""
    letter = letter_with("Bob", "Hello")
    letter.to_email = address
    with pytest.raises(ValueError, match="not one plain address"):
        outgoing(letter)
