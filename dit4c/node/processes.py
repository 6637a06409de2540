"""
Long-lived processes of a pod, started so that a node restart leaves them
running and finds them again.

Each process runs in its own session (``setsid``), so a signal meant for
the node (Ctrl-C in its terminal, a restart) does not reach it, and
stopping it signals its whole process group (a tool's children, such as
Jupyter kernels, go with it). Its standard output and error go to a log
file in the pod's directory; its pid and start time go to a pid file there,
so that a restarted node can tell the process it started from an unrelated
one that was given the same pid later.

While the node that started a process runs, the reactor tells it when the
process ends; a process found again after a restart is polled.
"""

from __future__ import annotations

import json
import os
import re
import signal
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from dit4c.common.mounts import isMount, mountPoints

__all__ = [
    "PodProcess",
    "exitReason",
    "isMount",
    "killRecorded",
    "killStrays",
    "logTail",
    "podProcesses",
    "removePodDirectory",
    "startTime",
]

#: Seconds between SIGTERM and SIGKILL when stopping a process.
STOP_GRACE = 5.0
#: Seconds between checks on a process found again after a node restart.
POLL_INTERVAL = 2.0
#: Roles whose exit reason ends with the last lines of their log: the
#: tool's own output, which the person sees (the helpers' logs are the
#: operator's).
TAIL_ROLES = frozenset({"tool"})
#: The longest exit reason: what the scheduler channel carries (protocols 7.4).
MAX_REASON = 1000
#: How much of the end of a log is read for its last lines.
_TAIL_BYTES = 8192


def logTail(path: Path, limit: int) -> str:
    """
    The last lines of the log at ``path`` that fit in ``limit`` characters
    (the last one cut at its start if it alone is longer), printable text
    only: terminal escapes and other control characters are dropped.
    """
    try:
        with path.open("rb") as f:
            start = max(0, f.seek(0, os.SEEK_END) - _TAIL_BYTES)
            f.seek(start)
            data = f.read(_TAIL_BYTES)
    except OSError:
        return ""
    if start > 0:
        data = data.partition(b"\n")[2]  # the first line read is only the end of one
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", data.decode("utf-8", "replace"))
    text = "".join(c for c in text.replace("\r\n", "\n") if c in "\n\t" or c.isprintable())
    lines = [line.rstrip() for line in text.split("\n")]
    while lines and not lines[-1]:
        lines.pop()
    kept: list[str] = []
    used = 0
    for line in reversed(lines):
        if used + len(line) + (1 if kept else 0) > limit:
            if not kept and limit > 1:
                kept.append("…" + line[-(limit - 1) :])
            break
        kept.append(line)
        used += len(line) + (1 if len(kept) > 1 else 0)
    return "\n".join(reversed(kept))


def exitReason(name: str, how: str, log: Path | None = None) -> str:
    """
    What the node reports when a pod's process ended by itself: ``The tool
    exited with status 1.``, and, given its ``log``, the last lines of it,
    the whole at most :data:`MAX_REASON` characters.
    """
    reason = f"The {name} {how}."
    if log is None:
        return reason
    lead = " Its last output:\n"
    tail = logTail(log, MAX_REASON - len(reason) - len(lead))
    return f"{reason}{lead}{tail}" if tail else reason


def startTime(pid: int) -> int | None:
    """The process's start time (clock ticks after boot), or None if there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may hold spaces.
    fields = stat[stat.rindex(")") + 2 :].split()
    if fields[0] == "Z":
        return None  # a zombie has ended
    return int(fields[19])


class _Watcher(ProcessProtocol):
    def __init__(self, process: PodProcess) -> None:
        self.process = process

    def processEnded(self, reason: Failure) -> None:
        value: Any = reason.value
        self.process._ended(getattr(value, "exitCode", None), getattr(value, "signal", None))


class PodProcess:
    """One process of a pod: the tool, or a helper."""

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        name: str,
        directory: Path,
        *,
        pollInterval: float = POLL_INTERVAL,
        stopGrace: float = STOP_GRACE,
    ) -> None:
        """
        :param name: the process's role in the pod (``tool``, ``auth``,
            ``listener``): names its log (``<name>.log``) and pid file
            (``<name>.pid``) in ``directory``.
        """
        self.reactor = reactor
        self.name = name
        self.directory = directory
        self.pollInterval = pollInterval
        self.stopGrace = stopGrace
        self.pid: int | None = None
        self._started: int | None = None
        self._stopping = False
        self._onExit: Callable[[PodProcess, str], object] | None = None
        #: Who waits for the process to end (each stop under way).
        self._endWaiters: list[Deferred[None]] = []
        self._poll: LoopingCall | None = None
        self._kill: IDelayedCall | None = None
        self._forgotten = False

    @property
    def logPath(self) -> Path:
        return self.directory / f"{self.name}.log"

    @property
    def pidPath(self) -> Path:
        return self.directory / f"{self.name}.pid"

    def onExit(self, callback: Callable[[PodProcess, str], object]) -> None:
        """``callback(process, reason)`` when it ends other than through :meth:`stop`."""
        self._onExit = callback

    # -- starting, and finding again ------------------------------------------------------

    def start(self, argv: Sequence[str], env: Mapping[str, str], cwd: Path | None = None) -> None:
        """
        Start the process in a session of its own.

        :raises OSError: it could not be started (no such program, ...).
        """
        self.directory.mkdir(parents=True, exist_ok=True)
        log = os.open(self.logPath, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        null = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        try:
            transport = self.reactor.spawnProcess(
                _Watcher(self),
                "/usr/bin/setsid",
                ["setsid", *argv],
                env=dict(env),
                path=str(cwd or self.directory),
                childFDs={0: null, 1: log, 2: log},
            )
        finally:
            os.close(log)
            os.close(null)
        self.pid = transport.pid
        self._started = startTime(transport.pid) if transport.pid else None
        self._stopping = False
        self._record(argv)
        self.log.info("{name} started (pid {pid})", name=self.name, pid=self.pid)

    def _record(self, argv: Sequence[str]) -> None:
        self.pidPath.write_text(json.dumps({"pid": self.pid, "started": self._started, "argv": list(argv)}))

    def watch(self, pid: int, argv: Sequence[str]) -> bool:
        """
        Take on a process of this role that another process started (a
        fork server): recorded in the pid file and polled from now on, as one
        found again after a restart is. Whether it is running.
        """
        started = startTime(pid)
        if started is None:
            return False
        self.pid, self._started, self._stopping = pid, started, False
        self._record(argv)
        self.log.info("{name} started (pid {pid})", name=self.name, pid=pid)
        return self.adopt()

    def adopt(self) -> bool:
        """
        Find the process again from its pid file (after a node restart).
        Whether it is still running; if it is, it is polled from now on.
        """
        try:
            record = json.loads(self.pidPath.read_text())
            pid, started = int(record["pid"]), record["started"]
        except (OSError, ValueError, KeyError, TypeError):
            return False
        if started is None or startTime(pid) != started:
            return False
        self.pid, self._started = pid, started
        self._poll = LoopingCall(self._check)
        self._poll.clock = self.reactor
        self._poll.start(self.pollInterval, now=False)
        return True

    @property
    def running(self) -> bool:
        return self.pid is not None and self._started is not None and startTime(self.pid) == self._started

    def _check(self) -> None:
        if not self.running:
            self._ended(None, None)

    def _ended(self, exitCode: int | None, signalNumber: int | None) -> None:
        if self.pid is None or self._forgotten:
            return
        if self._poll is not None and self._poll.running:
            self._poll.stop()
        self._poll = None
        if self._kill is not None and self._kill.active():
            self._kill.cancel()
        self._kill = None
        pid, self.pid = self.pid, None
        # The group may outlive its leader (a tool's children): end them too.
        _signalGroup(pid, signal.SIGKILL)
        if signalNumber is not None:
            how = f"was killed by signal {signalNumber}"
        elif exitCode is not None:
            how = f"exited with status {exitCode}"
        else:
            how = "ended"
        self.log.info("{name} {how}", name=self.name, how=how)
        waiting, self._endWaiters = self._endWaiters, []
        for d in waiting:
            d.callback(None)
        if not self._stopping and self._onExit is not None:
            self._onExit(self, exitReason(self.name, how, self.logPath if self.name in TAIL_ROLES else None))

    # -- stopping ---------------------------------------------------------------------------

    def stop(self) -> Deferred[None]:
        """SIGTERM to its process group, SIGKILL after the grace period; fires once it has ended."""
        if self.pid is None:
            return succeed(None)
        self._stopping = True
        self._forgotten = False
        d: Deferred[None] = Deferred()
        self._endWaiters.append(d)
        pid = self.pid
        _signalGroup(pid, signal.SIGTERM)
        # A child of this process is reported by the reactor; one found
        # again after a restart is not: poll (either way) while it stops.
        if self._poll is not None and self._poll.running:
            self._poll.stop()
        self._poll = LoopingCall(self._check)
        self._poll.clock = self.reactor
        self._poll.start(0.1, now=False)
        if self._kill is None:
            self._kill = self.reactor.callLater(self.stopGrace, self._forceStop, pid)
        return d

    def _forceStop(self, pid: int) -> None:
        self._kill = None
        if self.pid == pid:
            self.log.warn("{name} did not stop within {grace} s: killing it", name=self.name, grace=self.stopGrace)
            _signalGroup(pid, signal.SIGKILL)

    def forget(self) -> None:
        """Stop watching (the node is stopping and leaves the process running)."""
        if self._poll is not None and self._poll.running:
            self._poll.stop()
        self._poll = None
        self._onExit = None
        self._forgotten = True


#: The node's record of an instance, in its pod's directory.
RECORD = "instance.json"
#: The runtime's record of a pod, in its directory.
POD_RECORD = "pod.json"


def removePodDirectory(directory: Path) -> None:
    """
    Remove a pod's directory, never crossing into a mount inside it (the
    person's shared storage, mounted in the pod): each is unmounted first
    (lazily, if it is busy), and if one stays mounted nothing more is
    removed and :class:`OSError` says why. ``shutil.rmtree`` alone would
    delete the person's files through the mount.
    """
    import shutil

    if not directory.exists():
        return
    mounts: list[Path] = []
    points = mountPoints()
    for root, directories, _ in os.walk(directory):
        for name in list(directories):
            if isMount(Path(root) / name, points):
                mounts.append(Path(root) / name)
                directories.remove(name)
    for mount in mounts:
        _unmount(mount)
        if isMount(mount):
            raise OSError(f"{mount} is still mounted: not removing {directory}")
    # The node's record goes last: a node that dies half way through still
    # knows the instance when it starts again, and discards the rest.
    record = directory / RECORD
    for child in directory.iterdir():
        if child == record:
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()
    record.unlink(missing_ok=True)
    directory.rmdir()


def killRecorded(directory: Path) -> list[int]:
    """
    Kill (SIGKILL, whole process group) every process a pid file under
    ``directory`` records that still runs, then unmount (lazily) what is
    mounted under it (the storage their sshfs held); the pids killed. For
    cleaning up after a node that can no longer do it itself.

    Only a pod's own pid files count: those at the top of its directory
    (one holding ``pod.json`` or the node's record). Nothing below a pod is
    read, least of all its working directory, where the tool writes: a
    tool must not be able to name a process for a root node to kill.
    """
    killed = []
    pidFiles: list[Path] = []
    mounts: list[Path] = []
    points = mountPoints()
    for root, directories, files in os.walk(directory):
        # Never into a mount (the person's storage, perhaps dead by now).
        for name in list(directories):
            if isMount(Path(root) / name, points):
                mounts.append(Path(root) / name)
                directories.remove(name)
        pidFiles.extend(Path(root) / name for name in files if name.endswith(".pid"))
        if POD_RECORD in files or RECORD in files:
            directories.clear()  # a pod: its own pid files are these
    for pidFile in pidFiles:
        try:
            record = json.loads(pidFile.read_text())
            pid, started = int(record["pid"]), record["started"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if started is not None and startTime(pid) == started:
            _signalGroup(pid, signal.SIGKILL)
            killed.append(pid)
    for mount in mounts:
        _unmount(mount)
    return killed


def podProcesses(directory: Path, instance: str) -> list[int]:
    """
    Every process (but this one) that belongs to a pod: it works in the
    pod's directory (or below: a tool in its working directory), or its
    command line names it, or its environment carries the instance's id
    (``DIT4C_INSTANCE``, as every helper's does) and names the pod's
    directory (the helper environment's key file and state directory are
    in it): another node on the same machine may run a pod of the same
    instance (one restored there), which is not this one's. From ``/proc``,
    without touching anything inside the pod (a dead mount in it cannot
    stall this).
    """
    root = os.path.abspath(directory)
    marker = f"DIT4C_INSTANCE={instance}".encode()
    rootBytes = os.fsencode(root)
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            cwd = os.readlink(f"/proc/{entry}/cwd")
        except OSError:
            cwd = ""
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            environ = Path(f"/proc/{entry}/environ").read_bytes()
        except OSError:
            continue
        inside = cwd == root or cwd.startswith(root + "/")
        if inside or rootBytes in cmdline or (marker in environ.split(b"\0") and rootBytes + b"/" in environ):
            found.append(int(entry))
    return found


def killStrays(directory: Path, instance: str) -> list[int]:
    """
    Kill (SIGKILL, with its process group) every process of a pod that is
    still running (:func:`podProcesses`), for when its pid files do not
    name them all; the pids killed.
    """
    killed = podProcesses(directory, instance)
    for pid in killed:
        _signalGroup(pid, signal.SIGKILL)
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    return killed


def _unmount(mount: Path) -> None:
    import subprocess

    for command in (["fusermount3", "-u", "-z"], ["fusermount", "-u", "-z"], ["umount", "-l"]):
        if not isMount(mount):
            return
        try:
            subprocess.run([*command, str(mount)], capture_output=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            continue


def _signalGroup(pid: int, signalNumber: int) -> None:
    try:
        os.killpg(pid, signalNumber)
    except ProcessLookupError:
        pass
    except PermissionError:
        # Not a group leader of ours (should not happen): the process alone.
        try:
            os.kill(pid, signalNumber)
        except OSError:
            pass
