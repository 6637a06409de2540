"""
The little that differs between SQLite and PostgreSQL: placeholders, a few
column types, how a write transaction starts, how rows and migrations are
locked, and which driver errors mean what.

SQL is written once, with ``?`` placeholders and no ``?`` or ``%`` anywhere
else (no string literals holding them), and translated here.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from typing import Any, Protocol, TypeAlias

from zope.interface import Interface, implementer

from .errors import Conflict, NotFound, StoreError

#: A row as the driver gives it: the columns' values in the order the
#: statement named them (their types are the columns', known to the query).
Row: TypeAlias = Sequence[Any]


class Cursor(Protocol):
    """
    What the store uses of a DB-API 2 cursor (sqlite3's, psycopg's): the
    ``Transaction`` that ``adbapi.ConnectionPool.runInteraction`` hands over
    passes these through to it.
    """

    @property
    def rowcount(self) -> int: ...

    def execute(self, sql: str, params: Sequence[object] = (), /) -> object: ...

    def fetchone(self) -> Row | None: ...

    def fetchall(self) -> Sequence[Row]: ...


#: ``pg_advisory_xact_lock`` key serialising migrations across portal processes ("DIT4").
MIGRATION_LOCK = 0x44495434


class IDialect(Interface):
    name: str

    def sql(statement: str) -> str:
        """``statement`` with ``?`` placeholders, in the driver's paramstyle."""

    def ddl(statement: str) -> str:
        """A migration statement (run without parameters) with its ``{type}`` fields filled in."""

    def begin(cursor: Cursor) -> None:
        """Start a write transaction on ``cursor``'s connection (if the driver does not)."""

    def beginRead(cursor: Cursor) -> None:
        """
        Start a read-only transaction on ``cursor``'s connection that sees
        one snapshot of the database from its first statement to its end.
        """

    def lockMigrations(cursor: Cursor) -> None:
        """Take, for this transaction, the lock that lets one process migrate at a time."""

    def forUpdate(statement: str) -> str:
        """
        ``statement``, a SELECT, made to hold the rows it reads until the
        transaction ends: another transaction doing the same waits for this
        one, then sees what it wrote. Rows it does not read stay free.
        """

    def classify(error: BaseException) -> type[StoreError] | None:
        """The store error a driver error means, or None if it is not a driver error."""


#: Column types by name, as migrations write them: ``{timestamp}``, ``{blob}``.
_SQLITE_TYPES = {"timestamp": "REAL", "blob": "BLOB", "bigint": "BIGINT"}
# PostgreSQL's REAL is four bytes: far too coarse for epoch seconds.
_POSTGRES_TYPES = {"timestamp": "DOUBLE PRECISION", "blob": "BYTEA", "bigint": "BIGINT"}


@implementer(IDialect)
class SQLiteDialect:
    name = "sqlite"

    def sql(self, statement: str) -> str:
        return statement

    def ddl(self, statement: str) -> str:
        return statement.format(**_SQLITE_TYPES)

    def begin(self, cursor: Cursor) -> None:
        # The connection runs in autocommit mode (isolation_level None) so that
        # this, not the driver's guess, opens every transaction. IMMEDIATE
        # takes the write lock now: a second process waits (busy timeout)
        # instead of failing half way through.
        cursor.execute("BEGIN IMMEDIATE")

    def beginRead(self, cursor: Cursor) -> None:
        # Deferred: no write lock, so a writer (another process) neither
        # waits for this nor makes it wait. In WAL mode the first SELECT
        # fixes the snapshot every later statement of the transaction reads.
        cursor.execute("BEGIN")

    def lockMigrations(self, cursor: Cursor) -> None:
        # BEGIN IMMEDIATE already made this the only writer.
        pass

    def forUpdate(self, statement: str) -> str:
        # BEGIN IMMEDIATE already made this the only writer: SQLite has no
        # finer lock, and needs none.
        return statement

    def classify(self, error: BaseException) -> type[StoreError] | None:
        if isinstance(error, sqlite3.IntegrityError):
            name = getattr(error, "sqlite_errorname", "")
            text = str(error)
            if name == "SQLITE_CONSTRAINT_FOREIGNKEY" or "FOREIGN KEY" in text:
                return NotFound
            return Conflict
        if isinstance(error, sqlite3.Error):
            return StoreError
        return None


@implementer(IDialect)
class PostgreSQLDialect:
    name = "postgresql"

    def sql(self, statement: str) -> str:
        return statement.replace("%", "%%").replace("?", "%s")

    def ddl(self, statement: str) -> str:
        return statement.format(**_POSTGRES_TYPES)

    def begin(self, cursor: Cursor) -> None:
        # psycopg opens a transaction before the first statement, with the
        # BEGIN these make (a read may have left others on the connection).
        self._mode(cursor, readOnly=False)

    def beginRead(self, cursor: Cursor) -> None:
        # READ COMMITTED, the default, takes a new snapshot per statement;
        # REPEATABLE READ keeps the first statement's for the transaction.
        # Said in psycopg's own BEGIN: no round trip of its own.
        self._mode(cursor, readOnly=True)

    @staticmethod
    def _mode(cursor: Cursor, readOnly: bool) -> None:
        import psycopg

        # The DB-API cursor's connection (adbapi's Transaction passes it
        # through), idle between transactions, when these may change.
        connection = getattr(cursor, "connection")  # noqa: B009
        level = psycopg.IsolationLevel.REPEATABLE_READ if readOnly else psycopg.IsolationLevel.READ_COMMITTED
        if connection.isolation_level != level:
            connection.isolation_level = level
            connection.read_only = readOnly

    def lockMigrations(self, cursor: Cursor) -> None:
        cursor.execute(f"SELECT pg_advisory_xact_lock({MIGRATION_LOCK})")

    def forUpdate(self, statement: str) -> str:
        # NO KEY UPDATE, not UPDATE: it does not block the key-share locks
        # that inserting a row which refers to these (a session, an
        # instance) takes, only others locking them the same way.
        return statement + " FOR NO KEY UPDATE"

    def classify(self, error: BaseException) -> type[StoreError] | None:
        import psycopg
        from psycopg import errors

        if isinstance(error, errors.ForeignKeyViolation):
            return NotFound
        if isinstance(error, psycopg.IntegrityError):
            return Conflict
        if isinstance(error, psycopg.Error):
            return StoreError
        return None
