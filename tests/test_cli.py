"""The dearmp command line: submit a JSON file, then show a submission's history."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import dramatiq
import pytest
from click.testing import CliRunner

from tests.conftest import drain
from tests.factories import submission
from workers.cli import main
from workers.database.engine import alembic_config, migrate
from workers.pipeline.app import App
from workers.pipeline.runtime import submit


def test_submit_a_file_then_show_the_history(
    app: App, stub_broker: Any, stub_worker: dramatiq.Worker, tmp_path: Path
) -> None:
    payloads = [submission(), submission(supporter__email="bad")]
    path = tmp_path / "batch.json"
    path.write_text(json.dumps([*payloads, payloads[0]]))
    runner = CliRunner()
    result = runner.invoke(main, ["submit", str(path)], catch_exceptions=False)
    lines = result.stdout.split("\n")
    ids = [line.split()[0] for line in lines if line.strip()]
    assert [line.split()[1] for line in lines if line.strip()] == [
        "accepted",
        "accepted",
        "duplicate",
    ]
    assert ids[0] == ids[2]
    drain(stub_broker, stub_worker)

    shown = json.loads(runner.invoke(main, ["show", ids[0], "--json"]).stdout)
    assert shown["state"] == "delivered"
    assert [e["state"] for e in shown["history"]][-1] == "delivered"
    assert "amira" not in json.dumps(shown).lower()  # no personal data in the history view
    rejected = json.loads(runner.invoke(main, ["show", ids[1], "--json"]).stdout)
    assert rejected["rejection"]["supporter.email"].startswith("This is not a valid email")
    assert runner.invoke(main, ["show", "nope"]).exit_code != 0
    full = json.loads(runner.invoke(main, ["submission", "show", ids[0], "--json"]).stdout)
    body = full["letter"]["body"]
    assert body.startswith("Dear Alex Rivers,") and "[hidden]" in body
    for detail in ("Amira Haddad", "12 Mill Lane", "Millbrook", "DM1 1AA", "amira.haddad@"):
        assert detail not in json.dumps(full)
    revealed = runner.invoke(main, ["submission", "show", ids[0], "--json", "--reveal"])
    assert "12 Mill Lane" in revealed.stdout
    assert '"event": "letter_revealed"' in revealed.stderr and "Mill Lane" not in revealed.stderr


def test_campaign_mode_switch_sends_new_letters_to_the_sandbox(
    app: App, stub_broker: Any, stub_worker: dramatiq.Worker
) -> None:
    runner = CliRunner()
    result = runner.invoke(main, ["campaigns", "mode", "political-prisoners", "sandbox"])
    assert result.exit_code == 0 and "live -> sandbox" in result.stdout
    submit(app, stub_broker, submission())
    drain(stub_broker, stub_worker)
    [letter] = app.settings.resolved_outbox_dir.glob("*.eml")
    text = letter.read_text()
    assert f"To: DearMP sandbox <{app.settings.sandbox_address}>" in text
    assert "Subject: [SANDBOX]" in text and "meant for Alex Rivers" in text


def test_an_operators_mode_switch_survives_a_campaign_file_sync(app: App) -> None:
    from workers.database.engine import session_scope
    from workers.database.models import Campaign
    from workers.letters.definitions import get_definition, update_definition

    runner = CliRunner()
    switch = ["campaigns", "mode", "political-prisoners", "sandbox"]
    assert runner.invoke(main, switch).exit_code == 0
    with session_scope(app.sessions) as session:  # the stored definition differs from the file
        update_definition(session, "political-prisoners", title="Old title")
    assert (
        runner.invoke(main, ["campaigns", "sync"]).stdout.strip() == "changed: political-prisoners"
    )
    with session_scope(app.sessions) as session:
        row = session.get(Campaign, "political-prisoners")
        assert row is not None and row.mode == "sandbox"  # the file's "live" did not undo it
        definition = get_definition(session, "political-prisoners")
        assert definition is not None and definition.title != "Old title"


def test_show_prints_the_letter_with_its_hidden_markers_and_the_delivery_as_fields(
    app: App, stub_broker: Any, stub_worker: dramatiq.Worker
) -> None:
    sid = submit(app, stub_broker, submission())[0]
    drain(stub_broker, stub_worker)
    out = CliRunner().invoke(main, ["show", sid], catch_exceptions=False, terminal_width=200)
    assert out.exit_code == 0, out.output
    text = out.stdout
    assert "[hidden]" in text  # the supporter's details, masked and marked
    assert "Amira" not in text and "Mill Lane" not in text
    assert "{'status'" not in text and "  status: sent" in text
    assert "  attempts: 1" in text
    body_lines = text.split("  body:", 1)[1].splitlines()
    assert any("[hidden]" in line for line in body_lines)


def test_show_hides_the_supporter_in_what_servers_answered(
    app: App, stub_broker: Any, stub_worker: dramatiq.Worker
) -> None:
    """A refusal can quote the letter's sender: shown with their name hidden, as the letter."""
    from sqlalchemy import update

    from workers.database.engine import session_scope
    from workers.database.models import OutboxItem, Submission

    sid = submit(app, stub_broker, submission())[0]
    drain(stub_broker, stub_worker)
    answer = "550 5.7.1 Message from Amira Haddad refused"
    with session_scope(app.sessions) as session:
        session.execute(update(OutboxItem).where(OutboxItem.id == sid).values(error=answer))
        session.execute(
            update(Submission).where(Submission.id == sid).values(failure_reason=answer)
        )
    shown = CliRunner().invoke(main, ["show", sid, "--json"]).stdout
    assert "Amira" not in shown and "550 5.7.1 Message from [hidden] refused" in shown
    revealed = CliRunner().invoke(main, ["show", sid, "--json", "--reveal"]).stdout
    assert "Message from Amira Haddad refused" in revealed


def test_operator_commands_say_in_one_line_that_redis_is_away(app: App) -> None:
    app.settings.redis_url = "redis://127.0.0.1:1/0"
    for command in (["queues"], ["health"], ["watch", "--iterations", "1"]):
        result = CliRunner().invoke(main, command)
        down = 2 if command == ["health"] else 1  # health: nothing can go out
        assert result.exit_code == down, (command, result.output)
        assert "Traceback" not in result.output and result.exception is not None
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert len(lines) == 1, result.output
        assert "cannot reach Redis at redis://127.0.0.1:1/0" in lines[0]
        assert "REDIS_URL" in lines[0]
    health = CliRunner().invoke(main, ["health"])
    assert health.output.startswith("down: cannot reach Redis")
    # Dead letters are the database's record: listed without Redis, which is said.
    listed = CliRunner().invoke(main, ["dlq", "list", "--json"])
    assert listed.exit_code == 0 and json.loads(listed.stdout) == []
    assert "the database's record only: cannot reach Redis" in listed.stderr


def test_a_worker_child_that_dies_booting_stops_dearmp_worker_at_once(tmp_path: Path) -> None:
    """A supervisor (systemd, Docker's restart policy) restarts the whole worker; dramatiq's
    default would leave it idle for 30 s first."""
    import os
    import subprocess
    import sys
    import time

    env = {
        **os.environ,
        "DEARMP_DATA_DIR": str(tmp_path),
        # The settings load (dearmp worker reads them first), and the child, building its
        # broker, fails to boot: no port is that high.
        "DEARMP_BROKER": "redis",
        "REDIS_URL": "redis://127.0.0.1:99999/0",
    }
    migrate(f"sqlite:///{tmp_path / 'dearmp.sqlite3'}")  # it starts on a migrated database only
    dearmp = Path(sys.executable).with_name("dearmp")
    started = time.monotonic()
    done = subprocess.run(
        [str(dearmp), "worker", "--processes", "1", "--threads", "1"],
        env=env,
        capture_output=True,
        timeout=60,
    )
    assert done.returncode != 0
    assert b"exited unexpectedly" in done.stderr + done.stdout
    assert time.monotonic() - started < 20  # not dramatiq's 30 s wait


def test_failed_deliveries_are_reopened_by_reason_with_a_dry_run_first(
    app: App, stub_broker: Any, stub_worker: dramatiq.Worker, tmp_path: Path
) -> None:
    from sqlalchemy import update

    from workers.database.engine import session_scope
    from workers.database.models import OutboxItem, State, Submission

    ids = [submit(app, stub_broker, submission())[0] for _ in range(3)]
    drain(stub_broker, stub_worker)
    # Two letters refused for a mistake in configuration, one for another reason.
    with session_scope(app.sessions) as session:
        for sid, error in zip(
            ids,
            ["554 5.7.1 relay denied", "554 5.7.1 relay denied", "550 5.1.1 no such user"],
            strict=True,
        ):
            session.execute(
                update(Submission).where(Submission.id == sid).values(state=State.FAILED.value)
            )
            session.execute(
                update(OutboxItem)
                .where(OutboxItem.kind == "letter")
                .where(OutboxItem.id == sid)
                .values(status="failed", attempts=20, failures=20, error=error)
            )
    runner = CliRunner()
    dry = runner.invoke(main, ["deliveries", "reopen", "--reason", "5.7.1", "--dry-run"])
    assert dry.exit_code == 0 and "would reopen 2" in dry.stdout
    with session_scope(app.sessions) as session:
        assert {s.state for s in session.query(Submission)} == {"failed"}  # nothing changed
    done = runner.invoke(main, ["deliveries", "reopen", "--reason", "5.7.1", "--yes"])
    assert done.exit_code == 0 and "reopened 2" in done.stdout
    drain(stub_broker, stub_worker)
    with session_scope(app.sessions) as session:
        states = {sid: session.get(Submission, sid).state for sid in ids}  # type: ignore[union-attr]
        deliveries = {sid: session.get(OutboxItem, sid) for sid in ids}
        assert [states[sid] for sid in ids] == ["delivered", "delivered", "failed"]
        reopened = deliveries[ids[0]]
        assert reopened is not None and (reopened.status, reopened.failures) == ("sent", 0)
        history = [e.state for e in session.get(Submission, ids[0]).events]  # type: ignore[union-attr]
        assert history[-2:] == ["rendered", "delivered"]


def test_numeric_options_refuse_values_that_make_no_sense(app: App) -> None:
    """--every 0 was a busy loop, a negative overlap dropped the old secret at once and a huge
    one kept it for a century, --count 0 fed one anyway and --keep 0 kept one anyway: each is
    refused (click's usage error, exit 2) and nothing runs."""
    runner = CliRunner()
    for command, option in (
        (["retention", "run", "--every", "0"], "--every"),
        (["retention", "run", "--every", "59"], "--every"),
        (["webhooks", "rotate", "1", "--overlap-hours", "-5"], "--overlap-hours"),
        (["webhooks", "rotate", "1", "--overlap-hours", "1000000"], "--overlap-hours"),
        (["demo", "--count", "0"], "--count"),
        (["directory", "prune", "--keep", "0"], "--keep"),
    ):
        refused = runner.invoke(main, command)
        assert refused.exit_code == 2, (command, refused.output)
        assert f"Invalid value for '{option}'" in refused.stderr
        assert "not in the range" in refused.stderr and "Traceback" not in refused.output
    for command, said in (
        (["retention", "run", "--help"], "at least 60"),
        (["webhooks", "rotate", "--help"], "up to 720"),
        (["demo", "--help"], "at least 1"),
        (["directory", "prune", "--help"], "at least 1"),
    ):
        assert said in " ".join(runner.invoke(main, command).stdout.split()), command


def test_retention_run_logs_its_start_as_retention_not_run(app: App) -> None:
    out = CliRunner().invoke(main, ["retention", "run"])
    assert out.exit_code == 0, out.output
    started = [json.loads(line) for line in out.stderr.splitlines() if '"dearmp_started"' in line]
    assert [line["process"] for line in started] == ["retention"]


def test_a_rotated_secret_overlaps_for_the_hours_given_and_0_ends_it_at_once(app: App) -> None:
    from datetime import timedelta

    from workers.database.engine import session_scope
    from workers.database.models import WebhookEndpoint, utcnow

    runner = CliRunner()
    hook = ["webhooks", "add", "https://crm.example/hook", "--event", "letter.delivered"]
    assert runner.invoke(main, hook).exit_code == 0

    def overlap(hours: str) -> timedelta:
        before = utcnow()
        rotated = runner.invoke(main, ["webhooks", "rotate", "1", "--overlap-hours", hours])
        assert rotated.exit_code == 0, rotated.output
        with session_scope(app.sessions) as session:
            endpoint = session.get(WebhookEndpoint, 1)
            assert endpoint is not None and endpoint.previous_until is not None
            return endpoint.previous_until.replace(tzinfo=before.tzinfo) - before

    assert overlap("0") < timedelta(minutes=1)
    assert timedelta(hours=719) < overlap("720") <= timedelta(hours=720, minutes=1)


def test_directory_prune_says_how_many_are_kept_in_good_english(app: App) -> None:
    runner = CliRunner()
    one = runner.invoke(main, ["directory", "prune", "--keep", "1", "--dry-run"])
    assert one.exit_code == 1
    assert "no version to delete: at most 1 version is kept, and no more exist" in one.stderr
    two = runner.invoke(main, ["directory", "prune", "--dry-run"])
    assert "at most 2 versions are kept" in two.stderr


def test_submit_says_in_one_line_where_a_file_is_not_json(app: App, tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('{\n  "campaign": "political-prisoners",\n  "supporter": {,}\n}\n')
    out = CliRunner().invoke(main, ["submit", str(bad)])
    assert out.exit_code == 1 and "Traceback" not in out.output
    assert out.stderr.splitlines() == [
        f"Error: {bad}: not valid JSON: Expecting property name enclosed in double quotes "
        "(line 3, column 17)"
    ]
    binary = tmp_path / "binary.json"
    binary.write_bytes(b'{"a": "\xff\xfe\xfa"}')
    out = CliRunner().invoke(main, ["submit", str(binary)])
    assert out.exit_code == 1 and len(out.stderr.splitlines()) == 1
    assert f"{binary}: not valid JSON" in out.stderr


def test_campaigns_list_gives_each_campaigns_mode_and_pause(app: App) -> None:
    runner = CliRunner()
    listed = runner.invoke(main, ["campaigns", "list"])
    assert listed.exit_code == 0, listed.output
    [line] = listed.stdout.splitlines()
    assert line.startswith("political-prisoners (live): ")
    assert (
        runner.invoke(main, ["campaigns", "mode", "political-prisoners", "sandbox"]).exit_code == 0
    )
    assert runner.invoke(main, ["campaigns", "pause", "political-prisoners"]).exit_code == 0
    listed = runner.invoke(main, ["campaigns", "list"])
    assert listed.stdout.startswith("political-prisoners (sandbox, paused): ")
    [row] = json.loads(runner.invoke(main, ["campaigns", "list", "--json"]).stdout)
    assert row["slug"] == "political-prisoners" and row["title"] in listed.stdout
    assert (row["mode"], row["paused"]) == ("sandbox", True)
    assert row["paused_at"].startswith("20")  # ISO 8601
    assert runner.invoke(main, ["campaigns", "resume", "political-prisoners"]).exit_code == 0
    [row] = json.loads(runner.invoke(main, ["campaigns", "list", "--json"]).stdout)
    assert (row["paused"], row["paused_at"]) == (False, None)


def test_watch_without_a_terminal_says_it_would_print_nothing_unless_told_when_to_stop() -> None:
    result = CliRunner().invoke(main, ["watch"])
    assert result.exit_code == 2 and "give --iterations" in result.output


def test_submit_with_redis_away_stores_each_and_says_so_once(tmp_path: Path) -> None:
    """Each submission is stored (the reconciler sends it on once Redis is back); the command
    says once that Redis did not take them, not once per submission."""
    import os
    import subprocess
    import sys

    from tests.conftest import make_settings, serving
    from tests.services import REPO
    from workers.pipeline.runtime import state_counts

    with serving(make_settings(tmp_path)) as app:
        path = tmp_path / "batch.json"
        path.write_text(
            json.dumps([submission(supporter__email=f"s{i}@example.com") for i in range(3)])
        )
        env = {
            **os.environ,
            "DEARMP_BROKER": "redis",
            "REDIS_URL": "redis://127.0.0.1:1/0",
            "DEARMP_DATA_DIR": str(app.settings.data_dir),
            "DEARMP_SECRET_KEY": app.settings.secret_key.get_secret_value(),
        }
        done = subprocess.run(
            [sys.executable, "-m", "workers.cli", "submit", str(path)],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert done.stderr.count("Redis did not take every message") == 1
        ids = [line.split()[0] for line in done.stdout.splitlines() if line.endswith("accepted")]
        assert len(ids) == 3 and state_counts(app, ids) == {"received": 3}


@pytest.mark.parametrize(("command", "threads"), [("run", "0"), ("worker", "65")])
def test_threads_outside_the_settings_range_are_refused_with_usage(
    command: str, threads: str
) -> None:
    """``run --threads 0`` started a pipeline that did nothing; ``worker --threads 100`` failed
    naming a variable the operator never set."""
    refused = CliRunner().invoke(main, [command, "--threads", threads])
    assert refused.exit_code == 2 and "--threads" in refused.output


def one_line_refusal(result: Any) -> str:
    """The one line a refused command said on stderr (exit 1, no traceback), beside the JSON
    log's start-up line of a command that logs one."""
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and "uncaught_exception" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    lines = [line for line in lines if '"event": "dearmp_started"' not in line]
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_a_database_a_newer_dearmp_migrated_is_one_line_for_migrate_init_and_run(
    app: App,
) -> None:
    """Alembic cannot go from a migration it does not know: not its traceback, but what that
    means and what to do."""
    from sqlalchemy import text

    with app.engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = 'zzzz9999future'"))
    for command in (["migrate"], ["init"], ["run"]):
        said = one_line_refusal(CliRunner().invoke(main, command))
        assert said == (
            "Error: the database is at migration zzzz9999future, which this DearMP does not "
            "know: a newer DearMP migrated it (run that version, or restore a backup)"
        ), command


def test_long_running_commands_refuse_to_start_on_a_database_at_an_older_migration(
    app: App, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not started to fail statement by statement (the reconciler said "resent 0"): refused at
    once, saying where the database is and what to do; other commands meeting a missing
    column say the same."""
    import dramatiq.cli
    import uvicorn
    from alembic import command

    from config.settings import get_settings

    command.downgrade(alembic_config(app.settings.resolved_database_url), "0021")
    monkeypatch.setenv("DATABASE_URL", app.settings.resolved_database_url)  # `worker`'s own
    get_settings.cache_clear()
    started = []
    monkeypatch.setattr(dramatiq.cli, "main", lambda *a: started.append("worker"))
    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: started.append("api"))
    expected = (
        "Error: the database is at migration 0021, this DearMP needs 0022: `dearmp migrate` "
        "brings it up to date"
    )
    try:
        for line in (["worker"], ["api"], ["reconcile"], ["reconcile", "--once"]):
            assert one_line_refusal(CliRunner().invoke(main, line)) == expected, line
    finally:
        get_settings.cache_clear()
    assert started == []
    migrated = CliRunner().invoke(main, ["migrate"])
    assert migrated.exit_code == 0, migrated.output
    assert CliRunner().invoke(main, ["reconcile", "--once"]).stdout == "resent 0\n"


def test_a_command_on_a_database_without_tables_says_so(tmp_path: Path) -> None:
    from tests.conftest import make_settings
    from workers.pipeline.app import set_app

    set_app(App.from_settings(make_settings(tmp_path)))
    try:
        said = one_line_refusal(CliRunner().invoke(main, ["outbox", "list"]))
    finally:
        set_app(None)
    assert said == (
        "Error: the database has no DearMP tables yet: `dearmp migrate` makes them (or "
        "DATABASE_URL names another database)"
    )


def test_dead_letters_whose_failure_was_never_recorded_are_listed(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Dead-lettered while the database was away: no answer (``None``), which crashed the list
    (`--json` showed them)."""
    from workers.cli.queues import _print_dead

    row = {
        "message_id": "m-1",
        "actor": "validate_submission",
        "submission_id": "s-1",
        "dead_at": "2026-12-07T16:00:00+00:00",
        "attempts": None,
        "reason": "unknown",
        "answer": None,
    }
    _print_dead([row])
    assert "unknown: 1 (the answer: none recorded)" in capsys.readouterr().out


def test_a_database_away_at_the_start_is_logged_and_the_process_starts(tmp_path: Path) -> None:
    """It may come up after us: refusing to start spent a supervisor's restarts."""
    from sqlalchemy import create_engine
    from structlog.testing import capture_logs

    from workers.database.engine import check_schema

    away = create_engine(f"sqlite:///{tmp_path}/no/such/folder/dearmp.sqlite3")
    with capture_logs() as logs:
        check_schema(away)  # no raise
    assert [e["event"] for e in logs] == ["schema_not_checked"]
