"""Consent logging actor: a thin adapter over :mod:`workers.consent`."""

from __future__ import annotations

from typing import Any

import dramatiq

from workers.actors.common import DAY, NOT_RETRIED, run_stage
from workers.app import App
from workers.consent import log_consent
from workers.db import session_scope
from workers.stages import Stage


def _work(app: App, submission_id: str) -> list[Stage]:
    with session_scope(app.sessions) as session:
        log_consent(session, submission_id, app.secret)
    return []


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
