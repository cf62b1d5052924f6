"""The ASGI entry point for uvicorn (``dearmp api``): the factory ``workers.web.asgi:application``,
called once per process, builds the App and the broker and gives them to the application. Bad
settings end the process with one line each on stderr: ``ConfigurationError`` is a
``SystemExit``, which uvicorn lets through."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

from config.settings import get_settings
from workers.logging import configure_logging
from workers.pipeline.actors import setup
from workers.pipeline.app import App, log_started
from workers.web.api import API_THREADS, create_app


def application() -> FastAPI:
    settings = get_settings()
    configure_logging(settings.log_level)
    engine_options: dict[str, Any] = {}
    if not settings.resolved_database_url.startswith("sqlite"):
        # One pooled connection per request thread, kept open (no churn of overflow
        # connections), and no ping per checkout: a connection the database dropped fails one
        # request with a 503 and is replaced (SQLAlchemy invalidates the pool on a disconnect).
        engine_options = {"pool_size": API_THREADS, "max_overflow": 0, "pool_pre_ping": False}
    app = App.from_settings(settings, **engine_options)
    log_started(app, "api")
    return create_app(lambda: app, setup(settings, lambda: app))
