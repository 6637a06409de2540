"""
The test zygote (support.zygote): a forked twistd is a server of its own,
and its end is reported as ``Popen`` reports a child's.
"""

from __future__ import annotations

import os
import signal
import socket
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import treq
from support.processes import TWISTD, Process
from support.waiting import eventually
from support.zygote import ForkedProcess, enabled

pytestmark = pytest.mark.skipif(not enabled(), reason="DIT4C_TEST_FORK=0: servers are started afresh")


def routingServer(tmp_path: Path, signing: Any, http: str = "tcp:0:interface=127.0.0.1", **kwargs: Any) -> Process:
    """``twistd dit4c-routing`` serving public HTTP on ``http``."""
    return Process(
        [*TWISTD, "-n", "--pidfile=", "dit4c-routing", "--http", http, "--tunnel", f"unix:{tmp_path / 'tunnel.sock'}",
         "--jwks-file", str(signing.jwksPath)],
        tmp_path / "routing.log",
        **kwargs,
    )  # fmt: skip


@pytest_twisted.ensureDeferred
async def test_a_forked_server_runs_in_its_own_session_and_reports_its_end(tmp_path: Path, signing: Any) -> None:
    server = routingServer(tmp_path, signing)
    try:
        assert isinstance(server.proc, ForkedProcess)
        port = await server.waitForPort("public http")
        # Answering, so its reactor runs (and handles SIGTERM) from now on.
        await treq.get(f"http://127.0.0.1:{port}/", headers={"Host": "nobody.localhost"}, persistent=False)
        assert server.proc.poll() is None
        assert os.getpgid(server.pid) == server.pid and os.getsid(server.pid) == server.pid
        assert Path(f"/proc/{server.pid}/cwd").resolve() == Path.cwd().resolve()
        server.signal(signal.SIGTERM)
        # twistd shuts down, then ends by the signal it was stopped with, as one started afresh does.
        assert server.proc.wait(20) == -signal.SIGTERM
        assert "Server Shut Down." in server.log()
    finally:
        server.stop()


@pytest_twisted.ensureDeferred
async def test_a_server_that_refuses_its_options_ends_with_its_reason(tmp_path: Path) -> None:
    server = Process([*TWISTD, "-n", "--pidfile=", "dit4c-routing", "--no-such-option"], tmp_path / "routing.log")
    try:
        await eventually(lambda: server.proc.poll() is not None, 20, what="twistd to give up")
        assert server.proc.returncode not in (0, None)
        assert "no-such-option" in server.log()
    finally:
        server.stop()


@pytest_twisted.ensureDeferred
async def test_a_killed_server_reports_the_signal(tmp_path: Path, signing: Any) -> None:
    server = routingServer(tmp_path, signing)
    try:
        await server.waitForPort("public http")
        server.signal(signal.SIGKILL)
        assert server.proc.wait(20) == -signal.SIGKILL
    finally:
        server.stop()


@pytest_twisted.ensureDeferred
async def test_a_forked_server_serves_the_socket_it_was_handed(tmp_path: Path, signing: Any) -> None:
    """As systemd hands a listening socket over: bound here, served there (``systemd:domain=INET:index=0``)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    port = sock.getsockname()[1]
    server = routingServer(tmp_path, signing, "systemd:domain=INET:index=0", sockets=[sock])
    try:
        assert isinstance(server.proc, ForkedProcess) and sock.fileno() == -1
        await server.waitForLog("public http listening")
        response = await treq.get(f"http://127.0.0.1:{port}/", headers={"Host": "nobody.localhost"}, persistent=False)
        assert response.code == 404 and "There is no instance at nobody.localhost." in await response.text()
    finally:
        server.stop()
