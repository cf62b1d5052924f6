"""Consent logging actor: a thin adapter over :mod:`workers.consent`."""

from __future__ import annotations

from typing import Any

import dramatiq
from sqlalchemy.orm import Session

from workers.actors.common import DAY, NOT_RETRIED, Outcome, run_stage, together
from workers.app import App, get_app
from workers.consent import plan
from workers.stages import Stage
from workers.transitions import Apply


def _plan(session: Session, submission_id: str) -> Apply[int]:
    return plan(session, submission_id, get_app().secret)


def _work(app: App, ids: list[str]) -> list[Outcome]:
    return together(app, ids, _plan)


@dramatiq.actor(
    queue_name=Stage.CONSENT.queue,
    actor_name=Stage.CONSENT.actor,
    max_retries=8,
    min_backoff=1_000,
    max_backoff=120_000,
    max_age=7 * DAY,
    time_limit=60_000,
    throws=NOT_RETRIED,
)
def log_submission_consent(message: dict[str, Any]) -> None:
    run_stage(Stage.CONSENT, message, _work)
