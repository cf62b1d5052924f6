"""Delivery actor: a thin adapter over :mod:`workers.delivery`."""

from __future__ import annotations

from typing import Any

import dramatiq

from workers.actors.common import NOT_RETRIED, run_stage
from workers.app import App
from workers.delivery import deliver
from workers.stages import Stage


def _work(app: App, submission_id: str) -> list[Stage]:
    settings = app.settings
    return deliver(
        app.sessions,
        submission_id,
        app.mailer,
        settings.delivery_lease_seconds,
        settings.delivery_max_attempts,
    )


@dramatiq.actor(
    queue_name=Stage.DELIVER.queue,
    actor_name=Stage.DELIVER.actor,
    max_retries=10,
    min_backoff=5_000,
    max_backoff=600_000,
    time_limit=120_000,
    throws=NOT_RETRIED,
)
def deliver_submission(message: dict[str, Any]) -> None:
    run_stage(message, _work)
