"""
A real JupyterLab behind the auth helper: alice logs in through the real
portal, reaches the REST API, starts a kernel and runs ``1+1`` over the
kernel's WebSocket, all through the helper.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from auth_client import Browser, execute, logIn, startKernel
from support.sockets import rawRequest
from support.waiting import eventually

# Looked for, not imported: importing JupyterLab takes seconds, which every
# worker of a parallel run would spend collecting this module.
if importlib.util.find_spec("jupyterlab") is None:
    pytest.skip("JupyterLab is not installed", allow_module_level=True)


@pytest_twisted.async_yield_fixture
async def jupyter(tmp_path: Path) -> Any:
    executable = shutil.which("jupyter-lab", path=str(Path(sys.executable).parent)) or shutil.which("jupyter-lab")
    if executable is None:
        pytest.skip("jupyter-lab is not installed")
    home = tmp_path / "jupyter"
    # On a Unix socket, as a node runs it (and no port to choose).
    sock = tmp_path / "lab.sock"
    (home / "work").mkdir(parents=True)
    env = dict(
        os.environ,
        JUPYTER_CONFIG_DIR=str(home / "config"),
        JUPYTER_DATA_DIR=str(home / "data"),
        JUPYTER_RUNTIME_DIR=str(home / "runtime"),
        IPYTHONDIR=str(home / "ipython"),
        JUPYTER_PLATFORM_DIRS="1",
    )
    log = open(tmp_path / "jupyter.log", "wb")
    proc = subprocess.Popen(
        [
            executable, "--no-browser", "--ServerApp.token=", "--ServerApp.password=",
            "--ServerApp.disable_check_xsrf=True", "--ServerApp.allow_remote_access=True",
            f"--ServerApp.sock={sock}", "--allow-root",
            f"--ServerApp.root_dir={home / 'work'}",
        ],
        stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
    )  # fmt: skip
    try:

        async def serving() -> bool:
            assert proc.poll() is None, (tmp_path / "jupyter.log").read_text()
            try:
                status = await rawRequest(sock, b"GET /api/status HTTP/1.0\r\nHost: localhost\r\n\r\n")
            except Exception:
                return False  # not listening yet
            return re.match(rb"HTTP/1\.[01] 200 ", status) is not None

        await eventually(serving, 60, 0.2, lambda: (tmp_path / "jupyter.log").read_text())
        yield sock
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
        log.close()


@pytest.mark.slow
@pytest_twisted.ensureDeferred
async def test_jupyterlab_through_the_auth_helper(world: Any, jupyter: Path) -> None:
    await world.startAuth(tool=f"unix:path={jupyter}")
    alice = Browser(world)
    response = await logIn(alice, "alice", "/lab")
    assert response.code == 303

    response = await alice.get(world.instanceURL + "api/status", accept="application/json")
    assert response.code == 200
    assert "started" in await response.json()

    kernel = await startKernel(alice)

    # Without the session, the kernel's WebSocket is refused.
    anonymous = Browser(world)
    response = await anonymous.get(world.instanceURL + f"api/kernels/{kernel}", accept="application/json")
    assert response.code == 401

    assert await execute(alice, kernel, "1+1") == "2"

    response = await alice.request("DELETE", world.instanceURL + f"api/kernels/{kernel}", accept="application/json")
    assert response.code == 204

    # A gone kernel's channels: the tool refuses the upgrade, and that refusal comes through the helper.
    with pytest.raises(ConnectionError, match="did not open"):
        await execute(alice, kernel, "1+1", timeout=30)
