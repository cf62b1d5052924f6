"""Every email DearMP sends, as a receiving mail server judges it and as a hostile reply tries to
bend it: one writer and one signer for letters, notices and confirmations; SPF, DKIM and DMARC
judged by an independent evaluator (authheaders, with pyspf) against the records `dearmp dns`
publishes; a reply's subject, sender and text made safe before they reach a supporter."""

from __future__ import annotations

import base64
import email
import email.policy
import re
import shutil
import unicodedata
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import authheaders
import dkim
import dns.name
import dns.rdatatype
import dns.zone
import dramatiq
import pytest
import spf
from hypothesis import given, settings
from hypothesis import strategies as st

from config.settings import Settings
from schemas.campaign import SimilarLetters
from tests import mail_samples as samples
from tests.conftest import ApiClient, drain, make_settings
from tests.factories import send_letter, submission
from tests.services import dkim_dns, dkim_keys
from tests.test_mail_headers import check_wire
from tests.test_outbox import no_wait, send_item
from tests.test_stages import step, store
from workers.database.engine import session_scope
from workers.database.models import OutboxItem, State, Submission
from workers.letters import notices
from workers.letters.definitions import update_definition
from workers.letters.dns import records, zone_lines
from workers.letters.mail import (
    DkimSigner,
    Draft,
    Outgoing,
    TransientDeliveryError,
)
from workers.letters.mail.messages import write
from workers.pipeline.actors import outbox_for
from workers.pipeline.app import App, set_app
from workers.pipeline.intake import accept
from workers.pipeline.runtime import prepare
from workers.stages.comparison import compare
from workers.stages.confirmation import ConfirmationPolicy, notify
from workers.stages.delivery import DeliveryPolicy
from workers.stages.rendering import render
from workers.stages.resolution import resolve
from workers.stages.stage import Deferred
from workers.stages.validation import validate
from workers.web.api import create_app
from workers.wording import one_line

FROM_DOMAIN = "campaign.example.org"  # the sample campaign's From: letters@campaign.example.org
BOUNCES = f"bounces.{FROM_DOMAIN}"
REPLIES = f"replies.{FROM_DOMAIN}"
RELAY = "203.0.113.5"  # the relay DearMP sends through: what SPF names
SUPPORTER = "amira.haddad@example.com"
RELAYED = {"mail_backend": "smtp", "smtp_host": RELAY}  # the deployment `dearmp dns` describes
MP = "jane.smith.mp@parliament.example"
NOTICE_ID = "3f1e6c1a-8a54-4d3e-9a55-0c1f2e3d4b5a"
# A notice's Date, and its signature's time (t=): past, as every email's is when it is sent (a
# verifier refuses a signature from the future).
CREATED = datetime(2026, 11, 30, 15, 30, tzinfo=UTC)
SENDER = notices.Sender("Example Solidarity Campaign", f"letters@{FROM_DOMAIN}")
AUTOMATIC_KINDS = ("bounce notice", "forward", "survey", "survey reminder")


def signer() -> DkimSigner:
    return DkimSigner("dearmp", dkim_keys()[0])


def signing_settings(tmp_path: Path, **values: Any) -> Settings:
    """A deployment with a bounce and a reply domain, a DKIM key and a relay at :data:`RELAY`."""
    signing = {
        "bounce_domain": BOUNCES,
        "reply_domain": REPLIES,
        "dkim_private_key": dkim_keys()[0].decode(),
        "dkim_selector": "dearmp",
    }
    return make_settings(tmp_path, **(signing | values))


class Recorder:
    """A mail backend that keeps what it is given (envelope and bytes) in memory."""

    name = "outbox"

    def __init__(self, fail_first: bool = False) -> None:
        self.sent: list[Outgoing] = []
        self.fail_first = fail_first

    def send(self, mail: Outgoing) -> str:
        if self.fail_first:
            self.fail_first = False
            raise TransientDeliveryError("421 try again later")
        self.sent.append(mail)
        return "250 kept"

    def waiting(self) -> float:
        return 0.0

    def close(self) -> None:
        pass


@pytest.fixture
def signed_app(tmp_path: Path, sqlite_url: str) -> Iterator[App]:
    """The App of :func:`signing_settings` (one database: what is checked is the email)."""
    application = App.from_settings(signing_settings(tmp_path, database_url=sqlite_url))
    prepare(application)
    set_app(application)
    yield application
    set_app(None)
    application.engine.dispose()


@pytest.fixture
def sqlite_url(tmp_path: Path, sqlite_template: Path) -> str:
    path = tmp_path / "dearmp.sqlite3"
    shutil.copy(sqlite_template, path)
    return f"sqlite:///{path}"


# --- The records `dearmp dns` publishes, as the only DNS the evaluators see -----------------


class PublishedDns:
    """The zone `dearmp dns` prints for the deployment, loaded by dnspython and answered from:
    DKIM keys and DMARC policies (authheaders' lookups) and SPF (pyspf's)."""

    def __init__(self, settings: Settings) -> None:
        lines = zone_lines(records(settings, [FROM_DOMAIN], f"mx.{FROM_DOMAIN}"))
        self.zone = dns.zone.from_text(
            "\n".join(lines) + "\n", origin="example.org.", check_origin=False, relativize=False
        )

    def _rdataset(self, name: str, qtype: str) -> Any:
        absolute = dns.name.from_text(name.rstrip(".") + ".")
        if not absolute.is_subdomain(self.zone.origin):
            return None
        return self.zone.get_rdataset(absolute, dns.rdatatype.from_text(qtype))

    def lookup(self, name: bytes | str, timeout: int = 5) -> bytes | str | None:
        """TXT, as dkimpy asks (bytes) and as authheaders' DMARC lookup asks (str)."""
        text = name.decode() if isinstance(name, bytes) else name
        found = self._rdataset(text, "TXT")
        if not found:
            return None
        value = b"".join(next(iter(found)).strings)
        return value if isinstance(name, bytes) else value.decode()

    def spf(self, name: str, qtype: str, *args: Any, **kwargs: Any) -> list[Any]:
        """pyspf's DNS lookup: ((name, type), value) pairs."""
        answers = []
        for rdata in self._rdataset(name, qtype) or []:
            if qtype in ("TXT", "SPF"):
                answers.append(((name, qtype), rdata.strings))
            elif qtype == "MX":
                answers.append(((name, qtype), (rdata.preference, rdata.exchange)))
            elif qtype in ("A", "AAAA"):
                answers.append(((name, qtype), rdata.address))
        return answers


def judged(mail: Outgoing, published: PublishedDns, monkeypatch: pytest.MonkeyPatch) -> str:
    """The Authentication-Results a receiving server writes for ``mail`` sent by the relay."""
    monkeypatch.setattr(spf, "DNSLookup", published.spf)
    result: str = authheaders.authenticate_message(
        mail.data,
        "mx.example.net",
        spf=True,
        ip=RELAY,
        mail_from=mail.sender,
        helo=f"relay.{FROM_DOMAIN}",
        dnsfunc=published.lookup,
    )
    return result


def every_kind(app: App) -> dict[str, Outgoing]:
    """One email of each kind DearMP sends, made by the code that sends it."""
    mailer = Recorder()
    sid = store(app, submission())
    step(app, validate, sid)
    step(app, resolve, sid)
    step(app, compare, sid)
    step(app, render, sid, app.settings.sandbox_address, app.signer, app.returns)
    send_letter(app.sessions, sid, mailer, DeliveryPolicy(), None, app.signer, app.returns)
    with session_scope(app.sessions) as session:
        update_definition(session, "political-prisoners", confirmation=True)
        waiting = accept(session, submission(), app.secret, state=State.UNCONFIRMED).submission_id
    policy = ConfirmationPolicy.from_settings(app.settings)
    for _ in ("confirmation", "reminder"):
        with session_scope(app.sessions) as session:
            queued = notify(session, waiting, policy)
        for item_id in queued:
            send_item(app, item_id, mailer)
        with session_scope(app.sessions) as session:
            row = session.get(Submission, waiting)
            assert row is not None
            row.created_at -= policy.reminder_after  # the reminder is due
    assert len(mailer.sent) == 3
    envelope = app.returns.notice(NOTICE_ID)
    assert envelope is not None
    reply = samples.human_reply("<letter@campaign.example.org>", MP, "r-x@" + REPLIES)
    links = {answer: f"https://{FROM_DOMAIN}/s/{answer}" for answer in ("yes", "not_yet", "no")}
    drafts = {
        "bounce notice": notices.bounce_notice(NOTICE_ID, SENDER, SUPPORTER, "Jane", 1, CREATED),
        "forward": notices.forward(NOTICE_ID, SENDER, SUPPORTER, reply, "Jane", MP, CREATED),
        "survey": notices.survey(NOTICE_ID, SENDER, SUPPORTER, "Jane", links, CREATED, False),
        "survey reminder": notices.survey(
            NOTICE_ID, SENDER, SUPPORTER, "Jane", links, CREATED, True
        ),
    }
    kinds = dict(zip(("letter", "confirmation", "reminder"), mailer.sent, strict=True))
    text = "Your letter went to Jane today, in one email with the letters of 2 others."
    drafts["digest notice"] = notices.digested(NOTICE_ID, SENDER, SUPPORTER, "Jane", text, CREATED)
    for kind, draft in drafts.items():
        kinds[kind] = notices.outgoing(draft, envelope, app.signer)
    kinds["digest"] = _digest(app)
    return kinds


def _digest(app: App) -> Outgoing:
    """An MP's daily digest of two near-identical letters, as its outbox item sends it."""
    from workers.outbox import sending as outbox
    from workers.stages import digests

    rules = SimilarLetters(policy="digest", hold_after=0)
    with session_scope(app.sessions) as session:
        update_definition(session, "political-prisoners", confirmation=False, similar_letters=rules)
    for i in range(3):  # each near-identical to the letters before it
        sid = store(app, submission(supporter__email=f"digest{i}@example.com"))
        for stage in (validate, resolve, compare):
            step(app, stage, sid)
        step(app, render, sid, app.settings.sandbox_address, app.signer, app.returns)
    with session_scope(app.sessions) as session:
        [made] = digests.build_due(session, force=True)
    mailer = Recorder()
    kind = digests.kind(mailer, DeliveryPolicy(), None, app.signer, app.returns)
    with session_scope(app.sessions) as session:
        outbox.send(session, made, mailer, {digests.KIND: kind}, outbox.OutboxPolicy())
    [mail] = mailer.sent
    return mail


def test_every_kind_of_email_passes_spf_dkim_and_dmarc_with_the_published_records(
    signed_app: App, monkeypatch: pytest.MonkeyPatch
) -> None:
    published = PublishedDns(signed_app.settings.model_copy(update=RELAYED))
    for kind, mail in every_kind(signed_app).items():
        results = judged(mail, published, monkeypatch)
        assert f"dkim=pass header.d={FROM_DOMAIN}" in results, (kind, results)
        assert f"smtp.mailfrom={BOUNCES}" in results and "spf=pass" in results, (kind, results)
        assert "dmarc=pass" in results and f"header.from={FROM_DOMAIN}" in results, (kind, results)
        message = email.message_from_bytes(mail.data, policy=email.policy.default)
        automatic = message["Auto-Submitted"]
        letter = kind in ("letter", "digest")  # written to the MP, not automatic
        assert automatic == (None if letter else "auto-generated"), kind
        # A bounce of a letter comes back to its own address; of anything else, to a notice's.
        assert mail.sender.startswith("b-" if letter else "n-"), kind
        assert mail.sender.endswith(f"@{BOUNCES}"), kind


def test_an_email_sent_from_its_own_from_address_unsigned_fails_dmarc(
    signed_app: App, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The evaluator is not lenient: what confirmations were (unsigned, the envelope their
    From) fails, as it would at a receiving server."""
    draft = notices.bounce_notice(NOTICE_ID, SENDER, SUPPORTER, "Jane", 1, CREATED)
    mail = notices.outgoing(draft, SENDER.address, None)
    published = PublishedDns(signed_app.settings.model_copy(update=RELAYED))
    results = judged(mail, published, monkeypatch)
    assert "dmarc=fail" in results, results


def test_the_confirmation_actor_signs_and_sends_from_a_notice_address(
    signed_app: App, stub_broker: Any, stub_worker: dramatiq.Worker
) -> None:
    mailer = Recorder()
    signed_app.mailer = mailer
    with session_scope(signed_app.sessions) as session:
        update_definition(session, "political-prisoners", confirmation=True)
    payload = submission()
    payload.pop("client_ip")
    peer = ("203.0.113.9", 50_000)
    with ApiClient(create_app(lambda: signed_app, stub_broker), client=peer) as client:
        sid = client.post("/v1/submissions", json=payload).json()["id"]
    drain(stub_broker, stub_worker)
    [mail] = mailer.sent
    assert mail.message_id == f"<confirm-{sid}@{FROM_DOMAIN}>"
    assert mail.sender == signed_app.returns.notice(sid)
    assert signed_app.returns.read(mail.sender) is not None  # ours: a bounce is recognised
    assert mail.data.startswith(b"DKIM-Signature:") and dkim.verify(mail.data, dnsfunc=dkim_dns)


def test_a_report_to_a_confirmations_address_never_returns_the_letter(signed_app: App) -> None:
    """A confirmation's envelope is a notice's address: a report sent there, even one that names
    the letter (the same submission's), is dropped; the same report to the letter's own return
    address returns it."""
    from workers.database.models import InboundMessage, Letter
    from workers.receiving.store import store as store_inbound
    from workers.stages import inbound

    app, mailer = signed_app, Recorder()
    sid = store(app, submission())
    step(app, validate, sid)
    step(app, resolve, sid)
    step(app, compare, sid)
    step(app, render, sid, app.settings.sandbox_address, app.signer, app.returns)
    send_letter(app.sessions, sid, mailer, DeliveryPolicy(), None, app.signer, app.returns)
    with session_scope(app.sessions) as session:
        letter = session.get(Letter, sid)
        assert letter is not None
        message_id, to = letter.message_id, letter.to_email

    def returned_to(address: str | None) -> str:
        assert address is not None
        report = samples.postfix_dsn(message_id, to, address)
        [inbound_id] = store_inbound(app.sessions, "smtp", [address], report)
        with session_scope(app.sessions) as session:
            inbound.process(
                session, inbound_id, app.returns, inbound.InboundPolicy(), outbox_for(app)[0]
            )
        with session_scope(app.sessions) as session:
            row, submission_row = (
                session.get(InboundMessage, inbound_id),
                session.get(Submission, sid),
            )
            assert row is not None and submission_row is not None
            return f"{row.status} {submission_row.state}"

    assert returned_to(app.returns.notice(sid)) == "dropped delivered"
    assert returned_to(app.returns.bounce(sid)) == "done bounced"


def after_signature(data: bytes) -> bytes:
    """The email without its DKIM-Signature (whose t= is the time it was signed)."""
    assert data.startswith(b"DKIM-Signature:")
    return re.split(rb"\r\n(?=\S)", data, maxsplit=1)[1]


def test_a_confirmation_sent_again_is_the_same_email_dated_when_it_was_due(
    signed_app: App,
) -> None:
    app = signed_app
    with session_scope(app.sessions) as session:
        update_definition(session, "political-prisoners", confirmation=True)
        sid = accept(session, submission(), app.secret, state=State.UNCONFIRMED).submission_id
        row = session.get(Submission, sid)
        assert row is not None
        row.created_at -= timedelta(hours=2)
        created = row.created_at
    mailer = Recorder(fail_first=True)
    policy = ConfirmationPolicy.from_settings(app.settings)
    with session_scope(app.sessions) as session:
        [item_id] = notify(session, sid, policy)
    with pytest.raises(Deferred):  # tried again when due
        send_item(app, item_id, mailer, no_wait(app))
    failed = write_of(app, item_id)
    send_item(app, item_id, mailer, no_wait(app))
    [mail] = mailer.sent
    assert after_signature(mail.data) == after_signature(failed.data)
    message = email.message_from_bytes(mail.data, policy=email.policy.default)
    assert message["Date"] == format_datetime(created)


def write_of(app: App, item_id: str) -> Outgoing:
    """What the outbox would send now for the item, written again."""
    every_kind, _ = outbox_for(app)
    with session_scope(app.sessions) as session:
        item = session.get(OutboxItem, item_id)
        assert item is not None
        mail = every_kind[item.kind].compose(session, item)
    assert not isinstance(mail, str)
    return mail


def test_a_notice_is_the_same_email_every_time_it_is_written() -> None:
    reply = samples.human_reply("<letter@campaign.example.org>", MP, "r-x@" + REPLIES)

    def sent() -> Outgoing:
        draft = notices.forward(NOTICE_ID, SENDER, SUPPORTER, reply, "Jane", MP, CREATED)
        return notices.outgoing(draft, "n-x@" + BOUNCES, signer())

    first, second = sent(), sent()
    assert after_signature(first.data) == after_signature(second.data)
    message = email.message_from_bytes(first.data, policy=email.policy.default)
    assert message["Date"] == format_datetime(CREATED)
    assert message["Message-ID"] == f"<notice-{NOTICE_ID}@{FROM_DOMAIN}>"


# --- A hostile reply --------------------------------------------------------------------------


def b64_word(text: str, charset: str = "utf-8") -> str:
    return f"=?{charset}?b?{base64.b64encode(text.encode()).decode()}?="


def reply(
    subject: str, body: str = "Thank you.", sender: str = f'"Jane" <{MP}>', **more: str
) -> bytes:
    headers = {
        "From": sender,
        "To": "r-x@" + REPLIES,
        "Subject": subject,
        "Message-ID": "<reply-1@parliament.example>",
        "Content-Type": 'text/plain; charset="utf-8"',
    } | more
    head = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
    return head.encode("utf-8") + b"\r\n" + body.encode("utf-8")


INJECTION = "X\r\nContent-Type: text/html\r\nX-Injected: yes"
FORWARD_HEADERS = [
    "DKIM-Signature",
    "MIME-Version",
    "Content-Type",
    "Content-Transfer-Encoding",
    "From",
    "To",
    "Reply-To",
    "Subject",
    "Date",
    "Message-ID",
    "Auto-Submitted",
    "X-DearMP-Notice",
]


def forwarded(raw: bytes, mp_name: str = "Jane Smith", sender: notices.Sender = SENDER) -> bytes:
    draft = notices.forward(NOTICE_ID, sender, SUPPORTER, raw, mp_name, MP, CREATED)
    return notices.outgoing(draft, "n-x@" + BOUNCES, signer()).data


def test_an_encoded_line_break_in_a_reply_adds_no_header_to_its_forward() -> None:
    hostile = reply(
        b64_word(INJECTION) + " =?utf-8?q?a=E2=80=A8X-Injected:_sep?=",
        sender=f"{b64_word('Jane' + chr(13) + chr(10) + 'X-Injected: from')} <{MP}>",
    )
    data = forwarded(
        hostile,
        mp_name="Jane Smith\r\nX-Injected: mp",
        sender=notices.Sender("Campaign\u2028X-Injected: org\u202e", SENDER.address),
    )
    head = data.split(b"\r\n\r\n", 1)[0]
    assert not re.search(rb"(?im)^x-injected", head)
    check_wire(data)
    message = email.message_from_bytes(data, policy=email.policy.default)
    assert list(message.keys()) == FORWARD_HEADERS
    assert message["Content-Type"].content_type == "text/plain"
    assert str(message["Reply-To"]) == MP
    assert str(message["Subject"]) == (
        "Reply to your letter to Jane Smith X-Injected: mp: X Content-Type: text/html "
        "X-Injected: yesa X-Injected: sep"
    )
    assert dkim.verify(data, dnsfunc=dkim_dns)
    # Written again by the email package's own writer (what a reader's software may do, on an
    # interpreter without the CVE-2024-6923 fix), the decoded headers still hold no line break.
    rewritten = message.as_bytes(policy=email.policy.SMTP)
    assert list(email.message_from_bytes(rewritten, policy=email.policy.default).keys()) == (
        FORWARD_HEADERS
    )


@pytest.mark.parametrize(
    "character",
    ["\r", "\n", "\x00", "\x1b", "\x7f", "\x85", "\u2028", "\u2029", "\u202e", "\u200b", "\ufeff",
     "\ud800", "\t", "\x0b", "\x1c"],
)  # fmt: skip
def test_header_text_keeps_no_control_or_format_character(character: str) -> None:
    assert one_line(f"a{character}b", 100) in ("a b", "ab")


@settings(max_examples=200, deadline=None)
@given(text=st.text(max_size=300))
def test_any_outside_text_is_one_subject_line_read_back_as_cleaned(text: str) -> None:
    cleaned = one_line(text, 200)
    assert not {unicodedata.category(c) for c in cleaned} & {"Cc", "Cf", "Cs", "Zl", "Zp"}
    draft = Draft(SENDER.name, SENDER.address, SUPPORTER, cleaned or "x", CREATED, "<x@y>", "")
    data = write(draft)
    check_wire(data)
    parsed = email.message_from_bytes(data, policy=email.policy.default)
    assert len(parsed.get_all("Subject") or []) == 1
    assert str(parsed["Subject"]) == (cleaned or "x")


def test_a_forward_says_plainly_who_sent_the_reply() -> None:
    office = "caseworker@office.parliament.example"
    data = forwarded(reply("RE: Please act", sender=f'"Jane Smith MP" <{office}>'))
    message = email.message_from_bytes(data, policy=email.policy.default)
    # No address in the From name (one that differs from the From's domain is a spam signal),
    # and the MP's office named only for a sender on the MP's domain.
    assert message["From"].addresses[0].display_name == f"Office of Jane Smith via {SENDER.name}"
    assert message["From"].addresses[0].addr_spec == SENDER.address
    assert str(message["Subject"]) == "Reply to your letter to Jane Smith: RE: Please act"
    assert str(message["Reply-To"]) == office
    body = message.get_content().replace("\r\n", "\n")
    assert body.startswith(f"Forwarded from {office}.\n")
    assert f"{office} replied to your letter to Jane Smith, which went to {MP}" in body


@pytest.mark.parametrize(
    "sender",
    ['"Jane Smith MP" <jane@elsewhere.example>', f'"Jane Smith MP" <{MP}>, <b@x.example>', ""],
)
def test_a_forward_from_anyone_else_does_not_claim_the_mp_wrote_it(sender: str) -> None:
    """A reply an operator released from hold, or whose sender could not be read."""
    message = email.message_from_bytes(
        forwarded(reply("RE: Please act", sender=sender)), policy=email.policy.default
    )
    name = message["From"].addresses[0].display_name
    assert name == f"A reply to your letter via {SENDER.name}"
    assert "@" not in name and "Jane" not in name
    assert str(message["Subject"]) == "Reply to your letter to Jane Smith: RE: Please act"


def test_a_forward_names_the_office_on_a_shared_mail_service_only_for_the_mps_own_address() -> None:
    mp = "jane.smith.mp@gmail.com"

    def display(sender: str) -> str:
        draft = notices.forward(
            NOTICE_ID, SENDER, SUPPORTER, reply("RE: x", sender=sender), "Jane", mp, CREATED
        )
        return draft.from_name

    assert display(f"Jane <{mp}>") == f"Office of Jane via {SENDER.name}"
    assert display("Jane <someone.else@gmail.com>") == f"A reply to your letter via {SENDER.name}"


@pytest.mark.parametrize(
    "sender",
    ["a@parliament.example, b@elsewhere.example", "alice@parliament.example)<bob@evil.example>",
     '"refunds@collect.example" <jane@parliament.example>', "not an address", ""],
)  # fmt: skip
def test_a_reply_whose_sender_is_not_one_plain_address_gets_no_reply_to(sender: str) -> None:
    message = email.message_from_bytes(
        forwarded(reply("RE: Please act", sender=sender)), policy=email.policy.default
    )
    assert message["Reply-To"] is None
    assert message.get_content().startswith("Forwarded from a sender whose address could not be")


# --- A reply's text and subject ---------------------------------------------------------------


def test_an_html_only_reply_is_forwarded_as_the_text_a_reader_sees() -> None:
    html = (
        "<html><head><title>Reply</title><style>p { color: red }</style></head><body>"
        "<script>alert('x')</script><p>Tom &amp; Jerry&nbsp;&mdash; see &lt;this&gt;.</p>"
        "<style>.hidden { display: none }</style><p>Second&#160;paragraph</p></body></html>"
    )
    raw = reply("RE: x", html, **{"Content-Type": 'text/html; charset="utf-8"'})
    text = notices.reply_text(raw).text
    assert "Tom & Jerry \u2014 see <this>." in text.replace("\xa0", " ")
    assert "Second" in text and "paragraph" in text
    for left in ("&amp;", "&nbsp;", "&mdash;", "&#160;", "color", "alert", "display"):
        assert left not in text, left


@pytest.mark.parametrize("charset", ["x-no-such", "unknown-8bit", "idna", "undefined", "punycode"])
def test_a_reply_in_a_charset_python_does_not_know_is_read_as_best_it_can(charset: str) -> None:
    raw = reply(
        f"=?{charset}?q?caf=C3=A9?= ok",
        "Caf\u00e9 ok, merci.",
        **{"Content-Type": f'text/plain; charset="{charset}"'},
    )
    found = notices.reply_text(raw)
    assert found.text == "Caf\u00e9 ok, merci."
    assert found.subject.endswith(" ok") and "caf" in found.subject
    message = email.message_from_bytes(forwarded(raw), policy=email.policy.default)
    assert "Caf\u00e9 ok, merci." in message.get_content()


WORD_76 = "=?utf-8?q?" + "Zo=C3=AB_" * 7 + "a?="
WORD_77 = "=?utf-8?q?" + "Zo=C3=AB_" * 7 + "ab?="
LONG = "Réponse de la députée à votre lettre sur les prisonniers politiques, " * 4


@pytest.mark.parametrize(
    ("subject", "decoded"),
    [
        # Many encoded words: cut after decoding, never in the middle of a word.
        (" ".join(b64_word(w + " ") for w in LONG.split()), " ".join(LONG.split())[:150]),
        # Raw UTF-8 (SMTPUTF8): read as UTF-8, not as replacement characters.
        ("Réponse à votre lettre \u2013 merci", "Réponse à votre lettre \u2013 merci"),
        # Encoded words of 76 and 77 characters (longer than RFC 2047's 75): decoded all the same.
        (WORD_76, "Zoë " * 7 + "a"),
        (WORD_77, "Zoë " * 7 + "ab"),
    ],
)
def test_a_reply_subject_is_decoded_then_cut_then_encoded_again(subject: str, decoded: str) -> None:
    found = notices.reply_text(reply(subject)).subject
    assert found == decoded.rstrip()
    data = forwarded(reply(subject))
    check_wire(data)
    message = email.message_from_bytes(data, policy=email.policy.default)
    assert str(message["Subject"]) == f"Reply to your letter to Jane Smith: {decoded.rstrip()}"
    assert "\ufffd" not in str(message["Subject"])


def test_the_long_encoded_words_above_are_76_and_77_characters() -> None:
    assert [len(WORD_76), len(WORD_77)] == [76, 77]


# --- Quoted-printable lines ---------------------------------------------------------------------


def test_every_body_line_of_every_kind_of_email_is_at_most_76_characters(
    signed_app: App,
) -> None:
    # Mostly ASCII with some accents: what quoted-printable is chosen for.
    wide = "Zoë Smith, " + "x" * 200 + " https://" + "a" * 150 + " député " * 20
    long_reply = reply("RE: x", f"{wide}\n{wide}")
    links = {answer: f"https://{FROM_DOMAIN}/s/" + "t" * 200 for answer in ("yes", "not_yet", "no")}
    drafts = [
        notices.bounce_notice(NOTICE_ID, SENDER, SUPPORTER, wide, 1, CREATED),
        notices.forward(NOTICE_ID, SENDER, SUPPORTER, long_reply, wide, MP, CREATED),
        notices.survey(NOTICE_ID, SENDER, SUPPORTER, wide, links, CREATED, True),
        Draft(SENDER.name, SENDER.address, SUPPORTER, "Letter", CREATED, "<l@x>", wide, html=wide),
    ]
    mails = [notices.outgoing(d, "n-x@" + BOUNCES, signer()) for d in drafts]
    mails += list(every_kind(signed_app).values())  # confirmations and reminders among them
    for mail in mails:
        body = mail.data.split(b"\r\n\r\n", 1)[1]
        assert b"\n" not in body.replace(b"\r\n", b""), "CRLF line ends only"
        for line in body.split(b"\r\n"):
            assert len(line) <= 76, line
        message = email.message_from_bytes(mail.data, policy=email.policy.default)
        for part in message.walk():
            if part.get_content_maintype() == "text":
                assert part["Content-Transfer-Encoding"] == "quoted-printable"
    forward = email.message_from_bytes(mails[1].data, policy=email.policy.default)
    assert f"{wide}\n{wide}" in forward.get_content().replace("\r\n", "\n")  # read back whole
