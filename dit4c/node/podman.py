"""
The ``podman`` runtime: each instance is a podman pod on this node.

A pod ``<prefix>-<instance>`` holds the pod's infra container (which owns
the pod's network namespace) and the tool's container
``<prefix>-<instance>-tool``. The helpers are host processes
(:class:`dit4c.node.processes.PodProcess`), so that a node restart leaves
them running and finds them again:

- the auth helper runs in the pod's network namespace (``nsenter --net``):
  it reaches the tool on the pod's loopback and receives the one port the
  pod publishes, ``127.0.0.1:<hostPort>`` on the host;
- the listener runs in the host's network namespace (it dials the routing
  server) and forwards each stream to ``127.0.0.1:<hostPort>``.

A firewall in the pod's network namespace refuses every inbound connection
that does not come from the pod itself, except to the auth helper's port: the
tool is reachable only through the auth helper.

Every podman command runs with ``CONTAINERS_CONF`` pointing at
``etc/podman/containers.conf`` (or the file given), as a child process with a
timeout, in the runtime's own working directory; the reactor is never
blocked. The layout is described in docs/protocols.md section 9.1 ("Where
the helpers run: the podman runtime").

The runtime is made of parts, each in its own module: running podman
(:mod:`dit4c.node.podmancommand`), images, saved and loaded
(:mod:`dit4c.node.podmanimages`), building a pod
(:mod:`dit4c.node.podmanbuild`), starting a stopped pod again
(:mod:`dit4c.node.podmanresume`), and the pods it holds, watched, found
again after a restart and stopped (:mod:`dit4c.node.podmanpods`).
"""

from __future__ import annotations

import re
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from zope.interface import implementer

from dit4c.channel.wire import LogChunk
from dit4c.node.errors import PodmanError
from dit4c.node.interfaces import IRuntime, PodSpec, PodStatus, helperCommand
from dit4c.node.podmanbuild import INHERITED, firewallRules
from dit4c.node.podmancommand import summarise
from dit4c.node.podmanpods import (
    LABEL_DIRECTORY,
    LABEL_INSTANCE,
    LABEL_PREFIX,
    LABEL_ROLE,
    LABEL_TOOL_PORT,
    HeldPod,
    listening,
)
from dit4c.node.podmanresume import PodResuming
from dit4c.node.toollogs import mergeTimestamped

__all__ = [
    "AUTH_PORT",
    "CONTAINERS_CONF",
    "INHERITED",
    "LABEL_DIRECTORY",
    "LABEL_INSTANCE",
    "LABEL_PREFIX",
    "LABEL_ROLE",
    "LABEL_TOOL_PORT",
    "PodmanRuntime",
    "firewallRules",
    "listening",
    "summarise",
]

#: The podman configuration shipped with dit4c (``<repo>/etc/podman/containers.conf``).
CONTAINERS_CONF = Path(__file__).resolve().parent.parent.parent / "etc" / "podman" / "containers.conf"
#: The auth helper's port inside the pod (the next one if the tool uses it).
AUTH_PORT = 8765
#: Seconds a podman command may take (a pull may take ``pullTimeout``).
COMMAND_TIMEOUT = 60.0
#: Seconds a pull may take.
PULL_TIMEOUT = 900.0
#: Seconds podman waits for the tool to stop on SIGTERM before SIGKILL.
STOP_TIMEOUT = 10
#: Seconds between checks that the tool containers still run.
POLL_INTERVAL = 5.0

_PREFIX = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.-]{0,40}$")


@implementer(IRuntime)
class PodmanRuntime(PodResuming):
    """Runs each instance as a rootful podman pod; its helpers as host processes."""

    name = "podman"
    #: A stop keeps the pod and its tool's container (every file the tool
    #: wrote): a start of its instance starts them again (:mod:`dit4c.node.podmanresume`).
    resumable = True
    log = Logger()

    def __init__(
        self,
        reactor: Any,
        *,
        containersConf: Path | str | None = None,
        prefix: str = "dit4c",
        authCommand: Sequence[str] | None = None,
        listenerCommand: Sequence[str] | None = None,
        storageCommand: Sequence[str] | None = None,
        mountTimeout: float = 30.0,
        authPort: int = AUTH_PORT,
        podman: str = "podman",
        nsenter: str = "nsenter",
        iptablesRestore: str = "iptables-restore",
        ip6tablesRestore: str | None = "ip6tables-restore",
        commandTimeout: float = COMMAND_TIMEOUT,
        pullTimeout: float = PULL_TIMEOUT,
        stopTimeout: int = STOP_TIMEOUT,
        pollInterval: float = POLL_INTERVAL,
        helperStopGrace: float = 5.0,
        workDirectory: Path | None = None,
    ) -> None:
        """
        :param containersConf: podman's configuration (``CONTAINERS_CONF``);
            the file shipped in ``etc/podman`` if None.
        :param prefix: names the pods (``<prefix>-<instance>``) and is kept
            in their ``dit4c.prefix`` label: this runtime sees only its own
            pods, so several nodes (or test runs) can share one podman.
        :param authCommand: the auth helper's argv
            (``helperCommand("dit4c-helper-auth")`` if None).
        :param listenerCommand: the listener's argv
            (``helperCommand("dit4c-helper-listener")`` if None).
        :param authPort: the auth helper's port inside the pod.
        :param ip6tablesRestore: None where the host has no IPv6.
        :param workDirectory: podman's working directory (the node's own; a
            new temporary one if None): conmon, which podman leaves watching
            each container, writes files there (an ``oom`` marker when a
            container is killed for its memory), and they must not land in
            whatever directory the node was started from. A temporary one
            is removed when the runtime is forgotten.
        """
        if not _PREFIX.match(prefix):
            raise ValueError(f"bad pod name prefix {prefix!r}")
        self.storageCommand = list(storageCommand) if storageCommand is not None else helperCommand("dit4c-helper-storage")
        self.mountTimeout = mountTimeout
        self._temporaryWorkDirectory = workDirectory is None
        if workDirectory is None:
            workDirectory = Path(tempfile.mkdtemp(prefix="dit4c-podman-"))
        workDirectory.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.workDirectory = workDirectory
        self.reactor = reactor
        self.containersConf = Path(containersConf) if containersConf is not None else CONTAINERS_CONF
        self.prefix = prefix
        self.authCommand = list(authCommand) if authCommand is not None else helperCommand("dit4c-helper-auth")
        self.listenerCommand = (
            list(listenerCommand) if listenerCommand is not None else helperCommand("dit4c-helper-listener")
        )
        self.authPort = authPort
        self.podman = podman
        self.nsenter = nsenter
        self.iptablesRestore = iptablesRestore
        self.ip6tablesRestore = ip6tablesRestore
        self.commandTimeout = commandTimeout
        self.pullTimeout = pullTimeout
        self.stopTimeout = stopTimeout
        self.pollInterval = pollInterval
        self.helperStopGrace = helperStopGrace
        self._pods: dict[str, HeldPod] = {}
        self._callbacks: list[Callable[[str, str], object]] = []
        self._poll: LoopingCall | None = None
        self._forgotten = False

    # -- IRuntime ---------------------------------------------------------------------------

    def onExit(self, callback: Callable[[str, str], object]) -> None:
        self._callbacks.append(callback)

    def start(self, spec: PodSpec) -> Deferred[None]:
        return Deferred.fromCoroutine(self._start(spec))

    def stop(self, instance: str) -> Deferred[None]:
        return Deferred.fromCoroutine(self._stop(instance))

    def discard(self, instance: str) -> Deferred[None]:
        return Deferred.fromCoroutine(self._discard(instance))

    def pods(self) -> Deferred[list[PodStatus]]:
        return Deferred.fromCoroutine(self._list())

    def capture(self, instance: str, archive: Path) -> Deferred[str | None]:
        """
        The stopped tool container, committed to an image and saved as an
        OCI archive (``podman commit``, ``podman save``): the tool and every
        file it wrote.
        """
        return Deferred.fromCoroutine(self._capture(instance, archive))

    def logs(self, instance: str, offset: int | None, limit: int) -> Deferred[LogChunk]:
        """The tool container's output (``podman logs``), standard output and error in time order."""
        return Deferred.fromCoroutine(self._logs(instance, offset, limit))

    async def _logs(self, instance: str, offset: int | None, limit: int) -> LogChunk:
        name = self.toolName(instance)
        if not await self._exists("container", name):
            return LogChunk(0, 0, "")
        out, err, code, timedOut = await self._spawn([self.podman, "logs", "--timestamps", name])
        if timedOut or code != 0:
            raise PodmanError(f"reading the tool's output: {summarise(err)}")
        return LogChunk.of(mergeTimestamped(out, err), offset, limit)

    def ready(self, instance: str) -> Deferred[bool]:
        """
        Whether the tool listens on its port, read from the pod's network
        namespace (``/proc/<infra pid>/net/tcp``): the tool is not reachable
        from the host, so connecting to it is no test.
        """
        return Deferred.fromCoroutine(self._ready(instance))

    def forget(self) -> None:
        """
        Stop watching every pod, leaving them running (the node is stopping;
        a new runtime finds them again through :meth:`pods`).
        """
        self._forgotten = True
        self._callbacks.clear()
        for pod in self._pods.values():
            for process in pod.processes.values():
                process.forget()
        self._pods.clear()
        if self._poll is not None and self._poll.running:
            self._poll.stop()
        self._poll = None
        if self._temporaryWorkDirectory:
            # Pods left running keep their conmon, whose later writes here
            # (an oom marker) no runtime would read: a new runtime has a
            # directory of its own.
            shutil.rmtree(self.workDirectory, ignore_errors=True)
