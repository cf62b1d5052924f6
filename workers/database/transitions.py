"""Guarded state transitions: the database decides which worker moves a submission on.

The stages read and write with SQLAlchemy Core on the tables (one statement each, compiled once
per process), not through ORM objects: a stage is a few statements, and the ORM's unit of work
cost more than the statements themselves.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, NamedTuple, Protocol, TypeVar, cast

import structlog
from sqlalchemy import CursorResult, Executable, Result, Select, Update, bindparam, insert, select
from sqlalchemy.orm import Session, sessionmaker

from workers.database.engine import session_scope
from workers.database.models import CAMPAIGNS, EVENTS, SUBMISSIONS, State, Submission, utcnow
from workers.logging import bound
from workers.pipeline.states import MOVES, moves_from
from workers.webhooks import events as webhooks

# RETURNING makes SQLAlchemy send a group's events as one multi-row INSERT ("insertmanyvalues")
# rather than a statement per row.
RECORD_EVENT = insert(EVENTS).returning(EVENTS.c.id)


def rowcount(result: Result[Any]) -> int:
    """Rows matched by an UPDATE (``Session.execute`` is typed as returning a plain Result)."""
    return cast("CursorResult[Any]", result).rowcount


T = TypeVar("T")

# A stage in two steps: from its reads, it decides (no writes, no lock: rendering, hashing and
# parsing happen here) and returns what to write, a function run in the write transaction.
Apply = Callable[[Session], T]


def done(value: T) -> Apply[T]:
    """Nothing to write: the stage's answer is ``value``."""
    return lambda _session: value


def move(
    submission: Current,
    to_state: State,
    detail: str | None = None,
    then: Sequence[Any] = (),
    **fields: Any,
) -> Apply[list[Any]]:
    """Write the guarded move to ``to_state``; the answer is ``then`` (the stages to send it to)."""

    def write(session: Session) -> list[Any]:
        advance(session, submission, to_state, detail, **fields)
        return list(then)

    return write


class AlreadyMoved(Exception):
    """Another worker moved the submission first; this attempt has nothing left to do."""


class NotAMove(RuntimeError):
    """A move the table of states (:mod:`workers.pipeline.states`) does not have: a bug in the
    code that asked for it, not something to retry."""


class Current(Protocol):
    """What :func:`advance` needs to know of a submission: its id and the state it was read in."""

    @property
    def id(self) -> str: ...

    @property
    def state(self) -> str: ...


class At(NamedTuple):
    """A submission known to be in ``state`` (without reading the rest of it)."""

    id: str
    state: str


# A move's statement for each set of columns it writes, and below a read's for one submission
# and for a group, built once each. SQLAlchemy's compiled cache compiles a statement once
# however often it is built, but building one and computing its cache key (40 to 100 µs,
# against 0.3 µs for a statement kept) is paid on every call: built anew, the stages' reads and
# moves cost the workers up to 1 ms more a submission (docs/performance.md, SQLite's section).
# A group's moves are also made together by statement (GroupWrites).
_moves: dict[tuple[str, ...], Update] = {}
# The same move for a group whose moves are alike but for their ids (``b_ids``), by the
# statement for one: one UPDATE, which locks its rows in the order of their ids as the moves one
# at a time do (PostgreSQL would otherwise lock them in the table's order, and deadlock with
# another stage's group).
_for_ids: dict[Update, Update] = {}


def current(session: Session, submission_id: str, read: Select[Any] | None = None) -> Any:
    """The submission's row read by ``read`` (:func:`submission_read`; by default its id, state
    and campaign), None if there is no such one. It has the campaign's ``definition_sha256``
    and ``mode`` (None if the campaign is gone), so that
    :func:`workers.letters.definitions.get_definition` needs no statement of its own."""
    return read_one(session, SUBMISSION if read is None else read, submission_id)


def submission_read(*columns: str) -> Select[Any]:
    """A submission's id, state, campaign and ``columns``, with its campaign's version (for
    :func:`read_one`; a stage may add columns and joins to it)."""
    return select(
        SUBMISSIONS.c.id,
        SUBMISSIONS.c.state,
        SUBMISSIONS.c.campaign_slug,
        CAMPAIGNS.c.definition_sha256,
        CAMPAIGNS.c.mode,
        *(SUBMISSIONS.c[name] for name in columns),
    ).select_from(SUBMISSIONS.outerjoin(CAMPAIGNS, CAMPAIGNS.c.slug == SUBMISSIONS.c.campaign_slug))


# Reads built once, as module constants: a group's rows are kept by the statement that read them.
SUBMISSION = submission_read()
WITH_PAYLOAD = submission_read("payload")


def read_one(session: Session, statement: Select[Any], submission_id: str) -> Any:
    """``statement``'s row for one submission (None if there is none). ``statement`` selects
    ``submissions.id`` first, from a FROM clause that has the submissions table. While
    ``session`` is deciding a group (:func:`run_group`), the rows of every submission of the
    group are read with one statement, the first time one of them is asked for."""
    group = group_of(session)
    if group is None or submission_id not in group.members:
        one = _by_id.get(statement)
        if one is None:
            one = _by_id[statement] = statement.where(SUBMISSIONS.c.id == bindparam("id"))
        return session.execute(one, {"id": submission_id}).first()
    rows = group.read.get(statement)
    if rows is None:
        many = _by_ids.get(statement)
        if many is None:
            ids: Any = bindparam("ids", expanding=True)
            many = _by_ids[statement] = statement.where(SUBMISSIONS.c.id.in_(ids))
        found = session.execute(many, {"ids": group.ids})
        rows = group.read[statement] = {row[0]: row for row in found}
    return rows.get(submission_id)


_by_id: dict[Select[Any], Select[Any]] = {}
_by_ids: dict[Select[Any], Select[Any]] = {}
_GROUP = "workers.database.transitions.group"  # session.info: the Group being decided, written


class GroupWrites:
    """A group's writes, collected while its submissions are written (:func:`run_group`) and
    made with one statement of each kind at the end, instead of a few statements per
    submission: the guarded changes (each must match one row), then the inserts in the order
    their kinds came, then the events, then what was collected for a writer of its own (the
    consent ledger)."""

    def __init__(self) -> None:
        self.now = utcnow()  # the time of the group's moves and events
        self.guarded: dict[int, tuple[Executable, list[dict[str, Any]]]] = {}
        self.inserts: dict[int, tuple[Executable, list[dict[str, Any]]]] = {}
        self.events: list[dict[str, Any]] = []
        self.later: dict[Callable[[Session, list[Any]], Any], list[Any]] = {}

    def guard(self, statement: Executable, params: dict[str, Any]) -> None:
        self.guarded.setdefault(id(statement), (statement, []))[1].append(params)

    def insert(self, statement: Executable, params: dict[str, Any]) -> None:
        self.inserts.setdefault(id(statement), (statement, []))[1].append(params)

    def collect(self, write: Callable[[Session, list[Any]], Any], rows: list[Any]) -> None:
        """Rows for ``write``, which gets all of the group's at the end, in order (the consent
        ledger chains a group's events with one head read and one statement)."""
        self.later.setdefault(write, []).extend(rows)

    def flush(self, session: Session) -> None:
        """Make the writes; :class:`AlreadyMoved` when a guarded change matched nothing
        (another worker moved that submission first: the caller runs each submission again
        alone)."""
        for statement, params in self.guarded.values():
            if rowcount(session.execute(*_alike(statement, params))) != len(params):
                raise AlreadyMoved("a submission of the group")
        for statement, params in self.inserts.values():
            session.execute(_one_statement(statement), params)
        if self.events:
            session.execute(RECORD_EVENT, self.events)
        for write, rows in self.later.items():
            write(session, rows)


def _alike(statement: Executable, params: list[dict[str, Any]]) -> tuple[Executable, Any]:
    """A group's guarded changes of one kind: moves alike but for their ids as one UPDATE,
    else one row at a time (in the order of the ids)."""
    many = _for_ids.get(statement)  # type: ignore[call-overload]
    if many is None or len(params) < 2:
        return statement, params
    first = {name: value for name, value in params[0].items() if name != "b_id"}
    for row in params[1:]:
        if {name: value for name, value in row.items() if name != "b_id"} != first:
            return statement, params
    return many, {**first, "b_ids": [row["b_id"] for row in params]}


def _one_statement(statement: Any) -> Any:
    """The INSERT returning its key: SQLAlchemy then sends a group's rows as one multi-row
    INSERT ("insertmanyvalues") rather than a statement per row, as for the events."""
    found = _returning.get(statement)
    if found is None:
        found = _returning[statement] = statement.returning(*statement.table.primary_key)
    return found


_returning: dict[Any, Any] = {}


class Group:
    """The submissions one transaction decides and then writes together (:func:`in_group`): a
    message's, however many it carries (one is a group of one). ``read``: what was read for all
    of them, by the statement that read it (:func:`read_one`; resolution's directory lookup).
    ``writes`` is set once every decision is made: the writes happen after them all."""

    def __init__(self, ids: list[str]) -> None:
        self.ids = ids
        self.members = frozenset(ids)
        self.read: dict[Any, Any] = {}
        self.writes: GroupWrites | None = None


def group_of(session: Session) -> Group | None:
    """The group ``session`` is deciding or writing, if any (kept in ``Session.info``, which
    SQLAlchemy gives applications for what belongs to a session)."""
    group: Group | None = session.info.get(_GROUP)
    return group


@contextmanager
def together(session: Session, submission_ids: Sequence[str], writing: bool) -> Iterator[None]:
    """A group outside :func:`in_group` (the outbox's items of one message): while in it,
    :func:`read_one` reads these submissions' rows with one statement, and, ``writing``, the
    moves are made with one statement of each kind when it ends (:class:`GroupWrites`, which
    raises :class:`AlreadyMoved` if one of them was moved meanwhile)."""
    group = session.info[_GROUP] = Group(sorted(set(submission_ids)))
    group.writes = GroupWrites() if writing else None
    try:
        yield
        if group.writes is not None:
            group.writes.flush(session)
    finally:
        del session.info[_GROUP]


def group_writes(session: Session) -> GroupWrites | None:
    """The group's writes when ``session`` is writing a group (see :class:`GroupWrites`); None
    outside one (an operator's command) and while the group is still deciding."""
    group = group_of(session)
    return None if group is None else group.writes


def writes_of(session: Session) -> GroupWrites:
    """The writes of the group ``session`` is writing: a stage's writes are made with its
    group's (every stage runs in one, :func:`in_group`)."""
    writes = group_writes(session)
    if writes is None:
        raise RuntimeError("a stage's write outside its group's write step")
    return writes


def advance(
    session: Session,
    submission: Current,
    to_state: State,
    detail: str | None = None,
    **fields: Any,
) -> None:
    """Move ``submission`` from the state it was read in to ``to_state``; record the transition.

    The UPDATE is conditional on the state this worker read, so of two workers running the same
    message only one succeeds; the other gets :class:`AlreadyMoved` and its transaction rolls back.
    A move the table of states does not allow is refused (:class:`NotAMove`).
    """
    if (submission.state, to_state) not in MOVES:
        allowed = ", ".join(moves_from(State(submission.state))) or "none"
        raise NotAMove(f"{submission.state} -> {to_state.value} (allowed: {allowed})")
    writes = group_writes(session)
    now = writes.now if writes is not None else utcnow()
    names = tuple(sorted(fields))
    statement = _moves.get(names)
    if statement is None:
        changed = ("state", "updated_at", "dispatched_at", *names)
        changes: dict[str, Any] = {name: bindparam(f"v_{name}") for name in changed}
        guard = SUBMISSIONS.c.state == bindparam("b_state")
        statement = _moves[names] = (
            SUBMISSIONS.update().where(SUBMISSIONS.c.id == bindparam("b_id"), guard).values(changes)
        )
        ids: Any = bindparam("b_ids", expanding=True)
        locked = (
            select(SUBMISSIONS.c.id)
            .where(SUBMISSIONS.c.id.in_(ids))
            .order_by(SUBMISSIONS.c.id)
            .with_for_update()
        )
        _for_ids[statement] = (
            SUBMISSIONS.update().where(SUBMISSIONS.c.id.in_(locked), guard).values(changes)
        )
    values = {"state": to_state.value, "updated_at": now, "dispatched_at": now, **fields}
    params = {f"v_{name}": value for name, value in values.items()}
    move = {"b_id": submission.id, "b_state": submission.state, **params}
    event = {"submission_id": submission.id, "state": to_state.value, "at": now, "detail": detail}
    if writes is not None and not isinstance(submission, Submission):
        writes.guard(statement, move)  # made with the group's other writes
        writes.events.append(event)
        webhooks.on_move(session, submission, to_state, now, writes)
        return
    if rowcount(session.execute(statement, move)) != 1:
        raise AlreadyMoved(submission.id)
    session.execute(RECORD_EVENT, event)
    webhooks.on_move(session, submission, to_state, now)  # nothing read without endpoints
    if isinstance(submission, Submission):
        session.expire(submission)


# A submission of a group, with what its stage answered or the error that stopped it.
Outcome = tuple[str, T | None, BaseException | None]


def run_group(
    sessions: sessionmaker[Session],
    submission_ids: Sequence[str],
    plan: Callable[[Session, str], Apply[T]],
) -> list[Outcome[T]]:
    """A stage's work for the submissions of one message, in one transaction of its own.

    Every decision first (reads, parsing, rendering: no writes), then every write, in the order
    of the ids, so that two transactions that touch the same submissions take their row locks in
    the same order and cannot deadlock. A group's rows are read with one statement and its
    writes made with one statement of each kind (:class:`GroupWrites`). A submission whose
    decision fails gets its error and the others go on. When a guarded change matches nothing
    (another worker moved that submission first) or any write fails, the transaction is rolled
    back and each submission runs again alone, in a transaction of its own, where one already
    moved is told so (:class:`AlreadyMoved`) and writes nothing: one submission cannot fail its
    neighbours."""
    ids = sorted(set(submission_ids))
    try:
        with session_scope(sessions) as session:
            outcomes = in_group(session, ids, plan)
    except Exception as exc:
        if len(ids) == 1:
            return [(ids[0], None, exc)]
        structlog.get_logger(__name__).warning(
            "group_failed_running_alone", size=len(ids), error=type(exc).__name__
        )
        outcomes = []
        for sid in ids:
            try:
                with session_scope(sessions) as session:
                    outcomes += in_group(session, [sid], plan)
            except Exception as alone:
                outcomes.append((sid, None, alone))
    return outcomes


def in_group(
    session: Session, submission_ids: Sequence[str], plan: Callable[[Session, str], Apply[T]]
) -> list[Outcome[T]]:
    """Decide, then write, the submissions as one group in ``session``'s transaction (the
    caller commits, or rolls back on an error: a guarded change that matched nothing raises
    :class:`AlreadyMoved` when the group's writes are made)."""
    ids = sorted(set(submission_ids))
    group = session.info[_GROUP] = Group(ids)
    try:
        decided = [(sid, *_decide(session, sid, plan)) for sid in ids]
        group.writes = GroupWrites()
        outcomes = [_write(session, sid, write, error) for sid, write, error in decided]
        group.writes.flush(session)
    finally:
        del session.info[_GROUP]
    return outcomes


def one(session: Session, submission_id: str, plan: Callable[[Session, str], Apply[T]]) -> T:
    """A stage's decision and writes for one submission in ``session``'s transaction, as the
    pipeline makes them (a group of one); its error is raised."""
    [(_, value, error)] = in_group(session, [submission_id], plan)
    if error is not None:
        raise error
    return value  # type: ignore[return-value]  # set whenever error is None


def _decide(
    session: Session, submission_id: str, plan: Callable[[Session, str], Apply[T]]
) -> tuple[Apply[T] | None, BaseException | None]:
    with bound(submission_id=submission_id):
        try:
            return plan(session, submission_id), None
        except Exception as exc:  # a decision writes nothing: the others go on
            return None, exc


def _write(
    session: Session, submission_id: str, write: Apply[T] | None, error: BaseException | None
) -> Outcome[T]:
    if write is None:
        return submission_id, None, error
    with bound(submission_id=submission_id):
        try:
            return submission_id, write(session), None
        except AlreadyMoved as moved:  # its guarded change matched nothing: nothing written
            return submission_id, None, moved
