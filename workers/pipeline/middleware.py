"""Cross-cutting concerns for every actor, as dramatiq middleware."""

from __future__ import annotations

from typing import Any

import dramatiq
import structlog
from dramatiq.errors import ActorNotFound
from dramatiq.middleware import Middleware, MiddlewareError

from schemas.messages import NotAStageMessage, parse_stage_args
from workers.database.engine import session_scope
from workers.letters.mail import TransientDeliveryError
from workers.logging import configure_logging
from workers.pipeline.app import Apps, log_started
from workers.pipeline.dispatch import submission_id_of
from workers.pipeline.failures import Attempt, end_if_failing, record_failure
from workers.pipeline.handoff import Handoff
from workers.stages.stage import Stage

log = structlog.get_logger("workers")


class MessageTooOld(Exception):
    """The reason recorded for a message dead-lettered for its age."""


def reason_of(exception: BaseException) -> BaseException:
    """What failed: for a retry a stage asked for, the error it was asked for."""
    if isinstance(exception, dramatiq.Retry) and exception.__cause__ is not None:
        return exception.__cause__
    return exception


class ForeignMessage(MiddlewareError):
    """A message for a stage actor that is not a stage message (never retried)."""


class StageMessagesOnly(Middleware):
    """Dead-letters at once, before the actor runs, a message for a stage actor whose arguments
    are not a stage message (:class:`ForeignMessage`)."""

    def before_process_message(self, broker: dramatiq.Broker, message: Any) -> None:
        if message.actor_name in STAGE_ACTORS:
            try:
                parse_stage_args(message.args, message.kwargs)
            except NotAStageMessage as exc:
                raise ForeignMessage(str(exc)) from None


STAGE_ACTORS = frozenset(stage.actor for stage in Stage)
ID_NAMES = {stage.actor: stage.id_name for stage in Stage}


class LogContext(Middleware):
    """JSON logs in worker processes (at ``log_level``); the actor, message and submission id
    bound per message."""

    def __init__(self, log_level: str) -> None:
        self.log_level = log_level

    def after_process_boot(self, broker: dramatiq.Broker) -> None:
        configure_logging(self.log_level)

    def before_process_message(self, broker: dramatiq.Broker, message: Any) -> None:
        structlog.contextvars.clear_contextvars()
        id_name = ID_NAMES.get(message.actor_name, "submission_id")
        structlog.contextvars.bind_contextvars(
            actor=message.actor_name,
            message_id=message.message_id,
            **{id_name: submission_id_of(message)},
        )

    def after_process_message(
        self, broker: dramatiq.Broker, message: Any, *, result: Any = None, exception: Any = None
    ) -> None:
        if exception is not None:
            cause = reason_of(exception)
            details = {}
            if isinstance(cause, TransientDeliveryError):  # the server's answer, masked
                details["answer"] = str(cause)[:300]
            log.warning(
                "stage_attempt_failed",
                error=type(cause).__name__,
                retries=message.options.get("retries", 0),
                **details,
            )
        structlog.contextvars.clear_contextvars()

    def after_skip_message(self, broker: dramatiq.Broker, message: Any) -> None:
        structlog.contextvars.clear_contextvars()


class SendHeld(Middleware):
    """A worker that shuts down sends on what its handoff holds: after its threads have finished
    their messages, before the broker is closed."""

    def __init__(self, handoff: Handoff) -> None:
        self.handoff = handoff

    def after_worker_shutdown(self, broker: dramatiq.Broker, worker: Any) -> None:
        self.handoff.flush()


class ProcessApp(Middleware):
    """The worker process's App, built (and logged) as the process boots so that its threads
    share one; its sessions with the mail server ended (QUIT) when the worker shuts down."""

    def __init__(self, apps: Apps) -> None:
        self.apps = apps

    def after_process_boot(self, broker: dramatiq.Broker) -> None:
        log_started(self.apps(), "worker")

    def after_worker_shutdown(self, broker: dramatiq.Broker, worker: Any) -> None:
        try:
            self.apps().mailer.close()
        except Exception as exc:  # shutting down: nothing more to do about it
            log.warning("mail_close_failed", error=type(exc).__name__)


class FailureRecorder(Middleware):
    """Records every failed attempt in the database of ``apps()``; added before Retries, so it
    runs after it (dramatiq calls after-hooks in reverse) and knows whether it dead-lettered."""

    def __init__(self, apps: Apps) -> None:
        self.apps = apps

    def after_process_message(
        self, broker: dramatiq.Broker, message: Any, *, result: Any = None, exception: Any = None
    ) -> None:
        if exception is not None:
            self._record(message, exception)

    def before_enqueue(self, broker: dramatiq.Broker, message: Any, delay: int | None) -> None:
        # A retry goes back to Redis without the traceback dramatiq's Retries put in it: it can
        # quote data, and it is kept here, where erasure and retention reach it.
        message.options.pop("traceback", None)

    def after_skip_message(self, broker: dramatiq.Broker, message: Any) -> None:
        # dramatiq skips a message past its maximum age, and dead-letters it.
        if message.failed:
            self._record(message, MessageTooOld("older than its actor's maximum age"))

    def after_nack(self, broker: dramatiq.Broker, message: Any) -> None:
        # A message for an actor this process does not have is dead-lettered by the consumer,
        # without being processed.
        exception = getattr(message, "_exception", None)
        if isinstance(exception, ActorNotFound):
            self._record(message, exception)

    def _record(self, message: Any, exception: BaseException) -> None:
        exception = reason_of(exception)
        attempt = Attempt(
            message_id=message.message_id,
            queue_name=message.queue_name,
            actor_name=message.actor_name,
            submission_id=submission_id_of(message),
            exception=exception,
            attempts=message.options.get("retries", 0) or 1,
            dead_lettered=bool(message.failed),
        )
        try:
            app = self.apps()
            with session_scope(app.sessions) as session:
                record_failure(session, attempt)
            # Apart: the failure stays recorded whatever happens to the submission meanwhile.
            with session_scope(app.sessions) as session:
                ended = end_if_failing(session, attempt, app.settings.max_dead_letters)
            if ended:
                log.error("submission_failed_repeatedly", stage=message.actor_name)
        except Exception as exc:  # never let bookkeeping take the worker down
            log.error("failure_not_recorded", error=type(exc).__name__)
