"""
A compute node: each instance's life on this machine, whatever the runtime.

The node makes the instance's key pair (the public half goes up to the
portal, the private half stays in the pod's directory for the helpers),
builds the helper environment, asks the runtime for the pod, waits for the
tool to answer, and tells whoever watches (the scheduler) every state.

Its record of an instance is the instance's life (:mod:`dit4c.common.life`)
in the state it is in, kept in a small JSON file in the pod's directory
with the time it entered that state: a move the life does not allow is
refused, and a transient state that outlives its deadline becomes
``errored`` with the reason, whatever was under way (a restart included).

A restarted node takes back every pod it finds, carrying on from where
each instance was. Nothing here stats a mount point or reads, writes or
hashes a big file on the reactor thread.

The node is made of parts, each in its own module: the records and the
moves of each instance's life (:mod:`dit4c.node.noderecords`), starting
(:mod:`dit4c.node.nodestart`), stopping, saving and discarding
(:mod:`dit4c.node.nodestop`), and taking pods back after a restart
(:mod:`dit4c.node.noderecovery`). This module puts them together as the
service the scheduler talks to (:class:`dit4c.channel.interfaces.INode`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, fail, succeed
from twisted.logger import Logger
from zope.interface import implementer

from dit4c.channel.interfaces import INode, INodeObserver
from dit4c.channel.wire import InstanceStatus, LogChunk
from dit4c.common.life import DEADLINES, HOLDS_POD, State
from dit4c.node.errors import NotHere
from dit4c.node.interfaces import IRuntime, helperCommand
from dit4c.node.noderecovery import NodeRecovery
from dit4c.podhelper.forkserver import UPLOAD, ForkServer

__all__ = ["Node"]


@implementer(INode)
class Node(NodeRecovery, Service):
    """A compute node in this process."""

    log = Logger()
    #: Always reachable by whoever holds this object (its scheduler in this process, or its link server).
    connected = True

    def __init__(
        self,
        reactor: Any,
        runtime: IRuntime,
        directory: Path,
        *,
        name: str = "local",
        portal: str,
        portalInternal: str | None = None,
        routing: tuple[str, ...] = (),
        routingAudience: str = "dit4c-routing",
        capacity: int = 8,
        startTimeout: float = 300.0,
        readyInterval: float = 0.2,
        imageServer: str | None = None,
        uploadCommand: list[str] | None = None,
        helperForks: ForkServer | None = None,
        fileServer: str | None = None,
        fileServerHostKey: str | None = None,
        deadlines: Mapping[State, float] | None = None,
    ) -> None:
        """
        :param directory: where pods' directories go (``<directory>/<instance>/``).
        :param portal: the portal's public URL (browsers), and
            ``portalInternal`` as the helpers reach it.
        :param routing: client endpoints of the routing servers' tunnel ports.
        :param startTimeout: seconds a tool has to answer, once its pod is
            made, before its start counts as failed.
        :param imageServer: the image server's base URL, as this node
            reaches it: where saved images go. None: this node cannot save.
        :param uploadCommand: runs the upload helper (``helperCommand("dit4c-helper-upload")``).
        :param helperForks: forks the upload helper instead (the process
            runtime's fork server), unless ``uploadCommand`` is given.
        :param fileServer: the file server (``host:port``) whose storage
            each pod mounts (the storage helper), and ``fileServerHostKey``
            its SSH host key, pinned. None: no shared storage.
        :param deadlines: seconds each transient state may last (default:
            the instance life's).
        """
        self.reactor = reactor
        self.runtime = runtime
        self.directory = directory
        self.nodeName = name
        self.portal = portal
        self.portalInternal = portalInternal
        self.routing = routing
        self.routingAudience = routingAudience
        self.capacity = capacity
        self.startTimeout = startTimeout
        self.readyInterval = readyInterval
        self.imageServer = imageServer
        self.fileServer = fileServer
        self.fileServerHostKey = fileServerHostKey
        self.uploadCommand = uploadCommand or helperCommand(UPLOAD)
        self.uploadForks = helperForks if uploadCommand is None else None
        self.deadlines = {**DEADLINES, **(deadlines or {})}
        #: Whether it takes new instances (administrators cool a node down before removing it).
        self.accepting = True
        self._records = {}
        self._timers = {}
        self._uploads = {}
        self._locks = {}
        self._observers = []
        self._recovered = False
        self._recoveryWaiters: list[Deferred[None]] = []
        self._work = set()
        self._operations = {}
        self.outcomes = Counter()
        self.uploadedBytes = 0
        runtime.onExit(self._podExited)

    # -- the service: take every pod back ---------------------------------------------------

    def startService(self) -> Deferred[None]:
        super().startService()
        self.directory.mkdir(parents=True, exist_ok=True)
        d = Deferred.fromCoroutine(self._recover())

        def recovered(result: object) -> object:
            self._recovered = True
            waiting, self._recoveryWaiters = self._recoveryWaiters, []
            for waiter in waiting:
                waiter.callback(None)
            return result

        def failed(failure: Any) -> None:
            # A bug: say so, but never leave the node deaf to its scheduler.
            self.log.failure("taking back the pods failed", failure)

        d.addErrback(failed).addBoth(recovered)
        return d

    def whenReported(self) -> Deferred[None]:
        """Fires once the node knows its instances again (after a restart, once it has looked)."""
        if self._recovered:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._recoveryWaiters.append(d)
        return d

    def whenIdle(self) -> Deferred[None]:
        """Fires once nothing is under way (every start, stop, save and discard has settled)."""
        return Deferred.fromCoroutine(self._idle())

    # -- INode --------------------------------------------------------------------------

    def instances(self) -> list[InstanceStatus]:
        return [r.status() for r in self._records.values()]

    def subscribe(self, observer: INodeObserver) -> None:
        self._observers.append(observer)

    def setAccepting(self, accepting: bool) -> Deferred[None]:
        """
        Cool down (False: no new instance is started or resumed here; those
        it runs run on) or take instances again. Kept in memory only: a node
        started again takes instances, whatever it did before.
        """
        if accepting != self.accepting:
            self.accepting = accepting
            self.log.info(
                "node {name} {what}", name=self.nodeName, what="takes instances again" if accepting else "is cooling down"
            )
            for observer in list(self._observers):
                observer.nodeChanged(self)
        return succeed(None)

    def logs(self, instance: str, offset: int | None, limit: int) -> Deferred[LogChunk]:
        """The tool's output (``IRuntime.logs``), while this node holds anything of the instance."""
        record = self._records.get(instance)
        if record is None or record.state == State.DISCARDED:
            return fail(NotHere(f"This compute node holds nothing of instance {instance}."))
        return self.runtime.logs(instance, offset, limit)

    def publicKeys(self) -> dict[str, dict[str, Any]]:
        """Each active instance's public key (JWK), to publish again after a reconnect."""
        return {r.instance: r.jwk for r in self._records.values() if r.state in HOLDS_POD and r.jwk is not None}

    # -- what happens to pods ----------------------------------------------------------------

    def _podExited(self, instance: str, reason: str) -> None:
        record = self._records.get(instance)
        if record is None or record.state not in (State.STARTING, State.RUNNING):
            return
        self.log.warn("{instance} stopped by itself: {reason}", instance=instance, reason=reason)
        self._set(instance, State.ERRORED, reason)
        # What is left of the pod (the helpers, when the tool ended) goes too.
        self._spawn(instance, "stop", lambda: self.runtime.stop(instance))

    def stopService(self) -> Deferred[None]:
        # The pods run on: a restarted node takes them back.
        super().stopService()
        for instance in list(self._timers):
            self._disarm(instance)
        for upload in self._uploads.values():
            upload.forget()
        self.runtime.forget()
        return succeed(None)
