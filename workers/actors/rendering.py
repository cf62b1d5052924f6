"""Rendering actor: a thin adapter over :mod:`workers.rendering`."""

from __future__ import annotations

from typing import Any

import dramatiq
from sqlalchemy.orm import Session

from workers.actors.common import HOUR, NOT_RETRIED, Outcome, run_stage, send_on, together
from workers.app import App, get_app
from workers.rendering import plan
from workers.stages import Stage
from workers.transitions import Apply


def _plan(session: Session, submission_id: str) -> Apply[list[Stage]]:
    app = get_app()
    return plan(session, submission_id, app.mailer.name, app.settings.sandbox_address, app.signer)


def _work(app: App, ids: list[str]) -> list[Outcome]:
    return together(app, ids, _plan, send_on)


@dramatiq.actor(
    queue_name=Stage.RENDER.queue,
    actor_name=Stage.RENDER.actor,
    max_retries=5,
    min_backoff=500,
    max_backoff=30_000,
    max_age=24 * HOUR,
    time_limit=60_000,
    throws=NOT_RETRIED,
)
def render_submission(message: dict[str, Any]) -> None:
    run_stage(Stage.RENDER, message, _work)
