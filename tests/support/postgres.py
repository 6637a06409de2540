"""
A throwaway PostgreSQL server for the tests (``postgresServer``, once per
test process): it listens only on a Unix socket in a temporary directory,
and each test makes a fresh database in it. Without PostgreSQL installed
its tests are skipped, or fail when ``CI=true`` (CI must test PostgreSQL).
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

#: Names the server's socket file only: it listens on no TCP port.
_PORT = 54329


def _unavailable(why: str) -> None:
    message = f"PostgreSQL is needed for the PostgreSQL tests: {why}"
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
