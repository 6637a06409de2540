"""
JupyterLab, as the process runtime runs it (its root the instance's working
directory), shows the person's storage through the ``storage`` link the
runtime makes there, and opens the files in it.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from support.processes import Process
from support.waiting import eventually
from twisted.internet import reactor
from twisted.internet.error import ConnectError

from dit4c.common.portalhttp import portalHTTP
from dit4c.node.processlaunch import linkStorage

LAB = shutil.which("jupyter-lab") or str(Path(sys.executable).parent / "jupyter-lab")


@pytest.mark.skipif(not Path(LAB).exists(), reason="jupyter-lab is not installed")
@pytest_twisted.ensureDeferred
async def test_jupyterlab_lists_and_opens_the_persons_storage(tmp_path: Path) -> None:
    work, storage = tmp_path / "pod" / "work", tmp_path / "pod" / "mnt"
    work.mkdir(parents=True)
    (storage / "results").mkdir(parents=True)
    (storage / "results" / "run1.csv").write_text("a,b\n1,2\n")
    linkStorage(work)
    # On a Unix socket, as a node runs it: JupyterLab's own port 0 picks a
    # free port, closes it and binds it again later, which another test's
    # server may take in between.
    sock = tmp_path / "lab.sock"
    lab = Process(
        [
            LAB, "--no-browser", "--allow-root", f"--ServerApp.root_dir={work}", f"--ServerApp.sock={sock}",
            "--IdentityProvider.token=", "--ServerApp.password=",
        ],
        tmp_path / "lab.log",
        env={"JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime"), "HOME": str(work)},
    )  # fmt: skip
    try:
        await lab.waitForLog(r"is running at", timeout=60)
        http, base = portalHTTP(reactor, f"unix:{sock}", persistent=False)

        async def contents(path: str) -> Any:
            return await (await http.get(f"{base}/api/contents/{path}")).json()

        async def answered() -> Any:
            try:
                return await contents("")
            except ConnectError:
                return None

        # It says it is running before it binds its socket (a callback of its event loop).
        top = await eventually(answered, 30, what="JupyterLab serving on its socket")
        assert [(entry["name"], entry["type"]) for entry in top["content"]] == [("storage", "directory")]
        folder = await contents("storage/results")
        assert [entry["name"] for entry in folder["content"]] == ["run1.csv"]
        opened = await contents("storage/results/run1.csv?content=1")
        assert opened["content"] == "a,b\n1,2\n"
    finally:
        lab.stop()
