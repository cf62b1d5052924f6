"""Delivery actor: a thin adapter over :mod:`workers.delivery`."""

from __future__ import annotations

from typing import Any

import dramatiq

from workers.actors.common import DAY, HOUR, NOT_RETRIED, WRITES, Outcome, one_by_one, run_stage
from workers.app import App
from workers.delivery import deliver, deliver_group
from workers.mail import PermanentDeliveryError, TransientDeliveryError
from workers.stages import Stage


def _deliver(app: App, submission_id: str) -> list[Stage]:
    try:
        return deliver(
            app.sessions,
            submission_id,
            app.mailer,
            app.delivery_policy,
            app.limiter,
            app.signer,
            WRITES,
        )
    except TransientDeliveryError as exc:
        if exc.retry_after is not None:  # the provider said when: honour it
            raise dramatiq.Retry(str(exc), delay=int(exc.retry_after * 1000)) from exc
        raise


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
    if len(ids) == 1:
        return one_by_one(app, ids, _deliver)
    outcomes = deliver_group(
        app.sessions, ids, app.mailer, app.delivery_policy, app.limiter, app.signer, WRITES
    )
    return [(sid, _retry_after(error)) for sid, error in outcomes]


def _retry_after(error: BaseException | None) -> BaseException | None:
    """The provider said when to try again: the letter's own message waits that long."""
    if isinstance(error, TransientDeliveryError) and error.retry_after is not None:
        return dramatiq.Retry(str(error), delay=int(error.retry_after * 1000))
    return error
