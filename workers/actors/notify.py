"""Sender-confirmation actor: a thin adapter over :mod:`workers.confirmation`."""

from __future__ import annotations

from typing import Any

import dramatiq

from workers.actors.common import DAY, NOT_RETRIED, Outcome, one_by_one, run_stage
from workers.app import App
from workers.confirmation import ConfirmationPolicy, notify
from workers.db import session_scope
from workers.stages import Stage


def _notify(app: App, submission_id: str) -> list[Stage]:
    with session_scope(app.sessions) as session:
        return notify(
            session,
            submission_id,
            app.mailer,
            app.secret,
            ConfirmationPolicy.from_settings(app.settings),
        )


@dramatiq.actor(
    queue_name=Stage.NOTIFY.queue,
    actor_name=Stage.NOTIFY.actor,
    max_retries=10,
    min_backoff=5_000,
    max_backoff=600_000,
    max_age=DAY,
    time_limit=60_000,
    throws=NOT_RETRIED,
)
def notify_submission(message: dict[str, Any]) -> None:
    run_stage(Stage.NOTIFY, message, _work)


def _work(app: App, ids: list[str]) -> list[Outcome]:
    return one_by_one(app, ids, _notify)
