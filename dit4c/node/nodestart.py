"""
How a node starts an instance: a fresh pod directory and key pair, the
public half handed to whoever watches, the helper environment, a saved
image fetched from the image server (written and checked off the reactor
thread), the runtime's pod, and then waiting for the tool to answer.

A start is given up the moment the instance stops being ``starting`` (a
stop, a discard or its deadline came first): what was made is stopped.

A resume is a start of the pod a stop left, its files and key as they were:
one that fails (the runtime's reason, or a tool that does not answer) leaves
the instance ``stopped`` with the reason, its files kept for another try; a
marker file (``RESUMING``) says, to a node restarted meanwhile, that the
``starting`` instance was resuming, so that it carries on with the resume.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import treq
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.web.http_headers import Headers

from dit4c.channel.errors import NodeFull
from dit4c.channel.wire import InstanceStatus
from dit4c.common.files import receiveToFile, removeFile
from dit4c.common.helperenv import HelperEnvironment, toEnvironment
from dit4c.common.keys import generatePrivateKey, loadPrivateKey, publicJWK, savePrivateKey
from dit4c.common.life import HOLDS_POD, State
from dit4c.common.limits import LimitError, ToolLimits
from dit4c.common.tokens import INSTANCE_ID_RE
from dit4c.node.errors import RuntimeError_
from dit4c.node.interfaces import PodSpec
from dit4c.node.noderecords import InstanceRecord, NodeRecords

__all__ = ["FETCHED", "RESUMING", "UNPACKING", "FetchProgress", "NodeStarting"]

#: A saved image fetched for a start.
FETCHED = "image.tar"
#: A starting instance's reason once its saved image is fetched.
UNPACKING = "Unpacking the saved image."
#: Seconds from a pod's start to the first look at whether its tool answers again.
FIRST_READY_LOOK = 0.02
#: In a pod's directory while its instance resumes (a restarted node carries on with the resume).
RESUMING = "resuming"


class NodeStarting(NodeRecords):
    """Starting instances (a part of :class:`dit4c.node.node.Node`, which sets what is declared here)."""

    nodeName: str
    portal: str
    portalInternal: str | None
    routing: tuple[str, ...]
    routingAudience: str
    capacity: int
    startTimeout: float
    readyInterval: float
    fileServer: str | None
    fileServerHostKey: str | None
    accepting: bool
    #: Client endpoint of a tor's control port (``dit4c-node --onion``):
    #: each pod publishes its instance as an onion service there instead of
    #: dialling a routing server (``DIT4C_ONION``).
    onion: str | None = None

    def start(
        self,
        instance: str,
        image: str,
        port: int | None,
        digest: str | None = None,
        token: str | None = None,
        limits: object = None,
    ) -> Deferred[None]:
        if INSTANCE_ID_RE.fullmatch(instance) is None:
            raise ValueError(f"not an instance id: {instance!r}")
        current = self._records.get(instance)
        if current is not None and current.state in HOLDS_POD:
            return succeed(None)  # already under way: a repeated command
        if current is not None and current.state is State.DISCARDING:
            return succeed(None)  # it is going: a start for it is a stale command
        if not self.accepting or self.load() >= self.capacity:
            self.outcomes["start", "error"] += 1  # refused
            raise NodeFull(f"node {self.nodeName} takes no more instances")
        stale = current is not None or self._podDirectory(instance).exists()
        try:
            checked = ToolLimits.fromJSON(limits)
            invalid = None
        except LimitError as e:
            checked, invalid = ToolLimits(), f"The catalogue entry's limits cannot be applied: {e}"
        # Only what a runtime enforces: the idle limit is the portal's.
        kept = ToolLimits(cpus=checked.cpus, memory=checked.memory)
        record = InstanceRecord(
            instance, image, port, digest, State.STARTING, since=self.reactor.seconds(),
            limits=None if kept.empty else kept.toJSON(),
        )  # fmt: skip
        self._records[instance] = record
        self._writeRecord(record)
        self._began(instance, "start")
        self._arm(record)
        self._emit(record)
        if invalid is not None:
            self._failed(instance, invalid)
            return succeed(None)
        self._spawn(instance, "start", lambda: self._start(record, stale, token))
        return succeed(None)

    def resume(self, instance: str) -> Deferred[None]:
        """
        Start a stopped instance's pod again, its files and key as they
        were; where it cannot be (nothing stopped here, a runtime that
        cannot, no room), say so in a state: stopped with the reason, or
        the state it is in.
        """
        record = self._records.get(instance)
        if record is None or record.state is not State.STOPPED:
            if record is None:
                self.outcomes["resume", "error"] += 1
                self._emitStatus(InstanceStatus(instance, State.ERRORED, "This compute node holds no pod of this instance."))
            else:
                self._emit(record)
            return succeed(None)
        why = None
        if not self.runtime.resumable:
            why = "This compute node's runtime cannot resume an instance: save it, then start the saved image."
        elif not self.accepting:
            why = f"Node {self.nodeName} is cooling down for maintenance and takes no instance now; try again later."
        elif self.load() >= self.capacity:
            why = f"Node {self.nodeName} has no room for it now; try again later."
        if why is not None:
            self.outcomes["resume", "error"] += 1
            self._set(instance, State.STOPPED, why)
            return succeed(None)
        resumed = replace(record, state=State.STARTING, reason=None, since=self.reactor.seconds())
        (self._podDirectory(instance) / RESUMING).touch()
        self._records[instance] = resumed
        self._writeRecord(resumed)
        self._began(instance, "resume")
        self._arm(resumed)
        self._emit(resumed)
        self._spawn(instance, "resume", lambda: self._resume(resumed))
        return succeed(None)

    async def _resume(self, record: InstanceRecord) -> None:
        """The stopped pod started again (its marker removed once the resume has ended, however it ended)."""
        try:
            await self._start(record, stale=False, resuming=True)
        finally:
            await removeFile(self._podDirectory(record.instance) / RESUMING)

    async def _holdsPod(self, instance: str) -> bool:
        """Whether the runtime still has a pod of ``instance`` (stopped or not) on this node."""
        return any(pod.instance == instance for pod in await self.runtime.pods())

    async def _resumeFailed(self, instance: str, reason: str) -> None:
        """
        A resume that did not come to ``running``: what it started is
        stopped, and the instance is ``stopped`` again with the reason, its
        files kept (a resume may be tried again, or the instance discarded).
        """
        try:
            await self.runtime.stop(instance)
        except Exception:
            self.log.failure("could not stop {instance} after its resume failed", instance=instance)
            self._failed(instance, f"{reason} The compute node could not stop what it started.", during=State.STARTING)
            return
        if not self._still(instance, State.STARTING):
            return  # a stop or a discard came meanwhile: it says where the instance is
        if self._operations.get(instance) == "resume":
            del self._operations[instance]
            self.outcomes["resume", "error"] += 1
        self.log.warn("{instance} could not be resumed: {reason}", instance=instance, reason=reason)
        self._set(instance, State.STOPPED, reason)

    async def _start(self, record: InstanceRecord, stale: bool, token: str | None = None, resuming: bool = False) -> None:
        """
        ``resuming``: the pod's working directory is the instance's own
        already; a saved image it began from is neither fetched nor unpacked
        over it again.
        """
        instance = record.instance
        directory = self._podDirectory(instance)
        try:
            if stale:
                # A new life for an instance stopped here before: a fresh pod.
                await self.runtime.discard(instance)
                directory.mkdir(parents=True, exist_ok=True, mode=0o700)
                self._writeRecord(self._records.get(instance, record))
            keyFile = directory / "instance.key"
            if keyFile.exists() and not stale:
                # A resumed pod keeps its key: the routing and file servers
                # know the instance by it (they cache the portal's keys).
                key = loadPrivateKey(keyFile)
            else:
                key = generatePrivateKey()
                savePrivateKey(key, keyFile)
            jwk = publicJWK(key)
            if not self._still(instance, State.STARTING):
                return
            self._update(instance, jwk=jwk)
            for observer in self._observers:
                observer.instanceKey(self._node, instance, jwk)
            if self.onion:
                # Where the listener keeps the onion service's key (its .onion name across a resume).
                (directory / "state").mkdir(mode=0o700, exist_ok=True)
            environment = toEnvironment(
                HelperEnvironment(
                    instance=instance,
                    keyFile=str(keyFile),
                    portal=self.portal,
                    portalInternal=self.portalInternal or "",
                    routing=self.routing,
                    routingAudience=self.routingAudience,
                    stateDir=str(directory / "state"),
                    onion=self.onion,
                    fileServer=self.fileServer,
                    fileServerHostKey=self.fileServerHostKey if self.fileServer else None,
                )
            )
            if resuming and not await self._holdsPod(instance):
                why = "Nothing of this instance's pod is left on this compute node: it cannot be resumed."
                self._failed(instance, why, during=State.STARTING)
                return
            archive = None
            if record.image.startswith(("http://", "https://")) and not resuming:
                archive = await self._fetch(record, directory / FETCHED, token)
                if not self._still(instance, State.STARTING):
                    await removeFile(archive)
                    return
                # What a person waits for next: its files, or its container image, made from it.
                self._set(instance, State.STARTING, UNPACKING)
            spec = PodSpec(
                instance, record.image, record.port, directory, environment, record.digest, archive,
                limits=ToolLimits.fromJSON(record.limits),
            )  # fmt: skip
            await self.runtime.start(spec)
            if archive is not None:
                await removeFile(archive)
        except RuntimeError_ as e:
            if resuming and self._still(instance, State.STARTING):
                await self._resumeFailed(instance, f"It could not be resumed; its files are kept. {_sentence(str(e))}")
            else:
                self._failed(instance, str(e), during=State.STARTING)
            return
        except Exception:
            self.log.failure("could not start {instance}", instance=instance)
            if resuming and self._still(instance, State.STARTING):
                await self._resumeFailed(instance, "The compute node could not resume this instance; its files are kept.")
            else:
                self._failed(instance, "The compute node could not start this instance.", during=State.STARTING)
            return
        if not self._still(instance, State.STARTING):
            # Stopped or expired meanwhile (the work after it waits its turn): what was made stops.
            self.log.info("{instance} was started after it was given up: stopping it", instance=instance)
            await self.runtime.stop(instance)
            return
        await self._waitUntilReady(instance, self.reactor.seconds() + self.startTimeout, resuming=resuming)

    async def _fetch(self, record: InstanceRecord, path: Path, token: str | None) -> Path:
        """A saved image from the image server, written (and hashed) off the reactor thread, checked."""
        if not record.digest or not record.digest.startswith("sha256:"):
            raise RuntimeError_("The saved image has no digest to check it against.")
        headers = Headers({"Authorization": [f"Bearer {token}"]} if token else {})
        try:
            response = await treq.get(record.image, headers=headers, reactor=self.reactor, timeout=60)
        except Exception as e:
            raise RuntimeError_(f"The image server could not be reached: {e}.") from None
        if response.code != 200:
            await response.content()
            raise RuntimeError_(f"The image server would not give the saved image ({response.code}).")
        temporary = path.with_name(path.name + ".partial")
        progress = FetchProgress(self.reactor, lambda text: self._tellStarting(record.instance, text), response.length)
        try:
            digest = await receiveToFile(self.reactor, response, temporary, progress.received)
        except Exception as e:
            raise RuntimeError_(f"The saved image could not be fetched: {e}.") from None
        if digest != record.digest:
            await removeFile(temporary)
            raise RuntimeError_("The saved image does not match its digest; it was not started.")
        temporary.replace(path)
        return path

    def _tellStarting(self, instance: str, text: str) -> None:
        """How far a start has come, as its reason (the portal shows it) while it is still starting."""
        if self._still(instance, State.STARTING):
            self._set(instance, State.STARTING, text)

    async def _waitUntilReady(self, instance: str, deadline: float, resuming: bool = False) -> None:
        # Looks 20 ms apart at first, then twice as long each time up to
        # readyInterval: a tool that answers within milliseconds of its start
        # runs without waiting a whole interval, and a slow one is not asked
        # more often than every readyInterval.
        pause = min(FIRST_READY_LOOK, self.readyInterval)
        while self._state(instance) is State.STARTING:
            try:
                if await self.runtime.ready(instance):
                    if self._state(instance) is State.STARTING:
                        self._set(instance, State.RUNNING, None)
                    return
            except Exception:
                self.log.failure("checking whether {instance} answers", instance=instance)
            if self.reactor.seconds() >= deadline:
                if self._state(instance) is State.STARTING:
                    why = f"The tool did not answer within {self.startTimeout:g} s."
                    if resuming:
                        await self._resumeFailed(instance, f"{why} Its files are kept.")
                    else:
                        self._failed(instance, why)
                        await self.runtime.stop(instance)
                return
            d: Deferred[None] = Deferred()
            self.reactor.callLater(pause, d.callback, None)
            pause = min(pause * 2, self.readyInterval)
            await d


def _sentence(text: str) -> str:
    """``text`` as a sentence: its first letter upper case, a full stop at its end."""
    text = text.strip()
    if not text:
        return text
    text = text[0].upper() + text[1:]
    return text if text.endswith((".", "!", "?")) else text + "."


def _megabytes(n: int) -> str:
    return f"{n / 1e6:.1f}" if n < 10e6 else f"{n / 1e6:.0f}"


class FetchProgress:
    """
    How much of a saved image has come, told (as the starting instance's
    reason: "Fetching the saved image: 120 of 400 MB (30 %).") at its first
    bytes and then at most every ``every`` seconds, so that a person
    waiting for a large image sees it move, and the node, its scheduler and
    the portal are not told of every chunk.
    """

    def __init__(self, clock: IReactorTime, tell: Callable[[str], object], total: int | object, every: float = 1.0) -> None:
        self.clock = clock
        self.tell = tell
        #: The image's size, if the image server said (``Content-Length``).
        self.total = total if isinstance(total, int) and total > 0 else None
        self.every = every
        self._last: float | None = None

    def received(self, count: int) -> None:
        now = self.clock.seconds()
        if self._last is not None and now - self._last < self.every:
            return
        self._last = now
        self.tell(self.text(count))

    def text(self, count: int) -> str:
        if self.total is None:
            return f"Fetching the saved image: {_megabytes(count)} MB so far."
        return f"Fetching the saved image: {_megabytes(count)} of {_megabytes(self.total)} MB ({100 * count // self.total} %)."
