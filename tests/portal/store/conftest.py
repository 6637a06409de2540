"""
Fixtures for the store's tests: every test that takes ``store`` (or
``storeURL``) runs twice, against SQLite in a temporary file and against a
real PostgreSQL server started for the test session in a temporary
directory, with a fresh database for each test.

Without PostgreSQL installed, the PostgreSQL runs are skipped, or fail when
``CI=true`` (CI must test both backends).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from support.postgres import PostgresServer
from twisted.internet import reactor
from twisted.internet.defer import gatherResults
from twisted.internet.task import Clock

from dit4c.portal.store import IStore, openStore

#: Where every store test's clock starts (2023-11-14).
START = 1_700_000_000.0

@pytest.fixture(params=["sqlite", "postgresql"])
def storeURL(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """The URL of a fresh, empty database of each kind."""
    if request.param == "sqlite":
        yield f"sqlite://{tmp_path}/portal.db"
        return
    server: PostgresServer = request.getfixturevalue("postgresServer")
    name = server.createDatabase()
    try:
        yield server.url(name)
    finally:
        server.dropDatabase(name)


@pytest.fixture
def clock() -> Clock:
    clock = Clock()
    clock.advance(START)
    return clock


@pytest_twisted.async_yield_fixture
async def store(storeURL: str, clock: Clock) -> Any:
    """An open store on a fresh database, on ``clock``'s time."""
    opened = await openStore(storeURL, reactor, clock=clock)
    yield opened
    await opened.close()


#: How many portal processes ``stores`` stands for, and connections each has (PostgreSQL).
PROCESSES = 4


@pytest_twisted.async_yield_fixture
async def stores(storeURL: str, clock: Clock) -> Any:
    """
    Several stores open on one fresh database, as several portal processes
    would have them: work sent to different ones runs on different
    connections at once (SQLite: one each; PostgreSQL: ``PROCESSES`` each).
    """
    opened = await gatherResults(
        [openStore(storeURL, reactor, clock=clock, poolSize=PROCESSES) for _ in range(PROCESSES)]
    )
    yield opened
    for each in opened:
        await each.close()


@pytest.fixture
def tableRows() -> Any:
    """``await tableRows(store, "sessions")``: every row of a table, as the database holds it."""

    async def rows(store: IStore, table: str) -> list[tuple[Any, ...]]:
        result = await store._pool.runQuery(f"SELECT * FROM {table}")  # type: ignore[attr-defined]
        return [tuple(row) for row in result]

    return rows
