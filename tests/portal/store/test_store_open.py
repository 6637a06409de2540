"""Opening a store: URLs, migrations, several portal processes at once."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import gatherResults
from zope.interface.verify import verifyObject

from dit4c.portal.store import MIGRATIONS, IStore, StoreError, openStore
from dit4c.portal.store._open import _switchToWAL, describe, sqlitePath
from dit4c.portal.store.migrations import latestVersion


@pytest.mark.parametrize(
    "url, path",
    [
        ("sqlite:///var/lib/dit4c/portal.db", "/var/lib/dit4c/portal.db"),
        ("sqlite:////var/lib/dit4c/portal.db", "//var/lib/dit4c/portal.db"),
        ("sqlite:///:memory:", ":memory:"),
        ("sqlite:portal.db", "portal.db"),
        ("sqlite:///tmp/with%20space.db", "/tmp/with space.db"),
    ],
)
def test_sqlitePath(url: str, path: str) -> None:
    assert sqlitePath(url) == path


@pytest.mark.parametrize("url", ["sqlite://host/x.db", "sqlite:", "sqlite:///dir/", "sqlite:///x.db?mode=ro"])
def test_sqlitePathRejects(url: str) -> None:
    with pytest.raises(ValueError):
        sqlitePath(url)


def test_describeHidesPassword() -> None:
    described = describe("postgresql://portal:s3cret@db.example:5433/dit4c?sslmode=require")
    assert "s3cret" not in described
    assert described == "postgresql://portal@db.example:5433/dit4c"


@pytest_twisted.ensureDeferred
async def test_unknownScheme() -> None:
    with pytest.raises(ValueError, match="sqlite:///path or postgresql://"):
        await openStore("mysql://x/y", reactor)


@pytest_twisted.ensureDeferred
async def test_memory() -> None:
    store = await openStore("sqlite:///:memory:", reactor)
    try:
        user = await store.createUser("alice")
        assert await store.userById(user.id) == user
    finally:
        await store.close()


@pytest_twisted.ensureDeferred
async def test_providesIStore(store: IStore) -> None:
    assert verifyObject(IStore, store)


async def _versions(store: IStore, tableRows: Any) -> list[int]:
    return sorted(row[0] for row in await tableRows(store, "schema_version"))


@pytest_twisted.ensureDeferred
async def test_migrationsIdempotent(storeURL: str, tableRows: Any) -> None:
    """Opening twice applies nothing the second time, and keeps the data."""
    first = await openStore(storeURL, reactor)
    user = await first.createUser("alice")
    await first.close()
    second = await openStore(storeURL, reactor)
    try:
        assert await second.userById(user.id) == user
        assert await _versions(second, tableRows) == list(range(1, latestVersion() + 1))
    finally:
        await second.close()


@pytest_twisted.ensureDeferred
async def test_laterMigration(storeURL: str, tableRows: Any) -> None:
    """A new migration is applied on the next open, once."""
    first = await openStore(storeURL, reactor)
    await first.createUser("alice")
    await first.close()
    later = [*MIGRATIONS, (len(MIGRATIONS) + 1, ["ALTER TABLE users ADD COLUMN shoe_size INTEGER"])]
    for _ in range(2):
        store = await openStore(storeURL, reactor, migrations=later)
        try:
            assert await _versions(store, tableRows) == list(range(1, len(later) + 1))
            assert (await store.userByName("alice")) is not None
        finally:
            await store.close()


@pytest_twisted.ensureDeferred
async def test_failedMigrationRollsBack(storeURL: str, tableRows: Any) -> None:
    """A migration that fails leaves nothing of itself behind."""
    broken = [*MIGRATIONS, (len(MIGRATIONS) + 1, ["CREATE TABLE half (x INTEGER)", "NOT SQL AT ALL"])]
    with pytest.raises(StoreError, match="could not open the store"):
        await openStore(storeURL, reactor, migrations=broken)
    store = await openStore(storeURL, reactor)
    try:
        assert await _versions(store, tableRows) == list(range(1, latestVersion() + 1))
        fixed = [*MIGRATIONS, (len(MIGRATIONS) + 1, ["CREATE TABLE half (x INTEGER)"])]
        await store.close()
        store = await openStore(storeURL, reactor, migrations=fixed)  # "half" was never created
    finally:
        await store.close()


@pytest_twisted.ensureDeferred
async def test_newerSchemaRefused(storeURL: str) -> None:
    later = [*MIGRATIONS, (len(MIGRATIONS) + 1, ["CREATE TABLE future (x INTEGER)"])]
    await (await openStore(storeURL, reactor, migrations=later)).close()
    with pytest.raises(StoreError, match="newer than this portal"):
        await openStore(storeURL, reactor)


def test_migrationsNumberedInOrder() -> None:
    assert [version for version, _ in MIGRATIONS] == list(range(1, len(MIGRATIONS) + 1))


@pytest_twisted.ensureDeferred
async def test_badMigrationNumbers() -> None:
    with pytest.raises(ValueError, match="numbered"):
        await openStore("sqlite:///:memory:", reactor, migrations=[(2, [])])


@pytest_twisted.ensureDeferred
async def test_concurrentOpens(storeURL: str, tableRows: Any) -> None:
    """Portal processes starting at once on a fresh database migrate it once, without conflict."""
    stores = await gatherResults([openStore(storeURL, reactor) for _ in range(4)])
    try:
        assert await _versions(stores[0], tableRows) == list(range(1, latestVersion() + 1))
        user = await stores[1].createUser("alice")
        assert await stores[3].userById(user.id) == user
    finally:
        for store in stores:
            await store.close()


def test_walSwitchWaitsForALockHolder(tmp_path: Path) -> None:
    """
    Switching to WAL while another process holds the database waits for it
    (SQLite itself would fail at once with "database is locked").
    """
    path = str(tmp_path / "p.db")
    holder = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN EXCLUSIVE")
    holder.execute("CREATE TABLE t (x)")
    released = threading.Timer(0.2, lambda: holder.execute("COMMIT"))
    released.start()
    try:
        waiter = sqlite3.connect(path, isolation_level=None, timeout=0)
        _switchToWAL(waiter, timeout=10)
        assert waiter.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        assert waiter.execute("SELECT count(*) FROM t").fetchone() == (0,)
        waiter.close()
    finally:
        released.join()
        holder.close()


def test_walSwitchGivesUpAtItsDeadline(tmp_path: Path) -> None:
    path = str(tmp_path / "p.db")
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    holder.execute("CREATE TABLE t (x)")
    try:
        waiter = sqlite3.connect(path, isolation_level=None, timeout=0)
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            _switchToWAL(waiter, timeout=0.05)
        waiter.close()
    finally:
        holder.close()


@pytest_twisted.ensureDeferred
async def test_closed(tmp_path: Path) -> None:
    store = await openStore(f"sqlite://{tmp_path}/p.db", reactor)
    await store.close()
    await store.close()
    with pytest.raises(StoreError, match="closed"):
        await store.userById("x")


@pytest_twisted.ensureDeferred
async def test_postgresqlUnreachable(tmp_path: Path) -> None:
    """No server behind the URL: a StoreError that names the URL, never the password."""
    url = f"postgresql://portal:s3cret@/dit4c?host={tmp_path}&port=1"
    with pytest.raises(StoreError) as info:
        await openStore(url, reactor)
    assert "s3cret" not in str(info.value)


@pytest_twisted.ensureDeferred
async def test_badPostgresqlURL() -> None:
    pytest.importorskip("psycopg")
    with pytest.raises(ValueError, match="not a PostgreSQL URL"):
        await openStore("postgresql://x/y?nonsense_option=1", reactor)
