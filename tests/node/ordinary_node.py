"""
``python ordinary_node.py DIR``: a ``process`` runtime as an ordinary user
would run it (not root), for :mod:`test_ordinary_node`, which runs this
under ``setpriv`` as ``nobody``. It starts Notes and a tool that snoops,
checks what it must, and prints what it found as JSON.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import sys
import tempfile
from functools import partial
from pathlib import Path
from typing import Any

from confined import listeningInodes, snoopTool, socketInodes, toolPid, treeOf
from standins import POD_HELPER
from support.sockets import rawRequest
from support.waiting import eventually
from twisted.internet import task

from dit4c.node.interfaces import PodSpec
from dit4c.node.process import ProcessRuntime, builtinTools


async def main(reactor: Any, base: str) -> None:
    directory = Path(base) / "node"
    # Not under /tmp (the tool's /tmp is its own): only the read-only file system keeps the tool out.
    outside = Path(tempfile.mkdtemp(prefix="dit4c-outside-", dir="/var/tmp"))
    key = directory / "snp1" / "instance.key"
    tools = {"dit4c/notes": builtinTools()["dit4c/notes"], "snoop": snoopTool(key, outside)}
    runtime = ProcessRuntime(reactor, directory, tools, helpers=POD_HELPER, stopGrace=2)
    found: dict[str, Any] = {"confined": runtime.confined, "uid": os.getuid()}
    try:
        for instance, tool in (("nts1", "dit4c/notes"), ("snp1", "snoop")):
            pod = directory / instance
            pod.mkdir(parents=True, mode=0o700)
            (pod / "instance.key").write_text("the instance key")
            (pod / "instance.key").chmod(0o600)
            await runtime.start(PodSpec(instance, tool, None, pod, {"DIT4C_INSTANCE_KEY": str(pod / "instance.key")}))
            log = pod / "tool.log"
            await eventually(partial(runtime.ready, instance), timeout=30, what=lambda: log.read_text()[-3000:])  # noqa: B023 (awaited in this turn)
            found[instance] = {
                "ready": await runtime.ready(instance),
                "socketDirectory": oct(stat.S_IMODE((pod / "sock").stat().st_mode)),
                "tcp": len(socketInodes(treeOf(toolPid(pod))) & listeningInodes()),
                "log": (pod / "tool.log").read_text()[-1000:],
            }
        page = await rawRequest(directory / "nts1" / "sock" / "tool.sock", b"GET / HTTP/1.0\r\nX-DIT4C-User: alice\r\n\r\n")
        found["nts1"]["greets"] = b"Hello, alice." in page
        found["snp1"]["seen"] = json.loads((directory / "snp1" / "work" / "snoop.json").read_text())
        found["snp1"]["planted"] = (outside / "planted").exists()
    finally:
        for instance in list(runtime._pods):
            await runtime.discard(instance)
        shutil.rmtree(outside)
    print(json.dumps(found))


if __name__ == "__main__":
    task.react(main, sys.argv[1:])
