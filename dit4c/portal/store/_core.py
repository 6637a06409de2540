"""
What every area of ``SQLStore`` shares: the connection pool, the clock,
one transaction at a time (``SQLCore._run``), the schema's migrations at
open, and the helpers that turn rows into records.

Each area's public method is a coroutine turned into a ``Deferred``
(``_deferred``): it reads the clock and checks its arguments on the
reactor thread, then runs one transaction in a pool thread.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Coroutine, Iterable, Sequence
from typing import Any, ParamSpec, TypeVar

from twisted.enterprise.adbapi import ConnectionLost, ConnectionPool
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from dit4c.common.life import STATES, State
from dit4c.common.limits import ToolLimits

from ._dialect import Cursor, IDialect, Row
from .errors import Conflict, NotFound, StoreClosed, StoreError
from .migrations import MIGRATIONS, Migration, applyNext
from .model import UNSET, Image, Instance, Scheduler, User

P = ParamSpec("P")
T = TypeVar("T")


def _deferred(f: Callable[P, Coroutine[Any, Any, T]]) -> Callable[P, Deferred[T]]:
    """Make an ``async def`` method return a ``Deferred``."""

    @functools.wraps(f)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> Deferred[T]:
        return Deferred.fromCoroutine(f(*args, **kwargs))

    return wrapper


# -- rows to records, for the tables several areas read -----------------------------------------------

_USER = (
    "id", "name", "email", "password_hash", "display_name", "is_admin", "max_instances", "created", "disabled",
    "password_reset",
)  # fmt: skip
_SCHEDULER = ("id", "name", "public_jwk", "created", "disabled")
_IMAGE = ("id", "name", "ref", "digest", "owner_id", "port", "created", "deleted", "limits")
_INSTANCE = (
    "id", "owner_id", "image_id", "scheduler_id", "state", "reason", "url", "public_jwk", "created", "updated",
    "active_at",
)  # fmt: skip


def _cols(columns: Sequence[str], alias: str | None = None) -> str:
    return ", ".join(f"{alias}.{c}" if alias else c for c in columns)


def _marks(n: int) -> str:
    return ", ".join("?" * n)


def _user(row: Row) -> User:
    return User(row[0], row[1], row[2], row[3], row[4], bool(row[5]), row[6], row[7], bool(row[8]), bool(row[9]))


def _scheduler(row: Row) -> Scheduler:
    return Scheduler(row[0], row[1], row[2], row[3], bool(row[4]))


def _image(row: Row) -> Image:
    return Image(row[0], row[1], row[2], row[3], row[4], row[5], row[6], bool(row[7]), ToolLimits.loads(row[8]))


def _instance(row: Row) -> Instance:
    return Instance(*row)


def _checkState(state: str) -> str:
    try:
        return State(state).value
    except ValueError:
        raise ValueError(f"{state!r} is not an instance state (one of {', '.join(STATES)})") from None


def _given(**fields: object) -> dict[str, object]:
    """The fields that are not ``UNSET``, flags as 0/1 (PostgreSQL will not take a bool for INTEGER)."""
    return {
        name: int(value) if isinstance(value, bool) else value
        for name, value in fields.items()
        if value is not UNSET
    }


class _Txn:
    """One transaction's cursor, taking SQL with ``?`` placeholders. Used in a pool thread."""

    def __init__(self, cursor: Cursor, dialect: IDialect) -> None:
        self._cursor = cursor
        self._dialect = dialect

    def execute(self, sql: str, params: Iterable[object] = ()) -> int:
        """Run a statement; the number of rows it changed."""
        self._cursor.execute(self._dialect.sql(sql), tuple(params))
        return int(self._cursor.rowcount)

    def one(self, sql: str, params: Iterable[object] = ()) -> Row | None:
        """The first row a query finds, None if none."""
        self.execute(sql, params)
        return self._cursor.fetchone()

    def must(self, sql: str, params: Iterable[object] = ()) -> Row:
        """
        The first row of a query that cannot come back empty: an aggregate,
        or a row this transaction wrote or holds.
        """
        row = self.one(sql, params)
        if row is None:
            raise StoreError(f"the database found no row where one must be: {sql}")
        return row

    def all(self, sql: str, params: Iterable[object] = ()) -> list[Row]:
        self.execute(sql, params)
        return list(self._cursor.fetchall())

    def update(self, table: str, key: str, keyValue: object, fields: dict[str, object]) -> int:
        """``UPDATE table SET fields WHERE key = keyValue`` (names from code only)."""
        if not fields:
            return len(self.all(f"SELECT {key} FROM {table} WHERE {key} = ?", (keyValue,)))
        sets = ", ".join(f"{name} = ?" for name in fields)
        return self.execute(f"UPDATE {table} SET {sets} WHERE {key} = ?", (*fields.values(), keyValue))


class SQLCore:
    """
    The part of ``SQLStore`` every area uses: the pool, the dialect, the
    clock, and ``_run`` for one transaction. Each area is a subclass, and
    ``SQLStore`` all of them.
    """

    log = Logger()

    def __init__(self, pool: ConnectionPool, dialect: IDialect, clock: IReactorTime) -> None:
        self._pool = pool
        self._dialect = dialect
        self._clock = clock
        self._closed = False

    @property
    def dialect(self) -> IDialect:
        return self._dialect

    def _now(self) -> float:
        return self._clock.seconds()

    def _run(
        self,
        work: Callable[[_Txn], T],
        *,
        conflict: str | None = None,
        missing: str | None = None,
        readOnly: bool = False,
    ) -> Deferred[T]:
        """
        Run ``work`` in one transaction in a pool thread. Driver errors
        become store errors: ``conflict`` and ``missing`` are the messages
        for a uniqueness and a reference violation. ``readOnly``: a
        transaction that only reads, from one snapshot (``IDialect.beginRead``).
        """
        if self._closed:
            raise StoreClosed()
        dialect = self._dialect

        def interaction(cursor: Cursor) -> T:
            if readOnly:
                dialect.beginRead(cursor)
            else:
                dialect.begin(cursor)
            return work(_Txn(cursor, dialect))

        def translate(failure: Failure) -> Failure:
            error = failure.value
            if error is None or isinstance(error, StoreError):
                return failure
            if isinstance(error, ConnectionLost):
                raise StoreError("lost the connection to the database: try again") from error
            kind = dialect.classify(error)
            if kind is None:
                return failure
            if kind is Conflict:
                raise Conflict(conflict or "") from error
            if kind is NotFound:
                raise NotFound(missing or "") from error
            raise kind(f"the database failed: {error}") from error

        d: Deferred[T] = self._pool.runInteraction(interaction)
        d.addErrback(translate)
        return d

    async def _migrate(self, migrations: Sequence[Migration] = MIGRATIONS) -> None:
        """Apply, one transaction each, the migrations the database lacks."""
        dialect = self._dialect
        while True:
            applied = await self._pool.runInteraction(applyNext, dialect, migrations, self._now())
            if applied is None:
                return
            self.log.info("store schema migrated to version {version}", version=applied)

    # -- closing ------------------------------------------------------------------------------------

    def close(self) -> Deferred[None]:
        if not self._closed:
            self._closed = True
            self._pool.close()
        return succeed(None)
