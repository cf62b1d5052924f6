"""Validation actor: a thin adapter over :mod:`workers.validation`."""

from __future__ import annotations

from typing import Any

import dramatiq

from workers.actors.common import HOUR, NOT_RETRIED, Outcome, run_stage, send_on, together
from workers.app import App
from workers.stages import Stage
from workers.validation import plan


def _work(app: App, ids: list[str]) -> list[Outcome]:
    return together(app, ids, plan, send_on)


@dramatiq.actor(
    queue_name=Stage.VALIDATE.queue,
    actor_name=Stage.VALIDATE.actor,
    max_retries=5,
    min_backoff=500,
    max_backoff=30_000,
    max_age=24 * HOUR,
    time_limit=60_000,
    throws=NOT_RETRIED,
)
def validate_submission(message: dict[str, Any]) -> None:
    run_stage(Stage.VALIDATE, message, _work)
