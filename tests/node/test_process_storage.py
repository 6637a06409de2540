"""
The person's storage under the ``process`` runtime of a root node, for
real: the file server of the file server's tests, the runtime's real
storage helper mounting it with sshfs for the tool's uid, and a tool
running as that uid writing there. Skipped where sshfs or /dev/fuse is
missing, except under CI, where that is a failure.
"""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from standins import HELPERS
from support.waiting import eventually
from twisted.internet import reactor

from dit4c.common.keys import savePrivateKey
from dit4c.node.interfaces import PodSpec
from dit4c.node.process import ProcessRuntime, Tool

# The file server's tests' world (a portal, alice's instances and keys, a file server), reused as it is.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "fileserver"))
from fileserver_world import makeWorld  # noqa: E402

#: Writes to the storage, reports what it saw in ``storage.json``, then serves on its socket.
WRITER = r"""
import http.server, json, os, socketserver
storage = os.environ["DIT4C_STORAGE"]
seen = {"uid": os.getuid()}
try:
    os.makedirs(os.path.join(storage, "results"), exist_ok=True)
    with open(os.path.join(storage, "results", "draft.csv"), "w") as f:
        f.write("a,b\n1,2\n")
    os.rename(os.path.join(storage, "results", "draft.csv"), os.path.join(storage, "results", "run1.csv"))
    seen["read"] = open(os.path.join(storage, "results", "run1.csv")).read()
    seen["owner"] = os.stat(os.path.join(storage, "results", "run1.csv")).st_uid
    seen["listed"] = sorted(os.listdir(storage))
    # The same files through the link in the working directory (what JupyterLab and the static site show).
    seen["linked"] = sorted(os.listdir("storage"))
except OSError as e:
    seen["error"] = str(e)
with open("storage.json", "w") as f:
    json.dump(seen, f)
class Server(socketserver.UnixStreamServer):
    def get_request(self):
        return super().get_request()[0], ("local", 0)
Server(os.environ["SOCKET"], http.server.SimpleHTTPRequestHandler).serve_forever()
"""


@pytest.fixture
def rootFuse(fuse: None) -> None:
    if os.geteuid() != 0:
        pytest.skip("a root node is what runs tools as uids of their own")


@pytest_twisted.async_yield_fixture
async def world(tmp_path: Path) -> Any:
    async for w in makeWorld(tmp_path):
        yield w


@pytest.mark.slow
@pytest_twisted.ensureDeferred
async def test_the_tool_uses_the_storage_as_its_own_uid(world: Any, rootFuse: None, tmp_path: Path) -> None:
    w = world
    tools = {"writer": Tool("writer", ("{python}", "-c", WRITER), {"SOCKET": "{socket}"})}
    # The real storage helper (separate from the stand-in auth helper and listener).
    runtime = ProcessRuntime(reactor, tmp_path / "node", tools, helpers=HELPERS, podHelpers="separate", stopGrace=5)
    instance = w.a.id
    pod = tmp_path / "node" / instance
    pod.mkdir(parents=True, mode=0o700)
    savePrivateKey(w.keyA, pod / "instance.key")
    environment = {
        "DIT4C_INSTANCE": instance,
        "DIT4C_INSTANCE_KEY": str(pod / "instance.key"),
        "DIT4C_PORTAL": w.portalURL,
        "DIT4C_STATE_DIR": str(pod / "state"),
        "DIT4C_FILE_SERVER": f"127.0.0.1:{w.port}",
        "DIT4C_FILE_SERVER_HOST_KEY": w.hostKey.toString("openssh").decode(),
    }
    try:
        await runtime.start(PodSpec(instance, "writer", None, pod, environment))

        async def written() -> bool:
            return (pod / "work" / "storage.json").exists() and await runtime.ready(instance)

        await eventually(
            written, timeout=30,
            what=lambda: (pod / "tool.log").read_text()[-2000:] + (pod / "storage.log").read_text()[-2000:],
        )  # fmt: skip
        seen = json.loads((pod / "work" / "storage.json").read_text())
        uid = json.loads((pod / "pod.json").read_text())["uid"]
        assert seen["uid"] == uid and "error" not in seen, seen
        assert seen["read"] == "a,b\n1,2\n" and seen["owner"] == uid
        assert seen["linked"] == seen["listed"] and "results" in seen["linked"]
        # It is the person's storage on the file server.
        assert (w.home(w.alice) / "results" / "run1.csv").read_text() == "a,b\n1,2\n"
        # Mounted for that uid alone: every file is its own, mode 0700 (root, the node, passes anyway).
        info = (pod / "mnt" / "results").stat()
        assert info.st_uid == uid and stat.S_IMODE(info.st_mode) == 0o700
    finally:
        await runtime.discard(instance)
    assert not pod.exists()
    assert (w.home(w.alice) / "results" / "run1.csv").read_text() == "a,b\n1,2\n"
