"""The ASGI entry point for uvicorn (``dearmp api``): ``workers.web.asgi:application``."""

from __future__ import annotations

from typing import Any

from config.settings import get_settings
from workers.app import App, set_app
from workers.logging import configure_logging
from workers.web.api import API_THREADS, create_app

settings = get_settings()
configure_logging(settings.log_level)
engine_options: dict[str, Any] = {"take_turns": True}  # SQLite: threads queue for the writer
if not settings.resolved_database_url.startswith("sqlite"):
    # One pooled connection per request thread, kept open (no churn of overflow connections),
    # and no ping per checkout: a connection the database dropped fails one request with a 503
    # and is replaced (SQLAlchemy invalidates the pool when it sees a disconnect).
    engine_options = {"pool_size": API_THREADS, "max_overflow": 0, "pool_pre_ping": False}
set_app(App.from_settings(settings, **engine_options))
application = create_app()
