"""
The ``process`` runtime: each pod is two local processes, the tool and one
helper process (``dit4c-helper-pod``: the listener, the auth helper, and the
storage helper with shared storage, in one process), the embedded default
that needs no container engine.

The helper process is forked from the node's fork server
(:mod:`dit4c.podhelper.forkserver`), which has imported what a helper runs
once: each pod's helpers then share those pages and own only what they
change, a fraction of a process started afresh (docs/performance.md).
``podHelpers="separate"`` runs a pod's listener, auth helper and storage
helper as three processes instead, as before; pods started that way (or by
an older node) are found again and stopped as they were started, by the
roles their ``pod.json`` names.

The tool is a command from the node's tool table, run in the pod's own
working directory (``<pod>/work``). It listens on a Unix socket,
``<pod>/sock/tool.sock``, in a directory only the tool and the auth helper
can enter (mode 0700, inside the node-private pod directory); the auth
helper in front of it is the only way in; the listener dials the routing
server and hands each stream to the auth helper. The auth helper also
listens on a Unix socket, ``<pod>/auth.sock`` (mode 0600, in the pod
directory only the node's user enters): the node's readiness check, and
the listener's target when the helpers run as separate processes. No
helper of a pod listens on TCP.

A tool table entry that only speaks TCP (``{port}``, no ``{socket}``) is
given a free loopback port instead (:func:`freePort`), which any local
process can reach: such a tool is not confined as to who connects to it.
It is the one port the node chooses and another program binds later: the
tool is a program DIT4C does not control, and it takes a number, not a
socket.

Every tool is started through :mod:`dit4c.node.confine`, which keeps it
from the node's files: new mount and PID namespaces where the node's data
directory (and so every pod's key) is covered by an empty tmpfs, with only
the tool's working directory, its socket directory and the person's
storage bound back; the rest of the file system read-only; a ``/proc``
showing the tool's own processes only. When the node runs as root the tool
runs as a uid of its own, one per instance, from a range (default
:data:`TOOL_UIDS`; the uid need not exist in ``/etc/passwd``), its working
directory (a restored archive too) handed to that uid; the storage is
mounted for it (sshfs ``allow_other`` with that uid as owner). When the
node runs as an ordinary user the tool keeps the node's uid, in a user
namespace of its own; where the kernel refuses one it runs unconfined, and
the node's log says so once.

The tool's own output goes to ``<pod>/tool.log``; when the tool exits by
itself, the reason the node reports ends with that log's last lines.

The runtime is made of parts, each in its own module: the tool catalogue
(:mod:`dit4c.node.processtools`), launching a pod
(:mod:`dit4c.node.processlaunch`), a pod's processes, found again after a
restart and stopped (:mod:`dit4c.node.processpods`), and saved images
(:mod:`dit4c.node.processarchive`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from twisted.internet import threads
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import TCP4ClientEndpoint, UNIXClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from zope.interface import implementer

from dit4c.channel.wire import LogChunk
from dit4c.node.cgroups import Cgroups, PodCgroup, detect
from dit4c.node.confine import STORAGE_WAIT
from dit4c.node.errors import RuntimeError_
from dit4c.node.interfaces import IRuntime, helperCommand
from dit4c.node.processarchive import IMAGE_FORMAT, IMAGE_METADATA, packArchive

# Its name before the archives had a module of their own, still imported by that name.
from dit4c.node.processarchive import unpackArchive as _unpack  # noqa: F401
from dit4c.node.processes import POD_RECORD, PodProcess
from dit4c.node.processlaunch import TOOL_UIDS, PodLaunching, homeDirectory, whyUnconfined
from dit4c.node.processpods import HELPERS, POD_HELPERS
from dit4c.node.processtools import Tool, builtinTools, freePort, toolsFromFile
from dit4c.node.toollogs import readChunk
from dit4c.podhelper.forkserver import ForkServer

__all__ = [
    "IMAGE_FORMAT",
    "IMAGE_METADATA",
    "POD_HELPERS",
    "TOOL_UIDS",
    "ProcessRuntime",
    "Tool",
    "builtinTools",
    "freePort",
    "toolsFromFile",
]


@implementer(IRuntime)
class ProcessRuntime(PodLaunching):
    """Pods as local processes."""

    #: A stopped pod's working directory stays: started again, the tool finds its files.
    resumable = True

    name = "process"
    log = Logger()

    def __init__(
        self,
        reactor: Any,
        directory: Path,
        tools: Mapping[str, Tool] | None = None,
        *,
        helpers: Mapping[str, Sequence[str]] | None = None,
        stopGrace: float = 5.0,
        toolUids: range = TOOL_UIDS,
        hide: Sequence[Path] | None = None,
        storageWait: float = STORAGE_WAIT,
        podHelpers: str = "forked",
        cgroups: Cgroups | str | None = None,
        oomInterval: float = 1.0,
    ) -> None:
        """
        :param directory: where the node keeps pods (``<directory>/<instance>/``).
        :param tools: image name → tool (default :func:`builtinTools`).
        :param helpers: ``helpers`` (or, with ``podHelpers="separate"``,
            ``auth`` / ``listener`` / ``storage``) → the command that runs
            it (default: the DIT4C helper plugins). A ``helpers`` command
            given here is started as it is, not forked.
        :param podHelpers: ``forked`` (one helper process per pod, forked
            from the node's fork server), ``one`` (one helper process per
            pod, started afresh) or ``separate`` (the listener, the auth
            helper and the storage helper, a process each).
        :param toolUids: when the node runs as root, the uids (and gids)
            its tools run as, one per instance: a range no account uses.
        :param hide: what tools must not see (default: the node's data
            directory, the one holding ``directory``; and the node's home
            directory when it is not root, since its tools share its uid).
        :param storageWait: seconds a tool waits for the person's storage to
            be mounted before it starts without it.
        :param cgroups: where the tools' CPU and memory limits are enforced
            (:mod:`dit4c.node.cgroups`), or why they cannot be; None: found
            on this machine.
        :param oomInterval: seconds between looks at whether the kernel
            killed a process of a limited tool for its memory.
        """
        self.reactor = reactor
        self.directory = directory
        self.root = os.geteuid() == 0
        self.toolUids = toolUids
        if hide is None:
            hide = [directory.resolve().parent, *([] if self.root else [homeDirectory()])]
        self.hide = [Path(path).resolve() for path in hide]
        self.storageWait = storageWait
        self._uids: dict[str, int] = {}
        self.confined = whyUnconfined()
        if self.confined is not None:
            if self.root:
                self.log.error("tools cannot be confined, so none will start: {why}", why=self.confined)
            else:
                self.log.warn(
                    "tools run unconfined, as this user, and can read their instance's key: {why}. "
                    "Allow unprivileged user namespaces (sysctl user.max_user_namespaces, "
                    "kernel.unprivileged_userns_clone) to confine them.",
                    why=self.confined,
                )  # fmt: skip
        self.cgroups = cgroups if cgroups is not None else detect(str(directory.resolve()))
        if isinstance(self.cgroups, str):
            self.log.warn(
                "CPU and memory limits are not enforced on this node (each limited tool's log says so): {why}",
                why=self.cgroups,
            )
        else:
            self.log.info("CPU and memory limits are enforced with {how}", how=self.cgroups.describe())
        self.oomInterval = oomInterval
        self._cgroups: dict[str, PodCgroup] = {}
        self._oomWatch: LoopingCall | None = None
        self._oomSeen: set[str] = set()
        self.tools = dict(tools) if tools is not None else builtinTools()
        if podHelpers not in POD_HELPERS:
            raise ValueError(f"podHelpers is one of {', '.join(POD_HELPERS)}, not {podHelpers!r}")
        self.podHelpers = podHelpers
        #: Fork pod helpers, unless a command for them was given.
        self.forkServer: ForkServer | None = None
        if podHelpers == "forked" and HELPERS not in (helpers or {}):
            self.forkServer = ForkServer(reactor, directory / "helpers.sock", directory / "helpers-forkserver.log")
        self.helpers = {
            HELPERS: list(helperCommand("dit4c-helper-pod")),
            "auth": list(helperCommand("dit4c-helper-auth")),
            "listener": list(helperCommand("dit4c-helper-listener")),
            "storage": list(helperCommand("dit4c-helper-storage")),
            **{k: list(v) for k, v in (helpers or {}).items()},
        }
        self.stopGrace = stopGrace
        self._pods: dict[str, dict[str, PodProcess]] = {}
        #: Where each tool answers: its Unix socket, or a loopback port.
        self._ports: dict[str, int | Path] = {}
        #: Where each pod's auth helper answers: its Unix socket (a loopback
        #: port for a pod an older node started).
        self._auth: dict[str, int | Path] = {}
        self._exitCallbacks: list[Callable[[str, str], object]] = []

    def onExit(self, callback: Callable[[str, str], object]) -> None:
        self._exitCallbacks.append(callback)

    def capture(self, instance: str, archive: Path) -> Deferred[str | None]:
        """
        The pod's working directory as a tar archive, with the tool's name
        in ``.dit4c-image.json``; its digest (hashed as it is written).
        """
        directory = self.directory / instance
        try:
            tool = json.loads((directory / POD_RECORD).read_text())["image"]
        except (OSError, ValueError, KeyError) as e:
            raise RuntimeError_(f"Nothing to save: the instance has no pod here ({e}).") from None
        return threads.deferToThread(packArchive, directory / "work", archive, str(tool))

    def logs(self, instance: str, offset: int | None, limit: int) -> Deferred[LogChunk]:
        """The tool's output, from ``<pod>/tool.log``."""
        return threads.deferToThread(readChunk, self.directory / instance / "tool.log", offset, limit)

    def ready(self, instance: str) -> Deferred[bool]:
        """Whether the tool (its Unix socket, or its port), and the auth helper in front of it (its socket), accept connections."""
        if instance not in self._ports:
            return succeed(False)
        targets = [self._ports[instance], *([self._auth[instance]] if instance in self._auth else [])]
        return Deferred.fromCoroutine(self._ready(targets))

    async def _ready(self, targets: list[int | Path]) -> bool:
        for target in targets:
            if not await self._accepts(target):
                return False
        return True

    def _accepts(self, target: int | Path) -> Deferred[bool]:
        endpoint: Any
        if isinstance(target, Path):
            endpoint = UNIXClientEndpoint(self.reactor, str(target), timeout=2)
        else:
            endpoint = TCP4ClientEndpoint(self.reactor, "127.0.0.1", target, timeout=2)

        def connected(protocol: Protocol) -> bool:
            if protocol.transport is not None:
                protocol.transport.loseConnection()
            return True

        return connectProtocol(endpoint, Protocol()).addCallbacks(connected, lambda _: False)

    def forget(self) -> None:
        """Stop watching the pods (the node is stopping; they run on)."""
        for processes in self._pods.values():
            for process in processes.values():
                process.forget()
        if self._oomWatch is not None and self._oomWatch.running:
            self._oomWatch.stop()
        self._oomWatch = None
        if self.forkServer is not None:
            self.forkServer.stop()
