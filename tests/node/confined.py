"""
Helpers for the tests of confined tools: a tool that reports what it can
reach, requests over a Unix socket, and running things as another user.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from dit4c.node.process import Tool

ROOT = Path(__file__).resolve().parents[2]
NOBODY = 65534

#: A tool that tries what a confined tool must not manage, writes what
#: happened to ``snoop.json`` in its working directory, then serves HTTP on
#: its socket (so the instance runs). ``argv[1]``: the instance key's path;
#: ``argv[2]``: a directory of the node's outside the pod.
SNOOP = r"""
import http.server, json, os, socketserver, sys
key, outside = sys.argv[1], sys.argv[2]
seen = {"uid": os.getuid(), "gid": os.getgid(), "groups": os.getgroups(), "cwd": os.getcwd()}
def attempt(name, action):
    try:
        seen[name] = ["ok", action()]
    except OSError as e:
        seen[name] = ["refused", e.errno]
attempt("key", lambda: open(key).read())
attempt("pod", lambda: sorted(os.listdir(os.path.dirname(key))))
attempt("outside", lambda: open(os.path.join(outside, "planted"), "w").write("x"))
attempt("work", lambda: open("written-by-the-tool", "w").write("x"))
attempt("tmp", lambda: open("/tmp/scratch", "w").write("x"))
seen["pids"] = sorted(int(p) for p in os.listdir("/proc") if p.isdigit())
with open("snoop.json", "w") as f:
    json.dump(seen, f)
class Server(socketserver.UnixStreamServer):
    def get_request(self):
        request, _ = super().get_request()
        return request, ("local", 0)
Server(os.environ["SOCKET"], http.server.SimpleHTTPRequestHandler).serve_forever()
"""


def snoopTool(key: Path, outside: Path, python: str = "{python}") -> Tool:
    return Tool("snoop", (python, "-c", SNOOP, str(key), str(outside)), {"SOCKET": "{socket}"})


def systemPython() -> str:
    """
    A Python that another user can run (the test's own may live under a
    home directory only root may enter), with DIT4C and its dependencies
    importable through ``PYTHONPATH`` (see :func:`asUser`).
    """
    for candidate in ("/usr/bin/python3",):
        if os.access(candidate, os.X_OK):
            version = subprocess.run(
                [candidate, "-c", "import sys; print(sys.version_info[:2])"], capture_output=True, text=True
            ).stdout.strip()
            if version == str(sys.version_info[:2]):
                return candidate
    pytest.skip(f"no system Python {sys.version_info[0]}.{sys.version_info[1]} for another user to run")


def importPath() -> list[str]:
    """Where this test run's Python finds DIT4C's dependencies (for another Python to find them too)."""
    return [p for p in sys.path if p.endswith("site-packages") and os.path.isdir(p)]


def asUser(uid: int, argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` as ``uid`` (and the same gid, no other groups), DIT4C importable."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("running as another user needs root and setpriv")
    env = {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "PYTHONPATH": os.pathsep.join([str(ROOT), *importPath()]),
        "HOME": "/nonexistent",
        "LANG": "C.UTF-8",
        **kwargs.pop("env", {}),
    }
    command = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", *argv]
    return subprocess.run(command, env=env, capture_output=True, text=True, **kwargs)


def listeningInodes() -> set[int]:
    """Inodes of every TCP socket listening on this machine (IPv4 and IPv6)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A":  # LISTEN
                inodes.add(int(fields[9]))
    return inodes


def treeOf(pid: int) -> set[int]:
    """``pid`` and all its descendants, as the host sees them."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parent = int(stat[stat.rindex(")") + 2 :].split()[1])
            children.setdefault(parent, []).append(int(entry.name))
    found, todo = set(), [pid]
    while todo:
        current = todo.pop()
        found.add(current)
        todo.extend(children.get(current, []))
    return found


def socketInodes(pids: set[int]) -> set[int]:
    inodes = set()
    for pid in pids:
        try:
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    inodes.add(int(target[8:-1]))
        except OSError:
            continue
    return inodes


def toolPid(pod: Path) -> int:
    return int(json.loads((pod / "tool.pid").read_text())["pid"])
