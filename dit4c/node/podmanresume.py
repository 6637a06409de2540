"""
How the podman runtime resumes a stopped pod: the pod and its tool's
container are still on the node (a stop keeps them, with every file the
tool wrote, its volumes and, for a restored instance, the saved image it was
loaded from), so a start of an instance whose pod is here starts that pod
again rather than making a new one.

The pod is started again as a new one is made, in the same order: the
person's storage mounted on the host first (the tool's container binds the
mount point as it starts), the pod's infra container (its network namespace,
publishing the auth port on the host port podman chose when the pod was
made), the firewall applied again, then the tool's container, then the
helpers with the environment the node gives now (as the process runtime's
helpers are started afresh on a resume). Nothing is pulled, loaded or
fetched. A resume that fails stops what it started and keeps the pod.
"""

from __future__ import annotations

from pathlib import Path

from dit4c.common.helperenv import VARIABLES
from dit4c.node.errors import RuntimeError_
from dit4c.node.interfaces import PodSpec
from dit4c.node.podmanbuild import PodBuilding
from dit4c.node.podmanpods import INSTANCE_NAME, LABEL_TOOL_PORT, HeldPod, PodPhase

__all__ = ["PodResuming"]

#: Where the person's storage is in the tool's container.
STORAGE_IN_CONTAINER = "/mnt"


class PodResuming(PodBuilding):
    """Resuming pods (a part of :class:`dit4c.node.podman.PodmanRuntime`, which sets what is declared here)."""

    async def _start(self, spec: PodSpec) -> None:
        """A stopped pod of ``spec.instance`` started again if this node has one; else a new pod."""
        instance = spec.instance
        if not INSTANCE_NAME.match(instance):
            raise RuntimeError_(f"{instance!r} is not a valid instance id")
        pod = self._pods.get(instance)
        if pod is None:
            # Found again from podman's record (after a node restart), or none.
            pod = await self._find(instance)
        if pod is None:
            await super()._start(spec)
            return
        if pod.state not in (PodPhase.DOWN, PodPhase.ENDED):
            raise RuntimeError_(f"instance {instance} already has a pod on this node ({pod.state.value})")
        if str(pod.directory) in ("", "."):
            pod.directory = Path(spec.directory)
        await self._resume(pod, spec)

    async def _resume(self, pod: HeldPod, spec: PodSpec) -> None:
        instance = pod.instance
        pod.state = PodPhase.MAKING
        pod.failure = None
        # The helpers that ran before ended with the stop: new ones are started.
        pod.processes = {}
        try:
            toolPort, authPort, hostPort, infra = await self._kept(instance)
            if spec.environment.get(VARIABLES["fileServer"]):
                if STORAGE_IN_CONTAINER in await self._mountsOf(self.toolName(instance)):
                    await self._mountStorage(pod, spec)
                else:
                    self.log.info("pod {instance} was made without the person's storage", instance=instance)
            await self._run("start", infra, what="starting the pod again")
            pod.infraPid = await self._infraPid(instance)
            netns = f"/proc/{pod.infraPid}/ns/net"
            await self._firewall(netns, authPort)
            await self._run("start", self.toolName(instance), what="starting the tool again")
            pod.toolPort, pod.authPort = toolPort, authPort
            self._startHelpers(pod, spec, netns, toolPort, authPort, hostPort)
            if pod.failure is not None:
                raise RuntimeError_(pod.failure)
        except BaseException as e:
            self.log.warn("pod {instance} did not start again: {error}", instance=instance, error=str(e))
            pod.state = PodPhase.GOING
            try:
                await self._stopAgain(pod)
            except Exception as cleanup:
                self.log.error("stopping pod {instance} again: {error}", instance=instance, error=str(cleanup))
            pod.state = PodPhase.DOWN
            if isinstance(e, RuntimeError_):
                raise
            if isinstance(e, Exception):
                raise RuntimeError_(f"the pod could not start again: {e}") from e
            raise
        pod.state = PodPhase.UP
        self.log.info("pod {instance} started again (host port {port})", instance=instance, port=hostPort)
        self._watch()

    async def _kept(self, instance: str) -> tuple[int, int, int, str]:
        """
        What the pod was made with, from podman's record of it: the tool's
        port (its label), the auth helper's port and the host port it is
        published on (the pod's one port binding), and its infra container.
        """
        info = await self._json("pod", "inspect", self.podName(instance), what="inspecting the pod")
        if isinstance(info, list):
            info = info[0] if info else {}
        infra = info.get("InfraContainerID")
        tool = str((info.get("Labels") or {}).get(LABEL_TOOL_PORT, ""))
        bindings = (info.get("InfraConfig") or {}).get("PortBindings") or {}
        published = [
            (int(key.split("/")[0]), int(str(binding.get("HostPort", ""))))
            for key, found in bindings.items()
            if key.endswith("/tcp") and key.split("/")[0].isdigit()
            for binding in found or []
            if str(binding.get("HostPort", "")).isdigit()
        ]  # fmt: skip
        if not infra or not tool.isdigit() or len(published) != 1:
            raise RuntimeError_("the pod on this node is not one this runtime made: it cannot be started again")
        authPort, hostPort = published[0]
        return int(tool), authPort, hostPort, str(infra)

    async def _mountsOf(self, container: str) -> list[str]:
        """Where ``container`` has things mounted (its volumes' destinations)."""
        info = await self._json("container", "inspect", container, what="inspecting the tool's container")
        if isinstance(info, list):
            info = info[0] if info else {}
        return [str(m.get("Destination")) for m in info.get("Mounts") or [] if isinstance(m, dict)]

    async def _stopAgain(self, pod: HeldPod) -> None:
        """What a failed resume started, stopped again; the pod (and its files) kept."""
        await self._stopHelpers(pod)
        try:
            await self._run(
                "pod", "stop", "--ignore", "--time", str(self.stopTimeout), self.podName(pod.instance),
                timeout=self.stopTimeout + self.commandTimeout, what="stopping the pod",
            )  # fmt: skip
        finally:
            await self._stopStorage(pod)
