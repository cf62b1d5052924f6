"""``dearmp watch``'s work per stage: each recorded move counts for the stage acting on the state
it moved from, as the table of states says (on SQLite and PostgreSQL)."""

from __future__ import annotations

from datetime import timedelta

from tests.factories import submission
from workers.database.engine import session_scope
from workers.database.models import SubmissionEvent, utcnow
from workers.pipeline.app import App
from workers.pipeline.dead_letters import _snapshot_from_db
from workers.pipeline.intake import accept


def test_each_move_of_the_last_minute_counts_for_the_stage_it_moved_from(app: App) -> None:
    now = utcnow()
    paths = [
        ["validated", "resolved", "compared", "rendered", "failed"],  # failed: delivery's work
        ["rejected"],  # validation's
        ["validated (old)", "failed"],  # resolution's (validated before the last minute)
    ]
    with session_scope(app.sessions) as session:
        for states in paths:
            sid = accept(session, submission(), app.secret).submission_id
            for state in states:
                at = now - timedelta(minutes=5) if state.endswith("(old)") else now
                session.add(SubmissionEvent(submission_id=sid, state=state.split()[0], at=at))
                session.flush()
    with session_scope(app.sessions) as session:
        per_minute = _snapshot_from_db(session, [], now + timedelta(seconds=1)).per_minute
    assert {stage: n for stage, n in per_minute.items() if n and stage != "consent"} == {
        "validate": 2,
        "resolve": 2,
        "compare": 1,
        "render": 1,
        "deliver": 1,
    }
