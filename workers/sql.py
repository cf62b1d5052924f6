"""The stages' statements, compiled once per dialect and run straight on the driver's cursor.

A stage is a handful of small statements, and SQLAlchemy's execution path (an execution
context, a result object, the ORM session's bookkeeping) cost about 100 µs each, ten times the
statement itself on SQLite. :class:`Hot` keeps what matters of that path and drops the rest:

- the SQL is SQLAlchemy's own compilation of a Core statement, for the session's dialect;
- parameters go through each column type's bind processor, and result columns through their
  result processor, exactly as SQLAlchemy would apply them (``UTCDateTime``, JSON, ...);
- Python-side column defaults (``created_at=utcnow``) are filled in for INSERTs and UPDATEs;
- the engine's ``before_cursor_execute`` listeners run first (SQLite's lazy write lock in
  :mod:`workers.db` lives there);
- a driver error is raised as SQLAlchemy's wrapper (``IntegrityError``, ``OperationalError``),
  and a lost connection is invalidated so that the pool replaces it.

It runs on the session's connection, inside the session's transaction: commit and rollback are
the session's as before. Only plain statements are supported (no expanding ``IN`` parameters).
"""

from __future__ import annotations

from collections import namedtuple
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any, cast

from sqlalchemy import Connection, exc
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import Session
from sqlalchemy.sql import ClauseElement, Executable

Processor = Callable[[Any], Any] | None


def _same(value: Any) -> Any:
    return value


_MISSING = object()


class _Prepared:
    """One statement compiled for one dialect."""

    def __init__(self, statement: Executable, dialect: Dialect, keys: Sequence[str]) -> None:
        compiled: Any = cast(ClauseElement, statement).compile(
            dialect=dialect, column_keys=list(keys) if keys else None
        )
        self.sql: str = compiled.string
        binds = compiled.binds
        if any(bind.expanding for bind in binds.values()):
            raise ValueError("expanding (IN) parameters are not supported here")
        self.positional: tuple[str, ...] | None = (
            tuple(compiled.positiontup) if dialect.positional else None
        )
        escaped = getattr(compiled, "escaped_bind_names", None) or {}
        # Python-side defaults SQLAlchemy would compute before executing.
        defaults: dict[str, Callable[[], Any]] = {}
        prefetch = [(column, column.default) for column in compiled.insert_prefetch] + [
            (column, column.onupdate) for column in compiled.update_prefetch
        ]
        for column, default in prefetch:
            if default is None:
                continue
            if default.is_scalar:
                defaults[column.key] = partial(_same, default.arg)
            elif default.is_callable:
                defaults[column.key] = partial(default.arg, None)
            else:
                raise ValueError(f"unsupported default for {column.key}")
        # For each parameter the SQL names, once: (name, what stands in when the caller gives
        # none: a column default to call or a constant, the type's bind processor).
        by_name = {name: bind for bind, name in compiled.bind_names.items()}
        self.plan: list[tuple[str, Callable[[], Any] | None, Any, Processor]] = []
        for name in dict.fromkeys(self.positional or by_name):
            bind = by_name.get(name, binds.get(name))
            process = bind.type.dialect_impl(dialect).bind_processor(dialect)
            default = defaults.get(name, bind.callable)  # called for each execution
            self.plan.append((name, default, bind.value, process))
        names = [name for name, _, _, _ in self.plan]
        self.escaped: list[str] = [escaped.get(name, name) for name in names]
        # Where each positional parameter's value is in the plan (None: in the plan's order).
        self.order: list[int] | None = None
        if self.positional is not None and list(self.positional) != names:
            self.order = [names.index(name) for name in self.positional]
        self.row: Any = None
        self.results: list[tuple[int, Callable[[Any], Any]]] = []  # (column, result processor)
        selected = getattr(statement, "selected_columns", None)
        if selected is not None and getattr(statement, "is_select", False):
            columns = list(selected)
            self.row = namedtuple("Row", [c.key for c in columns], rename=True)  # type: ignore[misc]
            for index, column in enumerate(columns):
                process = column.type.dialect_impl(dialect).result_processor(dialect, None)
                if process is not None:
                    self.results.append((index, process))

    def parameters(self, params: Mapping[str, Any]) -> Any:
        values = []
        get = params.get
        for name, default, constant, process in self.plan:
            value = get(name, _MISSING)
            if value is _MISSING:
                value = constant if default is None else default()
            values.append(value if process is None else process(value))
        if self.positional is None:
            return dict(zip(self.escaped, values, strict=True))
        if self.order is None:
            return tuple(values)
        return tuple([values[index] for index in self.order])

    def convert(self, raw: Sequence[Any]) -> Any:
        if self.row is None:  # text(): the driver's values as they are
            return tuple(raw)
        if not self.results:
            return self.row._make(raw)
        values = list(raw)
        for index, process in self.results:
            values[index] = process(values[index])
        return self.row._make(values)


class Hot:
    """A Core statement run on the driver's cursor in the session's transaction.

    ``columns_from_params``: an ``insert(table)`` without ``.values()`` sets the columns its
    parameters name, as with ``Session.execute`` (compiled once for each set of names).
    """

    def __init__(self, statement: Executable, columns_from_params: bool = False) -> None:
        self.statement = statement
        self.columns_from_params = columns_from_params
        self._prepared: dict[tuple[int, tuple[str, ...]], _Prepared] = {}

    def prepared(self, dialect: Dialect, params: Mapping[str, Any]) -> _Prepared:
        keys = tuple(params) if self.columns_from_params else ()
        found = self._prepared.get((id(dialect), keys))
        if found is None:
            found = _Prepared(self.statement, dialect, keys)
            self._prepared[(id(dialect), keys)] = found
        return found

    def _run(
        self, session: Session, params: Sequence[Mapping[str, Any]], many: bool
    ) -> tuple[_Prepared, Any]:
        bound = _bound(session)
        connection = bound.connection
        prepared = self.prepared(bound.dialect, params[0])
        values: Any = (
            [prepared.parameters(p) for p in params] if many else prepared.parameters(params[0])
        )
        cursor = bound.driver.cursor()
        try:
            for listener in bound.listeners:
                listener(connection, cursor, prepared.sql, values, None, many)
            if many:
                cursor.executemany(prepared.sql, values)
            else:
                cursor.execute(prepared.sql, values)
        except bound.dialect.loaded_dbapi.Error as error:
            cursor.close()
            raise _wrapped(connection, prepared.sql, values, error, cursor) from error
        return prepared, cursor

    def first(self, session: Session, params: Mapping[str, Any] | None = None) -> Any:
        """The first row (attributes named after the selected columns), or None."""
        prepared, cursor = self._run(session, [params or {}], many=False)
        try:
            raw = cursor.fetchone()
        finally:
            cursor.close()
        return None if raw is None else prepared.convert(raw)

    def scalar(self, session: Session, params: Mapping[str, Any] | None = None) -> Any:
        row = self.first(session, params)
        return None if row is None else row[0]

    def execute(self, session: Session, params: Mapping[str, Any] | None = None) -> int:
        """Run a write; the number of rows it matched."""
        _, cursor = self._run(session, [params or {}], many=False)
        try:
            return int(cursor.rowcount)
        finally:
            cursor.close()

    def executemany(self, session: Session, params: Sequence[Mapping[str, Any]]) -> int:
        """Run a write once for each set of parameters (psycopg pipelines them: one round
        trip); the number of rows matched in all."""
        if not params:
            return 0
        _, cursor = self._run(session, params, many=True)
        try:
            return int(cursor.rowcount)
        finally:
            cursor.close()


class _Bound:
    """The session's connection and what a statement needs of it, looked up once."""

    __slots__ = ("connection", "dialect", "driver", "fairy", "listeners")

    def __init__(self, connection: Connection) -> None:
        self.connection = connection
        self.dialect = connection.dialect
        self.fairy = connection.connection  # the pool's proxy for this checkout
        self.driver: Any = self.fairy.dbapi_connection
        # The engine's listeners, as they are now (they are set up with the engine).
        self.listeners = tuple(connection.dispatch.before_cursor_execute)

    def usable(self) -> bool:
        # SQLAlchemy drops its proxy when the connection is closed or invalidated, and takes a
        # new one when it reconnects (``closed`` and ``invalidated`` read the same attribute).
        return self.connection._dbapi_connection is self.fairy


def _bound(session: Session) -> _Bound:
    """The session's connection: asking the session costs more than a statement, so it is kept
    in ``session.info`` until the session lets it go (commit, rollback and close close it)."""
    bound: _Bound | None = session.info.get(_CONNECTION)
    if bound is None or not bound.usable():
        bound = session.info[_CONNECTION] = _Bound(session.connection())
    return bound


_CONNECTION = "workers.sql.connection"


def _wrapped(
    connection: Connection, sql: str, values: Any, error: Any, cursor: Any
) -> exc.StatementError:
    """SQLAlchemy's wrapper for a driver error; a lost connection is invalidated first."""
    dialect = connection.dialect
    dbapi_connection = connection.connection.dbapi_connection
    disconnected = dialect.is_disconnect(error, dbapi_connection, cursor)
    if disconnected:
        connection.invalidate(error)
    wrapped: exc.StatementError = exc.DBAPIError.instance(
        sql,
        values,
        error,
        dialect.loaded_dbapi.Error,
        connection_invalidated=disconnected,
        dialect=dialect,
    )
    return wrapped
