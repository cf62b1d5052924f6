"""The ASGI entry point for uvicorn (``dearmp api``): the factory ``workers.web.asgi:application``
(``uvicorn --factory``), called once in each uvicorn process."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

from config.settings import get_settings
from workers.logging import configure_logging
from workers.pipeline.app import App, set_app
from workers.web.api import API_THREADS, create_app


def application() -> FastAPI:
    settings = get_settings()
    configure_logging(settings.log_level)
    engine_options: dict[str, Any] = {"take_turns": True}  # SQLite: threads queue for the writer
    if not settings.resolved_database_url.startswith("sqlite"):
        # One pooled connection per request thread, kept open (no churn of overflow
        # connections), and no ping per checkout: a connection the database dropped fails one
        # request with a 503 and is replaced (SQLAlchemy invalidates the pool on a disconnect).
        engine_options = {"pool_size": API_THREADS, "max_overflow": 0, "pool_pre_ping": False}
    set_app(App.from_settings(settings, **engine_options))
    return create_app()
