"""
Fixtures for the store's tests: every test that takes ``store`` (or
``storeURL``) runs twice, against SQLite in a temporary file and against a
real PostgreSQL server started for the test session in a temporary
directory, with a fresh database for each test.

Without PostgreSQL installed, the PostgreSQL runs are skipped, or fail when
``CI=true`` (CI must test both backends).
"""

from __future__ import annotations

import glob
import os
import pwd
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import gatherResults
from twisted.internet.task import Clock

from dit4c.portal.store import IStore, openStore

#: Where every store test's clock starts (2023-11-14).
START = 1_700_000_000.0

_PORT = 54329


def _unavailable(why: str) -> None:
    message = f"PostgreSQL is needed for the store's postgresql tests: {why}"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message + " (install it: bash scripts/install --test)", pytrace=False)
    pytest.skip(message)


def _postgresBin() -> Path | None:
    """The directory holding initdb and pg_ctl: on PATH, or Debian's newest."""
    found = shutil.which("initdb")
    if found and shutil.which("pg_ctl"):
        return Path(found).parent
    candidates = glob.glob("/usr/lib/postgresql/*/bin/initdb")
    if not candidates:
        return None
    newest = max(candidates, key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0)
    return Path(newest).parent


@dataclass
class PostgresServer:
    """A throwaway PostgreSQL server listening only on a Unix socket in ``socketDir``."""

    socketDir: Path
    port: int

    def _admin(self) -> Any:
        import psycopg

        return psycopg.connect(
            f"postgresql:///postgres?host={self.socketDir}&port={self.port}&user=postgres",
            autocommit=True,
        )

    def url(self, database: str) -> str:
        return f"postgresql:///{database}?host={self.socketDir}&port={self.port}&user=postgres"

    def createDatabase(self) -> str:
        name = "test_" + secrets.token_hex(6)
        with self._admin() as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return name

    def dropDatabase(self, name: str) -> None:
        with self._admin() as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def _run(args: list[str], what: str) -> None:
    done = subprocess.run(args, capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        raise RuntimeError(f"{what} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")


@pytest.fixture(scope="session")
def postgresServer() -> Iterator[PostgresServer]:
    try:
        import psycopg  # noqa: F401
    except ImportError:
        _unavailable("psycopg is not installed (pip install 'psycopg[binary]')")
    binDir = _postgresBin()
    if binDir is None:
        _unavailable("no initdb/pg_ctl on PATH or in /usr/lib/postgresql/*/bin (apt-get install postgresql)")
        raise AssertionError("unreachable")
    asUser: list[str] = []
    base = Path(tempfile.mkdtemp(prefix="dit4c-pg-"))
    if os.geteuid() == 0:
        # PostgreSQL refuses to run as root: run it as the postgres user, in
        # a directory that user owns.
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            shutil.rmtree(base)
            _unavailable("running as root, and there is no postgres user to run the server as")
        shutil.chown(base, "postgres", "postgres")
        asUser = ["runuser", "-u", "postgres", "--"]
    data = base / "data"
    options = (
        f"-k {base} -p {_PORT} -c listen_addresses='' "
        "-c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=200"
    )
    try:
        _run(
            [*asUser, str(binDir / "initdb"), "-D", str(data), "-U", "postgres", "-A", "trust",
             "-E", "UTF8", "--locale=C", "--no-sync"],
            "initdb",
        )  # fmt: skip
        _run(
            [*asUser, str(binDir / "pg_ctl"), "-D", str(data), "-l", str(base / "server.log"),
             "-w", "-t", "60", "-o", options, "start"],
            "pg_ctl start",
        )  # fmt: skip
    except BaseException as e:
        log = base / "server.log"
        detail = log.read_text(errors="replace") if log.exists() else ""
        shutil.rmtree(base, ignore_errors=True)
        pytest.fail(f"could not start PostgreSQL: {e}\n{detail}", pytrace=False)
    try:
        yield PostgresServer(base, _PORT)
    finally:
        subprocess.run(
            [*asUser, str(binDir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"],
            capture_output=True,
            timeout=60,
        )
        shutil.rmtree(base, ignore_errors=True)


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
