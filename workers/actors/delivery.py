"""Delivery actor: a thin adapter over :mod:`workers.delivery`."""

from __future__ import annotations

from typing import Any

import dramatiq

from workers.actors.common import DAY, HOUR, NOT_RETRIED, Outcome, run_stage
from workers.app import App
from workers.delivery import deliver_group
from workers.mail import PermanentDeliveryError, TransientDeliveryError
from workers.stages import Stage


@dramatiq.actor(
    queue_name=Stage.DELIVER.queue,
    actor_name=Stage.DELIVER.actor,
    max_retries=10,
    min_backoff=5_000,
    max_backoff=600_000,
    max_age=7 * DAY - HOUR,
    time_limit=120_000,
    # A permanent refusal is recorded on the submission, then dead-lettered for an operator.
    throws=(*NOT_RETRIED, PermanentDeliveryError),
)
def deliver_submission(message: dict[str, Any]) -> None:
    run_stage(Stage.DELIVER, message, _work)


def _work(app: App, ids: list[str]) -> list[Outcome]:
    # Alone, a permanent refusal is recorded at once and dead-lettered; in a group, the letter
    # goes on in a message of its own first (see deliver_group).
    outcomes = deliver_group(
        app.sessions, ids, app.mailer, app.delivery_policy, app.limiter, app.signer
    )
    return [(sid, _retry(error)) for sid, error in outcomes]


def _retry(error: BaseException | None) -> BaseException | None:
    """A passing refusal (a 4xx, a server away) is an expected outcome, not a crash: it goes
    back to dramatiq as a retry, which dramatiq does not log as an error (the warning with the
    server's answer is :class:`workers.middleware.LogContext`'s). When the provider said when
    to try again, the letter's message waits that long."""
    if isinstance(error, TransientDeliveryError):
        later = None if error.retry_after is None else int(error.retry_after * 1000)
        retry = dramatiq.Retry(str(error), delay=later)
        retry.__cause__ = error
        return retry
    return error
