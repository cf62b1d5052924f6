"""Classifying what comes back: real servers' bounce and auto-reply formats, and hostile mail."""

from __future__ import annotations

import base64

import pytest

from tests import mail_samples as samples
from workers.receiving.addresses import ReturnAddresses, make_local_part, read_address
from workers.receiving.classify import MAX_HOPS, classify

MID = "<3f1e6c1a-8a54-4d3e-9a55-0c1f2e3d4b5a@campaign.example.org>"
MP = "jane.smith.mp@parliament.example"
RETURN = "b-aaaa@bounces.campaign.example.org"


@pytest.mark.parametrize(
    ("sample", "status"),
    [
        (samples.postfix_dsn, "5.1.1"),
        (samples.exchange_online_ndr, "5.1.10"),
        (samples.gmail_dsn, "5.1.1"),
        (samples.exim_plain, "5.1.1"),
    ],
)
def test_permanent_bounces_of_each_server_are_bounces_with_their_status(
    sample: object, status: str
) -> None:
    found = classify(sample(MID, MP, RETURN))  # type: ignore[operator]
    assert found.kind == "bounce"
    assert found.status == status
    assert found.diagnostic
    assert MP not in found.diagnostic  # addresses are taken out


def test_the_returned_letter_is_named_when_the_bounce_carries_it() -> None:
    for sample in (samples.postfix_dsn, samples.exchange_online_ndr, samples.gmail_dsn):
        assert classify(sample(MID, MP, RETURN)).original_message_id == MID
    assert classify(samples.exim_plain(MID, MP, RETURN)).original_message_id == MID


def test_delays_are_not_bounces() -> None:
    assert classify(samples.postfix_dsn(MID, MP, RETURN, status="4.4.1")).kind == "delay"
    delay = classify(samples.exim_delay(MID, MP, RETURN))
    assert (delay.kind, delay.status) == ("delay", "4.3.0")


def test_automatic_replies_are_told_from_a_persons_reply() -> None:
    assert classify(samples.exchange_automatic_reply(MID, MP, RETURN)).kind == "auto_reply"
    assert classify(samples.rfc3834_auto_reply(MID, MP, RETURN)).kind == "auto_reply"
    assert classify(samples.human_reply(MID, MP, RETURN)).kind == "reply"
    human = samples.human_reply(MID, MP, RETURN)
    newsletter = human.replace(b"Subject: ", b"List-Id: <news.mp.example>\r\nSubject: ", 1)
    assert classify(newsletter).kind == "auto_reply"  # an office's newsletter: no reply
    for mark in (b"List-Unsubscribe: <mailto:u@mp.example>", b"X-Auto-Response-Suppress: All"):
        casework = human.replace(b"Subject: ", mark + b"\r\nSubject: ", 1)
        assert classify(casework).kind == "reply"  # a casework system's one-to-one reply


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"\x00\xff\xfe" * 1000,
        b"Content-Type: multipart/report; report-type=delivery-status\r\n\r\nno boundary at all",
        b"Content-Type: multipart/mixed; boundary=x\r\n\r\n--x\r\n" * 2000,
        b"Subject: =?utf-8?b?////?=\r\nContent-Type: text/plain; charset=no-such-charset\r\n\r\n"
        + "\u202e\U0001f4a9".encode() * 100,
        b"Content-Type: message/delivery-status\r\n\r\nAction: failed\r\n",
    ],
)
def test_broken_or_hostile_mime_never_raises(raw: bytes) -> None:
    found = classify(raw)
    assert found.kind in ("malformed", "reply", "bounce", "delay", "auto_reply")


def test_deeply_nested_mime_is_malformed_or_read_without_raising() -> None:
    nested = b"".join(
        b"Content-Type: multipart/mixed; boundary=b%d\r\n\r\n--b%d\r\n" % (i, i)
        for i in range(3000)
    )
    assert classify(nested).kind in ("malformed", "reply")


def test_a_message_that_has_gone_round_in_circles_is_a_loop() -> None:
    hops = b"".join(
        b"Received: from a by b; Wed, 2 Dec 2026 10:00:00 +0000\r\n" for _ in range(MAX_HOPS + 1)
    )
    found = classify(hops + samples.human_reply(MID, MP, RETURN))
    assert found.kind == "loop" and not found.acts


def test_one_of_our_notices_coming_back_is_a_loop() -> None:
    raw = b"X-DearMP-Notice: 1\r\nSubject: Reply from your MP\r\n\r\nhello\r\n"
    assert classify(raw).kind == "loop"


SECRET = b"k" * 32
SID = "3f1e6c1a-8a54-4d3e-9a55-0c1f2e3d4b5a"


def test_a_return_address_names_its_letter_and_cannot_be_forged() -> None:
    returns = ReturnAddresses(SECRET, "bounces.example.org", "replies.example.org")
    bounce, reply = returns.bounce(SID), returns.reply(SID)
    assert bounce is not None and reply is not None
    local = bounce.split("@")[0]
    assert len(local) <= 64 and local.startswith("b-")
    token = returns.read(bounce)
    assert token is not None and (token.purpose, token.object_id) == ("b", SID)
    assert returns.read(bounce.upper()) == token  # mail systems may change the case
    reply_token = returns.read(reply)
    assert reply_token is not None and reply_token.purpose == "r"
    # Forged: another key, a changed character, another purpose's token, another domain.
    assert ReturnAddresses(b"other" * 8, "bounces.example.org").read(bounce) is None
    flipped = local[:20] + ("a" if local[20] != "a" else "b") + local[21:]
    assert returns.read(f"{flipped}@bounces.example.org") is None
    as_reply = "r-" + local[2:]
    assert returns.read(f"{as_reply}@bounces.example.org") is None
    assert returns.read(bounce.replace("bounces.example.org", "evil.example")) is None
    assert returns.read(f"{make_local_part(SECRET, 'b', SID)}") is None


@pytest.mark.parametrize(
    "address",
    [
        "",
        "@",
        "postmaster@bounces.example.org",
        "b-" + "a" * 42 + "@bounces.example.org",
        "b-" + "é" * 42 + "@bounces.example.org",
        "x-" + "a" * 42 + "@bounces.example.org",
        "b-" + "1" * 42 + "@bounces.example.org",  # not base32
        "<>",
        "b-" + "a" * 4000 + "@bounces.example.org",
    ],
)
def test_addresses_that_are_not_ours_are_refused(address: str) -> None:
    assert read_address(SECRET, address, {"bounces.example.org"}) is None


def test_only_the_canonical_spelling_of_a_token_is_ours() -> None:
    returns = ReturnAddresses(SECRET, "bounces.example.org")
    address = returns.bounce(SID)
    assert address is not None
    local = address.split("@")[0]

    def decoded(token: str) -> bytes:
        return base64.b32decode(token.upper() + "======")

    # The last base32 character carries two spare bits: another spelling of the same bytes.
    spare = next(
        c
        for c in "abcdefghijklmnopqrstuvwxyz234567"
        if c != local[-1] and decoded(local[2:-1] + c) == decoded(local[2:])
    )
    assert returns.read(f"{local[:-1]}{spare}@bounces.example.org") is None


@pytest.mark.parametrize("charset", ["x-no-such", "unknown-8bit", "idna", "undefined", "base64"])
@pytest.mark.parametrize("subtype", ["plain", "html"])
def test_a_bounce_in_a_charset_python_does_not_know_is_still_a_bounce(
    charset: str, subtype: str
) -> None:
    raw = samples.exim_plain(MID, MP, RETURN).replace(
        b"\r\n\r\n", f"\r\nContent-Type: text/{subtype}; charset={charset}\r\n\r\n".encode(), 1
    )
    found = classify(raw)
    assert (found.kind, found.status) == ("bounce", "5.1.1")
    if subtype == "plain":  # (as HTML, the text's lines are one paragraph)
        assert found.diagnostic and "550 5.1.1" in found.diagnostic
        assert found.original_message_id == MID


def test_an_html_bounce_is_read_as_the_text_a_reader_sees() -> None:
    raw = samples.exim_plain(MID, MP, RETURN).replace(
        b"\r\n\r\n", b"\r\nContent-Type: text/html; charset=utf-8\r\n\r\n", 1
    )
    raw = raw.replace(b"550 5.1.1", b"<b>550</b>&nbsp;5.1.1")
    found = classify(raw)
    assert (found.kind, found.status) == ("bounce", "5.1.1")
    assert found.diagnostic and "&nbsp;" not in found.diagnostic and "<b>" not in found.diagnostic


def test_a_bounce_with_a_line_of_200000_characters_is_read_at_once() -> None:
    """The diagnostic's address pattern took time growing as the square of a line's length,
    holding the interpreter: a 200 KB line stopped every thread of the process for minutes.
    The line is cut first. (A bound, not a benchmark: the old code took over a minute.)"""
    import time

    raw = samples.exim_plain("<x@campaign.example.org>", "mp@parliament.example", "b-x@b.org")
    hostile = raw.replace(b"mailbox unavailable", b"a@" * 100_000)
    began = time.perf_counter()
    found = classify(hostile)
    assert time.perf_counter() - began < 5
    assert found.kind == "bounce" and len(found.diagnostic or "") <= 300


def test_a_reply_subject_of_a_megabyte_of_encoded_words_is_cut_before_it_is_decoded() -> None:
    """The header parser's memory grows far faster than its input (a 1 MB subject took 10 GB)."""
    from workers.letters.notices import MAX_HEADER_DECODED, decoded_header, reply_text

    subject = " ".join(["=?utf-8?q?abcdefghij?="] * 50_000)
    assert len(decoded_header(subject)) < MAX_HEADER_DECODED
    raw = samples.human_reply("<x@campaign.example.org>", "mp@parliament.example", "r-x@r.org")
    reply = reply_text(raw.replace(b"Subject: ", f"Subject: {subject} ".encode(), 1))
    assert reply.subject.startswith("abcdefghij") and len(reply.subject) < 1000
