"""`dearmp health` tells the truth: down when nothing can go out (no worker, no mail server, no
Redis), degraded when an operator should look (letters to files, no reconciler pass), healthy
otherwise; and the letters waiting to retry, listed and tried again at once."""

from __future__ import annotations

import contextlib
import json
import re
import time
from datetime import timedelta
from typing import Any

import dramatiq
import pytest
import redis
from click.testing import CliRunner
from sqlalchemy import update

from config.settings import Settings
from tests.factories import send_letter, submission
from tests.services import SmtpSink, free_port, wait_for
from tests.test_stages import through_render
from workers.cli import main
from workers.database.engine import session_scope
from workers.database.models import OutboxItem, utcnow
from workers.letters.mail import PermanentDeliveryError, TransientDeliveryError
from workers.pipeline import checks
from workers.pipeline.app import App
from workers.pipeline.embedded_redis import EmbeddedRedis
from workers.pipeline.heartbeat import Heartbeat, last_pass, live_workers, record_pass

pytestmark = [pytest.mark.redis]


@pytest.fixture
def on_redis(app: App, redis_server: EmbeddedRedis) -> redis.Redis:
    app.settings.redis_url = redis_server.url
    return redis.Redis.from_url(redis_server.url)


def checks_of(result: Any) -> dict[str, tuple[str, str]]:
    report = json.loads(result.stdout)
    return {c["name"]: (c["status"], c["detail"]) for c in report["checks"]}


def beating(client: redis.Redis) -> Heartbeat:
    """A worker process's heartbeat, as `dearmp worker` starts it."""
    heart = Heartbeat(client, "dearmp")
    heart.after_worker_boot(dramatiq.get_broker(), None)  # type: ignore[arg-type]
    assert wait_for(lambda: live_workers(client, "dearmp"), 10)
    return heart


def health_with_a_worker(on_redis: redis.Redis) -> Any:
    """``dearmp health --json`` while a worker process beats."""
    heart = beating(on_redis)
    try:
        return CliRunner().invoke(main, ["health", "--json"])
    finally:
        heart.before_worker_shutdown(dramatiq.get_broker(), None)  # type: ignore[arg-type]


def on_smtp(app: App, sink: SmtpSink) -> Settings:
    """The App's settings, letters going to ``sink`` over SMTP."""
    settings = app.settings
    settings.mail_backend, settings.smtp_host, settings.smtp_port = "smtp", "127.0.0.1", sink.port
    return settings


def test_no_worker_and_letters_to_files_is_down_and_says_why(app: App, on_redis: Any) -> None:
    result = CliRunner().invoke(main, ["health", "--json"])
    assert result.exit_code == 2, result.output
    checks = checks_of(result)
    assert checks["workers"][0] == "down" and "no worker process" in checks["workers"][1]
    assert checks["mail server"][0] == "degraded" and "files" in checks["mail server"][1]
    assert checks["reconciler"][0] == "degraded" and "no pass recorded" in checks["reconciler"][1]
    assert checks["database"] == ("ok", "reachable") and checks["redis"] == ("ok", "reachable")
    text = CliRunner().invoke(main, ["health"])
    assert text.exit_code == 2 and len(text.output.strip().splitlines()) == 1
    assert text.output.startswith("down: no worker process is alive")


def test_a_live_worker_a_reachable_mail_server_and_a_recent_pass_are_healthy(
    app: App, on_redis: redis.Redis, smtp_sink: SmtpSink
) -> None:
    settings = on_smtp(app, smtp_sink)
    heart = beating(on_redis)
    record_pass(dramatiq.brokers.redis.RedisBroker(url=settings.redis_url, namespace="dearmp"))  # type: ignore[no-untyped-call]
    try:
        result = CliRunner().invoke(main, ["health"])
        assert result.exit_code == 0, result.output
        assert result.stdout.startswith("healthy: 0 dead letters")
        assert "1 worker process alive" in result.stdout and "answers" in result.stdout
        assert last_pass(on_redis, "dearmp") is not None
    finally:
        heart.before_worker_shutdown(dramatiq.get_broker(), None)  # type: ignore[arg-type]
    assert live_workers(on_redis, "dearmp") == []  # a worker that stops says so at once


def test_a_mail_server_that_does_not_answer_is_down(app: App, on_redis: redis.Redis) -> None:
    settings = app.settings
    settings.mail_backend, settings.smtp_host, settings.smtp_port = "smtp", "127.0.0.1", free_port()
    result = health_with_a_worker(on_redis)
    assert result.exit_code == 2
    status, detail = checks_of(result)["mail server"]
    assert status == "down" and f"cannot reach 127.0.0.1:{settings.smtp_port}" in detail


def test_a_mail_server_refusing_us_at_its_greeting_is_named_with_its_answer(
    app: App, on_redis: redis.Redis
) -> None:
    """It answers, so it is reachable: what it said is the reason, not "cannot reach"; a 421
    passes by itself (degraded)."""
    import socket
    import threading

    listener = socket.create_server(("127.0.0.1", 0))

    def greet() -> None:
        with contextlib.suppress(OSError):
            conn, _ = listener.accept()
            with conn:
                conn.sendall(b"421 4.7.0 relay.example.org Too many connections\r\n")

    threading.Thread(target=greet, daemon=True).start()
    settings = app.settings
    settings.mail_backend, settings.smtp_host = "smtp", "127.0.0.1"
    settings.smtp_port = listener.getsockname()[1]
    try:
        result = health_with_a_worker(on_redis)
    finally:
        listener.close()
    status, detail = checks_of(result)["mail server"]
    assert status == "degraded" and "refused us at its greeting: 421 4.7.0" in detail
    assert "Too many connections" in detail and "cannot reach" not in detail


@pytest.mark.smtp
def test_a_mail_server_whose_greeting_drips_is_down_within_the_timeout(
    app: App, on_redis: redis.Redis
) -> None:
    """A greeting a byte at a time, each within the socket's timeout: the probe gives up once
    the whole takes longer than SMTP_TIMEOUT, as a letter's session does, never holds health."""
    from tests.test_smtp import RawRelay, dripping

    relay = RawRelay({"greeting": dripping(b"220")})
    settings = app.settings
    settings.mail_backend, settings.smtp_host, settings.smtp_port = "smtp", "127.0.0.1", relay.port
    settings.smtp_timeout = 1
    try:
        began = time.monotonic()
        result = health_with_a_worker(on_redis)
        took = time.monotonic() - began
    finally:
        relay.stop()
    status, detail = checks_of(result)["mail server"]
    assert status == "down" and "reply took longer than 1 s" in detail
    assert took < 2.5


def test_a_mail_server_without_the_starttls_letters_need_is_down(
    app: App, on_redis: redis.Redis, smtp_sink: SmtpSink
) -> None:
    """Health connects as letters do: a relay that offers no STARTTLS, when letters require it,
    is down (EHLO alone would have answered)."""
    settings = on_smtp(app, smtp_sink)
    settings.smtp_security = "starttls"
    result = health_with_a_worker(on_redis)
    assert result.exit_code == 2
    status, detail = checks_of(result)["mail server"]
    assert status == "down" and "offers no STARTTLS (SMTP_SECURITY=starttls)" in detail


def test_a_mail_server_that_offers_no_login_when_one_is_set_is_down(
    app: App, on_redis: redis.Redis, smtp_sink: SmtpSink
) -> None:
    """SMTP_USERNAME set and no AUTH offered: no letter can go, whatever EHLO answers."""
    from pydantic import SecretStr

    settings = on_smtp(app, smtp_sink)
    settings.smtp_username, settings.smtp_password = "letters", SecretStr("secret")
    result = health_with_a_worker(on_redis)
    assert result.exit_code == 2
    status, detail = checks_of(result)["mail server"]
    assert status == "down" and "offers no login (AUTH)" in detail


def test_a_lease_shorter_than_a_send_may_take_is_degraded(
    app: App, on_redis: redis.Redis, smtp_sink: SmtpSink
) -> None:
    settings = on_smtp(app, smtp_sink)
    assert "lease" not in checks_of(CliRunner().invoke(main, ["health", "--json"]))
    settings.delivery_lease_seconds = 5
    status, detail = checks_of(CliRunner().invoke(main, ["health", "--json"]))["lease"]
    assert status == "degraded" and "DEARMP_DELIVERY_LEASE_SECONDS is 5" in detail


def test_a_stale_reconciler_pass_is_degraded(app: App, on_redis: redis.Redis) -> None:
    on_redis.set("dearmp:reconciler", str(utcnow().timestamp() - 3600))
    status, detail = checks_of(CliRunner().invoke(main, ["health", "--json"]))["reconciler"]
    ago = re.search(r"last pass (\d+)s ago", detail)  # health's own checks take a moment
    assert status == "degraded" and ago is not None and 3600 <= int(ago.group(1)) < 3660


def test_the_reconciler_pass_is_timed_by_redis_not_by_a_hosts_clock(
    app: App, on_redis: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reconciler on a host whose clock ran two hours ahead made health read "last pass
    -7200s ago", ok long after it had stopped."""
    from types import SimpleNamespace

    from workers.pipeline import heartbeat

    ahead = time.time() + 7200
    monkeypatch.setattr(heartbeat.time, "time", lambda: ahead)
    heartbeat.record_pass(SimpleNamespace(client=on_redis, namespace="dearmp"))  # type: ignore[arg-type]
    monkeypatch.undo()
    status, detail = checks_of(CliRunner().invoke(main, ["health", "--json"]))["reconciler"]
    ago = re.search(r"last pass (-?\d+)s ago", detail)
    assert status == "ok" and ago is not None and 0 <= int(ago.group(1)) < 60


def test_letters_waiting_to_retry_are_listed_with_why_and_flushed_at_once(
    app: App, on_redis: redis.Redis
) -> None:
    sid = through_render(app, submission())
    later = utcnow() + timedelta(hours=1)
    with session_scope(app.sessions) as session:
        session.execute(
            update(OutboxItem)
            .where(OutboxItem.id == sid)
            .values(
                failures=2,
                next_attempt_at=later,
                error="451 4.7.1 <amira@example.com>: later, Amira Haddad",
            )
        )
    waiting = CliRunner().invoke(main, ["deliveries", "waiting", "--json"])
    [row] = json.loads(waiting.stdout)
    assert row["id"] == sid and row["failures"] == 2 and row["next_attempt_at"]
    assert row["error"] == "451 4.7.1 <[email]>: later, [hidden]"  # masked, the sender hidden
    status, detail = checks_of(CliRunner().invoke(main, ["health", "--json"]))["retries"]
    assert status == "ok" and "1 letter waiting to retry" in detail and "451 4.7.1" in detail

    assert "would try 1" in CliRunner().invoke(main, ["deliveries", "flush", "--dry-run"]).output
    flushed = CliRunner().invoke(main, ["deliveries", "flush"])
    assert flushed.exit_code == 0 and "trying 1 letter now" in flushed.output
    with session_scope(app.sessions) as session:
        item = session.get(OutboxItem, sid)
        assert item is not None and item.next_attempt_at is None
    again = CliRunner().invoke(main, ["deliveries", "flush"])
    assert again.exit_code == 1 and "no letter waits" in again.stderr  # nothing waits: says so


def test_an_mps_digest_waiting_to_retry_is_listed_and_flushed_as_health_says(
    app: App, on_redis: redis.Redis
) -> None:
    """Health counts a digest among the letters waiting and points to `deliveries waiting`:
    that command listed letters only ("0 letters waiting"), and flush said none waits."""
    sid = through_render(app, submission())
    later = utcnow() + timedelta(hours=1)
    with session_scope(app.sessions) as session:
        session.execute(update(OutboxItem).where(OutboxItem.id == sid).values(status="sent"))
        digest = OutboxItem(
            submission_id=sid, key="digest", kind="digest", status="pending", failures=1,
            next_attempt_at=later, error="451 4.7.1 try later",
        )  # fmt: skip
        session.add(digest)
        session.flush()
        digest_id = digest.id
    _, detail = checks_of(CliRunner().invoke(main, ["health", "--json"]))["retries"]
    assert "1 letter waiting to retry" in detail and "`dearmp deliveries waiting`" in detail
    [row] = json.loads(CliRunner().invoke(main, ["deliveries", "waiting", "--json"]).stdout)
    assert row["id"] == digest_id and row["kind"] == "digest"
    flushed = CliRunner().invoke(main, ["deliveries", "flush"])
    assert flushed.exit_code == 0 and "trying 1 letter now" in flushed.output


def test_a_letter_with_its_server_is_listed_as_such_not_as_due_now(
    app: App, on_redis: redis.Redis
) -> None:
    sid = through_render(app, submission())
    claimed = utcnow() - timedelta(seconds=5)
    with session_scope(app.sessions) as session:  # a worker took it, its answer not yet in
        session.execute(
            update(OutboxItem)
            .where(OutboxItem.id == sid)
            .values(status="sending", claimed_at=claimed)
        )
    waiting = CliRunner().invoke(main, ["deliveries", "waiting"])
    assert (
        f"{sid}  sending  failures 0  with its server since {claimed.isoformat()}" in waiting.output
    )
    assert "next now" not in waiting.output
    lapsed = utcnow() - timedelta(seconds=app.settings.delivery_lease_seconds + 5)
    with session_scope(app.sessions) as session:  # its worker died: the claim lapsed
        session.execute(update(OutboxItem).where(OutboxItem.id == sid).values(claimed_at=lapsed))
    waiting = CliRunner().invoke(main, ["deliveries", "waiting"])
    assert f"its worker stopped (taken at {lapsed.isoformat()})" in waiting.output


class Refusing:
    """A mail server that refuses every letter with ``error``, or takes it (``error`` None)."""

    name = "refusing"

    def __init__(self, error: Exception | None) -> None:
        self.error = error

    def send(self, mail: Any) -> str:
        if self.error is not None:
            raise self.error
        return "250 taken"

    def waiting(self) -> float:
        return 0.0

    def close(self) -> None:
        pass


@pytest.mark.parametrize(
    "error",
    [
        TransientDeliveryError("530 5.7.0 Must issue a STARTTLS command first"),
        PermanentDeliveryError("554 5.7.1 Service unavailable; client host blocked"),
    ],
    ids=["tried-again", "given-up"],
)
def test_letters_that_all_fail_their_tries_with_none_sent_are_down(
    app: App, on_redis: redis.Redis, error: Exception
) -> None:
    """Whatever the cause (a relay that refuses our login without saying so, or refuses every
    letter for good), letters that all fail while none goes out is nothing going out: down,
    with the commonest reason."""
    ids = [through_render(app, submission()) for _ in range(checks.STALLED_LETTERS + 1)]

    def send(sid: str, mailer: Refusing) -> None:
        with contextlib.suppress(Exception):
            send_letter(app.sessions, sid, mailer)

    for sid in ids[: checks.STALLED_LETTERS - 1]:
        send(sid, Refusing(error))
    status, _ = checks_of(CliRunner().invoke(main, ["health", "--json"])).get("retries", ("ok", ""))
    assert status == "ok"  # two letters: their recipients' trouble, maybe
    send(ids[checks.STALLED_LETTERS - 1], Refusing(error))
    result = CliRunner().invoke(main, ["health", "--json"])
    status, detail = checks_of(result)["retries"]
    assert result.exit_code == 2 and status == "down"
    assert "no letter sent in 15 minutes while 3 failed their last try" in detail
    assert str(error)[:20] in detail
    send(ids[-1], Refusing(None))  # one goes: the mail server takes letters
    status, _ = checks_of(CliRunner().invoke(main, ["health", "--json"])).get("retries", ("ok", ""))
    assert status == "ok"


@pytest.mark.smtp
def test_a_refused_letters_dead_letter_listed_by_reason_shown_by_prefix_and_cleared_by_reopen(
    app: App,
    stub_broker: Any,
    stub_worker: dramatiq.Worker,
    smtp_sink: SmtpSink,
    tmp_path: Any,
    on_redis: redis.Redis,
) -> None:
    """A dead letter an operator can act on: grouped by reason with the server's answer, its
    full id (or a unique prefix) to `show`; a requeue of a refusal for good says why it would
    send nothing and what will; `deliveries reopen` sends it again and clears it."""
    from tests.conftest import drain
    from tests.test_smtp import mailer as smtp_mailer
    from workers.pipeline.runtime import state_counts, submit

    app.mailer = smtp_mailer(tmp_path, smtp_sink)
    smtp_sink.answer = "550 5.1.1 <mp@parliament.uk>: Recipient address rejected (Amira Haddad)"
    sid = submit(app, stub_broker, submission())[0]
    drain(stub_broker, stub_worker)
    assert state_counts(app, [sid]) == {"failed": 1}

    listed = CliRunner().invoke(main, ["dlq", "list"])
    assert "PermanentDeliveryError: 1" in listed.output, listed.output
    assert "550 5.1.1 <[email]>: Recipient address rejected ([hidden])" in listed.output
    assert "Amira" not in listed.output  # the sender, quoted by the server: hidden
    [row] = json.loads(CliRunner().invoke(main, ["dlq", "list", "--json"]).stdout)
    assert row["message_id"] in listed.output  # whole, to paste
    shown = CliRunner().invoke(main, ["dlq", "show", row["message_id"][:8]])
    assert json.loads(shown.stdout)["message_id"] == row["message_id"]
    assert "Amira" not in shown.stdout and "rejected ([hidden])" in shown.stdout  # the sender

    requeued = CliRunner().invoke(main, ["dlq", "requeue", row["message_id"]])
    assert "not requeued" in requeued.output and "dearmp deliveries reopen" in requeued.output
    assert "requeued 0, not found 0" in requeued.output and requeued.exit_code == 1

    smtp_sink.answer = None  # the cause fixed
    reopened = CliRunner().invoke(main, ["deliveries", "reopen", "--yes"])
    assert reopened.exit_code == 0 and "cleared 1 dead letter " in reopened.output
    assert json.loads(CliRunner().invoke(main, ["dlq", "list", "--json"]).stdout) == []
    drain(stub_broker, stub_worker)
    assert state_counts(app, [sid]) == {"delivered": 1} and smtp_sink.received.count() == 1


def test_a_paused_campaign_holds_its_letters_until_resumed_and_health_names_it(
    app: App, stub_broker: Any, stub_worker: dramatiq.Worker, on_redis: redis.Redis
) -> None:
    from workers.pipeline.runtime import state_counts, submit

    slug = "political-prisoners"
    assert CliRunner().invoke(main, ["campaigns", "pause", slug]).exit_code == 0
    again = CliRunner().invoke(main, ["campaigns", "pause", slug])
    assert again.exit_code == 1 and "paused already" in again.output
    unknown = CliRunner().invoke(main, ["campaigns", "pause", "nope"])
    assert unknown.exit_code == 1 and "no campaign nope" in unknown.output

    sid = submit(app, stub_broker, submission())[0]
    assert wait_for(lambda: state_counts(app, [sid]) == {"rendered": 1}, 30)
    assert wait_for(lambda: _waits(app, sid), 30)  # held in the outbox, not sent, not lost
    status, detail = checks_of(CliRunner().invoke(main, ["health", "--json"]))["campaigns"]
    assert status == "degraded" and slug in detail

    resumed = CliRunner().invoke(main, ["campaigns", "resume", slug])
    assert resumed.exit_code == 0 and "1 waiting letter queued to go" in resumed.output
    assert wait_for(lambda: state_counts(app, [sid]) == {"delivered": 1}, 30)
    assert "campaigns" not in checks_of(CliRunner().invoke(main, ["health", "--json"]))
    not_paused = CliRunner().invoke(main, ["campaigns", "resume", slug])
    assert not_paused.exit_code == 1 and "is not paused" in not_paused.output


def test_a_paused_mp_address_holds_its_letters_until_marked_ok(
    app: App, stub_broker: Any, stub_worker: dramatiq.Worker, on_redis: redis.Redis
) -> None:
    """An office asks for a break: every letter to its address waits (the campaign's resume
    does not send it), health names the address, and `--ok` sends what waited."""
    from workers.database.models import Letter
    from workers.mp import health
    from workers.pipeline.runtime import state_counts, submit

    slug = "political-prisoners"
    assert CliRunner().invoke(main, ["campaigns", "pause", slug]).exit_code == 0
    sid = submit(app, stub_broker, submission())[0]
    assert wait_for(lambda: _waits(app, sid), 30)
    with session_scope(app.sessions) as session:
        address = session.get(Letter, sid).to_email  # type: ignore[union-attr]
    cli = CliRunner()
    assert (
        cli.invoke(main, ["directory", "address", address.upper(), "--pause", "recess"]).exit_code
        == 0
    )
    again = cli.invoke(main, ["directory", "address", address, "--pause", "recess"])
    assert again.exit_code == 1 and "paused already" in again.output
    neither = cli.invoke(main, ["directory", "address", address])
    assert neither.exit_code == 2 and "--pause REASON or --ok" in neither.output
    assert "1 waiting letter queued to go" in cli.invoke(main, ["campaigns", "resume", slug]).output
    assert wait_for(lambda: _waits(app, sid), 30)  # due, then deferred again: still held
    assert state_counts(app, [sid]) == {"rendered": 1}
    with session_scope(app.sessions) as session:  # a bounce of an earlier letter: still paused
        assert not health.note_bounce(session, address, None, 0, timedelta(hours=1))
    status, detail = checks_of(cli.invoke(main, ["health", "--json"]))["paused MP addresses"]
    assert status == "degraded" and f"{address.lower()} (1 letter waiting)" in detail

    resumed = cli.invoke(main, ["directory", "address", address, "--ok"])
    assert resumed.exit_code == 0 and "1 waiting letter queued to go" in resumed.output
    assert wait_for(lambda: state_counts(app, [sid]) == {"delivered": 1}, 30)
    assert "paused MP addresses" not in checks_of(cli.invoke(main, ["health", "--json"]))
    not_paused = cli.invoke(main, ["directory", "address", address, "--ok"])
    assert not_paused.exit_code == 1 and "neither paused nor marked failing" in not_paused.output


def test_pausing_an_address_marked_failing_is_one_line_and_changes_nothing(app: App) -> None:
    """Its letters are held already and its mark must stay: the operator is told what to do."""
    from workers.database.models import AddressHealth
    from workers.mp import health

    address = "jo.bloggs.mp@parliament.example"
    with session_scope(app.sessions) as session:
        session.add(AddressHealth(email=health.key(address), status=health.FAILING, reason="x"))
    said = CliRunner().invoke(main, ["directory", "address", address, "--pause", "recess"])
    assert said.exit_code == 1 and len(said.output.splitlines()) == 1, said.output
    assert "is marked failing: `--ok` once it works" in said.output
    with session_scope(app.sessions) as session:
        row = session.get(AddressHealth, health.key(address))
        assert row is not None and row.status == health.FAILING


def _waits(app: App, sid: str) -> bool:
    with session_scope(app.sessions) as session:
        item = session.get(OutboxItem, sid)
        return item is not None and item.status == "pending" and item.next_attempt_at is not None


def test_commands_given_what_does_not_exist_say_so_and_change_nothing(
    app: App, tmp_path: Any
) -> None:
    """A mistake is not accepted with exit 0: a campaign folder with no campaign files, a
    report of an unknown campaign, the erasure or withdrawal of an address nothing is held
    about (no consent event written)."""
    from sqlalchemy import func, select

    from workers.database.models import ConsentEvent

    app.settings.campaigns_dir = tmp_path / "nowhere"
    synced = CliRunner().invoke(main, ["campaigns", "sync"])
    assert synced.exit_code == 1 and "no campaign files" in synced.output
    assert "DEARMP_CAMPAIGNS_DIR" in synced.output
    report = CliRunner().invoke(main, ["replies", "report", "--campaign", "nope"])
    assert report.exit_code == 1 and "no campaign nope" in report.output

    def events() -> int:
        with session_scope(app.sessions) as session:
            return session.scalar(select(func.count()).select_from(ConsentEvent)) or 0

    before = events()
    erased = CliRunner().invoke(main, ["supporter", "erase", "nobody@example.org", "--yes"])
    assert erased.exit_code == 1 and "nothing is held about that address" in erased.output
    withdrawn = CliRunner().invoke(main, ["consent", "withdraw", "nobody@example.org"])
    assert withdrawn.exit_code == 1 and "--anyway" in withdrawn.output
    assert events() == before
    anyway = CliRunner().invoke(main, ["consent", "withdraw", "nobody@example.org", "--anyway"])
    assert anyway.exit_code == 0 and events() > before  # a suppression, asked for


def test_a_given_up_digest_is_counted_as_mail_to_an_mp_not_to_a_supporter(
    app: App, on_redis: redis.Redis
) -> None:
    sid = through_render(app, submission())
    with session_scope(app.sessions) as session:
        for key, kind in (("digest", "digest"), ("confirm", "confirm")):
            session.add(OutboxItem(submission_id=sid, key=key, kind=kind, status="failed"))
    _, detail = checks_of(CliRunner().invoke(main, ["health", "--json"]))["given up"]
    assert detail.startswith("0 letters failed, 1 MP digest failed, 1 email to supporters given up")


def test_settings_nothing_can_start_with_or_a_database_without_tables_are_down(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch, redis_server: EmbeddedRedis
) -> None:
    """Not "degraded, letters still go" (exit 1): nothing can go (exit 2), and why."""
    from config.settings import get_settings

    monkeypatch.setenv("DEARMP_DATA_DIR", str(tmp_path / "fresh"))
    monkeypatch.setenv("SMTP_PORT", "abc")
    get_settings.cache_clear()
    try:
        wrong = CliRunner().invoke(main, ["health"])
        monkeypatch.delenv("SMTP_PORT")
        monkeypatch.setenv("REDIS_URL", redis_server.url)
        get_settings.cache_clear()
        empty = CliRunner().invoke(main, ["health"])
    finally:
        get_settings.cache_clear()
    assert wrong.exit_code == 2 and wrong.stderr.startswith("down: SMTP_PORT: "), wrong.output
    assert empty.exit_code == 2, empty.output
    assert "has no DearMP tables yet: `dearmp migrate` makes them" in empty.stderr


@pytest.mark.parametrize(
    ("revision", "said"),
    [
        ("0021", "is at migration 0021, this DearMP needs 0022: `dearmp migrate` brings it up"),
        ("zzzz9999future", "is at migration zzzz9999future, which this DearMP does not know"),
    ],
)
def test_a_database_at_another_migration_than_the_codes_is_down_and_says_which(
    app: App, on_redis: redis.Redis, revision: str, said: str
) -> None:
    """Its statements fail one by one (a column missing, or one it does not know of): nothing
    can go out."""
    from sqlalchemy import text

    with app.engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = :v"), {"v": revision})
    result = CliRunner().invoke(main, ["health", "--json"])
    assert result.exit_code == 2, result.output
    status, detail = checks_of(result)["database"]
    assert status == "down" and said in detail, detail


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_sqlite_that_cannot_be_written_is_down_at_once_saying_why(
    app: App, on_redis: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Reads pass while another process holds the write lock, or the disk is full: nothing can
    be accepted or sent, and health says so within seconds (not after SQLite's busy timeout)."""
    import shutil
    import sqlite3

    path = app.engine.url.database
    assert path is not None
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")
    try:
        started = time.monotonic()
        locked = CliRunner().invoke(main, ["health", "--json"])
        took = time.monotonic() - started
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert locked.exit_code == 2, locked.output
    status, detail = checks_of(locked)["database"]
    assert status == "down" and "another process holds the SQLite database's write lock" in detail
    assert "nothing can be accepted or sent" in detail
    assert took < 15, took  # the lock waited for 2 s, not the 60 s of a writer

    usage = shutil.disk_usage(path)
    full = type(usage)(usage.total, usage.total - 2**20, 2**20)
    monkeypatch.setattr(shutil, "disk_usage", lambda _: full)
    result = CliRunner().invoke(main, ["health", "--json"])
    assert result.exit_code == 2, result.output
    status, detail = checks_of(result)["database"]
    assert status == "down" and "the SQLite database's disk has 1 MiB free" in detail
    assert "nothing can be accepted or sent" in detail


def test_workers_whose_letters_go_elsewhere_than_healths_settings_say_are_degraded(
    app: App, on_redis: redis.Redis, smtp_sink: SmtpSink
) -> None:
    """Health checks the mail server its own settings name: when the workers' letters go
    elsewhere (to files, here), it says so rather than vouch for a server they do not use."""
    from workers.pipeline.heartbeat import mail_route

    files = mail_route(app.settings)
    on_smtp(app, smtp_sink)
    heart = Heartbeat(on_redis, "dearmp", files)
    heart.after_worker_boot(dramatiq.get_broker(), None)  # type: ignore[arg-type]
    assert wait_for(lambda: live_workers(on_redis, "dearmp"), 10)
    try:
        status, detail = checks_of(CliRunner().invoke(main, ["health", "--json"]))["workers"]
    finally:
        heart.before_worker_shutdown(dramatiq.get_broker(), None)  # type: ignore[arg-type]
    assert status == "degraded" and f"sending letters to {files}" in detail
    assert f"these settings say SMTP 127.0.0.1:{smtp_sink.port}" in detail


@pytest.mark.parametrize(
    ("reason", "lasting", "status"),
    [
        ("the mail server refused our login (535 5.7.8): check SMTP_USERNAME", True, "down"),
        ("the email API refuses our key or domain (HTTP 401): check EMAIL_API_KEY", True, "down"),
        ("the mail server refused our login (454 4.7.0): check SMTP_USERNAME", False, "degraded"),
    ],
)
def test_a_mail_pause_the_relay_keeps_answering_the_same_way_is_down(
    app: App, on_redis: redis.Redis, reason: str, lasting: bool, status: str
) -> None:
    """A refused login, sender, certificate or key pauses delivery until someone acts (the
    worker that met it says so): nothing goes out, so down; one that passes by itself (a 4xx)
    is degraded."""
    from workers.pipeline.dead_letters import MailPauseAlarm

    MailPauseAlarm(on_redis, app.settings.redis_namespace)(reason, 60.0, lasting)
    result = CliRunner().invoke(main, ["health", "--json"])
    found, detail = checks_of(result)["mail pause"]
    assert found == status and reason in detail
    if status == "down":
        assert result.exit_code == 2
        assert "nothing goes out until that is fixed, then `dearmp deliveries resume`" in detail


GAVE_UP = "gave up after 3 failed attempts: 452 4.2.2 Mailbox full; from Amira Haddad"


def test_letters_given_up_today_are_degraded_with_how_to_send_them_again(
    app: App, on_redis: redis.Redis
) -> None:
    """Letters given up after their tries (a server down for hours) are failed, not dead
    letters: health says so for a day, with the command that sends them again."""
    today, long_ago = (through_render(app, submission()) for _ in range(2))
    with session_scope(app.sessions) as session:
        for sid, at in ((today, utcnow()), (long_ago, utcnow() - timedelta(days=2))):
            session.execute(
                update(OutboxItem)
                .where(OutboxItem.id == sid)
                .values(status="failed", claimed_at=at, error=GAVE_UP)
            )
    status, detail = checks_of(CliRunner().invoke(main, ["health", "--json"]))["failed letters"]
    assert status == "degraded"
    # The server's words quote the sender: hidden, as in every operator's view.
    assert detail.startswith(
        "1 letter to MPs failed in the last 24 h (most often: gave up after 3 failed attempts: "
        "452 4.2.2 Mailbox full; from [hidden]); "
    )
    assert "dearmp deliveries reopen --reason TEXT" in detail


def test_webhooks_given_up_today_are_degraded_with_how_to_send_them_again(
    app: App, on_redis: redis.Redis
) -> None:
    """A CRM that missed events is told of in health (it said ok, whatever the count)."""
    sid = through_render(app, submission())
    with session_scope(app.sessions) as session:
        session.add(
            OutboxItem(
                submission_id=sid,
                key="submission.accepted:1",
                kind="webhook",
                status="failed",
                claimed_at=utcnow(),
                error="gave up after 8 failed attempts: endpoint 1 answered HTTP 503",
            )
        )
    found = checks_of(CliRunner().invoke(main, ["health", "--json"]))
    status, detail = found["webhooks given up"]
    assert status == "degraded" and detail.startswith("1 webhook to CRMs given up in the last 24 h")
    assert "`dearmp outbox retry --kind webhook`" in detail


def test_watch_shows_a_letters_failed_tries_among_the_newest_failures(
    app: App, on_redis: redis.Redis
) -> None:
    """A letter's failed tries are recorded on its outbox item, not as a failed message: the
    live view lists them with the server's answer, the supporter's details hidden in it as
    everywhere else."""
    sid = through_render(app, submission(supporter__name="Jane Doe"))
    answer = "451 4.3.0 sender Jane Doe: try again later"
    with session_scope(app.sessions) as session:
        session.execute(
            update(OutboxItem)
            .where(OutboxItem.id == sid)
            .values(failures=1, claimed_at=utcnow(), error=answer)
        )
    view = CliRunner().invoke(main, ["watch", "--iterations", "1"], env={"COLUMNS": "200"})
    assert view.exit_code == 0
    assert "outbox (letter)" in view.stdout and sid in view.stdout
    assert "451 4.3.0 sender [hidden]: try again later" in view.stdout
    assert "Jane" not in view.stdout


def test_bounces_to_one_address_count_together_however_it_was_cased(app: App) -> None:
    """Every other lookup of an address's health lower-cases it: a letter to
    ``Jane.Smith@...`` and one to ``jane.smith@...`` are two bounces of one address."""
    from sqlalchemy import select

    from workers.database.models import Letter, LetterEvent
    from workers.mp import health

    ids = [through_render(app, submission()) for _ in range(2)]
    since = utcnow() - timedelta(minutes=1)
    with session_scope(app.sessions) as session:
        address = session.scalar(select(Letter.to_email).where(Letter.submission_id == ids[0]))
        assert address is not None
        for sid, cased in zip(ids, (address.upper(), address.lower()), strict=True):
            session.execute(
                update(Letter).where(Letter.submission_id == sid).values(to_email=cased)
            )
            session.add(LetterEvent(submission_id=sid, kind="bounce", at=utcnow()))
    with session_scope(app.sessions) as session:
        assert health.recent_bounces(session, address.lower(), since) == 2
        assert health.note_bounce(session, address, None, 2, timedelta(hours=1))


def _a_worker_says(client: redis.Redis, **about: Any) -> None:
    """A worker process's heartbeat key, as one on another machine wrote it."""
    said = {"host": "other-machine", "pid": 7, "started": time.time(), "mail": ""} | about
    client.set("dearmp:worker:other-machine:7", json.dumps(said), ex=30)


@pytest.mark.parametrize(
    ("about", "said"),
    [
        ({"clock": 400.0}, "worker other-machine:7's clock is 400 s ahead of Redis's"),
        ({"clock": -90.0}, "worker other-machine:7's clock is 90 s behind Redis's"),
        (
            {"settings": {"DEARMP_DELIVERY_LEASE_SECONDS": "10"}},
            "DEARMP_DELIVERY_LEASE_SECONDS is 10 on worker other-machine:7 but 300 here",
        ),
        (
            {"settings": {"DEARMP_MP_LIMIT": "0"}},
            "DEARMP_MP_LIMIT is 0 on worker other-machine:7 but 2 here",
        ),
        (
            {"settings": {"DATABASE_URL": "database 00000000"}},
            "DATABASE_URL is database 00000000 on worker other-machine:7 but database ",
        ),
    ],
)
def test_a_worker_whose_clock_or_shared_settings_differ_makes_health_degraded(
    app: App, on_redis: redis.Redis, about: dict[str, Any], said: str
) -> None:
    """On another machine, a clock off by more than the lease took over letters being sent and
    sent them again; a shorter lease did the same, another MP limit let letters past it, and
    another database swallowed every message: health said healthy."""
    app.settings.mp_limit = 2
    _a_worker_says(on_redis, **about)
    status, detail = checks_of(CliRunner().invoke(main, ["health", "--json"]))["workers"]
    assert status == "degraded" and said in detail, detail


def test_a_heartbeat_and_the_reconcilers_pass_say_their_clock_and_shared_settings(
    app: App, on_redis: redis.Redis
) -> None:
    from types import SimpleNamespace

    from workers.pipeline.heartbeat import reconciler_about, shared

    mine = shared(app.settings)
    heart = Heartbeat(on_redis, "dearmp", settings=mine)
    heart.after_worker_boot(dramatiq.get_broker(), None)  # type: ignore[arg-type]
    try:
        assert wait_for(lambda: live_workers(on_redis, "dearmp"), 10)
        [worker] = live_workers(on_redis, "dearmp")
    finally:
        heart.before_worker_shutdown(dramatiq.get_broker(), None)  # type: ignore[arg-type]
    assert worker["settings"] == mine and abs(worker["clock"]) < 1
    assert "://" not in mine["DATABASE_URL"]  # a fingerprint, never the URL
    record_pass(
        SimpleNamespace(client=on_redis, namespace="dearmp"), {**mine, "DEARMP_SEND_RATE": "9"}
    )  # type: ignore[arg-type]
    about = reconciler_about(on_redis, "dearmp")
    assert about is not None and abs(about["clock"]) < 1
    _a_worker_says(on_redis, settings=mine)
    status, detail = checks_of(CliRunner().invoke(main, ["health", "--json"]))["workers"]
    assert status == "degraded"
    assert "DEARMP_SEND_RATE is 9 on the reconciler on " in detail


def test_a_worker_or_the_reconciler_does_not_start_on_a_machine_whose_clock_is_off(
    app: App, on_redis: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    from config.settings import get_settings
    from workers.cli import pipeline

    app.settings.broker = "redis"  # the reconciler's (the process's App)
    monkeypatch.setenv("DEARMP_BROKER", "redis")  # the worker's (read before any App)
    monkeypatch.setenv("REDIS_URL", app.settings.redis_url or "")
    monkeypatch.setattr(pipeline, "clock_offset", lambda client: 400.0)
    get_settings.cache_clear()
    try:
        for command in (["reconcile", "--once"], ["worker"]):
            result = CliRunner().invoke(main, command)
            assert result.exit_code == 1, result.output
            assert "this machine's clock is 400 s ahead of Redis's" in result.stderr
            assert "set its clock (NTP)" in result.stderr
    finally:
        get_settings.cache_clear()


def test_one_database_however_its_url_is_written_has_one_fingerprint(tmp_path: Any) -> None:
    from workers.pipeline.heartbeat import shared

    def print_of(url: str) -> str:
        return shared(Settings.model_validate({"DATABASE_URL": url}))["DATABASE_URL"]

    assert print_of("postgresql+psycopg://u:secret@DB.example/dearmp") == print_of(
        "postgresql://other@db.example:5432/dearmp"
    )
    assert print_of("postgresql://db.example/dearmp") != print_of("postgresql://db.example/other")
    here = tmp_path / "dearmp.sqlite3"
    assert print_of(f"sqlite:///{here}") == print_of(f"sqlite:///{tmp_path}/./dearmp.sqlite3")
    assert "secret" not in print_of("postgresql://u:secret@db/dearmp")
