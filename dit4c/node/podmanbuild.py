"""
How the podman runtime builds a pod: the image (pulled or loaded), a pod
publishing the auth helper's port on a host loopback port podman chooses,
a firewall in the pod's network namespace that lets in only the auth
helper's port, the person's storage mounted on the host and bound into
the tool's container, the tool's container, then the helpers as host
processes. A pod that cannot be built is removed again, and the start
fails with the reason.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from twisted.internet.task import deferLater

from dit4c.common.helperenv import VARIABLES, toEnvironment
from dit4c.common.limits import ToolLimits
from dit4c.node.errors import PodmanError, RuntimeError_
from dit4c.node.interfaces import PodSpec
from dit4c.node.podmanimages import PodmanImages
from dit4c.node.podmanpods import (
    INSTANCE_NAME,
    LABEL_DIRECTORY,
    LABEL_INSTANCE,
    LABEL_MEMORY,
    LABEL_PREFIX,
    LABEL_ROLE,
    LABEL_TOOL_PORT,
    HeldPod,
    PodmanPods,
    PodPhase,
)
from dit4c.node.processes import isMount

__all__ = ["INHERITED", "PodBuilding", "firewallRules", "limitOptions"]

#: Host environment variables the helpers inherit (besides the pod's own).
INHERITED = ("PATH", "PYTHONPATH", "LANG", "LC_ALL", "TZ")


def firewallRules(authPort: int, ipv6: bool = False) -> bytes:
    """
    ``iptables-restore`` input for the pod's network namespace: inbound
    connections only from the pod itself (loopback) or to the auth helper's
    port; replies to the pod's own outbound traffic pass.
    """
    rejectRest = "-A INPUT -p ipv6-icmp -j ACCEPT\n" if ipv6 else "-A INPUT -j REJECT\n"
    return (
        "*filter\n"
        ":INPUT ACCEPT [0:0]\n"
        "-A INPUT -i lo -j ACCEPT\n"
        "-A INPUT -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT\n"
        f"-A INPUT -p tcp --dport {authPort} -j ACCEPT\n"
        "-A INPUT -p tcp -j REJECT --reject-with tcp-reset\n"
        f"{rejectRest}"
        "COMMIT\n"
    ).encode()



def limitOptions(limits: ToolLimits) -> list[str]:
    """
    ``podman run`` options for the tool's CPUs and memory; memory and swap
    together equal to the memory limit, so swap does not take it past it.
    """
    options = []
    if limits.cpus is not None:
        options += ["--cpus", f"{limits.cpus:g}"]
    if limits.memory is not None:
        options += ["--memory", f"{limits.memory}m", "--memory-swap", f"{limits.memory}m"]
    return options


class PodBuilding(PodmanPods, PodmanImages):
    """Building pods (a part of :class:`dit4c.node.podman.PodmanRuntime`, which sets what is declared here)."""

    authPort: int
    nsenter: str
    iptablesRestore: str
    ip6tablesRestore: str | None
    authCommand: list[str]
    listenerCommand: list[str]
    storageCommand: list[str]
    #: Seconds the storage helper has to mount the person's storage.
    mountTimeout: float

    async def _start(self, spec: PodSpec) -> None:
        instance = spec.instance
        if not INSTANCE_NAME.match(instance):
            raise RuntimeError_(f"{instance!r} is not a valid instance id")
        if instance in self._pods:
            raise RuntimeError_(f"instance {instance} already has a pod on this node")
        programs = {"auth helper": self.authCommand, "listener": self.listenerCommand, "nsenter": [self.nsenter]}
        for role, argv in programs.items():
            if not argv or shutil.which(argv[0]) is None:
                program = argv[0] if argv else ""
                raise RuntimeError_(f"the {role}'s program {program!r} is not installed on this node")
        pod = HeldPod(instance, Path(spec.directory), PodPhase.MAKING, memory=spec.limits.memory)
        self._pods[instance] = pod
        made = False
        try:
            if await self._exists("pod", self.podName(instance)):
                raise RuntimeError_(f"instance {instance} already has a pod on this node: discard it first")
            image = spec.image
            if spec.archive is not None:
                image = await self._load(spec.archive)
            else:
                await self._ensureImage(image)
            toolPort = spec.port if spec.port is not None else await self._exposedPort(image)
            authPort = self.authPort if toolPort != self.authPort else self.authPort + 1
            pod.directory.mkdir(parents=True, exist_ok=True)
            made = True
            hostPort = await self._createPod(pod, authPort, toolPort)
            pod.toolPort = toolPort
            pod.authPort = authPort
            pod.infraPid = await self._infraPid(instance)
            netns = f"/proc/{pod.infraPid}/ns/net"
            await self._firewall(netns, authPort)
            volumes: list[str] = []
            if spec.environment.get(VARIABLES["fileServer"]):
                # The person's storage, mounted on the host by the storage
                # helper, then bound into the tool's container at /mnt.
                mount = await self._mountStorage(pod, spec)
                volumes = ["--volume", f"{mount}:/mnt"]
            await self._run(
                "run", "--detach", "--init", "--pull=never",
                *volumes,
                *limitOptions(spec.limits),
                "--pod", self.podName(instance),
                "--name", self.toolName(instance),
                "--label", f"{LABEL_PREFIX}={self.prefix}",
                "--label", f"{LABEL_INSTANCE}={instance}",
                "--label", f"{LABEL_ROLE}=tool",
                image,
                what="starting the tool",
            )  # fmt: skip
            self._startHelpers(pod, spec, netns, toolPort, authPort, hostPort)
            if pod.failure is not None:
                raise RuntimeError_(pod.failure)
        except BaseException as e:
            self.log.warn("pod {instance} did not start: {error}", instance=instance, error=str(e))
            pod.state = PodPhase.GOING
            try:
                await self._removeAll(pod, removePod=made, removeDirectory=False)
            except Exception as cleanup:
                self.log.error("cleaning up pod {instance}: {error}", instance=instance, error=str(cleanup))
            if self._pods.get(instance) is pod:
                del self._pods[instance]
            if isinstance(e, RuntimeError_):
                raise
            if isinstance(e, Exception):
                raise RuntimeError_(f"the pod could not start: {e}") from e
            raise
        pod.state = PodPhase.UP
        self.log.info("pod {instance} started (host port {port})", instance=instance, port=hostPort)
        self._watch()

    async def _createPod(self, pod: HeldPod, authPort: int, toolPort: int) -> int:
        """
        Create and start the pod (its infra container) publishing the auth
        port on a host loopback port podman chooses; that port, as podman
        reports it. A few tries: podman chooses the port as it creates the
        pod and binds it as it starts it, and another program may take it
        in between.
        """
        for attempt in range(3):
            try:
                await self._run(
                    "pod", "create",
                    "--name", self.podName(pod.instance),
                    "--label", f"{LABEL_PREFIX}={self.prefix}",
                    "--label", f"{LABEL_INSTANCE}={pod.instance}",
                    "--label", f"{LABEL_DIRECTORY}={pod.directory}",
                    "--label", f"{LABEL_TOOL_PORT}={toolPort}",
                    *(["--label", f"{LABEL_MEMORY}={pod.memory}"] if pod.memory is not None else []),
                    "--publish", f"127.0.0.1::{authPort}",
                    what="creating the pod",
                )  # fmt: skip
                await self._run("pod", "start", self.podName(pod.instance), what="starting the pod")
            except PodmanError as e:
                if "address already in use" in str(e) and attempt < 2:
                    await self._run("pod", "rm", "--ignore", "--force", self.podName(pod.instance))
                    continue
                raise
            return await self._hostPort(pod.instance, authPort)
        raise AssertionError("unreachable")

    async def _hostPort(self, instance: str, authPort: int) -> int:
        """The host port the pod publishes ``authPort`` on (``podman pod inspect``: its infra container's bindings)."""
        info = await self._json("pod", "inspect", self.podName(instance), what="inspecting the pod")
        if isinstance(info, list):
            info = info[0] if info else {}
        bindings = ((info.get("InfraConfig") or {}).get("PortBindings") or {}).get(f"{authPort}/tcp") or []
        for binding in bindings:
            port = str(binding.get("HostPort", ""))
            if port.isdigit() and int(port) > 0:
                return int(port)
        raise RuntimeError_(f"podman published the auth port {authPort} on no host port")

    async def _firewall(self, netns: str, authPort: int) -> None:
        await self._run(
            command=[self.nsenter, f"--net={netns}", "--", self.iptablesRestore],
            stdin=firewallRules(authPort),
            what="closing the pod's network to all but the auth helper",
        )
        if self.ip6tablesRestore is not None:
            await self._run(
                command=[self.nsenter, f"--net={netns}", "--", self.ip6tablesRestore],
                stdin=firewallRules(authPort, ipv6=True),
                what="closing the pod's network to all but the auth helper (IPv6)",
            )

    def _helperEnv(self, spec: PodSpec, **chosen: str) -> dict[str, str]:
        """A helper's environment: the pod's, and what this runtime chose (helper environment attributes)."""
        env = {k: os.environ[k] for k in INHERITED if k in os.environ}
        env.update(spec.environment)
        env.update(toEnvironment(**chosen))
        return env

    def _startHelpers(
        self, pod: HeldPod, spec: PodSpec, netns: str, toolPort: int, authPort: int, hostPort: int
    ) -> None:
        nsenter = shutil.which(self.nsenter) or self.nsenter
        auth = self._process(pod, "auth")
        try:
            auth.start(
                [nsenter, f"--net={netns}", "--", *self.authCommand],
                self._helperEnv(
                    spec, tool=f"tcp:host=127.0.0.1:port={toolPort}", authListen=f"tcp:{authPort}:interface=0.0.0.0"
                ),
            )
            listener = self._process(pod, "listener")
            listener.start(
                self.listenerCommand,
                self._helperEnv(spec, auth=f"tcp:host=127.0.0.1:port={hostPort}"),
            )
        except OSError as e:
            raise RuntimeError_(f"a helper could not start: {e.strerror or e}") from None

    async def _mountStorage(self, pod: HeldPod, spec: PodSpec) -> Path:
        mount = pod.directory / "mnt"
        mount.mkdir(exist_ok=True)
        storage = self._process(pod, "storage")
        try:
            storage.start(self.storageCommand, self._helperEnv(spec, storageMount=str(mount)))
        except OSError as e:
            raise RuntimeError_(f"the storage helper could not start: {e.strerror or e}") from None
        deadline = self.reactor.seconds() + self.mountTimeout
        while not isMount(mount):
            if pod.failure is not None:
                raise RuntimeError_(pod.failure)
            if self.reactor.seconds() > deadline:
                raise RuntimeError_(f"the person's storage was not mounted within {self.mountTimeout:g} s")
            await deferLater(self.reactor, 0.1, lambda: None)
        return mount
