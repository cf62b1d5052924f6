"""MP resolution actor: a thin adapter over :mod:`workers.resolution`."""

from __future__ import annotations

from typing import Any

import dramatiq
from sqlalchemy.orm import Session

from workers.actors.common import HOUR, NOT_RETRIED, Outcome, run_stage, send_on, together
from workers.app import App, get_app
from workers.resolution import plan, warm_live
from workers.stages import Stage
from workers.transitions import Apply


def _plan(session: Session, submission_id: str) -> Apply[list[Stage]]:
    app = get_app()
    return plan(session, submission_id, app.settings.resolution_order, app.live_sources)


def _work(app: App, ids: list[str]) -> list[Outcome]:
    # Live answers are fetched before any transaction; a source that fails one submission
    # fails that submission alone.
    order = app.settings.resolution_order
    ready, failed = [], []
    for submission_id in ids:
        try:
            warm_live(app.sessions, submission_id, order, app.live_sources)
        except Exception as exc:
            failed.append((submission_id, exc))
            continue
        ready.append(submission_id)
    return failed + (together(app, ready, _plan, send_on) if ready else [])


@dramatiq.actor(
    queue_name=Stage.RESOLVE.queue,
    actor_name=Stage.RESOLVE.actor,
    max_retries=8,
    min_backoff=1_000,
    max_backoff=120_000,
    max_age=24 * HOUR,
    time_limit=60_000,
    throws=NOT_RETRIED,
)
def resolve_submission(message: dict[str, Any]) -> None:
    run_stage(Stage.RESOLVE, message, _work)
