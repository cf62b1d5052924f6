"""Cross-cutting concerns for every actor, as dramatiq middleware."""

from __future__ import annotations

from typing import Any

import dramatiq
import structlog
from dramatiq.middleware import Middleware

from config.settings import get_settings
from workers.logging import configure_logging


class LogContext(Middleware):
    """JSON logs in worker processes; the actor, message and submission id bound per message."""

    def after_process_boot(self, broker: dramatiq.Broker) -> None:
        configure_logging(get_settings().log_level)

    def before_process_message(self, broker: dramatiq.Broker, message: Any) -> None:
        structlog.contextvars.clear_contextvars()
        args = message.args
        submission_id = args[0].get("submission_id") if args and isinstance(args[0], dict) else None
        structlog.contextvars.bind_contextvars(
            actor=message.actor_name, message_id=message.message_id, submission_id=submission_id
        )

    def after_process_message(
        self, broker: dramatiq.Broker, message: Any, *, result: Any = None, exception: Any = None
    ) -> None:
        if exception is not None:
            structlog.get_logger("workers").warning(
                "stage_attempt_failed",
                error=type(exception).__name__,
                retries=message.options.get("retries", 0),
            )
        structlog.contextvars.clear_contextvars()

    def after_skip_message(self, broker: dramatiq.Broker, message: Any) -> None:
        structlog.contextvars.clear_contextvars()
