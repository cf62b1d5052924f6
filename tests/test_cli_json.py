"""Every ``dearmp`` command answers in JSON with ``--json``; destructive ones take ``--dry-run``
and/or ask first (``--yes`` skips the question, and without a terminal they refuse rather than
hang); commands with nothing to do, or that cannot find what they were given, exit 1."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import dramatiq
import pytest
from click.testing import CliRunner, Result
from sqlalchemy import func, select, update

from tests.conftest import drain
from tests.factories import submission
from workers.cli import main
from workers.database.engine import session_scope
from workers.database.models import DirectoryVersion, OutboxItem, State, Submission
from workers.pipeline.app import App
from workers.pipeline.runtime import submit

# Commands without --json, and why: each named here on purpose.
EXEMPT = {
    "api": "runs the HTTP server until stopped",
    "worker": "runs the dramatiq workers until stopped",
    "run": "runs the whole pipeline until stopped",
    "inbound": "runs the SMTP receiver until stopped",
    "metrics": "serves Prometheus metrics until stopped",
    "watch": "a live view for a person, refreshed until stopped",
    "migrate": "prints nothing: its exit code is its answer",
}

# Commands that delete, erase, drop, reopen or requeue in bulk, or send again what was held.
DESTRUCTIVE = {
    "dlq purge",
    "dlq requeue",
    "deliveries reopen",
    "directory prune",
    "directory dissolve",
    "outbox retry",
    "replies drop",
    "replies release",
    "replies resend-bounced",
    "review reject",
    "review release",
    "supporter erase",
    "webhooks remove",
}


def commands(group: click.Group = main, prefix: str = "") -> Iterator[tuple[str, click.Command]]:
    for name, command in sorted(group.commands.items()):
        path = f"{prefix}{name}"
        if isinstance(command, click.Group):
            yield from commands(command, f"{path} ")
        else:
            yield path, command


def options(command: click.Command) -> set[str]:
    return {opt for param in command.params for opt in param.opts}


def run(*args: str) -> Result:
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def count(app: App, model: type) -> int:
    with session_scope(app.sessions) as session:
        return int(session.scalar(select(func.count()).select_from(model)) or 0)


def test_every_command_answers_in_json_and_every_destructive_one_asks_or_dry_runs() -> None:
    found = dict(commands())
    assert set(EXEMPT) <= set(found) and DESTRUCTIVE <= set(found)  # no stale names
    assert not set(EXEMPT) & DESTRUCTIVE
    no_json = sorted(p for p, c in found.items() if p not in EXEMPT and "--json" not in options(c))
    assert no_json == []
    unguarded = sorted(p for p in DESTRUCTIVE if not {"--dry-run", "--yes"} & options(found[p]))
    assert unguarded == []


def test_json_answers_are_one_document_with_the_facts_of_the_text(
    app: App, stub_broker: Any, stub_worker: dramatiq.Worker
) -> None:
    sid = submit(app, stub_broker, submission())[0]
    drain(stub_broker, stub_worker)
    [row] = json.loads(run("submissions", "list", "--json").stdout)
    assert row["id"] == sid and row["state"] == "delivered"
    assert row["created"].startswith("20") and "T" in row["created"]  # ISO 8601
    shown = json.loads(run("show", sid, "--json").stdout)
    assert shown["id"] == sid and "Amira" not in json.dumps(shown)  # masked as in the text
    status = json.loads(run("directory", "status", "--json").stdout)
    [current] = [v for v in status["versions"] if v["current"]]
    assert isinstance(current["id"], int) and current["seats"] > 0 and status["failing"] == []
    verified = json.loads(run("consent", "verify", "--json").stdout)
    assert verified["intact"] is True and verified["events"] > 0
    switched = run("campaigns", "mode", "political-prisoners", "sandbox", "--json")
    assert json.loads(switched.stdout) == {
        "campaign": "political-prisoners",
        "before": "live",
        "mode": "sandbox",
    }
    assert json.loads(run("campaigns", "sync", "--json").stdout) == {"changed": []}
    records = json.loads(run("dns", "--json").stdout)
    assert {"name", "type", "value", "why"} <= set(records[0])
    nothing = CliRunner().invoke(main, ["submissions", "list", "--state", "failed", "--json"])
    assert nothing.exit_code == 1 and json.loads(nothing.stdout) == []
    assert "no submission matches" in nothing.stderr


def test_submit_says_conflict_for_a_key_reused_with_another_body_and_exits_1(
    app: App, stub_broker: Any, tmp_path: Path
) -> None:
    first = submission()
    other = submission(idempotency_key=first["idempotency_key"], message="Another letter")
    path = tmp_path / "batch.json"
    path.write_text(json.dumps([first, first, other]))
    result = CliRunner().invoke(main, ["submit", str(path), "--json"])
    assert result.exit_code == 1, result.output
    answers = json.loads(result.stdout)
    assert [a["outcome"] for a in answers] == ["accepted", "duplicate", "conflict"]
    assert "1 conflict: an idempotency key already used with a different body" in result.stderr
    assert count(app, Submission) == 1  # nothing stored for the conflict
    text = CliRunner().invoke(main, ["submit", str(path)])
    assert text.exit_code == 1 and text.stdout.splitlines()[-1].endswith(" conflict")


def versions(app: App) -> int:
    return count(app, DirectoryVersion)


def test_a_destructive_command_dry_runs_refuses_without_yes_and_does_it_with_yes(
    app: App,
) -> None:
    assert run("directory", "dissolve", "--yes").exit_code == 0
    assert run("directory", "dissolve", "--off", "--yes").exit_code == 0
    before = versions(app)
    assert before == 3
    dry = run("directory", "prune", "--keep", "1", "--dry-run", "--json")
    assert dry.exit_code == 0 and json.loads(dry.stdout) == {"dry_run": True, "deleted": [2]}
    assert versions(app) == before  # a dry run changes nothing
    unasked = CliRunner().invoke(main, ["directory", "prune", "--keep", "1"])
    assert unasked.exit_code == 1 and "--yes" in unasked.stderr
    assert "Delete 1 old directory version (2)?" in unasked.stderr
    assert versions(app) == before  # refused, not done
    done = run("directory", "prune", "--keep", "1", "--yes")
    assert done.exit_code == 0 and "deleted versions: 2" in done.stdout
    assert versions(app) == before - 1
    again = CliRunner().invoke(main, ["directory", "prune", "--keep", "1", "--yes"])
    assert again.exit_code == 1 and "no version to delete" in again.stderr


def test_on_a_terminal_the_question_is_asked_and_no_changes_nothing(
    app: App, monkeypatch: pytest.MonkeyPatch
) -> None:
    run("directory", "dissolve", "--yes")
    monkeypatch.setattr("workers.cli.base._terminal", lambda: True)
    declined = CliRunner().invoke(main, ["directory", "dissolve", "--off"], input="n\n")
    assert declined.exit_code == 1 and "Mark Parliament sitting again? [y/N]" in declined.stderr
    assert versions(app) == 2
    agreed = CliRunner().invoke(main, ["directory", "dissolve", "--off", "--json"], input="y\n")
    assert agreed.exit_code == 0 and json.loads(agreed.stdout)["dissolved"] is False
    assert versions(app) == 3


def test_erasure_without_yes_and_without_a_terminal_is_refused_and_erases_nothing(
    app: App, stub_broker: Any
) -> None:
    email = "amira.haddad@example.com"
    submit(app, stub_broker, submission(supporter__email=email))
    unasked = CliRunner().invoke(main, ["supporter", "erase", email])
    assert unasked.exit_code == 1
    assert "Erase everything held about 1 supporter" in unasked.stderr and "--yes" in unasked.stderr
    with session_scope(app.sessions) as session:
        assert session.scalar(select(Submission.erased_at)) is None
    erased = run("supporter", "erase", email, "--yes", "--json")
    assert json.loads(erased.stdout)["submissions"] == 1
    with session_scope(app.sessions) as session:
        assert session.scalar(select(Submission.erased_at)) is not None


def test_reopen_dry_runs_asks_and_says_when_nothing_matches(
    app: App, stub_broker: Any, stub_worker: dramatiq.Worker
) -> None:
    none = CliRunner().invoke(main, ["deliveries", "reopen", "--dry-run"])
    assert none.exit_code == 1 and "no failed letter matches" in none.stderr
    sid = submit(app, stub_broker, submission())[0]
    drain(stub_broker, stub_worker)
    with session_scope(app.sessions) as session:
        session.execute(update(Submission).values(state=State.FAILED.value))
        session.execute(update(OutboxItem).where(OutboxItem.id == sid).values(status="failed"))
    dry = run("deliveries", "reopen", "--dry-run", "--json")
    assert json.loads(dry.stdout) == {
        "dry_run": True,
        "reopened": [sid],
        "digests_reopened": [],
        "dead_letters_cleared": 0,
    }
    unasked = CliRunner().invoke(main, ["deliveries", "reopen"])
    assert unasked.exit_code == 1 and "Send 1 failed letter again?" in unasked.stderr
    with session_scope(app.sessions) as session:
        assert session.scalar(select(Submission.state)) == "failed"  # neither changed anything
    assert "reopened 1" in run("deliveries", "reopen", "--yes").stdout
    with session_scope(app.sessions) as session:
        assert session.scalar(select(Submission.state)) != "failed"


def test_commands_with_nothing_to_do_say_so_and_exit_1(app: App) -> None:
    for args, said in (
        (["campaigns", "mode", "political-prisoners", "live"], "live mode already"),
        (["directory", "dissolve", "--off", "--yes"], "Parliament is sitting already"),
        (["outbox", "retry", "--yes"], "no given-up item"),
        (["deliveries", "flush"], "no letter waits"),
        (["replies", "resend-bounced", "--member", "1", "--to", "a@b.example", "--yes"], "no re"),
        (["webhooks", "remove", "99", "--yes"], "no webhook endpoint 99"),
        (["replies", "drop", "nope", "--yes"], "no held reply"),
    ):
        result = CliRunner().invoke(main, [*args, "--json"])
        assert result.exit_code == 1, (args, result.output)
        assert said in result.stderr, (args, result.stderr)
    assert run("campaigns", "pause", "political-prisoners").exit_code == 0
    again = CliRunner().invoke(main, ["campaigns", "pause", "political-prisoners"])
    assert again.exit_code == 1 and "paused already" in again.stderr


def test_messages_redis_did_not_take_are_said_to_wait_for_the_reconciler(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """What a command committed is sent on after the commit; if Redis is away, the command says
    the reconciler will send it (the database holds it), not only a log line."""
    from workers.cli.base import Cli
    from workers.stages.stage import Stage

    class Away:
        def enqueue(self, message: Any) -> None:
            raise ConnectionError("redis is away")

    cli = Cli()
    cli.__dict__["broker"] = Away()  # the cached broker, unreachable
    cli.send({Stage.WEBHOOK: ["an-item"]})
    said = capsys.readouterr()
    assert "the reconciler sends them once it is back" in said.err and said.out == ""
    cli.send({Stage.WEBHOOK: []})  # nothing to send: nothing said
    assert capsys.readouterr() == ("", "")
