"""The ASGI entry point for uvicorn (``dearmp api``): ``workers.web.asgi:application``."""

from __future__ import annotations

from config.settings import get_settings
from workers.logging import configure_logging
from workers.web.api import create_app

configure_logging(get_settings().log_level)
application = create_app()
