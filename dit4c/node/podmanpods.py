"""
The pods the podman runtime holds: where each is (:class:`PodPhase`), its
helpers watched and its tool's container polled, so that a pod that ends by
itself is reported; each found again from podman's record and its pid files
after a node restart (:meth:`PodmanPods._find`, :meth:`PodmanPods._list`);
and each stopped or removed, the listener first and the storage last.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThreadPool

from dit4c.node.cgroups import MIB, oomKillsAt, reachedAt
from dit4c.node.errors import PodmanError, RuntimeError_
from dit4c.node.interfaces import PodStatus
from dit4c.node.podmancommand import SAVED_PREFIX, PodmanCommands
from dit4c.node.processes import PodProcess, removePodDirectory

__all__ = [
    "INSTANCE_NAME",
    "LABEL_DIRECTORY",
    "LABEL_INSTANCE",
    "LABEL_MEMORY",
    "LABEL_PREFIX",
    "LABEL_ROLE",
    "LABEL_TOOL_PORT",
    "HeldPod",
    "PodPhase",
    "PodmanPods",
    "listening",
]

#: Labels on the pod and the tool's container.
LABEL_PREFIX = "dit4c.prefix"
LABEL_INSTANCE = "dit4c.instance"
LABEL_DIRECTORY = "dit4c.directory"
LABEL_ROLE = "dit4c.role"
LABEL_TOOL_PORT = "dit4c.tool-port"
#: The tool's memory limit in MiB (on the pod: a restarted node says an OOM kill as one).
LABEL_MEMORY = "dit4c.memory"

INSTANCE_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")


class PodPhase(enum.Enum):
    """Where one pod is, as this runtime sees it (the instance's own life is the node's)."""

    MAKING = "being made"
    UP = "up"
    #: Its tool or a helper ended by itself.
    ENDED = "ended by itself"
    GOING = "being stopped"
    DOWN = "down"


#: podman's word (``podman ps``) for a container that runs.
_CONTAINER_UP = "running"


@dataclass
class HeldPod:
    """What this node holds of one pod."""

    instance: str
    directory: Path
    state: PodPhase
    processes: dict[str, PodProcess] = field(default_factory=dict)
    #: The tool's port in the pod, and the pid of a process in its network namespace.
    toolPort: int | None = None
    #: The auth helper's port in the pod (unknown for a pod found again after a restart).
    authPort: int | None = None
    infraPid: int | None = None
    #: Why the pod failed while starting (a helper exited).
    failure: str | None = None
    #: The tool's memory limit (MiB), if it has one; the pod's cgroup (as podman names it).
    memory: int | None = None
    cgroup: str | None = None

    def oomReason(self) -> str:
        return f"The tool used more than its {self.memory} MiB of memory and was stopped."


def listening(pid: int, port: int) -> bool:
    """Whether a TCP socket listens on ``port`` in the network namespace of process ``pid``."""
    for table in ("tcp", "tcp6"):
        try:
            lines = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            # local address "HEXIP:HEXPORT", state 0A is LISTEN
            if len(fields) > 3 and fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                return True
    return False



class PodmanPods(PodmanCommands):
    """
    Pods held, watched, found again and stopped (a part of
    :class:`dit4c.node.podman.PodmanRuntime`, which sets what is declared here).
    """

    #: Seconds podman waits for the tool to stop on SIGTERM before SIGKILL.
    stopTimeout: int
    #: Seconds between checks that the tool containers still run.
    pollInterval: float
    #: Seconds a helper has to end after SIGTERM.
    helperStopGrace: float
    _pods: dict[str, HeldPod]
    _callbacks: list[Callable[[str, str], object]]
    _poll: LoopingCall | None
    #: Whether the node stopped watching (it is stopping; the pods run on).
    _forgotten: bool

    async def _infraPid(self, instance: str) -> int:
        """The pid of the pod's infra container, which holds the pod's network namespace."""
        info = await self._json("pod", "inspect", self.podName(instance), what="inspecting the pod")
        if isinstance(info, list):
            info = info[0] if info else {}
        infra = info.get("InfraContainerID")
        if not infra:
            raise RuntimeError_("the pod has no infra container")
        if instance in self._pods and info.get("CgroupPath"):
            self._pods[instance].cgroup = str(info["CgroupPath"])
        out = await self._run("inspect", "--format", "{{.State.Pid}}", infra, what="inspecting the pod")
        pid = int(out.strip() or 0)
        if pid <= 0:
            raise RuntimeError_("the pod's network is not up")
        return pid

    async def _ready(self, instance: str) -> bool:
        pod = self._pods.get(instance)
        if pod is None or pod.state is not PodPhase.UP or pod.toolPort is None:
            return False
        if pod.infraPid is None or not Path(f"/proc/{pod.infraPid}").exists():
            try:
                pod.infraPid = await self._infraPid(instance)
            except RuntimeError_:
                return False
        # The tool, and the auth helper in front of it (people reach the tool only through it).
        if pod.authPort is not None and not listening(pod.infraPid, pod.authPort):
            return False
        return listening(pod.infraPid, pod.toolPort)

    def _process(self, pod: HeldPod, name: str) -> PodProcess:
        process = PodProcess(self.reactor, name, pod.directory, stopGrace=self.helperStopGrace)
        process.onExit(lambda p, reason: self._exited(pod, reason))
        pod.processes[name] = process
        return process

    # -- exits ------------------------------------------------------------------------------

    def _exited(self, pod: HeldPod, reason: str) -> None:
        if self._forgotten or self._pods.get(pod.instance) is not pod:
            return
        if pod.state is PodPhase.MAKING:
            pod.failure = pod.failure or reason
            return
        if pod.state is not PodPhase.UP:
            return
        pod.state = PodPhase.ENDED
        self.log.info("pod {instance} stopped by itself: {reason}", instance=pod.instance, reason=reason)
        for callback in list(self._callbacks):
            try:
                callback(pod.instance, reason)
            except Exception:
                self.log.failure("onExit callback failed")

    def _watch(self) -> None:
        if self._poll is None and not self._forgotten:
            self._poll = LoopingCall(self._pollOnce)
            self._poll.clock = self.reactor
            self._poll.start(self.pollInterval, now=False).addErrback(
                lambda f: self.log.failure("watching the pods", f)
            )

    def _pollOnce(self) -> Deferred[None] | None:
        if not any(pod.state is PodPhase.UP for pod in self._pods.values()):
            if self._poll is not None and self._poll.running:
                self._poll.stop()
            self._poll = None
            return None
        d = Deferred.fromCoroutine(self._checkTools())
        d.addErrback(lambda f: self.log.warn("checking the tools: {error}", error=f.getErrorMessage()))
        return d

    async def _checkTools(self) -> None:
        containers = await self._json("ps", "--all", "--filter", f"label={LABEL_PREFIX}={self.prefix}", "--format", "json")
        tools = {}
        for c in containers or []:
            labels = c.get("Labels") or {}
            if labels.get(LABEL_ROLE) == "tool" and LABEL_INSTANCE in labels:
                tools[labels[LABEL_INSTANCE]] = c
        for pod in list(self._pods.values()):
            if pod.state is not PodPhase.UP:
                continue
            c = tools.get(pod.instance)
            if c is None:
                self._exited(pod, "The tool's container is gone.")
            elif c.get("State") != _CONTAINER_UP:
                self._exited(pod, await self._endedWhy(pod, c))
            elif pod.memory is not None and await self._podCgroup(pod) and oomKillsAt(f"{pod.cgroup}/libpod-{c.get('Id')}") > 0:
                # A process of the tool (a Jupyter kernel, say) killed while
                # the tool lives on: the instance ends with the reason, not
                # with a kernel that silently restarts.
                self._exited(pod, pod.oomReason())

    async def _endedWhy(self, pod: HeldPod, container: dict[str, Any]) -> str:
        """
        Why the tool's container ended. podman's ``State.OOMKilled`` misses
        the kernel's kill of a process under the container's init, and the
        container's cgroup goes with it: its pod's cgroup, which outlives
        it, says whether its memory reached the limit.
        """
        code = container.get("ExitCode")
        if pod.memory is not None and code == 137 and await self._podCgroup(pod):
            if reachedAt(str(pod.cgroup), pod.memory * MIB):
                return pod.oomReason()
        return f"The tool exited with status {code}."

    async def _podCgroup(self, pod: HeldPod) -> bool:
        """Whether the pod's cgroup is known (asked of podman once: a pod found again after a restart)."""
        if pod.cgroup is None:
            try:
                await self._infraPid(pod.instance)
            except RuntimeError_:
                pass
        return pod.cgroup is not None

    # -- finding again ----------------------------------------------------------------------

    async def _find(self, instance: str) -> HeldPod | None:
        """The pod from podman's record (after a node restart), its helpers adopted; None if none."""
        if not INSTANCE_NAME.match(instance):
            return None
        if not await self._exists("pod", self.podName(instance)):
            return None
        info = await self._json("pod", "inspect", self.podName(instance), what="inspecting the pod")
        if isinstance(info, list):
            info = info[0] if info else {}
        labels = info.get("Labels") or {}
        if labels.get(LABEL_PREFIX) != self.prefix:
            return None
        return self._adopt(instance, labels, info.get("State") == "Running")

    def _adopt(self, instance: str, labels: dict[str, str], running: bool) -> HeldPod:
        pod = HeldPod(instance, Path(labels.get(LABEL_DIRECTORY, "")), PodPhase.UP if running else PodPhase.DOWN)
        port = labels.get(LABEL_TOOL_PORT, "")
        pod.toolPort = int(port) if port.isdigit() else None
        memory = labels.get(LABEL_MEMORY, "")
        pod.memory = int(memory) if memory.isdigit() else None
        self._pods[instance] = pod
        if labels.get(LABEL_DIRECTORY):
            for name in ("auth", "listener", "storage"):
                # Never a stat of the mount point (a dead FUSE mount fails, or waits
                # for a file server this very process may serve): its pid file says.
                if name == "storage" and not (pod.directory / "storage.pid").exists():
                    continue
                process = self._process(pod, name)
                if not process.adopt():
                    del pod.processes[name]
        return pod

    async def _list(self) -> list[PodStatus]:
        entries = await self._json(
            "pod", "ps", "--filter", f"label={LABEL_PREFIX}={self.prefix}", "--format", "json", what="listing the pods"
        )
        statuses = []
        for entry in entries or []:
            labels = entry.get("Labels") or {}
            instance = labels.get(LABEL_INSTANCE)
            if not instance or labels.get(LABEL_PREFIX) != self.prefix:
                continue
            podRunning = entry.get("Status") == "Running"
            pod = self._pods.get(instance)
            if pod is None:
                pod = self._adopt(instance, labels, podRunning)
            statuses.append(self._status(pod, entry, podRunning))
        if any(pod.state is PodPhase.UP for pod in self._pods.values()):
            self._watch()
        return statuses

    def _status(self, pod: HeldPod, entry: dict[str, Any], podRunning: bool) -> PodStatus:
        if pod.state is PodPhase.MAKING:
            return PodStatus(pod.instance, False, "The pod is starting.")
        if pod.state is PodPhase.GOING:
            return PodStatus(pod.instance, False, "The pod is stopping.")
        if not podRunning:
            status = entry.get("Status") or "unknown"
            tool = [c for c in entry.get("Containers") or [] if c.get("Names") == self.toolName(pod.instance)]
            if status == "Degraded" and tool:
                reason = f"The tool is not running ({tool[0].get('Status')})."
            elif status in ("Exited", "Stopped"):
                reason = "The pod is stopped."
            else:
                reason = f"The pod is {status.lower()}."
            return PodStatus(pod.instance, False, reason)
        for name in ("auth", "listener"):
            process = pod.processes.get(name)
            if process is None or not process.running:
                return PodStatus(pod.instance, False, f"The {name} helper is not running.")
        if pod.state is PodPhase.ENDED:
            return PodStatus(pod.instance, False, "The pod stopped by itself.")
        pod.state = PodPhase.UP
        return PodStatus(pod.instance, True)

    # -- stopping and removing ----------------------------------------------------------------

    async def _stopHelpers(self, pod: HeldPod) -> None:
        """The listener first, so that no one reaches a tool that is going; then the auth helper."""
        pod.state = PodPhase.GOING
        for name in ("listener", "auth"):
            process = pod.processes.get(name)
            if process is not None:
                await process.stop()

    async def _stopStorage(self, pod: HeldPod) -> None:
        """Unmount the person's storage, once the tool cannot be writing to it."""
        process = pod.processes.get("storage")
        if process is not None:
            await process.stop()

    async def _stop(self, instance: str) -> None:
        pod = self._pods.get(instance) or await self._find(instance)
        if pod is None:
            return
        await self._stopHelpers(pod)
        await self._run(
            "pod", "stop", "--ignore", "--time", str(self.stopTimeout), self.podName(instance),
            timeout=self.stopTimeout + self.commandTimeout,
            what="stopping the pod",
        )  # fmt: skip
        await self._stopStorage(pod)
        pod.state = PodPhase.DOWN
        self.log.info("pod {instance} stopped", instance=instance)

    async def _discard(self, instance: str) -> None:
        pod = self._pods.get(instance) or await self._find(instance)
        if pod is None:
            return
        await self._removeAll(pod, removePod=True, removeDirectory=True)
        if self._pods.get(instance) is pod:
            del self._pods[instance]
        self.log.info("pod {instance} discarded", instance=instance)

    async def _removeAll(self, pod: HeldPod, *, removePod: bool, removeDirectory: bool) -> None:
        """
        Stop the helpers, remove the pod's directory, then the pod: if the
        node dies half-way, the pod (and its label) is what is left, and a
        second discard finds it.
        """
        await self._stopHelpers(pod)
        if removePod:
            await self._runUnlessGone(
                "pod", "stop", "--ignore", "--time", str(self.stopTimeout), self.podName(pod.instance),
                what="stopping the pod",
            )  # fmt: skip
        await self._stopStorage(pod)
        if removePod:
            loaded = await self._loadedImage(pod.instance)
            directory = pod.directory
            if removeDirectory and str(directory) not in ("", "/") and directory.exists():
                await deferToThreadPool(
                    self.reactor, self.reactor.getThreadPool(), removePodDirectory, directory
                )
            await self._runUnlessGone(
                "pod", "rm", "--ignore", "--force", "--time", str(self.stopTimeout), self.podName(pod.instance),
                what="removing the pod",
            )  # fmt: skip
            if loaded is not None:
                # Refused (and left) while another pod restored from the same image still uses it.
                await self._spawn([self.podman, "rmi", loaded])
        pod.state = PodPhase.DOWN

    async def _runUnlessGone(self, *args: str, what: str) -> None:
        """
        A ``podman pod stop|rm --ignore``: done if the pod is gone, also when
        it went while podman looked at it (``--ignore`` covers only a pod
        that was gone before; one removed between podman's finding its name
        and acting on its id fails with "no such pod").
        """
        try:
            await self._run(*args, timeout=self.stopTimeout + self.commandTimeout, what=what)
        except PodmanError as e:
            if "no such pod" not in str(e):
                raise

    async def _loadedImage(self, instance: str) -> str | None:
        """
        The saved image ``instance``'s tool was restored from (loaded from an
        archive, see ``_load``), if it was: removed with the pod, since the
        image server holds it and a later restore loads it again.
        """
        out, _, code, timedOut = await self._spawn(
            [self.podman, "container", "inspect", "--format", "{{.ImageName}}", self.toolName(instance)]
        )
        name = out.decode("utf-8", "replace").strip()
        if timedOut or code != 0 or not name.startswith(SAVED_PREFIX):
            return None
        return name
