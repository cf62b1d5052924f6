"""``dearmp console``: what the operators' web console (``/console``) needs set up."""

from __future__ import annotations

import click

from workers.cli.base import Cli, json_option, pass_cli


@click.group()
def console() -> None:
    """The operators' web console (/console): off until DEARMP_CONSOLE_ACCOUNTS is set."""


@console.command("hash-password")
@click.argument("name")
@click.password_option(help="The operator's password (asked for, twice, when not given).")
@json_option
@pass_cli
def hash_password(cli: Cli, name: str, password: str) -> None:
    """An entry for DEARMP_CONSOLE_ACCOUNTS: NAME:HASH (comma-separate several)."""
    from config.settings import CONSOLE_NAME_RE
    from workers.web.console.auth import MAX_PASSWORD, hash_password

    if not CONSOLE_NAME_RE.fullmatch(name):
        raise click.BadParameter("letters, digits, . _ - (64 at most)", param_hint="NAME")
    if not 12 <= len(password) <= MAX_PASSWORD:
        raise click.BadParameter(f"12 to {MAX_PASSWORD} characters", param_hint="password")
    entry = f"{name}:{hash_password(password)}"
    cli.say(entry, {"name": name, "entry": entry})
