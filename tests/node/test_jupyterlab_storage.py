"""
JupyterLab, as the process runtime runs it (its root the instance's working
directory), shows the person's storage through the ``storage`` link the
runtime makes there, and opens the files in it.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import pytest_twisted
import treq
from support.processes import Process

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
    lab = Process(
        [
            LAB, "--no-browser", "--allow-root", f"--ServerApp.root_dir={work}", "--ServerApp.ip=127.0.0.1",
            "--ServerApp.port=0", "--ServerApp.port_retries=0", "--IdentityProvider.token=", "--ServerApp.password=",
        ],
        tmp_path / "lab.log",
        env={"JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime"), "HOME": str(work)},
    )  # fmt: skip
    try:
        port = int((await lab.waitForLog(r"http://127\.0\.0\.1:(\d+)/", timeout=60)).group(1))
        top = await (await treq.get(f"http://127.0.0.1:{port}/api/contents/", persistent=False)).json()
        assert [(entry["name"], entry["type"]) for entry in top["content"]] == [("storage", "directory")]
        folder = await (await treq.get(f"http://127.0.0.1:{port}/api/contents/storage/results", persistent=False)).json()
        assert [entry["name"] for entry in folder["content"]] == ["run1.csv"]
        opened = await (
            await treq.get(f"http://127.0.0.1:{port}/api/contents/storage/results/run1.csv?content=1", persistent=False)
        ).json()
        assert opened["content"] == "a,b\n1,2\n"
    finally:
        lab.stop()
