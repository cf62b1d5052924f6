"""Operators' commands on a real Redis, with real dead letters from failing actors in a worker."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import redis
import requests
from click.testing import CliRunner
from dramatiq.brokers.redis import RedisBroker
from sqlalchemy import select

from tests.conftest import make_settings
from tests.factories import submission
from tests.services import SmtpSink, free_port, wait_for
from tests.test_e2e_redis import Stack, wait_all_final
from tests.test_sources import parliament, recorded_postcodes_io  # noqa: F401
from tests.test_stages import through_render
from workers.cli import main
from workers.database.engine import session_scope
from workers.database.models import AddressHealth, OutboxItem, PurgedDeadLetter, utcnow
from workers.pipeline.app import App, set_app
from workers.pipeline.dispatch import stage_message
from workers.pipeline.embedded_redis import EmbeddedRedis
from workers.pipeline.heartbeat import last_pass, live_workers
from workers.pipeline.intake import accept
from workers.pipeline.runtime import prepare, submit
from workers.stages.stage import Stage
from workers.stages.validation import validate

pytestmark = [pytest.mark.redis, pytest.mark.smtp]


@pytest.fixture
def postcodes_port() -> Iterator[int]:
    """Where the workers look up postcodes the directory lacks: nothing answers there until a
    test starts the recorded postcodes.io on it (an outage, then its end). The port is held,
    bound and not listening (connections are refused), so that no other socket takes it as its
    own meanwhile (a free port, left unbound, was once a client's by the time the stub came)."""
    with socket.socket() as held:
        held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the stub's: it may bind
        held.bind(("127.0.0.1", 0))
        yield int(held.getsockname()[1])


@pytest.fixture
def ops(
    tmp_path: Path,
    db_url: str,
    redis_server: EmbeddedRedis,
    smtp_sink: SmtpSink,
    postcodes_port: int,
    parliament: Any,  # noqa: F811
) -> Iterator[tuple[App, RedisBroker, Stack]]:
    settings = make_settings(
        tmp_path,
        database_url=db_url,
        redis_url=redis_server.url,
        broker="redis",
        mail_backend="smtp",  # the operator's commands see what the workers use
        smtp_host="127.0.0.1",
        smtp_port=smtp_sink.port,
    )
    app = App.from_settings(settings)
    prepare(app)
    set_app(app)
    env = {
        "DEARMP_MAIL_BACKEND": "smtp",
        "SMTP_HOST": "127.0.0.1",
        "SMTP_PORT": str(smtp_sink.port),
        "DEARMP_RESOLUTION_ORDER": "local,live",
        "POSTCODES_IO_URL": f"http://127.0.0.1:{postcodes_port}",
        "MEMBERS_API_URL": parliament[1].url,
        "DEARMP_LOOKUP_ATTEMPTS": "1",
    }
    stack = Stack(tmp_path, db_url, redis_server.url, **env)
    stack.start("worker", "--processes", "1", "--threads", "2")
    stack.start("reconcile")  # `dearmp health` asks for its last pass
    client = redis.Redis.from_url(redis_server.url)
    alive = lambda: live_workers(client, "dearmp") and last_pass(client, "dearmp")  # noqa: E731
    assert wait_for(alive, 60), stack.log_text()[-2000:]
    yield app, RedisBroker(url=redis_server.url, namespace="dearmp"), stack
    stack.stop()
    set_app(None)
    app.engine.dispose()


def cli(*args: str) -> Any:
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.stdout


def outage(app: App, broker: RedisBroker) -> str:
    """A real dead letter that a requeue can complete: a submission whose postcode only the
    live source knows, resolved while postcodes.io is away, with no retries left."""
    with session_scope(app.sessions) as session:
        sid = accept(session, submission(supporter__postcode="AB10 1AB"), app.secret).submission_id
    with session_scope(app.sessions) as session:
        validate(session, sid)
    broker.enqueue(stage_message(Stage.RESOLVE, sid).copy(options={"max_retries": 0}))
    return sid


def dead_count(queue: str) -> int:
    depths = {d["queue"]: d for d in json.loads(cli("queues", "--json"))}
    return int(depths[queue]["dead"])


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_queues_list_show_and_a_requeue_that_a_worker_completes(
    ops: tuple[App, RedisBroker, Stack], smtp_sink: SmtpSink, shared_data: Path, postcodes_port: int
) -> None:
    app, broker, stack = ops
    # Two real dead letters: a message that cannot parse, and a resolution while postcodes.io
    # is away, with no retries left.
    broken = stage_message(Stage.VALIDATE, "x").copy(args=({"v": 99, "submission_id": "x"},))
    broker.enqueue(broken)
    sid = outage(app, broker)
    assert wait_for(lambda: dead_count("dearmp.resolve") == 1, 60), stack.log_text()[-2000:]
    assert wait_for(lambda: dead_count("dearmp.validate") == 1, 10)

    listed = json.loads(cli("dlq", "list", "--json"))
    assert {d["actor"] for d in listed} == {"validate_submission", "resolve_submission"}
    [lookup] = json.loads(cli("dlq", "list", "--json", "--actor", "resolve_submission"))
    assert lookup["submission_id"] == sid and lookup["reason"].endswith("SourceUnavailable")
    assert len(json.loads(cli("dlq", "list", "--json", "--reason", "foreignmessage"))) == 1

    shown = json.loads(cli("dlq", "show", lookup["message_id"]))
    assert [h["state"] for h in shown["history"]][-1] == "validated"
    assert "unavailable" in shown["failure"]["message"]
    assert "SourceUnavailable" in shown["failure"]["traceback"]
    assert "amira" not in json.dumps(shown).lower()
    revealed = CliRunner().invoke(main, ["dlq", "show", lookup["message_id"], "--reveal"])
    assert '"event": "dead_letter_revealed"' in revealed.stderr

    assert "would requeue 1" in cli(
        "dlq", "requeue", "--all", "--actor", "resolve_submission", "--dry-run"
    )
    assert dead_count("dearmp.resolve") == 1  # a dry run changes nothing

    back = recorded_postcodes_io(shared_data, postcodes_port)  # postcodes.io is back
    try:
        out = cli("dlq", "requeue", lookup["message_id"])
        assert "requeued 1, not found 0" in out
        assert wait_all_final(app, [sid], timeout=60) == {"delivered": 1}, stack.log_text()[-2000:]
    finally:
        back.stop()
    assert smtp_sink.received.count() == 1
    assert dead_count("dearmp.resolve") == 0 and dead_count("dearmp.validate") == 1
    missing = CliRunner().invoke(main, ["dlq", "requeue", "no-such-id"])
    assert missing.exit_code == 1 and "not found 1" in missing.stdout  # nothing requeued

    wide = {"COLUMNS": "160"}
    view = CliRunner().invoke(main, ["watch", "--iterations", "1"], env=wide).stdout
    assert "dearmp.resolve" in view and "Newest failures" in view
    assert "SourceUnavailable" in view and "ForeignMessage" in view


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_health_fails_on_dead_letters_and_purge_records_what_it_deleted(
    ops: tuple[App, RedisBroker, Stack],
) -> None:
    app, broker, stack = ops
    assert "healthy: 0 dead letters" in cli("health")
    broken = stage_message(Stage.VALIDATE, "x").copy(args=({"v": 99, "submission_id": "x"},))
    broker.enqueue(broken)
    assert wait_for(lambda: dead_count("dearmp.validate") == 1, 60), stack.log_text()[-2000:]

    unhealthy = CliRunner().invoke(main, ["health"])
    assert unhealthy.exit_code != 0 and "1 dead letter" in unhealthy.output
    assert CliRunner().invoke(main, ["health", "--max-dead", "1"]).exit_code == 0

    unasked = CliRunner().invoke(main, ["dlq", "purge"])  # no terminal to ask on, no --yes
    assert unasked.exit_code == 1 and "--yes" in unasked.stderr
    assert dead_count("dearmp.validate") == 1
    assert "purged 1" in cli("dlq", "purge", "--yes", "--queue", "dearmp.validate")
    assert dead_count("dearmp.validate") == 0
    with session_scope(app.sessions) as session:
        [purged] = session.scalars(select(PurgedDeadLetter)).all()
    assert purged.message_id == broken.message_id and purged.reason is not None
    assert "ForeignMessage" in purged.reason
    assert "healthy" in cli("health")

    # An MP address that keeps returning letters makes the deployment unhealthy until mended.
    with session_scope(app.sessions) as session:
        session.add(AddressHealth(email="mp@parliament.example", member_id=1, status="failing"))
    failing = CliRunner().invoke(main, ["health"])
    assert failing.exit_code != 0 and "1 MP address failing" in failing.output
    assert "marked ok" in cli("directory", "address", "mp@parliament.example", "--ok")
    assert "healthy" in cli("health")

    # A webhook long overdue is a CRM endpoint not answering, not emails or workers gone.
    with session_scope(app.sessions) as session:
        sid = accept(session, submission(), app.secret).submission_id
        long_ago = utcnow() - timedelta(hours=1)
        session.add(
            OutboxItem(submission_id=sid, key="letter.delivered:1", kind="webhook",
                       created_at=long_ago)
        )  # fmt: skip
    late = CliRunner().invoke(main, ["health"])
    assert late.exit_code != 0 and "1 webhook overdue" in late.output, late.output
    assert "emails overdue" not in late.output and "email overdue" not in late.output


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_prometheus_metrics_from_the_exporter_and_the_workers(
    tmp_path: Path, db_url: str, redis_server: EmbeddedRedis, smtp_sink: SmtpSink
) -> None:
    app = App.from_settings(make_settings(tmp_path, database_url=db_url))
    prepare(app)
    broker = RedisBroker(url=redis_server.url, namespace="dearmp")
    exporter, workers_port = free_port(), free_port()
    env = {
        "DEARMP_MAIL_BACKEND": "smtp",
        "SMTP_HOST": "127.0.0.1",
        "SMTP_PORT": str(smtp_sink.port),
        "DEARMP_WORKER_METRICS": "true",
        "dramatiq_prom_host": "127.0.0.1",
        "dramatiq_prom_port": str(workers_port),
        "dramatiq_prom_db": str(tmp_path / "prom"),
    }
    (tmp_path / "prom").mkdir()
    stack = Stack(tmp_path, db_url, redis_server.url, **env)
    try:
        stack.start("worker", "--processes", "1", "--threads", "2")
        stack.start("metrics", "--port", str(exporter))
        sid = submit(app, broker, submission())[0]
        broker.enqueue(stage_message(Stage.VALIDATE, "x").copy(args=({"v": 99},)))
        assert wait_all_final(app, [sid], timeout=60) == {"delivered": 1}

        def scrape(port: int) -> str:
            try:
                return requests.get(f"http://127.0.0.1:{port}/metrics", timeout=2).text
            except requests.ConnectionError:
                return ""

        assert wait_for(lambda: 'status="dead"} 1.0' in scrape(exporter), 30)
        text = scrape(exporter)
        assert 'dearmp_queue_messages{queue="dearmp.validate",status="dead"} 1.0' in text
        assert 'dearmp_submissions{state="delivered"} 1.0' in text
        assert "dearmp_mail_paused 0.0" in text
        assert "dearmp_failing_addresses 0.0" in text
        assert 'dearmp_letters_total{campaign="political-prisoners",outcome="sent"} 1.0' in text
        assert wait_for(lambda: "dramatiq_messages_total" in scrape(workers_port), 30)
        assert 'actor_name="deliver_submission"' in scrape(workers_port)
    finally:
        stack.stop()
        app.engine.dispose()


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_dead_letters_outlive_a_redis_restart_in_the_operators_view(
    ops: tuple[App, RedisBroker, Stack], smtp_sink: SmtpSink, shared_data: Path, postcodes_port: int
) -> None:
    """The database is the source of truth: after Redis restarts empty, the dead letters are
    still listed, counted by health, and a requeue makes the message again from the record."""

    app, broker, stack = ops
    sid = outage(app, broker)
    assert wait_for(lambda: dead_count("dearmp.resolve") == 1, 60), stack.log_text()[-2000:]
    redis.Redis.from_url(app.settings.resolved_redis_url).flushall()  # a restart, empty

    [listed] = json.loads(cli("dlq", "list", "--json"))
    assert listed["submission_id"] == sid and listed["in_redis"] is False
    assert listed["reason"].endswith("SourceUnavailable")
    assert dead_count("dearmp.resolve") == 1
    client = redis.Redis.from_url(app.settings.resolved_redis_url)
    assert wait_for(lambda: live_workers(client, "dearmp"), 30)  # their next heartbeat
    unhealthy = CliRunner().invoke(main, ["health"])
    assert unhealthy.exit_code == 1 and "1 dead letter" in unhealthy.output, unhealthy.output

    back = recorded_postcodes_io(shared_data, postcodes_port)
    try:
        assert "requeued 1, not found 0" in cli("dlq", "requeue", "--all", "--yes")
        assert wait_all_final(app, [sid], timeout=60) == {"delivered": 1}, stack.log_text()[-2000:]
    finally:
        back.stop()
    assert smtp_sink.received.count() == 1
    assert json.loads(cli("dlq", "list", "--json")) == []
    assert "healthy: 0 dead letters" in cli("health")


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_health_says_when_the_relay_refusing_us_pauses_delivery(
    ops: tuple[App, RedisBroker, Stack], smtp_sink: SmtpSink
) -> None:
    """A worker that meets a sender refusal pauses, and every operator's command sees it."""
    app, broker, stack = ops
    smtp_sink.sender_answer = "553 5.7.1 Sender address rejected: not owned by user"
    sid = through_render(app, submission())
    broker.enqueue(stage_message(Stage.DELIVER, sid))
    assert wait_for(lambda: "paused" in CliRunner().invoke(main, ["health"]).output, 60), (
        stack.log_text()[-2000:]
    )
    health = CliRunner().invoke(main, ["health"])
    said = "mail delivery paused: the mail server refused our sender (MAIL FROM): 553 5.7.1"
    assert health.exit_code == 2 and said in health.output
    with session_scope(app.sessions) as session:
        from workers.database.models import OutboxItem

        delivery = session.get(OutboxItem, sid)
        assert delivery is not None and delivery.attempts == 0
    assert json.loads(cli("dlq", "list", "--json")) == []  # waiting is not failing
