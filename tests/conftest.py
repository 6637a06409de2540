"""
Fixtures shared by every test: signing keys and tokens, a backend web server,
a routing server and listener in this process on real loopback sockets, and
helpers to run the real ``twistd`` plugins as separate processes.
"""

from __future__ import annotations

import os
import resource
import signal
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from hypothesis import settings
from support.backend import startBackend
from support.ordering import spread
from support.passwords import cheapUnknownNames  # noqa: F401 (autouse: every test)
from support.postgres import postgresServer  # noqa: F401 (a fixture: one PostgreSQL server per test process)
from support.processes import TWISTD, Process
from support.routing import Signing, startRouting, stopRouting
from twisted.internet import reactor
from twisted.logger import LogLevel, globalLogPublisher

from dit4c.common.keys import generatePrivateKey, jwks, savePrivateKey
from dit4c.common.tokens import TokenSigner

# Many tests open thousands of sockets.
_soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (_hard, _hard))

# Tests stop servers with SIGINT, as a person's Ctrl-C does. A shell
# without job control starts its background commands with SIGINT ignored,
# and an ignored signal stays ignored in every child: a suite started so
# would see its servers ignore the Ctrl-C. Handled here, children start
# with the default.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

# Generated examples are judged by what they do, never by how long one
# takes: hypothesis' per-example deadline is a wall-clock assertion, and
# fails on a loaded machine.
settings.register_profile("dit4c", deadline=None)
settings.load_profile("dit4c")


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


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "allow_logged_errors: the test expects errors in the log")
    if config.option.basetemp is None or hasattr(config, "workerinput"):
        # Short temporary paths: a pod's Unix socket (<pod>/sock/tool.sock)
        # must fit in sun_path's 107 bytes, and pytest's own base
        # (/tmp/pytest-of-<user>/pytest-<n>) grows with every run, as does
        # the one pytest-xdist gives each of its workers (<base>/popen-gw<n>).
        config.option.basetemp = f"/tmp/d4t-{os.getpid()}"
        config.stash[_SHORT_BASE] = config.option.basetemp


_SHORT_BASE = pytest.StashKey[str]()
_BRIDGE_HOLD = pytest.StashKey[str]()


def pytest_sessionstart(session: pytest.Session) -> None:
    """
    The process that runs the session (not a worker) holds podman's bridge
    up until the session ends, before any browser starts (``support.hostnet``).
    """
    if hasattr(session.config, "workerinput"):
        return
    from support.hostnet import holdPodmanBridge

    held = holdPodmanBridge()
    if held is not None:
        session.config.stash[_BRIDGE_HOLD] = held


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """In a parallel run, the whole-installation tests spread over the workers (see ``support.ordering``)."""
    workers = getattr(config, "workerinput", {}).get("workercount", 0)
    if workers > 1:
        items[:] = spread(items, workers)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    """With ``DIT4C_TEST_CPU=FILE``, each test's wall and CPU seconds appended to FILE (``support.cpu``)."""
    path = os.environ.get("DIT4C_TEST_CPU")
    if not path:
        yield
        return
    from support.cpu import TestCPU

    measure = TestCPU(path)
    measure.begin()
    yield
    measure.end(item.nodeid)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    held = session.config.stash.get(_BRIDGE_HOLD, None)
    if held is not None:
        from support.hostnet import releasePodmanBridge

        releasePodmanBridge(held)
    base = session.config.stash.get(_SHORT_BASE, None)
    if base is None or exitstatus != 0:
        return  # kept when something failed, to look at
    from dit4c.common.mounts import mountPoints

    if any(point == base or point.startswith(base + "/") for point in mountPoints()):
        return  # never through a mount left behind
    import shutil

    shutil.rmtree(base, ignore_errors=True)


def requireFuse() -> None:
    """Skip (fail under CI) where FUSE mounts cannot be made: no sshfs, or no /dev/fuse."""
    import shutil

    missing = [what for what, ok in (("sshfs", shutil.which("sshfs")), ("/dev/fuse", os.path.exists("/dev/fuse"))) if not ok]
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"FUSE mounts cannot be tested: no {', '.join(missing)}")
        pytest.skip(f"FUSE mounts cannot be tested: no {', '.join(missing)}")


@pytest.fixture
def fuse() -> None:
    """Tests that mount the person's storage (sshfs) need FUSE."""
    requireFuse()


# -- keys and tokens ---------------------------------------------------------------


@pytest.fixture
def signing(tmp_path: Path) -> Signing:
    import json

    key = generatePrivateKey()
    keyPath = tmp_path / "signing.pem"
    savePrivateKey(key, keyPath)
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


#: The one Chromium of this worker, kept from test to test: starting one
#: costs about 2 s of CPU, which some 40 browser tests paid each.
_browsers: list[Any] = []


@pytest_twisted.async_yield_fixture
async def browser() -> Any:
    """
    Headless Chromium (skipped where there is none, failed under CI): the
    worker's, with nothing left of the test before (see
    :meth:`~support.browser.Browser.forget`); a new one if that one no
    longer answers.
    """
    from support.browser import requireBrowser, startBrowser
    from twisted.internet import threads

    requireBrowser()
    # Asked again here: a browser can die between two tests (nothing answers then).
    if _browsers and not await _browsers[0].forget():
        await _browsers.pop().stop()
    if not _browsers:
        _browsers.append(await threads.deferToThread(startBrowser))
    started = _browsers[0]
    try:
        yield started
    finally:
        if not await started.forget():
            _browsers.clear()
            await started.stop()


@pytest.fixture(scope="session", autouse=True)
def _quitBrowser() -> Iterator[None]:
    """The worker's Chromium stopped when its tests are done."""
    yield
    for started in _browsers:
        started.quit()


# -- real processes --------------------------------------------------------------------


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Any]:
    """Start ``twistd -n <plugin> ...`` children; every one is stopped afterwards."""
    started: list[Process] = []
    held: list[Any] = []

    def start(
        plugin: str, *args: str, name: str | None = None, env: dict[str, str] | None = None,
        sockets: Sequence[Any] = (), socketNames: Sequence[str] = (),
    ) -> Process:  # fmt: skip
        """``sockets``, ``socketNames``: handed to it, as :class:`~support.processes.Process` hands them."""
        logPath = tmp_path / f"{name or plugin}-{len(started)}.log"
        proc = Process(
            [*TWISTD, "-n", "--pidfile=", plugin, *args], logPath, env, sockets=sockets, socketNames=socketNames
        )
        started.append(proc)
        return proc

    def stopAll() -> None:
        """Stop them all now (a clean-up that must come after them calls it first)."""
        for proc in started:
            proc.stop()

    def hold(sockets: Iterable[Any]) -> None:
        """Keep ``sockets`` (to hand to a server at each start) until the test ends, then close them."""
        held.extend(sockets)

    start.stopAll = stopAll  # type: ignore[attr-defined]
    start.hold = hold  # type: ignore[attr-defined]
    yield start
    stopAll()
    for sock in held:
        sock.close()
