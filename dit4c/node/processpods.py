"""
A process-runtime pod's processes: which there are (the tool and one helper
process; or, with ``podHelpers="separate"`` and in pods an older node
started, the tool, the auth helper, the listener and maybe the storage
helper), how they are watched, how a restarted node finds them again from
the pod's ``pod.json`` and pid files (:meth:`PodProcesses._adopt`), and how
they are stopped, and removed with every trace of the pod.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from twisted.internet import threads
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from dit4c.node.cgroups import Cgroups, PodCgroup, removeCgroup
from dit4c.node.interfaces import PodStatus
from dit4c.node.processes import (
    POD_RECORD,
    PodProcess,
    killRecorded,
    killStrays,
    removePodDirectory,
)

__all__ = ["HELPERS", "POD_HELPERS", "STORAGE", "STORAGE_STOP", "PodProcesses"]

#: A pod's processes: the tool and its one helper process.
ROLES = ("tool", "helpers")
HELPERS = "helpers"
#: A pod's processes with ``podHelpers="separate"`` (and every pod before
#: there was one helper process): the storage helper too with a file server.
SEPARATE_ROLES = ("tool", "auth", "listener")
STORAGE = "storage"
KNOWN_ROLES = frozenset((*ROLES, *SEPARATE_ROLES, STORAGE))
#: How a pod's helpers run: forked from the node's fork server (one process
#: per pod), started afresh (one process per pod), or three processes.
POD_HELPERS = ("forked", "one", "separate")
#: Seconds a pod's helper process may take to stop beyond waiting for the
#: tool: unmounting the storage (``fusermount``, then sshfs's end: 5 s,
#: SIGTERM and 5 s, SIGKILL and 5 s).
STORAGE_STOP = 20.0


class PodProcesses:
    """
    The pods' processes (a part of :class:`dit4c.node.process.ProcessRuntime`,
    which sets what is declared here).
    """

    log = Logger()

    reactor: Any
    directory: Path
    podHelpers: str
    stopGrace: float
    _pods: dict[str, dict[str, PodProcess]]
    #: Where each tool answers: its Unix socket, or a loopback port.
    _ports: dict[str, int | Path]
    #: Where each pod's auth helper answers: its Unix socket (a loopback
    #: port for a pod an older node started).
    _auth: dict[str, int | Path]
    _exitCallbacks: list[Callable[[str, str], object]]
    #: Where the tools' limits are enforced, or why they are not.
    cgroups: Cgroups | str
    #: Each limited pod's cgroup, and the pods whose OOM kill was reported.
    _cgroups: dict[str, PodCgroup]
    _oomSeen: set[str]
    _oomWatch: LoopingCall | None
    oomInterval: float

    def _roles(self, storage: bool) -> tuple[str, ...]:
        """The processes a new pod has."""
        if self.podHelpers == "separate":
            return (*SEPARATE_ROLES, STORAGE) if storage else SEPARATE_ROLES
        return ROLES

    @property
    def _hold(self) -> float:
        """Seconds a stopping helper process keeps the storage mounted, waiting for the tool (stopped by then)."""
        return self.stopGrace + 5.0

    def _processes(self, instance: str, directory: Path, roles: Sequence[str]) -> dict[str, PodProcess]:
        processes = {
            role: PodProcess(
                self.reactor, role, directory,
                stopGrace=self._hold + STORAGE_STOP if role == HELPERS else self.stopGrace,
            )
            for role in roles
        }  # fmt: skip

        def exited(process: PodProcess, reason: str) -> None:
            self._exited(instance, reason)

        for process in processes.values():
            process.onExit(exited)
        return processes

    def _exited(self, instance: str, reason: str) -> None:
        cgroup = self._cgroups.get(instance)
        if cgroup is not None and cgroup.limits.memory is not None:
            killed = "signal 9" in reason or "status 137" in reason
            if cgroup.oomKills() > 0 or (killed and not cgroup.counted() and cgroup.reachedLimit()):
                reason = cgroup.oomReason()  # the kernel's SIGKILL, said as what it was
        for callback in self._exitCallbacks:
            callback(instance, reason)

    # -- limits ------------------------------------------------------------------------------

    def _limited(self, instance: str, cgroup: PodCgroup | None) -> None:
        """``instance``'s tool runs in ``cgroup`` (None: in none); one with a memory limit is watched."""
        self._oomSeen.discard(instance)
        if cgroup is None:
            self._cgroups.pop(instance, None)
            return
        self._cgroups[instance] = cgroup
        if cgroup.limits.memory is not None and self._oomWatch is None:
            self._oomWatch = LoopingCall(self._lookForOom)
            self._oomWatch.clock = self.reactor
            self._oomWatch.start(self.oomInterval, now=False).addErrback(
                lambda f: self.log.failure("watching the tools' memory", f)
            )

    def _lookForOom(self) -> None:
        """
        A process of a limited tool killed for its memory (a Jupyter kernel,
        say, while the server it runs under lives on) ends the instance with
        the reason: a person sees why, not a kernel that silently restarts.
        """
        watching = False
        for instance, cgroup in list(self._cgroups.items()):
            processes = self._pods.get(instance) or {}
            tool = processes.get("tool")
            if cgroup.limits.memory is None or instance in self._oomSeen or tool is None or not tool.running:
                continue
            watching = True
            if cgroup.oomKills() > 0:
                self._oomSeen.add(instance)
                self.log.warn("{instance}: {reason}", instance=instance, reason=cgroup.oomReason())
                for callback in self._exitCallbacks:
                    callback(instance, cgroup.oomReason())
        if not watching and self._oomWatch is not None:
            if self._oomWatch.running:
                self._oomWatch.stop()
            self._oomWatch = None

    def _adopt(self, instance: str) -> dict[str, PodProcess] | None:
        """
        The pod's processes, found again from its ``pod.json`` and pid files
        if this runtime did not start them (a node restart): each is
        watched from now on. None if there is no such pod.

        Which processes the pod has is read from ``pod.json`` (its
        ``roles``; a pod started before there was one helper process has
        none, and a storage helper if ``storage`` or its pid file says so):
        never by looking at the mount point, which on a dead FUSE mount
        fails, or waits for a file server that may be served by this very
        process.
        """
        processes = self._pods.get(instance)
        if processes is not None:
            return processes
        directory = self.directory / instance
        try:
            pod = json.loads((directory / POD_RECORD).read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(pod, dict):
            return None
        roles = pod.get("roles")
        if not isinstance(roles, list) or not roles or not all(role in KNOWN_ROLES for role in roles):
            storage = bool(pod.get("storage", (directory / f"{STORAGE}.pid").exists()))
            roles = [*SEPARATE_ROLES, *([STORAGE] if storage else [])]
        processes = self._processes(instance, directory, roles)
        for process in processes.values():
            process.adopt()
        self._pods[instance] = processes
        self._limited(instance, PodCgroup.fromJSON(pod.get("cgroup")))
        try:
            self._ports[instance] = Path(pod["socket"]) if pod.get("socket") else int(pod["tool"])
            auth = pod["auth"]
            # A path; a port number in a pod an older node started.
            self._auth[instance] = Path(auth) if isinstance(auth, str) else int(auth)
        except (KeyError, ValueError, TypeError):
            pass
        return processes

    def stop(self, instance: str) -> Deferred[None]:
        processes = self._adopt(instance) or {}
        if HELPERS in processes:
            # The helper process first: its tunnel and auth helper close at
            # once, so no one reaches a tool that is going; it unmounts the
            # storage only once the tool has ended (--tool-pid-file).
            both = [processes[role].stop() for role in (HELPERS, "tool") if role in processes]
            return DeferredList(both, consumeErrors=True).addCallback(lambda _: None)
        # The listener first, so no one reaches a tool that is going; the
        # storage last, once the tool cannot be writing to it.
        order = [processes[role] for role in ("listener", "auth", "tool") if role in processes]
        d = DeferredList([p.stop() for p in order], consumeErrors=True)
        if STORAGE in processes:
            d.addCallback(lambda _: processes[STORAGE].stop())
        return d.addCallback(lambda _: None)

    def discard(self, instance: str) -> Deferred[None]:
        """
        Stop the pod, then make sure nothing of it is left: every process a
        pid file in its directory names, and any other process still in it
        (working in its directory, or carrying its instance id), is killed,
        what is mounted in it unmounted, and the directory removed.
        """
        directory = self.directory / instance

        def remove(_: object) -> Deferred[None]:
            self._pods.pop(instance, None)
            self._ports.pop(instance, None)
            self._auth.pop(instance, None)
            cgroup = self._cgroups.pop(instance, None)
            self._oomSeen.discard(instance)
            # Scanning processes and a working directory of gigabytes: not on the reactor thread.
            return threads.deferToThread(_removeAll, directory, instance, cgroup)

        return self.stop(instance).addCallback(remove)

    def pods(self) -> Deferred[list[PodStatus]]:
        found: list[PodStatus] = []
        for record in sorted(self.directory.glob(f"*/{POD_RECORD}")):
            instance = record.parent.name
            processes = self._adopt(instance)
            if processes is None:
                found.append(PodStatus(instance, False, "Its pod record is unreadable."))
                continue
            missing = [role for role, p in processes.items() if not p.running]
            reason = f"Not running: {', '.join(missing)}." if missing else None
            found.append(PodStatus(instance, not missing, reason))
        return succeed(found)


def _removeAll(directory: Path, instance: str, cgroup: PodCgroup | None = None) -> None:
    """Blocking (a thread): nothing of the pod left, processes, mounts and its cgroup included; then its directory."""
    killRecorded(directory)
    killStrays(directory, instance)
    if cgroup is not None:
        removeCgroup(cgroup)
    removePodDirectory(directory)
