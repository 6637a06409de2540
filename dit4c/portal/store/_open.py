"""
``openStore``: a store from a URL, its schema brought up to date.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Sequence
from typing import Any
from urllib.parse import unquote, urlsplit

from twisted.enterprise.adbapi import ConnectionPool
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorCore, IReactorTime

from ._dialect import IDialect, PostgreSQLDialect, SQLiteDialect
from ._sql import SQLStore
from .errors import StoreError
from .interfaces import IStore
from .migrations import MIGRATIONS, Migration, checkMigrations

#: Seconds a SQLite connection waits for another process's write lock.
SQLITE_BUSY_TIMEOUT = 30.0

#: Seconds to wait for a PostgreSQL server to accept a connection (unless the URL says).
POSTGRES_CONNECT_TIMEOUT = 10


def sqlitePath(url: str) -> str:
    """
    The file a ``sqlite:`` URL names: ``sqlite:///abs/path.db`` (absolute,
    as in a ``file:`` URL), ``sqlite:relative/path.db``, or
    ``sqlite:///:memory:`` (one private in-memory database).
    """
    scheme, _, rest = url.partition(":")
    if scheme.lower() != "sqlite" or not rest:
        raise ValueError(f"not a sqlite: URL: {url!r}")
    if "?" in rest or "#" in rest:
        raise ValueError("a sqlite: URL takes no query or fragment")
    if rest.startswith("//"):
        host, slash, path = rest[2:].partition("/")
        if host:
            raise ValueError(f"a sqlite: URL names no host (write sqlite:///path), not {host!r}")
        path = slash + path
        if path == "/:memory:":
            return ":memory:"
    else:
        path = rest
    path = unquote(path)
    if not path or path.endswith("/"):
        raise ValueError(f"a sqlite: URL must name a file: {url!r}")
    return path


def _switchToWAL(connection: sqlite3.Connection, timeout: float = SQLITE_BUSY_TIMEOUT) -> None:
    """
    Put the database in WAL mode, waiting out other processes doing the same.

    Changing the journal mode takes an exclusive lock without calling the
    busy handler, so two portals opening a fresh database at once would
    otherwise see "database is locked". This runs in a database thread, so
    sleeping blocks no reactor.
    """
    deadline = time.monotonic() + timeout
    pause = 0.005
    while True:
        try:
            connection.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) and "busy" not in str(e):
                raise
            if time.monotonic() + pause > deadline:
                raise
            time.sleep(pause)
            pause = min(pause * 2, 0.25)


def _sqlitePool(path: str, reactor: IReactorCore) -> ConnectionPool:
    def prepare(connection: sqlite3.Connection) -> None:
        # Autocommit mode: the dialect's BEGIN IMMEDIATE opens every transaction.
        connection.isolation_level = None
        connection.execute("PRAGMA foreign_keys = ON")
        if path != ":memory:":
            _switchToWAL(connection)
            # Durable at each checkpoint, which is what WAL is for.
            connection.execute("PRAGMA synchronous = NORMAL")

    # One connection: SQLite has one writer at a time anyway, and a single
    # connection is the only way an in-memory database is one database.
    return ConnectionPool(
        "sqlite3",
        path,
        timeout=SQLITE_BUSY_TIMEOUT,
        check_same_thread=False,
        cp_min=1,
        cp_max=1,
        cp_openfun=prepare,
        cp_reactor=reactor,
    )


def postgresDefaults(url: str) -> dict[str, str | int]:
    """
    The connection parameters the portal adds to a PostgreSQL URL (those
    the URL does not give itself): its name, and a deadline for connecting.
    """
    try:
        import psycopg
    except ImportError as e:
        raise StoreError(
            "a postgresql: store needs psycopg: pip install 'dit4c[postgres]'"
        ) from e
    from psycopg.conninfo import conninfo_to_dict

    try:
        given = conninfo_to_dict(url)
    except psycopg.ProgrammingError as e:
        raise ValueError(f"not a PostgreSQL URL: {describe(url)!r}") from e
    defaults: dict[str, str | int] = {"application_name": "dit4c-portal"}
    if "connect_timeout" not in given:
        # libpq would otherwise wait for ever on a server that does not answer.
        defaults["connect_timeout"] = POSTGRES_CONNECT_TIMEOUT
    return {k: v for k, v in defaults.items() if k not in given}


def _postgresPool(url: str, reactor: IReactorCore, poolSize: int) -> ConnectionPool:
    import psycopg

    defaults = postgresDefaults(url)

    def prepare(connection: psycopg.Connection[tuple[object, ...]]) -> None:
        # The store's locking reads (a person's row before counting their
        # instances, a scheduler's before numbering its commands) rely on
        # each statement seeing what was committed before it ran: READ
        # COMMITTED, whatever default the server or database was given.
        # Under REPEATABLE READ a count after waiting for a lock would still
        # see the snapshot from before the wait. psycopg says it in the
        # BEGIN it sends anyway: no extra round trip.
        connection.isolation_level = psycopg.IsolationLevel.READ_COMMITTED

    return ConnectionPool(
        "psycopg",
        url,
        **defaults,
        cp_min=1,
        cp_max=poolSize,
        cp_reconnect=True,
        cp_openfun=prepare,
        cp_reactor=reactor,
    )


def describe(url: str) -> str:
    """A URL for the log: no password, no query."""
    parts = urlsplit(url)
    if parts.scheme.lower() == "sqlite":
        return url
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    user = f"{parts.username}@" if parts.username else ""
    return f"{parts.scheme}://{user}{host}{port}{parts.path}"


async def _open(
    url: str,
    reactor: IReactorCore,
    clock: IReactorTime,
    poolSize: int,
    migrations: Sequence[Migration],
) -> IStore:
    checkMigrations(migrations)
    scheme = url.partition(":")[0].lower()
    dialect: IDialect
    if scheme == "sqlite":
        pool = _sqlitePool(sqlitePath(url), reactor)
        dialect = SQLiteDialect()
    elif scheme in ("postgresql", "postgres"):
        if poolSize < 1:
            raise ValueError("poolSize must be at least 1")
        pool = _postgresPool(url, reactor, poolSize)
        dialect = PostgreSQLDialect()
    else:
        raise ValueError(f"a store URL is sqlite:///path or postgresql://..., not {describe(url)!r}")
    store = SQLStore(pool, dialect, clock)
    try:
        await store._migrate(migrations)
    except BaseException as e:
        await store.close()
        kind = dialect.classify(e)
        if kind is not None:
            raise kind(f"could not open the store at {describe(url)}: {e}") from e
        raise
    SQLStore.log.info("store open at {url}", url=describe(url))
    return store


def openStore(
    url: str,
    reactor: Any,
    *,
    clock: IReactorTime | None = None,
    poolSize: int = 5,
    migrations: Sequence[Migration] = MIGRATIONS,
) -> Deferred[IStore]:
    """
    Open the store at ``url`` and bring its schema up to date.

    :param url: ``sqlite:///path/to/file.db`` (the embedded default),
        ``sqlite:///:memory:``, ``postgresql://user:pass@host:port/dbname``
        or ``postgresql:///dbname?host=/socket/dir`` (any libpq URL).
    :param reactor: runs the database threads and, unless ``clock`` is
        given, tells the time.
    :param clock: the time for every record's timestamps and every expiry.
    :param poolSize: connections to PostgreSQL at most (SQLite always has one).
    :param migrations: the schema's migrations (tests give others).
    """
    return Deferred.fromCoroutine(
        _open(url, reactor, clock if clock is not None else reactor, poolSize, migrations)
    )
