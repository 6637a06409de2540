"""
What a ``slurm``-runtime job runs on the compute node Slurm picked:
``python -m dit4c.node.slurmjob <pod directory>``, the job script's one
command.

It reads the pod's ``job.json`` (written by :mod:`dit4c.node.slurm` on the
node before ``sbatch``), then starts the pod's helper process
(``dit4c-helper-pod``: the listener, which dials out to the routing server
from this compute node, the auth helper and the storage helper) and the
tool, in the pod's working directory on the shared storage, the tool's
output in ``tool.log`` and the helpers' in ``helpers.log``. Once the tool
and the auth helper both accept connections it writes ``ready`` in the pod's
directory: the node, on another machine, cannot connect to a Unix socket
here, but it sees that file on the shared storage. The tool is started
through :mod:`dit4c.node.confine`, as the process runtime starts it: the
pods' directory hidden, as a uid of its own when the job runs as root.

When the tool ends by itself, it writes its status to ``exit.json``, stops
the helpers and ends the job with the tool's status (non-zero: the job
``FAILED``). On SIGTERM (``scancel``, or Slurm's own at the job's time
limit) it passes the signal on to both and waits for them; Slurm kills what
is left after its ``KillWait``.

This is a plain blocking program: it runs in the job, never in the node.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["EXIT", "JOB", "READY", "STARTED", "main"]

#: In the pod's directory: what the job runs (the node writes it).
JOB = "job.json"
#: In the pod's directory: the tool and its auth helper answer (the job writes it).
READY = "ready"
#: In the pod's directory: how the tool ended by itself (the job writes it).
EXIT = "exit.json"
#: In the pod's directory: the job has begun on a compute node (the job writes it first).
STARTED = "started"
#: Seconds between looks at the tool, at most.
LOOK = 0.5


def _accepts(target: str | int) -> bool:
    family = socket.AF_UNIX if isinstance(target, str) else socket.AF_INET
    with socket.socket(family) as s:
        s.settimeout(1)
        try:
            s.connect(target if isinstance(target, str) else ("127.0.0.1", target))
        except OSError:
            return False
    return True


def _freePort() -> int:
    """A loopback port for a tool that speaks only TCP (as the process runtime gives one: the tool binds it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _startTime(pid: int) -> int | None:
    from dit4c.node.processes import startTime

    return startTime(pid)


def main(argv: list[str]) -> int:
    from dit4c.common.helperenv import VARIABLES
    from dit4c.node import confine
    from dit4c.node.processlaunch import _own as own
    from dit4c.node.processtools import Tool

    pod = Path(argv[1])
    (pod / STARTED).write_text(json.dumps({"host": socket.gethostname()}))
    job: dict[str, Any] = json.loads((pod / JOB).read_text())
    work = Path(job["work"])
    tool = Tool(job["tool"]["name"], tuple(job["tool"]["command"]), job["tool"].get("environment"))
    socketPath = Path(job["socket"]) if job.get("socket") else None
    port = None if socketPath is not None else (job.get("port") or _freePort())
    helperEnv = dict(job["helperEnvironment"])
    if port is not None:
        helperEnv[VARIABLES["tool"]] = f"tcp:host=127.0.0.1:port={port}"
    toolEnv = {**job["toolEnvironment"], **({"PORT": str(port)} if port is not None else {}), **tool.env(port, work, socketPath)}
    for name in (READY, EXIT):
        (pod / name).unlink(missing_ok=True)
    if socketPath is not None:
        socketPath.unlink(missing_ok=True)
    Path(job["authSocket"]).unlink(missing_ok=True)
    uid = job.get("uid")
    sockets = [str(socketPath.parent)] if socketPath is not None else []
    if isinstance(uid, int):
        # The tool's own uid (a root node's job): its working directory and socket directory are its.
        own([work, *map(Path, sockets)], uid, uid)
    plan = confine.Plan(
        tool.argv(port, work, socketPath), str(work),
        uid=uid if isinstance(uid, int) else None, gid=uid if isinstance(uid, int) else None,
        hide=list(job.get("hide") or []), bind=[str(work), *sockets], expose=list(job.get("expose") or []),
        storage=job.get("storage"),
    )  # fmt: skip

    ending: list[int] = []
    signal.signal(signal.SIGTERM, lambda number, frame: ending.append(number))
    with (pod / "helpers.log").open("ab") as helperLog, (pod / "tool.log").open("ab") as toolLog:
        helpers = subprocess.Popen(
            [*job["helpers"], "--tool-pid-file", str(pod / "tool.pid"), "--hold", str(job.get("hold", 10))],
            env=helperEnv, cwd=str(pod), stdin=subprocess.DEVNULL, stdout=helperLog, stderr=subprocess.STDOUT,
        )  # fmt: skip
        toolProcess = subprocess.Popen(
            confine.command(sys.executable, plan), env=toolEnv, cwd=str(work),
            stdin=subprocess.DEVNULL, stdout=toolLog, stderr=subprocess.STDOUT,
        )  # fmt: skip
    (pod / "tool.pid").write_text(json.dumps({"pid": toolProcess.pid, "started": _startTime(toolProcess.pid)}))
    (pod / "helpers.pid").write_text(json.dumps({"pid": helpers.pid, "started": _startTime(helpers.pid)}))
    targets: list[str | int] = [str(socketPath) if socketPath is not None else port, job["authSocket"]]  # type: ignore[list-item]
    ready = False
    pause = 0.02
    while not ending:
        status = toolProcess.poll()
        if status is not None:
            (pod / EXIT).write_text(json.dumps({"tool": status}))
            (pod / READY).unlink(missing_ok=True)
            _end(helpers)
            return status or 0
        if helpers.poll() is not None:
            (pod / EXIT).write_text(json.dumps({"helpers": helpers.returncode}))
            (pod / READY).unlink(missing_ok=True)
            _end(toolProcess)
            return 1
        if not ready and all(_accepts(target) for target in targets):
            ready = True
            (pod / READY).write_text(json.dumps({"host": socket.gethostname(), "port": port}))
        time.sleep(pause)
        pause = min(pause * 2, LOOK)
    (pod / READY).unlink(missing_ok=True)
    # Asked to stop: the helpers first (no one reaches a tool that is going), both given the signal.
    for process in (helpers, toolProcess):
        _signal(process, signal.SIGTERM)
    for process in (toolProcess, helpers):
        process.wait()
    return 0


def _signal(process: subprocess.Popen[bytes], number: int) -> None:
    try:
        process.send_signal(number)
    except ProcessLookupError:
        pass


def _end(process: subprocess.Popen[bytes], grace: float = 10.0) -> None:
    _signal(process, signal.SIGTERM)
    try:
        process.wait(grace)
    except subprocess.TimeoutExpired:
        _signal(process, signal.SIGKILL)
        process.wait()


if __name__ == "__main__":
    sys.exit(main(sys.argv))
