"""Hot statements (workers.sql) give what SQLAlchemy's own execution gives, on both databases."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from sqlalchemy import bindparam, event, exc, insert, select, text, update
from sqlalchemy.orm import Session

from tests.factories import submission
from workers.app import App
from workers.db import session_scope
from workers.delivery import _READ
from workers.intake import accept
from workers.models import EVENTS, LETTERS, SUBMISSIONS
from workers.resolution import LOOKUP
from workers.sql import Hot
from workers.transitions import current


def _stored(app: App) -> str:
    with session_scope(app.sessions) as session:
        return accept(session, submission(), app.secret).submission_id


def test_rows_match_sqlalchemy_with_every_type_processed(app: App) -> None:
    sid = _stored(app)
    columns = ("payload", "created_at", "consent_logged_at", "rejection", "member_id")
    with session_scope(app.sessions) as session:
        hot = current(session, sid, *columns)
        statement = select(
            SUBMISSIONS.c.id, SUBMISSIONS.c.state, *(SUBMISSIONS.c[c] for c in columns)
        ).where(SUBMISSIONS.c.id == sid)
        plain = session.execute(statement).one()
        assert hot.payload == plain.payload and isinstance(hot.payload, dict)
        assert hot.created_at == plain.created_at and hot.created_at.tzinfo is not None
        assert hot.consent_logged_at is None and hot.rejection is None
        assert (hot.id, hot.state) == (plain.id, plain.state)
        assert current(session, "no-such-id") is None
        # A parameter whose value comes from a function gets it at each execution.
        asked = iter([sid, "nobody"])
        by_callable = Hot(
            select(SUBMISSIONS.c.id).where(
                SUBMISSIONS.c.id == bindparam("x", callable_=lambda: next(asked))
            )
        )
        assert by_callable.scalar(session) == sid and by_callable.scalar(session) is None
        # The joined delivery read and the directory lookup (duplicate column names) both work.
        assert _READ.first(session, {"id": sid}).state == "received"
        assert LOOKUP.first(session, {"postcode": "ZZ1 1ZZ"}) is None


def test_writes_fill_python_defaults_and_process_parameters(app: App) -> None:
    sid = _stored(app)
    at = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    record = Hot(insert(EVENTS), columns_from_params=True)
    move = Hot(
        update(SUBMISSIONS)
        .where(SUBMISSIONS.c.id == bindparam("b_id"), SUBMISSIONS.c.state == "received")
        .values(rejection=bindparam("v_rejection"), updated_at=bindparam("v_at"))
    )
    with session_scope(app.sessions) as session:
        assert move.execute(session, {"b_id": sid, "v_rejection": {"x": "y"}, "v_at": at}) == 1
        assert move.execute(session, {"b_id": "nobody", "v_rejection": None, "v_at": at}) == 0
        record.execute(session, {"submission_id": sid, "state": "rejected", "detail": "d"})
        record.executemany(
            session, [{"submission_id": sid, "state": "x", "at": at, "detail": None}] * 2
        )
    with session_scope(app.sessions) as session:
        row = session.execute(select(SUBMISSIONS).where(SUBMISSIONS.c.id == sid)).one()
        assert row.rejection == {"x": "y"} and row.updated_at == at
        events = session.execute(
            select(EVENTS).where(EVENTS.c.submission_id == sid).order_by(EVENTS.c.id)
        ).all()
        assert [e.state for e in events] == ["received", "rejected", "x", "x"]
        assert events[1].at is not None  # the column's Python default (utcnow)
        assert events[2].at == at


def test_driver_errors_come_as_sqlalchemy_errors_and_listeners_run(app: App) -> None:
    sid = _stored(app)
    seen: list[str] = []

    def listen(_c: object, _cur: object, statement: str, *_rest: object) -> None:
        seen.append(statement)

    event.listen(app.engine, "before_cursor_execute", listen)
    try:
        store = Hot(insert(EVENTS), columns_from_params=True)
        row = {"id": 10**6, "submission_id": sid, "state": "x"}
        with session_scope(app.sessions) as session:
            store.execute(session, row)
        with pytest.raises(exc.IntegrityError), session_scope(app.sessions) as session:
            store.execute(session, row)
    finally:
        event.remove(app.engine, "before_cursor_execute", listen)
    assert len(seen) == 2 and seen[0].startswith("INSERT INTO submission_events")
    with pytest.raises(ValueError, match="expanding"), session_scope(app.sessions) as session:
        Hot(select(LETTERS.c.submission_id).where(LETTERS.c.submission_id.in_(["a"]))).first(
            session
        )


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_a_lost_connection_is_invalidated_and_replaced(app: App) -> None:
    probe = Hot(select(SUBMISSIONS.c.id).limit(1))
    with Session(app.engine) as session:
        pid = session.execute(text("SELECT pg_backend_pid()")).scalar()
        with app.engine.connect() as other:
            other.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
        with pytest.raises(exc.OperationalError) as raised:
            probe.first(session)
        assert raised.value.connection_invalidated
    with session_scope(app.sessions) as session:
        probe.first(session)  # the pool gave a new connection
