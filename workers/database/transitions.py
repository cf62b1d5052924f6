"""Guarded state transitions: the database decides which worker moves a submission on.

The stages read and write with SQLAlchemy Core statements built once per process (building
one and computing its cache key costs more than running it), and a group of submissions is
read with one statement and written with one statement of each kind.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from functools import cache
from typing import Any, NamedTuple, Protocol, TypeVar, cast

import structlog
from sqlalchemy import CursorResult, Executable, Result, Select, Update, bindparam, insert, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from workers.database.engine import session_scope
from workers.database.models import CAMPAIGNS, EVENTS, SUBMISSIONS, State, Submission, utcnow
from workers.logging import bound
from workers.pipeline.states import MOVES, moves_from
from workers.webhooks import events as webhooks

# RETURNING makes SQLAlchemy send a group's rows as one multi-row INSERT ("insertmanyvalues")
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


def current(session: Session, submission_id: str, read: Select[Any] | None = None) -> Any:
    """The submission's row read by ``read`` (by default :data:`SUBMISSION`), None if there is
    no such one; with its campaign's ``definition_sha256`` and ``mode`` (for ``get_definition``)."""
    found = read_one(session, SUBMISSION if read is None else read, submission_id)
    if found is None:  # deleted since (retention), or this process is on another database
        structlog.get_logger(__name__).warning("submission_not_found", submission_id=submission_id)
    return found


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


@cache
def _by_id(statement: Select[Any]) -> Select[Any]:
    return statement.where(SUBMISSIONS.c.id == bindparam("id"))


@cache
def _by_ids(statement: Select[Any]) -> Select[Any]:
    ids: Any = bindparam("ids", expanding=True)
    return statement.where(SUBMISSIONS.c.id.in_(ids))


def read_one(session: Session, statement: Select[Any], submission_id: str) -> Any:
    """``statement``'s row for one submission, None if there is none (``statement`` selects
    ``submissions.id`` first). In a group, every member's row is read with one statement, the
    first time one of them is asked for."""
    group = group_of(session)
    if group is None or submission_id not in group.members:
        return session.execute(_by_id(statement), {"id": submission_id}).first()
    rows = group.read.get(statement)
    if rows is None:
        found = session.execute(_by_ids(statement), {"ids": group.ids})
        rows = group.read[statement] = {row[0]: row for row in found}
    return rows.get(submission_id)


@cache
def _move_statement(names: tuple[str, ...]) -> Update:
    """The guarded move writing the columns ``names`` (besides the state and its times)."""
    changed = ("state", "updated_at", "dispatched_at", *names)
    changes: dict[str, Any] = {name: bindparam(f"v_{name}") for name in changed}
    return guarded_update(SUBMISSIONS.c.state == bindparam("b_state"), changes)


def guarded_update(guard: Any, changes: dict[str, Any]) -> Update:
    """A change of one submission (``b_id``) made only where ``guard`` holds, for
    :meth:`GroupWrites.guard`. A group's changes alike but for their ids are made as one UPDATE
    (``b_ids``), which locks its rows in the order of their ids as the changes one at a time do
    (PostgreSQL would otherwise lock them in the table's order, and deadlock with another
    stage's group)."""
    one = SUBMISSIONS.update().where(SUBMISSIONS.c.id == bindparam("b_id"), guard).values(changes)
    ids: Any = bindparam("b_ids", expanding=True)
    locked = select(SUBMISSIONS.c.id).where(SUBMISSIONS.c.id.in_(ids))
    locked = locked.order_by(SUBMISSIONS.c.id).with_for_update()
    _for_ids[one] = SUBMISSIONS.update().where(SUBMISSIONS.c.id.in_(locked), guard).values(changes)
    return one


_for_ids: dict[Update, Update] = {}


@cache
def _returning_key(statement: Any) -> Any:
    """The INSERT returning its key, so that a group's rows go as one multi-row INSERT."""
    return statement.returning(*statement.table.primary_key)


Batched = dict[int, tuple[Executable, list[dict[str, Any]]]]


@dataclass(eq=False)
class GroupWrites:
    """A group's writes, collected while its submissions are written and made at the end with
    one statement of each kind: the guarded changes (each must match one row), the inserts in
    the order their kinds came, the events, then each writer's rows (the consent ledger)."""

    now: datetime = field(default_factory=utcnow)  # the time of the group's moves and events
    guarded: Batched = field(default_factory=dict)
    inserts: Batched = field(default_factory=dict)
    events: list[dict[str, Any]] = field(default_factory=list)
    later: dict[Callable[[Session, list[Any]], Any], list[Any]] = field(default_factory=dict)

    def guard(self, statement: Executable, params: dict[str, Any]) -> None:
        self.guarded.setdefault(id(statement), (statement, []))[1].append(params)

    def insert(self, statement: Executable, params: dict[str, Any]) -> None:
        self.inserts.setdefault(id(statement), (statement, []))[1].append(params)

    def collect(self, write: Callable[[Session, list[Any]], Any], rows: list[Any]) -> None:
        """Rows for ``write``, which gets all of the group's at the end, in order."""
        self.later.setdefault(write, []).extend(rows)

    def flush(self, session: Session) -> None:
        """Make the writes; :class:`AlreadyMoved` when a guarded change matched nothing
        (another worker moved that submission first)."""
        for statement, params in self.guarded.values():
            if rowcount(session.execute(*_alike(statement, params))) != len(params):
                raise AlreadyMoved("a submission of the group")
        for statement, params in self.inserts.values():
            session.execute(_returning_key(statement), params)
        if self.events:
            session.execute(RECORD_EVENT, self.events)
        for write, rows in self.later.items():
            write(session, rows)


def _alike(statement: Executable, params: list[dict[str, Any]]) -> tuple[Executable, Any]:
    """A group's guarded changes of one kind: moves alike but for their ids as one UPDATE,
    else one row at a time (in the order of the ids)."""
    many = _for_ids.get(statement)  # type: ignore[call-overload]
    rest = [{name: value for name, value in row.items() if name != "b_id"} for row in params]
    if many is None or len(params) < 2 or any(row != rest[0] for row in rest):
        return statement, params
    return many, {**rest[0], "b_ids": [row["b_id"] for row in params]}


@dataclass(eq=False)
class Group:
    """The submissions one transaction decides, then writes, together: a message's. ``read``:
    what was read for all of them, by the statement that read it; ``writes``, set once every
    decision is made."""

    ids: list[str]
    read: dict[Any, Any] = field(default_factory=dict)
    writes: GroupWrites | None = None

    def __post_init__(self) -> None:
        self.members = frozenset(self.ids)


_GROUP = "workers.database.transitions.group"  # session.info: the Group being decided, written


def group_of(session: Session) -> Group | None:
    """The group ``session`` is deciding or writing, if any (kept in ``Session.info``)."""
    group: Group | None = session.info.get(_GROUP)
    return group


@contextmanager
def together(session: Session, submission_ids: Sequence[str], writing: bool) -> Iterator[None]:
    """A group (a stage's, or the outbox's items of one message): its rows are read together
    and its writes, if any (``writing``, or set meanwhile), made together when it ends."""
    group = session.info[_GROUP] = Group(sorted(set(submission_ids)))
    group.writes = GroupWrites() if writing else None
    try:
        yield
        if group.writes is not None:
            group.writes.flush(session)
    finally:
        del session.info[_GROUP]


def writes_of(session: Session) -> GroupWrites:
    """The writes of the group ``session`` is writing (every stage runs in one)."""
    group = group_of(session)
    if group is None or group.writes is None:
        raise RuntimeError("a stage's write outside its group's write step")
    return group.writes


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
    A move the table of states does not allow is refused (:class:`NotAMove`). In a group being
    written (but for an ORM object), it is made with the group's other writes.
    """
    if (submission.state, to_state) not in MOVES:
        allowed = ", ".join(moves_from(State(submission.state))) or "none"
        raise NotAMove(f"{submission.state} -> {to_state.value} (allowed: {allowed})")
    group = group_of(session)
    writes = None if group is None else group.writes
    now = writes.now if writes is not None else utcnow()
    statement = _move_statement(tuple(sorted(fields)))
    values = {"state": to_state.value, "updated_at": now, "dispatched_at": now, **fields}
    params = {f"v_{name}": value for name, value in values.items()}
    change = {"b_id": submission.id, "b_state": submission.state, **params}
    event = {"submission_id": submission.id, "state": to_state.value, "at": now, "detail": detail}
    if writes is not None and not isinstance(submission, Submission):
        writes.guard(statement, change)
        writes.events.append(event)
        webhooks.on_move(session, submission, to_state, now, writes)
        return
    if rowcount(session.execute(statement, change)) != 1:
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

    Every decision first (no writes), then every write, in the order of the ids, so that two
    transactions that touch the same submissions take their row locks in the same order and
    cannot deadlock. A decision that fails fails its submission only. When any write fails (a
    guarded change matched nothing: :class:`AlreadyMoved`), the transaction is rolled back and
    each submission runs again alone: one submission cannot fail its neighbours."""
    ids = sorted(set(submission_ids))
    try:
        with session_scope(sessions) as session:
            return in_group(session, ids, plan)
    except Exception as exc:
        if len(ids) == 1:
            return [(ids[0], None, exc)]
        structlog.get_logger(__name__).warning(
            "group_failed_running_alone", size=len(ids), error=type(exc).__name__
        )
    outcomes: list[Outcome[T]] = []
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
    caller commits, or rolls back on an error such as :class:`AlreadyMoved`)."""
    with together(session, submission_ids, writing=False):
        group: Group = session.info[_GROUP]
        decided: list[tuple[str, Apply[T] | None, BaseException | None]] = []
        for sid in group.ids:
            with bound(submission_id=sid):
                try:
                    decided.append((sid, plan(session, sid), None))
                except SQLAlchemyError:  # the transaction may be spent: each runs again alone
                    raise
                except Exception as exc:  # a decision writes nothing: the others go on
                    decided.append((sid, None, exc))
        group.writes = GroupWrites()  # made when the group ends
        outcomes: list[Outcome[T]] = []
        for sid, write, error in decided:
            with bound(submission_id=sid):
                try:
                    outcomes.append((sid, None if write is None else write(session), error))
                except AlreadyMoved as moved:  # its guarded change matched nothing
                    outcomes.append((sid, None, moved))
    return outcomes


def one(session: Session, submission_id: str, plan: Callable[[Session, str], Apply[T]]) -> T:
    """A stage's decision and writes for one submission in ``session``'s transaction, as the
    pipeline makes them (a group of one); its error is raised."""
    [(_, value, error)] = in_group(session, [submission_id], plan)
    if error is not None:
        raise error
    return value  # type: ignore[return-value]  # set whenever error is None
