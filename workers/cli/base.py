"""What every ``dearmp`` command shares: the top-level group, the :class:`Cli` each is given, and
how they answer: text or ``--json`` (:func:`command`, :meth:`Cli.say`), a table's :func:`cell`, a
refusal for nothing to do (:class:`Nothing`), and a question before a destructive change
(:func:`confirm`). Text from outside (a server's answer, an MP's name) is shown through
:mod:`workers.wording`: it never moves the terminal's cursor, nor is it read as rich markup."""

from __future__ import annotations

import json
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import asdict, dataclass, is_dataclass
from datetime import date, datetime
from functools import cached_property
from pathlib import Path
from typing import IO, Any

import click
import dramatiq
from rich.text import Text
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from config.settings import ConfigurationError, get_settings, problems_of
from workers.database.engine import SchemaProblem, schema_problem, session_scope
from workers.logging import configure_logging
from workers.pipeline.app import App, get_app, log_started
from workers.pipeline.dispatch import dispatch_groups
from workers.stages.stage import Stage
from workers.wording import one_line, printable

# The commands that run the pipeline (or part of it) for as long as they are left to, by their
# path under ``dearmp``: each logs the start-up line, its process named by the path's first word.
# (``api``'s is its ASGI factory's; ``worker``'s its worker processes'.)
RUNNING_COMMANDS = frozenset({"run", "demo", "reconcile", "inbound", "retention run"})


def app_for_cli(log_file: Path | None = None) -> App:
    """The process's App, with logging set up (to ``log_file``, if given)."""
    settings = get_settings()
    stream = None
    if log_file is not None:
        # The embedded data folder holds personal data: this user's only.
        settings.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        log_file.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        stream = log_file.open("a", buffering=1)
    configure_logging(settings.log_level, stream=stream)
    return get_app()


@dataclass
class Cli:
    """The command line's composition root, given to each command as click's context object:
    the App and the broker, each built once, on first use (set ``log_file`` before)."""

    log_file: Path | None = None
    as_json: bool = False  # --json: one JSON document on stdout, messages for people on stderr

    def say(self, text: str | Callable[[], None], data: Any) -> None:
        """The command's answer: ``data`` as one JSON document with --json, else ``text`` (or
        what prints it: a table, say)."""
        if self.as_json:
            click.echo(json.dumps(data, indent=2, default=_plain))
        elif callable(text):
            text()
        else:
            click.echo(printable(text))

    def tell(self, text: str) -> None:
        """A line for a person: on stdout, or on stderr when stdout is for --json's document."""
        click.echo(printable(text), err=self.as_json)

    def session(self) -> AbstractContextManager[Session]:
        """A transaction on the App's database: committed unless it raises."""
        return session_scope(self.app.sessions)

    def send(self, sends: Mapping[Stage, Sequence[str]]) -> None:
        """Stage messages for what a command has committed (if not, the reconciler sends them);
        the broker is built only when there is something to send."""
        if any(sends.values()) and not dispatch_groups(self.broker, sends):
            click.echo(  # a warning: on stderr, apart from what the command answers
                "Redis did not take every message: the reconciler sends them once it is back",
                err=True,
            )

    @cached_property
    def app(self) -> App:
        app = app_for_cli(self.log_file)
        command = click.get_current_context(silent=True)
        if command is not None:  # its path without the program's name: "retention run"
            path = command.command_path.removeprefix(command.find_root().command_path).strip()
            if path in RUNNING_COMMANDS:
                log_started(app, path.split()[0])
        return app

    @cached_property
    def broker(self) -> dramatiq.Broker:
        """The broker that stage messages go on, with the actors declared on it."""
        from workers.pipeline.actors import setup
        from workers.pipeline.dramatiq_private import installed_broker

        # The one set up already in this process (a test's), or this process's own.
        return installed_broker() or setup(self.app.settings, lambda: self.app)


pass_cli = click.make_pass_decorator(Cli, ensure=True)


def cell(value: object) -> Text:
    """A table's cell: ``value`` as text on one line (:func:`one_line`), never read as rich
    markup (a server's ``[mx1.example.com]`` is shown, ``[/b]`` raises nothing)."""
    return Text(one_line("" if value is None else str(value)))


def _plain(value: Any) -> Any:
    """What JSON cannot hold as it is: times in ISO 8601, paths and the rest as text."""
    if isinstance(value, datetime | date):
        return value.isoformat()
    if is_dataclass(value) and not isinstance(value, type):
        return asdict(value)
    if isinstance(value, set | frozenset):
        return sorted(value)
    return str(value)


def _want_json(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    if value:
        ctx.ensure_object(Cli).as_json = True


# --json: the command answers with one JSON document on stdout (see :meth:`Cli.say`).
json_option = click.option(
    "--json",
    is_flag=True,
    expose_value=False,
    is_eager=True,  # before other options' callbacks, which may already have to answer
    callback=_want_json,
    help="Machine-readable: one JSON document on stdout.",
)


def command(
    group: click.Group, name: str | None = None
) -> Callable[[Callable[..., None]], click.Command]:
    """Declare a command of ``group`` that is given the :class:`Cli` and answers ``--json``
    (listed after its other options: added to the command, not to ``fn``)."""
    return lambda fn: json_option(group.command(name)(pass_cli(fn)))


dry_run_option = click.option(
    "--dry-run", is_flag=True, help="Say what would be done; change nothing."
)
yes_option = click.option(
    "--yes", "-y", is_flag=True, help="Do not ask for confirmation (needed without a terminal)."
)


def confirm(yes: bool, question: str) -> None:
    """Ask ``question`` before a destructive change, unless ``--yes`` was given. Without a
    terminal to ask on, refuse (exit 1) rather than hang or guess."""
    if yes:
        return
    if not _terminal():
        raise click.ClickException(f"{question} Not asked without a terminal: add --yes.")
    click.confirm(question, abort=True, err=True)


def _terminal() -> bool:
    """Whether a person can answer: stdin is a terminal (not a pipe, cron or a CI job)."""
    return sys.stdin.isatty()


@contextmanager
def refusing(*errors: type[Exception], then: str = "") -> Iterator[None]:
    """What ``errors`` say (and ``then``), one line and exit 1, not a traceback."""
    try:
        yield
    except errors as exc:
        raise click.ClickException(f"{exc}{then}") from None


@contextmanager
def until_stopped(*signals: signal.Signals) -> Iterator[threading.Event]:
    """An event set on SIGTERM (and ``signals``); Ctrl-C ends the block quietly."""
    stop = threading.Event()
    for sig in (signal.SIGTERM, *signals):
        signal.signal(sig, lambda *_: stop.set())
    try:
        yield stop
    except KeyboardInterrupt:
        stop.set()


class Nothing(click.ClickException):
    """Nothing to do, or nothing found by what was given: said on stderr, and exit 1."""

    def show(self, file: IO[Any] | None = None) -> None:
        click.echo(self.message, file=file, err=True)


class BadConfiguration(click.ClickException):
    """Settings a command cannot run with: one line per problem, each naming its variable."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems

    def show(self, file: IO[Any] | None = None) -> None:
        for problem in self.problems:
            click.echo(f"Error: configuration: {problem}", file=file, err=True)


class Commands(click.Group):
    """The ``dearmp`` group: a service that goes away while a command runs is one line and a
    non-zero exit, not a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        import redis
        from pydantic import ValidationError
        from sqlalchemy.exc import OperationalError, ProgrammingError

        try:
            return super().invoke(ctx)
        except ConfigurationError as exc:  # the settings: what is wrong, not a traceback
            raise BadConfiguration(exc.problems) from None
        except ValidationError as exc:  # settings built from values, not the environment
            raise BadConfiguration(problems_of(exc)) from None
        except redis.RedisError as exc:
            raise click.ClickException(
                f"lost Redis ({type(exc).__name__}); is it running? `dearmp queues` says where "
                "it is expected."
            ) from None
        except SchemaProblem as exc:  # not at this code's migration
            raise click.ClickException(str(exc)) from None
        except (OperationalError, ProgrammingError) as exc:
            # A missing table or column: the database at another migration, said as such.
            if (problem := _schema_problem(ctx)) is not None:
                raise click.ClickException(problem) from None
            if isinstance(exc, ProgrammingError):
                raise
            raise click.ClickException(
                f"cannot reach the database ({type(exc.orig).__name__}); check DATABASE_URL."
            ) from None


def _schema_problem(ctx: click.Context) -> str | None:
    """What :func:`schema_problem` says of the command's database, None when it cannot say."""
    cli = ctx.find_object(Cli)
    if cli is None or "app" not in cli.__dict__:  # no App was built: no statement failed
        return None
    try:
        return schema_problem(cli.app.engine)
    except SQLAlchemyError:
        return None


@click.group(cls=Commands)
# The installed distribution's version (pyproject.toml's), not a copy kept in the code.
@click.version_option(package_name="dearmp", prog_name="dearmp")
@click.pass_context
def main(ctx: click.Context) -> None:
    """DearMP: every supporter's letter reaches their MP, once."""
    ctx.ensure_object(Cli)
