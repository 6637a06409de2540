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

A restarted node takes back every pod it finds (:meth:`Node._recover`): it
reads its records, asks the runtime which pods still run, and carries on
from where each instance was — a running one runs on, a stop or save
under way is finished, an upload still running is watched again (one that
ended is judged by what it left, one that died is started afresh), partial
files are removed, and a pod with no record is discarded. Each instance is
taken back on its own: one that cannot be is reported ``errored`` with the
reason and the others go on. Nothing here stats a mount point or reads,
writes or hashes a big file on the reactor thread.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import treq
from twisted.application.service import Service
from twisted.internet import threads
from twisted.internet.defer import Deferred, DeferredLock, succeed
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.web.http_headers import Headers
from zope.interface import implementer

from dit4c.channel.interfaces import INode, INodeObserver, NodeFull
from dit4c.channel.wire import MAX_REASON, InstanceStatus
from dit4c.common.files import receiveToFile, removeFile
from dit4c.common.helperenv import HelperEnvironment, inherited, toEnvironment
from dit4c.common.keys import generate_private_key, public_jwk, save_private_key
from dit4c.common.life import (
    DEADLINES,
    HOLDS_POD,
    TRANSIENT,
    IllegalMove,
    Life,
    State,
    expiredReason,
)
from dit4c.common.tokens import INSTANCE_ID_RE
from dit4c.node.interfaces import IRuntime, PodSpec, PodStatus, RuntimeError_, helperCommand
from dit4c.node.processes import RECORD, PodProcess, removePodDirectory
from dit4c.upload.helper import failureFile, progressFile, resultFile

__all__ = ["Node"]

#: What a pod's directory holds of a save under way.
_ARCHIVE = "saved-image.tar"
#: A saved image fetched for a start.
_FETCHED = "image.tar"


@dataclass(frozen=True)
class _Record:
    instance: str
    image: str
    port: int | None
    digest: str | None
    state: State
    reason: str | None = None
    #: The instance's public key (JWK), once made.
    jwk: dict[str, Any] | None = None
    #: When it entered its state (the node's clock), so a deadline outlives a restart.
    since: float = 0.0
    #: Whether a stop under way is the first step of a save.
    saving: bool = False
    #: The digest of the captured image while it is uploaded.
    captured: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "state", State(self.state))

    def status(self) -> InstanceStatus:
        return InstanceStatus(self.instance, self.state, _shorten(self.reason))

    def toJSON(self) -> dict[str, Any]:
        data = asdict(self)
        data["state"] = self.state.value
        return data

    @classmethod
    def fromJSON(cls, data: Mapping[str, Any]) -> _Record:
        known = {name: data[name] for name in cls.__dataclass_fields__ if name in data}
        return cls(**known)


def _shorten(reason: str | None) -> str | None:
    """A reason as the channel carries it (at most ``MAX_REASON`` characters, its end kept)."""
    if reason is None or len(reason) <= MAX_REASON:
        return reason
    return "…" + reason[-(MAX_REASON - 1) :]


@implementer(INode)
class Node(Service):
    """A compute node in this process."""

    log = Logger()

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
        self.uploadCommand = uploadCommand or helperCommand("dit4c-helper-upload")
        self.deadlines: Mapping[State, float] = {**DEADLINES, **(deadlines or {})}
        #: Whether it takes new instances (administrators cool a node down before removing it).
        self.accepting = True
        self._records: dict[str, _Record] = {}
        self._timers: dict[str, IDelayedCall] = {}
        self._uploads: dict[str, PodProcess] = {}
        self._locks: dict[str, DeferredLock] = {}
        self._observers: list[INodeObserver] = []
        self._recovered = False
        self._recoveryWaiters: list[Deferred[None]] = []
        #: Every piece of work under way, for tests and a clean stop.
        self._work: set[Deferred[Any]] = set()
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

    async def _idle(self) -> None:
        while self._work:
            for d in list(self._work):
                try:
                    await d
                except Exception:
                    pass

    def _spawn(self, instance: str, what: str, work: Callable[[], Awaitable[Any]]) -> Deferred[None]:
        """
        Run ``work`` on its own, after the work on the same instance that
        came before it (a stop waits for the start under way to settle,
        which it soon does: the start sees it is no longer wanted). A
        failure is logged and costs only this instance.
        """
        lock = self._locks.setdefault(instance, DeferredLock())

        async def guarded() -> None:
            await lock.acquire()
            try:
                await work()
            except Exception:
                self.log.failure("could not {what} {instance}", what=what, instance=instance)
                self._failed(instance, f"The compute node failed to {what} this instance.")
            finally:
                lock.release()
                if not lock.locked and not lock.waiting and self._locks.get(instance) is lock:
                    del self._locks[instance]

        d = Deferred.fromCoroutine(guarded())
        if not d.called:
            self._work.add(d)

            def settled(result: None) -> None:
                self._work.discard(d)
                return result

            d.addBoth(settled)
        return d

    async def _recover(self) -> None:
        for path in sorted(self.directory.glob(f"*/{RECORD}")):
            try:
                record = _Record.fromJSON(json.loads(path.read_text()))
            except (OSError, ValueError, TypeError, KeyError):
                self.log.warn("ignoring an unreadable instance record {path}", path=str(path))
                continue
            self._records[record.instance] = record
        try:
            pods = {pod.instance: pod for pod in await self.runtime.pods()}
        except Exception:
            self.log.failure("the runtime could not list its pods")
            pods = {}
        for instance in pods:
            if instance not in self._records:
                # Made by this node but not recorded (a discard that died half way):
                # nothing can use it any more.
                self.log.warn("discarding pod {instance}, which this node holds no record of", instance=instance)
                self._spawn(instance, "discard", partial(self._discardPod, instance))
        for record in list(self._records.values()):
            self._arm(record)
            self._spawn(record.instance, "take back", partial(self._takeBack, record, pods.get(record.instance)))
        if self._records:
            self.log.info("found {count} instances again", count=len(self._records))

    async def _discardPod(self, instance: str) -> None:
        try:
            await self.runtime.discard(instance)
            await threads.deferToThread(removePodDirectory, self._podDirectory(instance))
        except (OSError, RuntimeError_) as e:
            # Tried again at the next restart: it is still a pod with no record.
            self.log.warn("could not discard pod {instance}: {error}", instance=instance, error=str(e))

    async def _takeBack(self, record: _Record, pod: PodStatus | None) -> None:
        """Carry on from where ``record`` was when the node stopped."""
        instance, state = record.instance, record.state
        directory = self._podDirectory(instance)
        if state is State.STARTING:
            await removeFile(directory / _FETCHED)
            await removeFile(directory / (_FETCHED + ".partial"))
            if pod is not None and pod.running:
                self.log.info("{instance} was starting: waiting for it again", instance=instance)
                await self._waitUntilReady(instance, self.reactor.seconds() + self.startTimeout)
            else:
                self._failed(
                    instance, "The compute node restarted while this instance was starting.", during=State.STARTING
                )
                await self.runtime.stop(instance)
        elif state is State.RUNNING:
            if pod is not None and pod.running:
                self.log.info("found {instance} running again", instance=instance)
                self._emit(record)
            else:
                why = pod.reason if pod is not None and pod.reason else "Its pod is gone."
                why = f"The instance stopped while its compute node was restarting. {why}"
                self._failed(instance, why, during=State.RUNNING)
                await self.runtime.stop(instance)
        elif state is State.STOPPING:
            await self._finishStop(instance)
        elif state is State.SAVING:
            await self._capture(instance)
        elif state is State.UPLOADING:
            await self._upload(instance)
        elif state is State.DISCARDING:
            await self._discard(instance)
        elif state is State.ERRORED and pod is not None and pod.running:
            # What is left of an errored pod must not run on unseen.
            await self.runtime.stop(instance)
        else:
            self._emit(record)

    # -- INode --------------------------------------------------------------------------

    def load(self) -> int:
        return sum(1 for r in self._records.values() if r.state in HOLDS_POD)

    def instances(self) -> list[InstanceStatus]:
        return [r.status() for r in self._records.values()]

    def subscribe(self, observer: INodeObserver) -> None:
        self._observers.append(observer)

    def publicKeys(self) -> dict[str, dict[str, Any]]:
        """Each active instance's public key (JWK), to publish again after a reconnect."""
        return {r.instance: r.jwk for r in self._records.values() if r.state in HOLDS_POD and r.jwk is not None}

    def start(
        self, instance: str, image: str, port: int | None, digest: str | None = None, token: str | None = None
    ) -> Deferred[None]:
        if INSTANCE_ID_RE.fullmatch(instance) is None:
            raise ValueError(f"not an instance id: {instance!r}")
        current = self._records.get(instance)
        if current is not None and current.state in HOLDS_POD:
            return succeed(None)  # already under way: a repeated command
        if current is not None and current.state is State.DISCARDING:
            return succeed(None)  # it is going: a start for it is a stale command
        if not self.accepting or self.load() >= self.capacity:
            raise NodeFull(f"node {self.nodeName} takes no more instances")
        stale = current is not None or self._podDirectory(instance).exists()
        record = _Record(instance, image, port, digest, State.STARTING, since=self.reactor.seconds())
        self._records[instance] = record
        self._save(record)
        self._arm(record)
        self._emit(record)
        self._spawn(instance, "start", lambda: self._start(record, stale, token))
        return succeed(None)

    async def _start(self, record: _Record, stale: bool, token: str | None = None) -> None:
        instance = record.instance
        directory = self._podDirectory(instance)
        try:
            if stale:
                # A new life for an instance stopped here before: a fresh pod.
                await self.runtime.discard(instance)
                directory.mkdir(parents=True, exist_ok=True, mode=0o700)
                self._save(self._records.get(instance, record))
            key = generate_private_key()
            keyFile = directory / "instance.key"
            save_private_key(key, keyFile)
            jwk = public_jwk(key)
            if not self._still(instance, State.STARTING):
                return
            self._update(instance, jwk=jwk)
            for observer in self._observers:
                observer.instanceKey(self, instance, jwk)
            environment = toEnvironment(
                HelperEnvironment(
                    instance=instance,
                    keyFile=str(keyFile),
                    portal=self.portal,
                    portalInternal=self.portalInternal or "",
                    routing=self.routing,
                    routingAudience=self.routingAudience,
                    stateDir=str(directory / "state"),
                    fileServer=self.fileServer,
                    fileServerHostKey=self.fileServerHostKey if self.fileServer else None,
                )
            )
            archive = None
            if record.image.startswith(("http://", "https://")):
                archive = await self._fetch(record, directory / _FETCHED, token)
                if not self._still(instance, State.STARTING):
                    await removeFile(archive)
                    return
            spec = PodSpec(instance, record.image, record.port, directory, environment, record.digest, archive)
            await self.runtime.start(spec)
            if archive is not None:
                await removeFile(archive)
        except RuntimeError_ as e:
            self._failed(instance, str(e), during=State.STARTING)
            return
        except Exception:
            self.log.failure("could not start {instance}", instance=instance)
            self._failed(instance, "The compute node could not start this instance.", during=State.STARTING)
            return
        if not self._still(instance, State.STARTING):
            # Stopped or expired meanwhile (the work after it waits its turn): what was made stops.
            self.log.info("{instance} was started after it was given up: stopping it", instance=instance)
            await self.runtime.stop(instance)
            return
        await self._waitUntilReady(instance, self.reactor.seconds() + self.startTimeout)

    async def _fetch(self, record: _Record, path: Path, token: str | None) -> Path:
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
        try:
            digest = await receiveToFile(self.reactor, response, temporary)
        except Exception as e:
            raise RuntimeError_(f"The saved image could not be fetched: {e}.") from None
        if digest != record.digest:
            await removeFile(temporary)
            raise RuntimeError_("The saved image does not match its digest; it was not started.")
        temporary.replace(path)
        return path

    async def _waitUntilReady(self, instance: str, deadline: float) -> None:
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
                    self._failed(instance, f"The tool did not answer within {self.startTimeout:g} s.")
                    await self.runtime.stop(instance)
                return
            d: Deferred[None] = Deferred()
            self.reactor.callLater(self.readyInterval, d.callback, None)
            await d

    def _failed(self, instance: str, reason: str, *, during: State | None = None) -> None:
        """``instance`` is errored for ``reason`` (only if it is still ``during`` that step, when given)."""
        state = self._state(instance)
        if state in (None, State.ERRORED, State.DISCARDED) or (during is not None and state is not during):
            return
        self.log.warn("{instance} failed: {reason}", instance=instance, reason=reason)
        self._set(instance, State.ERRORED, reason)

    # -- stopping and saving -------------------------------------------------------------------

    def stop(self, instance: str) -> Deferred[None]:
        return self._stop(instance, save=False)

    def save(self, instance: str) -> Deferred[None]:
        return self._stop(instance, save=True)

    def _stop(self, instance: str, *, save: bool) -> Deferred[None]:
        record = self._records.get(instance)
        if record is None:
            # Unknown here: nothing to stop (the portal hears that it is stopped).
            self._emitStatus(InstanceStatus(instance, State.STOPPED))
            return succeed(None)
        if record.state in (State.STARTING, State.RUNNING):
            if save and self.imageServer is None:
                self._set(instance, State.STOPPING, None)
                return self._spawn(instance, "stop", lambda: self._noImageServer(instance))
            self._set(instance, State.STOPPING, None, saving=save)
            return self._spawn(instance, "stop", lambda: self._finishStop(instance))
        if record.state is State.ERRORED:
            # Nothing of an errored instance may run on: whatever is left is stopped.
            self._emit(record)
            return self._spawn(instance, "stop", lambda: self.runtime.stop(instance))
        # Under way, or at rest already: say where it is.
        self._emit(record)
        return succeed(None)

    async def _noImageServer(self, instance: str) -> None:
        await self.runtime.stop(instance)
        why = "This compute node has no image server to save to; the instance is stopped."
        self._failed(instance, why, during=State.STOPPING)

    async def _finishStop(self, instance: str) -> None:
        try:
            await self.runtime.stop(instance)
        except Exception:
            self.log.failure("could not stop {instance}", instance=instance)
            self._failed(instance, "The compute node could not stop this instance cleanly.", during=State.STOPPING)
            return
        record = self._records.get(instance)
        if record is None or record.state is not State.STOPPING:
            return
        if record.saving:
            self._set(instance, State.SAVING, None)
            await self._capture(instance)
        else:
            self._set(instance, State.STOPPED, None)

    async def _capture(self, instance: str) -> None:
        """Capture the stopped pod's image (off the reactor thread), then upload it."""
        directory = self._podDirectory(instance)
        archive = directory / _ARCHIVE
        # What an earlier, interrupted capture left.
        await removeFile(archive)
        await removeFile(archive.with_suffix(".partial"))
        try:
            await self.runtime.stop(instance)  # stopped for sure (after a restart, too)
            digest = await self.runtime.capture(instance, archive)
            if digest is None:
                digest = await threads.deferToThread(_hashFile, archive)
        except Exception as e:
            if isinstance(e, (OSError, RuntimeError_)):
                self.log.warn("could not capture {instance}: {error}", instance=instance, error=str(e))
            else:
                self.log.failure("could not capture {instance}", instance=instance)
            await removeFile(archive)
            self._failed(instance, f"The instance could not be saved: {e}", during=State.SAVING)
            return
        if not self._still(instance, State.SAVING):
            await removeFile(archive)  # given up meanwhile (its deadline passed)
            return
        self._set(instance, State.UPLOADING, None, captured=digest)
        await self._upload(instance)

    async def _upload(self, instance: str) -> None:
        """
        Have the upload helper store the captured image and report it. An
        upload helper that outlived a node restart is watched again; one
        that ended is judged by the result it left; none: a fresh one.
        """
        record = self._records[instance]
        directory = self._podDirectory(instance)
        archive = directory / _ARCHIVE
        process = PodProcess(self.reactor, "upload", directory)
        ended: Deferred[str | None] = Deferred()
        process.onExit(lambda p, reason: ended.callback(reason) if not ended.called else None)
        self._uploads[instance] = process
        try:
            if process.adopt():
                self.log.info("{instance}: watching its upload again", instance=instance)
            elif resultFile(str(archive)).exists() or failureFile(str(archive)).exists():
                ended.callback(None)  # it finished while the node was away
            else:
                if record.captured is None or not archive.exists():
                    why = "The captured image was lost while its compute node restarted; save again."
                    self._failed(instance, why, during=State.UPLOADING)
                    return
                await removeFile(resultFile(str(archive)))
                await removeFile(failureFile(str(archive)))
                environment = toEnvironment(
                    HelperEnvironment(
                        instance=instance,
                        keyFile=str(directory / "instance.key"),
                        portal=self.portal,
                        portalInternal=self.portalInternal or "",
                        imageServer=self.imageServer,
                        imageFile=str(archive),
                        imageDigest=record.captured,
                    )
                )
                try:
                    process.start(self.uploadCommand, {**inherited(), **environment})
                except OSError as e:
                    self._failed(instance, f"The upload helper could not start: {e.strerror}.", during=State.UPLOADING)
                    return
            watch = LoopingCall(self._uploadProgress, instance, progressFile(str(archive)))
            watch.clock = self.reactor
            watch.start(1.0, now=False)
            try:
                reason = await ended
            finally:
                watch.stop()
        finally:
            self._uploads.pop(instance, None)
        # Its verdict: the result it left, or (a helper this node started) its exit status.
        succeeded = resultFile(str(archive)).exists() or (reason is not None and reason.endswith("exited with status 0."))
        failure = _readText(failureFile(str(archive)))
        for leftover in (archive, progressFile(str(archive)), resultFile(str(archive)), failureFile(str(archive))):
            await removeFile(leftover)
        if not self._still(instance, State.UPLOADING):
            return
        if not succeeded:
            why = failure or reason or "it ended"
            self._failed(instance, f"The saved image could not be uploaded: {why}")
            return
        self.log.info("{instance} saved as {digest}", instance=instance, digest=record.captured)
        self._set(instance, State.SAVED, None, captured=None)

    def _uploadProgress(self, instance: str, progress: Path) -> None:
        """How much of a saved image the upload helper has sent, shown to the person."""
        try:
            counts = json.loads(progress.read_text())
            sent, total = int(counts["sent"]), int(counts["total"])
        except (OSError, ValueError, KeyError, TypeError):
            return
        reason = f"{sent / 1e6:.1f} of {total / 1e6:.1f} MB sent to the image server"
        record = self._records.get(instance)
        if record is not None and record.state is State.UPLOADING and record.reason != reason:
            self._set(instance, State.UPLOADING, reason)

    # -- discarding ------------------------------------------------------------------------------

    def discard(self, instance: str) -> Deferred[None]:
        record = self._records.get(instance)
        if record is not None and record.state is not State.DISCARDING:
            if not Life(record.state).allows(State.DISCARDING):
                # The portal gave up on it (errored there): whatever it was doing here ends.
                self._set(instance, State.ERRORED, f"Discarded while {record.state.value}.")
            self._set(instance, State.DISCARDING, None)
        upload = self._uploads.get(instance)
        if upload is not None:
            # An upload under way holds the instance's turn until it ends: end it now.
            upload.stop()
        return self._spawn(instance, "discard", lambda: self._discard(instance))

    async def _discard(self, instance: str) -> None:
        try:
            await self.runtime.discard(instance)
            # What the runtime left (it may have failed half way); a thread: it may be big.
            await threads.deferToThread(removePodDirectory, self._podDirectory(instance))
        except (OSError, RuntimeError_) as e:
            self.log.warn("could not discard {instance}: {error}", instance=instance, error=str(e))
            # Kept, so that discarding it again tries again.
            why = f"The compute node could not remove everything of this instance: {e}"
            self._failed(instance, why, during=State.DISCARDING)
            return
        self._disarm(instance)
        record = self._records.pop(instance, None)
        if record is not None:
            self.log.info("{instance} discarded", instance=instance)
        self._emitStatus(InstanceStatus(instance, State.DISCARDED))

    # -- what happens to pods ----------------------------------------------------------------

    def _podExited(self, instance: str, reason: str) -> None:
        record = self._records.get(instance)
        if record is None or record.state not in (State.STARTING, State.RUNNING):
            return
        self.log.warn("{instance} stopped by itself: {reason}", instance=instance, reason=reason)
        self._set(instance, State.ERRORED, reason)
        # What is left of the pod (the helpers, when the tool ended) goes too.
        self._spawn(instance, "stop", lambda: self.runtime.stop(instance))

    # -- deadlines -------------------------------------------------------------------------------

    def _arm(self, record: _Record) -> None:
        """A timer for the deadline of ``record``'s state, if it has one (counted from when it entered it)."""
        self._disarm(record.instance)
        if record.state not in TRANSIENT:
            return
        deadline = self.deadlines[record.state]
        delay = max(0.0, record.since + deadline - self.reactor.seconds())
        self._timers[record.instance] = self.reactor.callLater(delay, self._expired, record.instance, record.state)

    def _disarm(self, instance: str) -> None:
        timer = self._timers.pop(instance, None)
        if timer is not None and timer.active():
            timer.cancel()

    def _expired(self, instance: str, state: State) -> None:
        self._timers.pop(instance, None)
        record = self._records.get(instance)
        if record is None or record.state is not state:
            return
        reason = expiredReason(state, self.deadlines[state])
        self.log.warn("{instance}: {reason}", instance=instance, reason=reason)
        self._set(instance, State.ERRORED, reason)
        # Whatever was under way is given up; what may still run is stopped.
        upload = self._uploads.get(instance)
        if upload is not None:
            upload.stop()  # its watcher, which holds the instance's turn, then ends
        if state in (State.STARTING, State.STOPPING):
            self._spawn(instance, "stop", lambda: self.runtime.stop(instance))

    # -- records -------------------------------------------------------------------------------

    def _podDirectory(self, instance: str) -> Path:
        return self.directory / instance

    def _state(self, instance: str) -> State | None:
        record = self._records.get(instance)
        return record.state if record is not None else None

    def _still(self, instance: str, state: State) -> bool:
        """Whether ``instance`` is still in ``state`` (work that awaited asks before it goes on)."""
        return self._state(instance) is state

    def _set(self, instance: str, state: State, reason: str | None, **changes: Any) -> bool:
        """Move ``instance`` to ``state`` if its life allows it; whether it moved."""
        record = self._records.get(instance)
        if record is None:
            return False
        try:
            Life(record.state).move(state)
        except IllegalMove as e:
            self.log.warn("{instance}: {error}; ignored", instance=instance, error=str(e))
            return False
        since = record.since if state is record.state else self.reactor.seconds()
        moved = replace(record, state=state, reason=reason, since=since, **changes)
        self._records[instance] = moved
        self._save(moved)
        if moved.state is not record.state:
            self._arm(moved)
        self._emit(moved)
        return True

    def _update(self, instance: str, **changes: Any) -> None:
        record = self._records.get(instance)
        if record is not None:
            self._records[instance] = record = replace(record, **changes)
            self._save(record)

    def _save(self, record: _Record) -> None:
        directory = self._podDirectory(record.instance)
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        path = directory / RECORD
        temporary = path.with_suffix(".tmp")
        temporary.write_text(json.dumps(record.toJSON()))
        temporary.replace(path)

    def _emit(self, record: _Record) -> None:
        self._emitStatus(record.status())

    def _emitStatus(self, status: InstanceStatus) -> None:
        for observer in self._observers:
            observer.instanceState(self, status)

    def stopService(self) -> Deferred[None]:
        # The pods run on: a restarted node takes them back.
        super().stopService()
        for instance in list(self._timers):
            self._disarm(instance)
        for upload in self._uploads.values():
            upload.forget()
        self.runtime.forget()
        return succeed(None)


def _hashFile(path: Path) -> str:
    """Blocking (a thread): ``sha256:<hex>`` of a file."""
    import hashlib

    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1024 * 1024), b""):
            digest.update(block)
    return f"sha256:{digest.hexdigest()}"


def _readText(path: Path, limit: int = 2000) -> str | None:
    """A small file's text (the upload helper's failure), if it is there."""
    try:
        return path.read_text(errors="replace")[:limit].strip() or None
    except OSError:
        return None
