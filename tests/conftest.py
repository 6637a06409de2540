"""
Fixtures shared by every test: signing keys and tokens, a backend web server,
a routing server and listener in this process on real loopback sockets, and
helpers to run the real ``twistd`` plugins as separate processes.
"""

from __future__ import annotations

import os
import re
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.logger import LogLevel, globalLogPublisher

from dit4c.common.keys import generate_private_key, jwks, save_private_key
from dit4c.common.tokens import TokenSigner
from dit4c.testing import Signing, deferLater, startBackend, startRouting, stopRouting

# Many tests open thousands of sockets.
_soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (_hard, _hard))


# -- logged errors fail the test (as magic-wormhole's suite does) -----------------


@pytest.fixture(autouse=True)
def failOnLoggedErrors(request: pytest.FixtureRequest) -> Iterator[list[Any]]:
    """
    A test fails if anything logged a critical event (an unhandled error,
    a traceback) unless it is marked ``allow_logged_errors``.
    """
    errors: list[Any] = []

    def observer(event: dict[str, Any]) -> None:
        if event.get("log_level") in (LogLevel.critical,) or event.get("isError"):
            errors.append(event)

    globalLogPublisher.addObserver(observer)
    yield errors
    globalLogPublisher.removeObserver(observer)
    if errors and not request.node.get_closest_marker("allow_logged_errors"):
        from twisted.logger import formatEvent

        pytest.fail("errors were logged:\n" + "\n".join(formatEvent(e) for e in errors))


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "allow_logged_errors: the test expects errors in the log")


# -- keys and tokens ---------------------------------------------------------------


@pytest.fixture
def signing(tmp_path: Path) -> Signing:
    import json

    key = generate_private_key()
    keyPath = tmp_path / "signing.pem"
    save_private_key(key, keyPath)
    jwksPath = tmp_path / "jwks.json"
    jwksPath.write_text(json.dumps(jwks(key)))
    return Signing(key, keyPath, jwksPath, TokenSigner(key))


# -- a backend web server -------------------------------------------------------------


@pytest_twisted.async_yield_fixture
async def backend() -> Any:
    started = startBackend(reactor)
    yield started
    await started.stop()


@pytest_twisted.async_yield_fixture
async def routing(signing: Signing) -> Any:
    started = await startRouting(signing)
    yield started
    await stopRouting(started)


# -- a real browser -----------------------------------------------------------------------


@pytest_twisted.async_yield_fixture
async def browser() -> Any:
    """Headless Chromium (skipped where there is none, failed under CI)."""
    from twisted.internet import threads

    from dit4c.testing_browser import requireBrowser, startBrowser

    requireBrowser()
    started = await threads.deferToThread(startBrowser)
    try:
        yield started
    finally:
        await started.stop()


# -- real processes --------------------------------------------------------------------


class Process:
    """A ``twistd -n`` child, its log, and the addresses it announced."""

    def __init__(self, args: list[str], logPath: Path, env: dict[str, str] | None = None) -> None:
        self.args = args
        self.logPath = logPath
        self._log = open(logPath, "ab")
        self.proc = subprocess.Popen(
            args,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=dict(os.environ, **(env or {})),
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return self.logPath.read_text(errors="replace")

    async def waitForLog(self, pattern: str, timeout: float = 20.0, start: int = 0) -> re.Match[str]:
        """Wait (without blocking the reactor) until the log matches ``pattern``."""
        deadline = time.monotonic() + timeout
        compiled = re.compile(pattern)
        while True:
            match = compiled.search(self.log(), start)
            if match:
                return match
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.args[:4]} exited ({self.proc.returncode}):\n{self.log()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {pattern!r} in:\n{self.log()}")
            await deferLater(0.05)

    def port(self, what: str, start: int = 0) -> int:
        match = re.compile(rf"{what} listening on IPv4Address\(type='TCP', host='[^']*', port=(\d+)\)").search(
            self.log(), start
        )
        assert match, f"no {what} port in log:\n{self.log()}"
        return int(match.group(1))

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)

    def peakRSS(self) -> int:
        """The process's peak resident set (VmHWM), in bytes."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmHWM")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.signal(signal.SIGCONT)
            self.signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.signal(signal.SIGKILL)
                self.proc.wait(10)
        self._log.close()


#: ``twistd`` as a user runs it, with this interpreter.
TWISTD = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Any]:
    """Start ``twistd -n <plugin> ...`` children; every one is stopped afterwards."""
    started: list[Process] = []

    def start(plugin: str, *args: str, name: str | None = None, env: dict[str, str] | None = None) -> Process:
        logPath = tmp_path / f"{name or plugin}-{len(started)}.log"
        proc = Process(
            [*TWISTD, "-n", "--pidfile=", plugin, *args], logPath, env
        )
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.stop()
