"""``dearmp api``, the HTTP intake on uvicorn, and ``dearmp console``, what the operators' web
console (``/console``) needs set up."""

from __future__ import annotations

import click

from workers.cli.base import Cli, app_for_cli, command, main
from workers.database.engine import check_schema


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=int)
@click.option("--workers", default=1, show_default=True, type=int, help="uvicorn processes.")
def api(host: str, port: int, workers: int) -> None:
    """Serve the HTTP intake (OpenAPI description at /openapi.json, demo page at /demo/SLUG)."""
    import uvicorn

    # Logging configured, settings and the database's migration checked, before uvicorn starts.
    engine = app_for_cli().engine
    check_schema(engine)
    engine.dispose()  # no connection held open in uvicorn's supervisor
    uvicorn.run(
        "workers.web.asgi:application",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        access_log=False,  # our own access log has no client addresses or tokens
        proxy_headers=True,
        server_header=False,
        log_level="warning",
    )


@main.group()
def console() -> None:
    """The operators' web console (/console): off until DEARMP_CONSOLE_ACCOUNTS is set."""


@command(console, "hash-password")
@click.argument("name")
@click.password_option(help="The operator's password (asked for, twice, when not given).")
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
