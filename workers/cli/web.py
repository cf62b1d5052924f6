"""``dearmp api``: the HTTP intake on uvicorn."""

from __future__ import annotations

import click

from workers.cli.base import app_for_cli


@click.command("api")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=int)
@click.option("--workers", default=1, show_default=True, type=int, help="uvicorn processes.")
def api(host: str, port: int, workers: int) -> None:
    """Serve the HTTP intake (OpenAPI description at /openapi.json, demo page at /demo/SLUG)."""
    import uvicorn

    app_for_cli()  # logging configured, settings checked, before uvicorn starts
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
