"""What every ``dearmp`` command shares: the top-level group, and what commands are given."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import IO, Any

import click
import dramatiq

from config.settings import ConfigurationError, get_settings, problems_of
from workers.logging import configure_logging
from workers.pipeline.app import App, get_app, log_started

# The commands that run the pipeline (or part of it) for as long as they are left to: each
# logs the start-up line. (``api``'s is its ASGI factory's; ``worker``'s its worker processes'.)
RUNNING_COMMANDS = frozenset({"run", "demo", "reconcile", "inbound"})


def app_for_cli(log_file: Path | None = None) -> App:
    """The process's App, with logging set up (to ``log_file``, if given)."""
    settings = get_settings()
    if log_file is not None:
        # The embedded data folder holds personal data: this user's only.
        settings.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        log_file.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        configure_logging(settings.log_level, stream=log_file.open("a", buffering=1))
    else:
        configure_logging(settings.log_level)
    return get_app()


@dataclass
class Cli:
    """The command line's composition root, given to each command as click's context object:
    the App and the broker, each built once, on first use (set ``log_file`` before)."""

    log_file: Path | None = None

    @cached_property
    def app(self) -> App:
        app = app_for_cli(self.log_file)
        command = click.get_current_context(silent=True)
        if command is not None and command.info_name in RUNNING_COMMANDS:
            log_started(app, command.info_name)
        return app

    @cached_property
    def broker(self) -> dramatiq.Broker:
        """The broker that stage messages go on, with the actors declared on it."""
        from workers.pipeline.actors import setup
        from workers.pipeline.dramatiq_private import installed_broker

        # The one set up already in this process (a test's), or this process's own.
        return installed_broker() or setup(self.app.settings, lambda: self.app)


pass_cli = click.make_pass_decorator(Cli, ensure=True)


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
        from sqlalchemy.exc import OperationalError

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
        except OperationalError as exc:
            raise click.ClickException(
                f"cannot reach the database ({type(exc.orig).__name__}); check DATABASE_URL."
            ) from None


@click.group(cls=Commands)
@click.pass_context
def main(ctx: click.Context) -> None:
    """DearMP: every supporter's letter reaches their MP, once."""
    ctx.ensure_object(Cli)
