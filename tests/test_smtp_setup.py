"""Setting up an SMTP session that fails (TLS, a refused login) leaves nothing open, and a refused
login stops every thread from trying again for a while: letters wait, costing no attempt."""

from __future__ import annotations

import os
import re
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import pytest
import trustme
from aiosmtpd.smtp import AuthResult, LoginPassword

from tests.conftest import make_settings
from tests.factories import send_letter, submission
from tests.services import SmtpSink, wait_for
from tests.test_smtp import RawRelay, tls_contexts
from tests.test_smtp import mailer as smtp_mailer
from tests.test_stages import through_render
from workers.database.engine import session_scope
from workers.database.models import Letter, OutboxItem, Submission
from workers.letters.mail import Outgoing, SmtpMailer, TransientDeliveryError
from workers.letters.mail.relay import RelayPause
from workers.pipeline.app import App
from workers.stages.delivery import DeliveryPolicy
from workers.stages.stage import Deferred

pytestmark = [
    pytest.mark.smtp,
    pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS"),
]
MAIL = Outgoing(
    "a@example.org",
    ["b@example.org"],
    b"From: a@example.org\r\nTo: b@example.org\r\nSubject: x\r\n\r\nhello\r\n",
    "<1@example.org>",
)


class Logins:
    """An authenticator that counts the logins it is asked for."""

    def __init__(self) -> None:
        self.tries = 0
        self.lock = threading.Lock()

    def __call__(self, server: Any, session: Any, envelope: Any, mechanism: str, data: Any) -> Any:
        with self.lock:
            self.tries += 1
        ok = isinstance(data, LoginPassword) and data.password == b"right"
        return AuthResult(success=ok, handled=False)  # a refusal: the server answers 535


@pytest.fixture
def logins() -> Logins:
    return Logins()


@pytest.fixture
def relay(logins: Logins) -> Iterator[SmtpSink]:
    sink = SmtpSink(authenticator=logins, auth_required=True, auth_require_tls=False).start()
    yield sink
    sink.stop()


def settings(tmp_path: Path, port: int, **values: Any) -> Any:
    base = {"smtp_username": "dearmp", "smtp_password": "wrong", "smtp_timeout": 5}
    return make_settings(
        tmp_path, mail_backend="smtp", smtp_host="127.0.0.1", smtp_port=port, **(base | values)
    )


def open_sockets() -> int:
    fds = os.listdir("/proc/self/fd")
    links = []
    for fd in fds:
        try:
            links.append(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            continue
    return sum(link.startswith("socket:") for link in links)


def test_a_refused_login_closes_its_session(tmp_path: Path, relay: SmtpSink) -> None:
    before = open_sockets()
    kept = []  # as a worker keeps an exception (and its frames) while it records the failure
    for _ in range(10):
        with pytest.raises(TransientDeliveryError, match="535") as raised:
            SmtpMailer(settings(tmp_path, relay.port)).send(MAIL)
        kept.append(raised.value)
    assert open_sockets() - before <= 1


def test_a_failed_tls_handshake_closes_its_session(tmp_path: Path) -> None:
    ca = trustme.CA()  # the relay's certificate is signed by a CA we do not trust
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    sink = SmtpSink(tls_context=context).start()
    try:
        before = open_sockets()
        kept = []
        for _ in range(10):
            mailer = SmtpMailer(settings(tmp_path, sink.port, smtp_security="starttls"))
            with pytest.raises(TransientDeliveryError) as raised:
                mailer.send(MAIL)
            kept.append(raised.value)
        assert open_sockets() - before <= 1
    finally:
        sink.stop()


def test_one_refused_login_stops_every_thread_from_trying(
    tmp_path: Path, relay: SmtpSink, logins: Logins
) -> None:
    mailer = SmtpMailer(settings(tmp_path, relay.port))
    answers: list[str] = []
    start = threading.Barrier(8)

    def send() -> None:
        start.wait()
        try:
            mailer.send(MAIL)
        except TransientDeliveryError as exc:
            answers.append(str(exc))

    threads = [threading.Thread(target=send) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(answers) == 8
    assert logins.tries <= 2  # threads that raced the first refusal; then nobody tries
    assert 25 < mailer.waiting() <= 30
    assert sum("next try in" in a for a in answers) >= 6


def test_the_pause_doubles_and_a_login_accepted_ends_it() -> None:
    now = [1000.0]
    alarms: list[tuple[Any, ...]] = []
    breaker = RelayPause(clock=lambda: now[0], alarm=lambda *a: alarms.append(a))
    breaker.refused("535 5.7.8 Authentication failed", lasting=True)
    assert breaker.waiting() == 30
    with pytest.raises(TransientDeliveryError, match="next try in 30 s"), breaker.turn():
        pass
    now[0] += 30
    with breaker.turn():  # its turn: one login is tried
        breaker.refused("535 5.7.8 Authentication failed", lasting=True)
    assert breaker.waiting() == 60
    for _ in range(10):
        breaker.refused("535 5.7.8 Authentication failed", lasting=True)
    assert breaker.waiting() == 900  # at most 15 minutes
    breaker.accepted()
    assert breaker.waiting() == 0
    assert alarms[0] == ("535 5.7.8 Authentication failed", 30.0, True)
    assert alarms[-1] == (None, 0.0) and len(alarms) == 13  # 12 pauses, one end


def test_threads_refused_at_once_are_one_refusal_on_every_transport() -> None:
    """SMTP set-up failures and the mail API's refusals both go through ``refused_once``: eight
    threads meeting one bad certificate pause once, for 30 s, with one alarm (two unlocked
    threads could both see no pause and double it)."""
    alarms: list[tuple[Any, ...]] = []
    breaker = RelayPause(clock=lambda: 1000.0, alarm=lambda *a: alarms.append(a))
    start = threading.Barrier(8)
    waits: list[float] = []

    def meet() -> None:
        start.wait()
        waits.append(breaker.refused_once("our certificate was refused", lasting=True))

    threads = [threading.Thread(target=meet) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert waits == [30.0] * 8 and breaker.refusals == 1 and len(alarms) == 1


def test_letters_wait_for_the_login_without_using_attempts(
    app: App, tmp_path: Path, relay: SmtpSink
) -> None:
    mailer = SmtpMailer(settings(tmp_path, relay.port))
    mailer.relay.refused("535 5.7.8 Authentication failed", lasting=True)  # a moment ago
    sid = through_render(app, submission())
    with pytest.raises(Deferred, match="delivery paused"):
        send_letter(app.sessions, sid, mailer, DeliveryPolicy())
    with session_scope(app.sessions) as session:
        delivery = session.get(OutboxItem, sid)
        assert delivery is not None and (delivery.status, delivery.attempts) == ("pending", 0)
        assert delivery.dispatched_at > delivery.created_at  # the reconciler waits too
    assert relay.received.count() == 0


@pytest.mark.parametrize(
    ("where", "answer"),
    [
        ("MAIL", "553 5.7.1 <letters@campaign.example.org>: Sender address rejected: not owned"),
        ("RCPT", "554 5.7.1 <mp@parliament.uk>: Relay access denied"),
    ],
)
def test_a_policy_answer_pauses_delivery_and_a_later_success_resumes_it(
    app: App, tmp_path: Path, smtp_sink: SmtpSink, where: str, answer: str
) -> None:
    alarms: list[tuple[Any, ...]] = []
    mailer = smtp_mailer(tmp_path, smtp_sink, alarm=lambda *a: alarms.append(a))
    first, second = through_render(app, submission()), through_render(app, submission())
    if where == "MAIL":
        smtp_sink.sender_answer = answer
    else:
        with session_scope(app.sessions) as session:
            to = session.get(Letter, first)
            assert to is not None
            smtp_sink.refuse[to.to_email] = answer
    policy = DeliveryPolicy()
    with pytest.raises(Deferred, match=r"5\.7\.1"):
        send_letter(app.sessions, first, mailer, policy)
    with pytest.raises(Deferred, match="delivery paused"):  # the next letter waits too
        send_letter(app.sessions, second, mailer, policy)
    status = " ".join(answer.split()[:2])  # of the answer, its status and our words it holds
    phrase = "Sender address rejected" if where == "MAIL" else "Relay access denied"
    [(reason, pause, lasting)] = alarms
    assert reason.endswith(f": {status} ({phrase})") and (pause, lasting) == (30.0, True)
    assert 25 < mailer.waiting() <= 30
    with session_scope(app.sessions) as session:
        for sid in (first, second):
            delivery = session.get(OutboxItem, sid)
            assert delivery is not None and (delivery.status, delivery.attempts) == ("pending", 0)
            sub = session.get(Submission, sid)
            assert sub is not None and sub.state == "rendered"  # not failed: not their fault
    # The relay is fixed; once the pause is over, the next letter is the probe.
    smtp_sink.sender_answer = None
    smtp_sink.refuse.clear()
    mailer.relay.closed_until = 0.0
    send_letter(app.sessions, first, mailer, policy)
    send_letter(app.sessions, second, mailer, policy)
    assert smtp_sink.received.count() == 2 and alarms[-1] == (None, 0.0)
    assert mailer.waiting() == 0


def test_a_refused_recipient_is_still_the_letters_own_failure(
    app: App, tmp_path: Path, smtp_sink: SmtpSink
) -> None:
    from workers.letters.mail import PermanentDeliveryError

    mailer = smtp_mailer(tmp_path, smtp_sink)
    sid = through_render(app, submission())
    with session_scope(app.sessions) as session:
        to = session.get(Letter, sid)
        assert to is not None
        smtp_sink.refuse[to.to_email] = "550 5.1.1 <x>: Recipient address rejected: unknown"
    with pytest.raises(PermanentDeliveryError, match=r"5\.1\.1"):
        send_letter(app.sessions, sid, mailer, DeliveryPolicy())
    assert mailer.waiting() == 0


def test_a_policy_answer_to_the_letters_content_is_the_letters_own_failure(
    tmp_path: Path, smtp_sink: SmtpSink
) -> None:
    from workers.letters.mail import PermanentDeliveryError

    mailer = smtp_mailer(tmp_path, smtp_sink)
    smtp_sink.answer = "554 5.7.1 Message rejected as spam"
    with pytest.raises(PermanentDeliveryError, match="spam"):
        mailer.send(MAIL)
    assert mailer.waiting() == 0  # one letter's content does not pause everyone's


def test_a_recipient_refused_by_policy_again_after_other_letters_went_is_its_own_failure(
    app: App, tmp_path: Path, smtp_sink: SmtpSink
) -> None:
    """ "550 5.7.1 Recipient address rejected: Access denied" names the recipient, "554 5.7.1
    Relay access denied" names us, and nothing in the words says which. The first refusal
    pauses; once the relay has taken other letters, the same recipient refused again is the
    letter's own permanent failure, and it pauses nobody."""
    from workers.letters.mail import PermanentDeliveryError

    mailer = smtp_mailer(tmp_path, smtp_sink, smtp_pause=5)
    refused = through_render(app, submission())
    other = through_render(app, submission(supporter__postcode="DM2 1AA"))
    with session_scope(app.sessions) as session:
        to = session.get(Letter, refused)
        assert to is not None
        smtp_sink.refuse[to.to_email] = "550 5.7.1 <x>: Recipient address rejected: Access denied"
    policy = DeliveryPolicy()
    with pytest.raises(Deferred, match=r"5\.7\.1"):
        send_letter(app.sessions, refused, mailer, policy)
    assert 4 < mailer.waiting() <= 5  # SMTP_PAUSE_SECONDS
    mailer.relay.closed_until = 0.0  # the pause is over
    with pytest.raises(Deferred, match=r"5\.7\.1"):  # refused again, nothing accepted between
        send_letter(app.sessions, refused, mailer, policy)
    mailer.relay.closed_until = 0.0
    send_letter(app.sessions, other, mailer, policy)
    with pytest.raises(PermanentDeliveryError, match="Access denied"):
        send_letter(app.sessions, refused, mailer, policy)
    assert mailer.waiting() == 0
    with session_scope(app.sessions) as session:
        failed = session.get(Submission, refused)
        assert failed is not None and failed.state == "failed"
        assert "Access denied" in (failed.failure_reason or "")


def test_a_helo_name_that_is_not_fully_qualified_is_refused_at_start(tmp_path: Path) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="SMTP_HELO_NAME must be a fully qualified"):
        settings(tmp_path, 25, smtp_helo_name="worker")
    for good in ("worker.campaign.example.org", "[203.0.113.5]"):
        assert settings(tmp_path, 25, smtp_helo_name=good).smtp_helo_name == good


@pytest.mark.parametrize(
    "answer",
    [
        "504 5.5.2 <worker>: Helo command rejected: need fully-qualified hostname",
        "450 4.7.1 <worker>: Helo command rejected: Host not found",
        "550 5.7.1 Client host rejected: cannot find your reverse hostname",
        "530 5.7.0 Must issue a STARTTLS command first",
    ],
)
def test_an_answer_about_our_own_set_up_pauses_and_fails_no_letter(
    app: App, tmp_path: Path, smtp_sink: SmtpSink, answer: str
) -> None:
    """Postfix answers a HELO it refuses at RCPT ("Helo command rejected"), with a code that
    says nothing of a policy: the words say it is our set-up, the same for every letter."""
    alarms: list[tuple[Any, ...]] = []
    mailer = smtp_mailer(tmp_path, smtp_sink, alarm=lambda *a: alarms.append(a))
    first, second = through_render(app, submission()), through_render(app, submission())
    for sid in (first, second):
        with session_scope(app.sessions) as session:
            letter = session.get(Letter, sid)
            assert letter is not None
            smtp_sink.refuse[letter.to_email] = answer
    policy = DeliveryPolicy()
    with pytest.raises(Deferred, match=answer.split()[0]):
        send_letter(app.sessions, first, mailer, policy)
    with pytest.raises(Deferred, match="delivery paused"):
        send_letter(app.sessions, second, mailer, policy)
    status = " ".join(answer.split()[:2])  # and the words of ours it holds: no others
    phrase = re.search(
        r"(Helo command|Client host) rejected|Must issue a STARTTLS command first", answer
    )
    assert phrase is not None
    assert alarms == [  # 4xx: passes by itself
        (
            f"the mail server refused us at RCPT TO: {status} ({phrase[0]})",
            30.0,
            answer.startswith("5"),
        )
    ]
    assert wait_for(lambda: smtp_sink.open_sessions == 0, 5)  # none waits out the pause
    with session_scope(app.sessions) as session:
        for sid in (first, second):
            delivery = session.get(OutboxItem, sid)
            assert delivery is not None and (delivery.status, delivery.attempts) == ("pending", 0)


def test_a_certificate_our_ca_does_not_verify_pauses_delivery_and_says_why(
    app: App, tmp_path: Path
) -> None:
    """The relay's certificate is not from the CA we were given (SMTP_CA_FILE): the relay's
    set-up, the same for every letter. Delivery pauses with the reason (what `dearmp health`
    shows), after one handshake, and no letter is charged an attempt."""
    relay_ca, our_ca = trustme.CA(), trustme.CA()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    relay_ca.issue_cert("127.0.0.1").configure_cert(context)
    our_ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    sink = SmtpSink(tls_context=context).start()
    alarms: list[tuple[Any, ...]] = []
    try:
        config = settings(
            tmp_path,
            sink.port,
            smtp_security="starttls",
            smtp_ca_file=tmp_path / "ca.pem",
            smtp_username=None,
            smtp_password=None,
        )
        mailer = SmtpMailer(config, alarm=lambda *a: alarms.append(a))
        first, second = through_render(app, submission()), through_render(app, submission())
        policy = DeliveryPolicy()
        with pytest.raises(Deferred, match="TLS verification of the mail server failed"):
            send_letter(app.sessions, first, mailer, policy)
        with pytest.raises(Deferred, match="delivery paused"):
            send_letter(app.sessions, second, mailer, policy)
        assert mailer.pool.opened == 0 and sink.most_sessions == 1  # one handshake, not two
        [(reason, pause, lasting)] = alarms
        assert reason is not None and "TLS verification of the mail server failed" in reason
        assert "SMTP_CA_FILE" in reason and pause == 30.0 and lasting
        with session_scope(app.sessions) as session:
            for sid in (first, second):
                delivery = session.get(OutboxItem, sid)
                assert delivery is not None
                assert (delivery.status, delivery.attempts) == ("pending", 0)
    finally:
        sink.stop()


@pytest.mark.parametrize(
    "answer",
    [
        "550 5.1.1 <helo@example.com>: Recipient address rejected: User unknown",
        "450 4.1.2 <a@tls.example>: Recipient address rejected: Domain not found",
        "550 5.1.1 <starttls@authentication.example>: Recipient address rejected: User unknown",
        '550 5.1.1 <"Helo command rejected"@example.com>: Recipient address rejected: unknown',
    ],
)
def test_a_recipient_quoted_in_an_answer_is_the_letters_own_whatever_its_words(
    tmp_path: Path, smtp_sink: SmtpSink, answer: str
) -> None:
    """Postfix quotes the recipient it refuses ("<helo@example.com>: Recipient address
    rejected"): words in the address say nothing of our set-up. The letter fails (5xx) or is
    tried again as its own (4xx), and nobody else's letter waits."""
    from workers.letters.mail import PermanentDeliveryError

    alarms: list[tuple[Any, ...]] = []
    mailer = smtp_mailer(tmp_path, smtp_sink, alarm=lambda *a: alarms.append(a))
    smtp_sink.refuse["b@example.org"] = answer
    expected = PermanentDeliveryError if answer.startswith("5") else TransientDeliveryError
    with pytest.raises(expected, match="Recipient address rejected") as raised:
        mailer.send(MAIL)
    assert not getattr(raised.value, "ours", False)  # an attempt of the letter's
    assert mailer.waiting() == 0 and alarms == []
    other = Outgoing(MAIL.sender, ["c@example.org"], MAIL.data, "<2@example.org>")
    assert mailer.send(other).startswith("250")  # the next letter goes at once


@pytest.mark.parametrize(
    "answer",
    [
        "550 5.7.515 Access denied, sending domain campaign.example.org doesn't meet the "
        "required authentication level.",
        "550 5.7.26 Unauthenticated email from campaign.example.org is not accepted due to "
        "domain's DMARC policy.",
        "554 5.7.1 Client host rejected: your message looks like spam",
        "451 4.7.0 Temporary authentication required for this message; try again",
    ],
)
def test_a_refusal_at_data_is_the_letters_own_whatever_its_words(
    tmp_path: Path, smtp_sink: SmtpSink, answer: str
) -> None:
    """At DATA the relay has taken our session, sender and recipients: what it refuses then is
    the letter (its content, its DKIM or DMARC), even in words about authentication."""
    from workers.letters.mail import PermanentDeliveryError

    alarms: list[tuple[Any, ...]] = []
    mailer = smtp_mailer(tmp_path, smtp_sink, alarm=lambda *a: alarms.append(a))
    smtp_sink.answer = answer
    expected = PermanentDeliveryError if answer.startswith("5") else TransientDeliveryError
    with pytest.raises(expected, match=answer.split()[1]) as raised:
        mailer.send(MAIL)
    assert not getattr(raised.value, "ours", False)
    assert mailer.waiting() == 0 and alarms == []
    smtp_sink.answer = None
    assert mailer.send(MAIL).startswith("250") and mailer.pool.opened == 1


def test_set_up_words_at_rcpt_for_one_recipient_alone_become_that_letters_own(
    tmp_path: Path, smtp_sink: SmtpSink
) -> None:
    """ "Sender address rejected" at RCPT pauses delivery the first time; when the relay has
    taken other letters since and refuses this recipient again in the same words (a rule of
    the relay's for that recipient), it is the letter's own answer and pauses nobody."""
    mailer = smtp_mailer(tmp_path, smtp_sink, smtp_pause=5)
    answer = "450 4.1.8 <letters@campaign.example.org>: Sender address rejected: Domain not found"
    smtp_sink.refuse["b@example.org"] = answer
    with pytest.raises(TransientDeliveryError, match="Sender address rejected") as first:
        mailer.send(MAIL)
    assert first.value.ours and 4 < mailer.waiting() <= 5
    mailer.relay.closed_until = 0.0  # the pause is over
    other = Outgoing(MAIL.sender, ["c@example.org"], MAIL.data, "<2@example.org>")
    assert mailer.send(other).startswith("250")
    with pytest.raises(TransientDeliveryError, match="Sender address rejected") as again:
        mailer.send(MAIL)
    assert not again.value.ours and mailer.waiting() == 0  # an attempt of its own, no pause


def test_the_pause_reason_health_shows_keeps_of_the_answer_only_its_status(
    app: App, tmp_path: Path, smtp_sink: SmtpSink, redis_server: Any
) -> None:
    """The pause's reason, shown to whoever runs `dearmp health` and kept in Redis, names the
    relay's answer by its status and the words of ours it holds ("Relay access denied"): not a
    recipient's address it quotes, nor any other word of it."""
    import redis
    from click.testing import CliRunner

    from workers.cli import main
    from workers.pipeline.dead_letters import MailPauseAlarm

    app.settings.redis_url = redis_server.url
    client = redis.Redis.from_url(redis_server.url)
    alarm = MailPauseAlarm(client, app.settings.redis_namespace)
    mailer = smtp_mailer(tmp_path, smtp_sink, alarm=alarm)
    sid = through_render(app, submission())
    with session_scope(app.sessions) as session:
        letter = session.get(Letter, sid)
        assert letter is not None
        to = letter.to_email
    smtp_sink.refuse[to] = f"554 5.7.1 <{to}>: Relay access denied"
    with pytest.raises(Deferred, match=r"^refused us: 554 5\.7\.1: wait"):  # (its status only)
        send_letter(app.sessions, sid, mailer, DeliveryPolicy())
    with pytest.raises(TransientDeliveryError, match="delivery paused") as waiting:
        mailer.send(MAIL)
    assert to not in str(waiting.value) and "[email]" not in str(waiting.value)
    health = CliRunner().invoke(main, ["health"], terminal_width=300)
    assert health.exit_code != 0 and "mail delivery paused" in health.output
    said = "the mail server refused us at RCPT TO: 554 5.7.1 (Relay access denied)"
    assert said in health.output and "[email]" not in health.output
    assert to not in health.output and to.split("@")[0] not in health.output

    # The relay fixed, an operator resumes: the worker tries again within seconds, not after
    # its doubled pause, and the next letter goes.
    del smtp_sink.refuse[to]
    resumed = CliRunner().invoke(main, ["deliveries", "resume"])
    assert resumed.exit_code == 0 and "resumed" in resumed.output
    assert wait_for(lambda: mailer.waiting() == 0, 5)
    send_letter(app.sessions, sid, mailer, DeliveryPolicy())
    assert smtp_sink.received.count() == 1
    again = CliRunner().invoke(main, ["deliveries", "resume"])
    assert again.exit_code == 1 and "no pause was reported" in again.output


def test_a_relay_that_offers_no_login_when_one_is_set_pauses_delivery_as_a_refused_login(
    tmp_path: Path, smtp_sink: SmtpSink
) -> None:
    """A relay without AUTH (often: only after STARTTLS) while SMTP_USERNAME is set: every
    letter would fail the same way, so it is our side's refusal, not the letter's."""
    mailer = SmtpMailer(settings(tmp_path, smtp_sink.port))
    with pytest.raises(TransientDeliveryError, match="offers no login") as raised:
        mailer.send(MAIL)
    assert raised.value.ours and mailer.relay.waiting() > 0
    assert smtp_sink.received.count() == 0


def garbage_with_starttls(file: BinaryIO) -> None:
    """What is not TLS sent with the answer to STARTTLS, then the connection closed."""
    file.write(b"220 2.0.0 go ahead\r\n" + b"HTTP/1.1 200 OK\r\n\r\n" * 10)
    file.flush()


def garbage_after_starttls(file: BinaryIO) -> None:
    file.write(b"220 2.0.0 go ahead\r\n")
    file.flush()
    file.read(5)  # the client's hello begins
    file.write(b"HTTP/1.1 200 OK\r\n\r\n" * 10)
    file.flush()


@pytest.mark.parametrize(
    ("kind", "setting"),
    [
        ("no STARTTLS", "SMTP_SECURITY"),
        ("garbage after STARTTLS", "SMTP_SECURITY"),
        ("garbage with STARTTLS", "SMTP_SECURITY"),
        ("a login challenge not base64", "SMTP_HOST"),
    ],
)
def test_a_set_up_that_fails_the_same_for_every_letter_pauses_delivery(
    tmp_path: Path, kind: str, setting: str
) -> None:
    """SMTP_SECURITY=starttls and a relay that offers none, or answers STARTTLS with what is not
    TLS; a relay's login challenge that is not base64: every letter would meet the same, so it
    pauses delivery (as a refused login does) with one line naming the setting to check, and
    costs no letter an attempt."""
    tls, _ = tls_contexts(tmp_path)
    relay = {
        "no STARTTLS": lambda: RawRelay({}),
        "garbage after STARTTLS": lambda: RawRelay({"STARTTLS": garbage_after_starttls}, tls),
        "garbage with STARTTLS": lambda: RawRelay({"STARTTLS": garbage_with_starttls}, tls),
        "a login challenge not base64": lambda: RawRelay(
            {"AUTH": b"334 !!!not*base64$$$\r\n"}, offer=(b"AUTH CRAM-MD5",)
        ),
    }[kind]()
    values: dict[str, Any] = {"smtp_ca_file": tmp_path / "ca.pem"}
    if kind == "a login challenge not base64":
        values |= {"smtp_username": "dearmp", "smtp_password": "secret"}
    else:
        values |= {"smtp_security": "starttls"}
    alarms: list[tuple[Any, ...]] = []
    try:
        config = make_settings(
            tmp_path, mail_backend="smtp", smtp_host="127.0.0.1", smtp_port=relay.port, **values
        )
        mailer = SmtpMailer(config, alarm=lambda *a: alarms.append(a))
        with pytest.raises(TransientDeliveryError) as first:
            mailer.send(MAIL)
        with pytest.raises(TransientDeliveryError, match="delivery paused") as second:
            mailer.send(MAIL)
    finally:
        relay.stop()
    assert first.value.ours and second.value.ours  # no letter's attempt
    [(reason, pause, lasting)] = alarms
    # A handshake the relay ended (what the garbage sent with its 220 does) may be its restart.
    assert setting in reason and reason.isprintable() and pause == 30.0
    assert lasting == (kind != "garbage with STARTTLS")
    assert reason in str(first.value) and 25 < mailer.waiting() <= 30


# A hostile answer echoing the letter it refuses: a supporter's name and street.
ECHO = b"Amira Haddad, 1 High Street: no"


@pytest.mark.parametrize(
    ("refusal", "status"),
    [
        ("greeting", "554 5.7.1"),
        ("login", "535 5.7.8"),
        ("MAIL", "553 5.7.1"),
        ("RCPT", "554 5.7.1"),
        ("HTTP", "404"),
    ],
)
def test_a_pause_logs_and_keeps_a_servers_answer_only_as_its_status(
    tmp_path: Path, refusal: str, status: str
) -> None:
    """The pause's reason is logged and kept in Redis for `dearmp health`, where erasing a
    supporter does not reach: of the server's answer, which may quote the letter, only its
    status, with our own words. The letter keeps the whole answer (erased with it)."""
    from structlog.testing import capture_logs

    from tests.test_providers import ProviderStub, http_settings
    from workers.letters.mail import HttpMailer

    alarms: list[str] = []
    provider, relay = None, None
    if refusal == "HTTP":
        provider = ProviderStub()
        provider.replies.append((404, {}, ECHO.decode()))
        config = http_settings(tmp_path, provider)
        mailer: Any = HttpMailer(config, alarm=lambda *a: alarms.append(a[0]))
    else:
        answer = status.encode() + b" " + ECHO + b"\r\n"
        login = refusal == "login"
        relay = RawRelay({"AUTH" if login else refusal: answer}, offer=(b"AUTH PLAIN",))
        values = {"smtp_username": "dearmp", "smtp_password": "secret"} if login else {}
        config = make_settings(
            tmp_path, mail_backend="smtp", smtp_host="127.0.0.1", smtp_port=relay.port, **values
        )
        mailer = SmtpMailer(config, alarm=lambda *a: alarms.append(a[0]))
    try:
        with capture_logs() as logs, pytest.raises(TransientDeliveryError) as raised:
            mailer.send(MAIL)
    finally:
        if provider is not None:
            provider.server.shutdown()
        if relay is not None:
            relay.stop()
    assert raised.value.ours and "Amira Haddad" in str(raised.value)
    [paused] = [log for log in logs if log["event"] == "mail_delivery_paused"]
    for kept in (paused["reason"], alarms[0], mailer.relay.reason):
        assert status in kept and "Amira" not in kept and "High" not in kept, kept
