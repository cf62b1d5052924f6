"""End to end through a real relay nobody on the project wrote: Debian's Postfix with STARTTLS,
SMTP AUTH (Cyrus SASL, sasldb) and strict RFC checks, relaying to Postfix's smtp-sink.

Worker processes, Redis and PostgreSQL are real too. In each scenario every letter that should
arrive arrives exactly once (counted by Message-ID at smtp-sink), and no letter is blamed for
the relay's state: a letter fails only when the relay refuses its recipient.
"""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import dkim
import pytest
import redis
import trustme
from dramatiq.brokers.redis import RedisBroker
from sqlalchemy import func, select, update

from tests.conftest import make_settings
from tests.factories import submission
from tests.postfix import Postfix
from tests.services import REPO, dkim_dns, dkim_keys, wait_for
from tests.test_e2e_redis import Stack, wait_all_final
from workers.database.engine import session_scope
from workers.database.models import Letter, Member, OutboxItem, Submission
from workers.pipeline.app import App
from workers.pipeline.dead_letters import mail_pause
from workers.pipeline.embedded_redis import EmbeddedRedis
from workers.pipeline.runtime import prepare, submit

pytestmark = [
    pytest.mark.redis,
    pytest.mark.smtp,
    pytest.mark.parametrize("db_url", ["postgresql"], indirect=True),
]

MPS = ["DM1 1AA", "DM2 1AA", "DM3 1AA", "DM4 1AA", "DM5 1AA", "DM6 1AA"]


@pytest.fixture
def relay() -> Iterator[Postfix]:
    postfix = Postfix().start()
    yield postfix
    postfix.stop()


class Run:
    """The application, its broker, and worker processes pointed at the relay."""

    def __init__(self, tmp_path: Path, db_url: str, redis_url: str, relay: Postfix) -> None:
        self.app = App.from_settings(make_settings(tmp_path, database_url=db_url))
        prepare(self.app)
        self.broker = RedisBroker(url=redis_url, namespace="dearmp")
        self.redis = redis.Redis.from_url(redis_url)
        self.relay = relay
        self.stack = Stack(
            tmp_path,
            db_url,
            redis_url,
            **relay.environment(SMTP_PAUSE_SECONDS="3", SMTP_TIMEOUT="10"),
        )

    def start(self, processes: int = 2, threads: int = 4, **env: str) -> None:
        self.stack.env.update(env)
        self.stack.start("worker", "--processes", str(processes), "--threads", str(threads))
        self.stack.start("reconcile")

    def submit(self, n: int, postcodes: list[str] = MPS) -> list[str]:
        return [
            submit(self.app, self.broker, submission(supporter__postcode=postcodes[i % 6]))[0]
            for i in range(n)
        ]

    def final(self, ids: list[str], timeout: float = 120) -> dict[str, int]:
        return wait_all_final(self.app, ids, timeout)

    def arrived_once(self, ids: list[str]) -> None:
        """Each of these letters reached smtp-sink exactly once."""
        expected = {f"<{sid}@campaign.example.org>" for sid in ids}
        assert wait_for(lambda: expected <= set(self.relay.message_ids()), 30), self.logs()
        copies = Counter(self.relay.message_ids())
        assert [m for m in expected if copies[m] != 1] == []

    def most_attempts(self, ids: list[str]) -> int:
        with session_scope(self.app.sessions) as session:
            return int(
                session.scalar(select(func.max(OutboxItem.attempts)).where(OutboxItem.id.in_(ids)))
                or 0
            )

    def failures(self, ids: list[str]) -> dict[str, str]:
        with session_scope(self.app.sessions) as session:
            rows = session.execute(
                select(Submission.id, Submission.failure_reason).where(
                    Submission.id.in_(ids), Submission.state == "failed"
                )
            )
            return {sid: reason or "" for sid, reason in rows}

    def logs(self) -> str:
        return f"relay:\n{self.relay.log()[-3000:]}\nworkers:\n{self.stack.log_text()[-3000:]}"

    def close(self) -> None:
        self.stack.stop()
        self.app.engine.dispose()


@pytest.fixture
def run(tmp_path: Path, db_url: str, redis_server: EmbeddedRedis, relay: Postfix) -> Iterator[Run]:
    running = Run(tmp_path, db_url, redis_server.url, relay)
    yield running
    running.close()


def test_signed_letters_go_through_tls_auth_and_strict_checks_once_each(run: Run) -> None:
    run.start(DEARMP_DKIM_SELECTOR="dearmp", DEARMP_DKIM_PRIVATE_KEY=dkim_keys()[0].decode())
    ids = run.submit(24)
    assert run.final(ids) == {"delivered": 24}, run.logs()
    run.arrived_once(ids)
    assert run.most_attempts(ids) == 1
    assert run.relay.count("sasl_method=PLAIN, sasl_username=dearmp@relay.test") == 24
    assert run.relay.count("reject") == 0
    for dump in run.relay.sink_dir.iterdir():
        received = dump.read_bytes()
        assert b"with ESMTPSA" in received  # STARTTLS, then AUTH
        # smtp-sink writes its own X- lines first; the message starts at the first Received.
        message = received[received.index(b"Received:") :].replace(b"\n", b"\r\n")
        assert dkim.verify(message, dnsfunc=dkim_dns)


def test_a_sender_the_relay_refuses_pauses_delivery_until_it_is_fixed(run: Run) -> None:
    """ "553 5.7.1 Sender address rejected: not owned by user": our configuration, not the
    letters'. Delivery pauses, the alarm shows in `dearmp health`, and after the relay's
    operator fixes the rule and reloads, every letter goes, none having used an attempt."""
    run.relay.rules(recipients={}, senders=("someone-else@campaign.example.org",))
    run.relay.reload()
    run.start()
    ids = run.submit(12)
    assert wait_for(lambda: mail_pause(run.redis, "dearmp") is not None, 60), run.logs()
    health = subprocess.run(
        [sys.executable, "-m", "workers.cli", "health"],
        cwd=REPO,
        env=run.stack.env,
        capture_output=True,
        text=True,
    )
    assert health.returncode != 0
    assert "mail delivery paused" in health.stderr
    assert "553 5.7.1" in health.stderr and "not owned" not in health.stderr  # status, no words
    assert run.relay.count("Sender address rejected") >= 1
    run.relay.rules(recipients={}, senders=("letters@campaign.example.org",))
    run.relay.reload()
    assert run.final(ids) == {"delivered": 12}, run.logs()
    run.arrived_once(ids)
    assert run.most_attempts(ids) == 1  # the refusals cost no letter an attempt
    # Each worker process's pause ends with its own timer (3, 6, 12 s...), or at its next letter.
    assert wait_for(lambda: mail_pause(run.redis, "dearmp") is None, 90)
    # Each worker process tried once per pause, not once per letter.
    assert run.relay.count("Sender address rejected") < 12


def test_a_wrong_password_stops_every_thread_trying_and_recovers(run: Run) -> None:
    """22 letters, 8 threads, a password the relay no longer accepts: a few failed logins
    (one per worker process per pause), not one per letter and thread."""
    run.relay.password("changed-at-the-relay")
    run.start()
    ids = run.submit(22)
    assert wait_for(lambda: run.relay.count("authentication failed") >= 4, 60), run.logs()
    run.relay.password("relay-password")  # the account's password is put right
    assert run.final(ids) == {"delivered": 22}, run.logs()
    run.arrived_once(ids)
    assert run.most_attempts(ids) == 1
    failed_logins = run.relay.count("authentication failed")
    print(f"22 letters, 2 processes x 4 threads: {failed_logins} failed logins")
    assert failed_logins <= 10, run.logs()  # 2 processes; pauses of 3, 6, 12 s...


def test_a_recipient_the_relay_refuses_fails_that_letter_alone(run: Run) -> None:
    refused = "alex.rivers.mp@mp.example.org"
    run.relay.rules(recipients={refused: "550 5.1.1 <x>: Recipient address rejected: unknown"})
    run.relay.reload()
    run.start()
    ids = run.submit(12)
    assert run.final(ids) == {"delivered": 10, "failed": 2}, run.logs()
    failures = run.failures(ids)
    with session_scope(run.app.sessions) as session:
        rows = session.execute(select(Letter.submission_id, Letter.to_email))
        to = {sid: address for sid, address in rows}
    assert {to[sid] for sid in failures} == {refused}
    assert all("550 5.1.1" in reason for reason in failures.values())
    run.arrived_once([sid for sid in ids if sid not in failures])
    assert mail_pause(run.redis, "dearmp") is None  # one recipient pauses nobody


def test_a_recipient_whose_address_holds_words_of_set_up_fails_that_letter_alone(
    run: Run,
) -> None:
    """Postfix quotes the recipient it refuses ("550 5.1.1 <helo@tls.mp.example.org>:
    Recipient address rejected: User unknown"): the words in the address are not an answer
    about our HELO or TLS. That letter fails, and nobody's delivery pauses."""
    refused = "helo@tls.mp.example.org"
    with session_scope(run.app.sessions) as session:
        session.execute(
            update(Member)
            .where(Member.email == "alex.rivers.mp@mp.example.org")
            .values(email=refused)
        )
    run.relay.rules(recipients={refused: "550 5.1.1 User unknown"})
    run.relay.reload()
    run.start()
    ids = run.submit(12)
    assert run.final(ids) == {"delivered": 10, "failed": 2}, run.logs()
    failures = run.failures(ids)
    assert all("Recipient address rejected: User unknown" in r for r in failures.values())
    delivered = [sid for sid in ids if sid not in failures]
    run.arrived_once(delivered)
    assert run.most_attempts(delivered) == 1
    assert "mail_delivery_paused" not in run.stack.log_text(), run.logs()


def test_a_451_storm_passes_and_every_letter_goes_once(run: Run) -> None:
    run.relay.rules(recipients={"mp.example.org": "451 4.3.0 <x>: Try again later"})
    run.relay.reload()
    run.start(DEARMP_OUTBOX_BACKOFF_SECONDS="2")  # retried within seconds, not minutes
    ids = run.submit(18)
    assert wait_for(lambda: run.relay.count("451 4.3.0") >= 18, 60), run.logs()
    run.relay.rules(recipients={})
    run.relay.reload()
    assert run.final(ids, timeout=180) == {"delivered": 18}, run.logs()
    run.arrived_once(ids)
    assert 1 < run.most_attempts(ids) < 20
    assert run.failures(ids) == {}


def test_a_rule_changed_by_reload_reaches_sessions_opened_before_it(run: Run) -> None:
    """Sessions opened before `postfix reload` keep the old rules while they last: the pool
    closes them after SMTP_CONNECTION_MAX_AGE, so a new rule applies within that."""
    run.start(SMTP_CONNECTION_MAX_AGE="3", SMTP_CONNECTION_IDLE="60")
    first = run.submit(12)
    assert run.final(first) == {"delivered": 12}, run.logs()  # sessions open, in the pool
    refused = "alex.rivers.mp@mp.example.org"
    run.relay.rules(recipients={refused: "550 5.1.1 <x>: Recipient address rejected: gone"})
    run.relay.reload()
    second: list[str] = []

    def refusing() -> bool:
        second.extend(run.submit(1, postcodes=["DM1 1AA"] * 6))
        return bool(run.failures(second))

    assert wait_for(refusing, 30, 0.5), run.logs()
    assert len(second) <= 20  # a few seconds of letters at most went through old sessions
    run.final(second)


def test_a_per_client_connection_limit_costs_no_letter_an_attempt(run: Run) -> None:
    """A relay that allows each client 2 connections answers the others "421 too many
    connections": sessions wait and try again, no letter is failed or charged for it."""
    run.relay.configure(smtpd_client_connection_count_limit="2")
    # All 40 queued before the workers start, and each letter its own delivery message (no
    # handoff linger): the 8 threads send at once, so the pools want more than 2 sessions.
    ids = run.submit(40)
    run.start(DEARMP_HANDOFF_LINGER_MS="0")
    assert run.final(ids, timeout=180) == {"delivered": 40}, run.logs()
    run.arrived_once(ids)
    assert run.relay.count("Connection concurrency limit exceeded") >= 1
    assert run.most_attempts(ids) == 1


def test_sessions_the_relay_timed_out_are_replaced_without_an_error(run: Run) -> None:
    run.relay.configure(smtpd_timeout="2s")
    run.start(SMTP_CONNECTION_IDLE="60")
    first = run.submit(8)
    assert run.final(first) == {"delivered": 8}, run.logs()
    assert wait_for(lambda: run.relay.count("timeout after") >= 1, 30), run.logs()
    second = run.submit(8)
    assert run.final(second) == {"delivered": 8}, run.logs()
    run.arrived_once(first + second)
    assert run.most_attempts(first + second) == 1
    assert '"level": "error"' not in run.stack.log_text()


def test_a_per_client_connection_limit_is_met_with_a_few_refused_connections(run: Run) -> None:
    """Two worker processes, a relay that allows 2 connections: the process left with none
    open holds its new connections (1 s, doubling) and one thread tries, instead of every
    letter trying and being deferred (1,042 refused connections for 1,200 letters before)."""
    run.relay.configure(smtpd_client_connection_count_limit="2")
    ids = run.submit(120)
    run.start(DEARMP_HANDOFF_LINGER_MS="0")
    assert run.final(ids, timeout=240) == {"delivered": 120}, run.logs()
    run.arrived_once(ids)
    assert run.most_attempts(ids) == 1
    refused = run.relay.count("Connection concurrency limit exceeded")
    print(f"120 letters, 2 processes x 4 threads, 2 connections allowed: {refused} refused")
    assert 1 <= refused <= 20, run.logs()


def test_a_451_to_some_letters_keeps_the_sessions_open(run: Run) -> None:
    """One MP of six answered 451 at RCPT, again and again: each refusal resets its session
    (RSET) and the session carries on, so the relay sees a session per thread at most, not a
    new connection (with its TLS and AUTH) per refusal."""
    run.relay.rules(recipients={"alex.rivers.mp@mp.example.org": "451 4.3.0 <x>: Try again"})
    run.relay.reload()
    run.start(SMTP_CONNECTION_IDLE="60", DEARMP_OUTBOX_BACKOFF_SECONDS="1")
    ids = run.submit(36)
    delivered = [sid for i, sid in enumerate(ids) if i % 6 != 0]
    assert wait_for(lambda: run.relay.count("451 4.3.0") >= 18, 90), run.logs()
    assert wait_for(lambda: run.final(delivered).get("delivered") == 30, 60), run.logs()
    run.arrived_once(delivered)
    sessions = run.relay.count(" connect from ")
    refusals = run.relay.count("451 4.3.0")
    print(f"{refusals} refusals at RCPT over {sessions} sessions")
    # 2 processes x SMTP_MAX_CONNECTIONS, and a few more if one is recycled meanwhile
    assert sessions <= 10 and sessions < refusals, run.logs()
    assert run.failures(ids) == {}


def test_a_relay_certificate_our_ca_does_not_verify_pauses_delivery_and_health_says_so(
    run: Run, tmp_path: Path
) -> None:
    """SMTP_CA_FILE names another CA: every handshake would fail the same way. Delivery
    pauses after one failed handshake per process and pause, `dearmp health` names TLS
    verification, and no letter is charged; with the right CA, every letter goes."""
    other = trustme.CA()
    other.cert_pem.write_to_path(str(tmp_path / "other-ca.pem"))
    run.start(SMTP_CA_FILE=str(tmp_path / "other-ca.pem"))
    ids = run.submit(24)
    assert wait_for(lambda: mail_pause(run.redis, "dearmp") is not None, 60), run.logs()
    health = subprocess.run(
        [sys.executable, "-m", "workers.cli", "health"],
        cwd=REPO,
        env=run.stack.env,
        capture_output=True,
        text=True,
    )
    assert health.returncode != 0
    assert "TLS verification of the mail server failed" in health.stderr, health.stderr
    assert wait_for(lambda: run.relay.count("SSL_accept error") >= 2, 30), run.logs()
    # A letter claimed as the pause began counts its claim until its failed handshake gives the
    # claim back uncounted: none is left charged.
    assert wait_for(lambda: run.most_attempts(ids) == 0, 30), run.logs()
    handshakes = run.relay.count("SSL_accept error")
    # Not one a letter (24): at most each thread's handshake already under way when the first
    # failed (2 processes x 4 threads), then a probe a process after each pause (3, 6, 12 s...).
    assert handshakes <= 12, run.logs()
    run.stack.stop()
    run.stack.processes.clear()
    run.start(SMTP_CA_FILE=str(run.relay.ca_file))
    assert run.final(ids) == {"delivered": 24}, run.logs()
    run.arrived_once(ids)
    assert run.most_attempts(ids) == 1


def test_a_helo_the_relay_refuses_pauses_delivery_until_it_is_fixed(run: Run) -> None:
    """Postfix answers a HELO it refuses at RCPT ("504 5.5.2 ... Helo command rejected"), a
    code that says nothing of policy: our set-up, the same for every letter. Delivery pauses,
    no letter fails or is charged, and once the relay accepts the name every letter goes."""
    helo = run.relay.etc / "helo"
    helo.write_text("worker.campaign.example.org 504 5.5.2 need fully-qualified hostname\n")
    run.relay.configure(smtpd_helo_restrictions=f"check_helo_access texthash:{helo}")
    run.start()
    ids = run.submit(12)
    assert wait_for(lambda: mail_pause(run.redis, "dearmp") is not None, 60), run.logs()
    paused = mail_pause(run.redis, "dearmp")
    assert paused is not None and "Helo command rejected" in paused["reason"]
    helo.write_text("")
    run.relay.reload()
    assert run.final(ids) == {"delivered": 12}, run.logs()
    run.arrived_once(ids)
    assert run.most_attempts(ids) == 1
    assert run.relay.count("Helo command rejected") < 12
