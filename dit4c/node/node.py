"""
A compute node: each instance's life on this machine, whatever the runtime.

The node makes the instance's key pair (the public half goes up to the
portal, the private half stays in the pod's directory for the helpers),
builds the helper environment, asks the runtime for the pod, waits for the
tool to answer, and tells whoever watches (the scheduler) every state. It
remembers each instance in a small JSON file in the pod's directory, so a
restarted node knows its instances again and asks the runtime which of
them still run.
"""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import treq
from twisted.application.service import Service
from twisted.internet import threads
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.web.http_headers import Headers
from zope.interface import implementer

from dit4c.channel.interfaces import INode, INodeObserver, NodeFull
from dit4c.channel.wire import InstanceStatus
from dit4c.common.helperenv import HelperEnvironment, inherited
from dit4c.common.keys import generate_private_key, public_jwk, save_private_key
from dit4c.common.life import HOLDS_POD
from dit4c.common.tokens import INSTANCE_ID_RE
from dit4c.node.interfaces import IRuntime, PodSpec, RuntimeError_
from dit4c.node.processes import PodProcess, removePodDirectory
from dit4c.upload.helper import progressFile

__all__ = ["Node"]

@dataclass(frozen=True)
class _Record:
    instance: str
    image: str
    port: int | None
    digest: str | None
    state: str
    reason: str | None = None
    #: The instance's public key (JWK), once made.
    jwk: dict[str, Any] | None = None

    def status(self) -> InstanceStatus:
        return InstanceStatus(self.instance, self.state, self.reason)


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
    ) -> None:
        """
        :param directory: where pods' directories go (``<directory>/<instance>/``).
        :param portal: the portal's public URL (browsers), and
            ``portalInternal`` as the helpers reach it.
        :param routing: client endpoints of the routing servers' tunnel ports.
        :param startTimeout: seconds a tool has to answer before its start
            counts as failed.
        :param imageServer: the image server's base URL, as this node
            reaches it: where saved images go. None: this node cannot save.
        :param uploadCommand: runs the upload helper (``python -m dit4c.upload``).
        :param fileServer: the file server (``host:port``) whose storage
            each pod mounts (the storage helper), and ``fileServerHostKey``
            its SSH host key, pinned. None: no shared storage.
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
        self.uploadCommand = uploadCommand or [sys.executable, "-m", "dit4c.upload"]
        #: Whether it takes new instances (administrators cool a node down before removing it).
        self.accepting = True
        self._records: dict[str, _Record] = {}
        self._observers: list[INodeObserver] = []
        self._recovered = False
        self._recoveryWaiters: list[Deferred[None]] = []
        runtime.onExit(self._podExited)

    # -- the service: find the instances again ---------------------------------------------

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

        d.addBoth(recovered)
        return d

    def whenReported(self) -> Deferred[None]:
        """Fires once the node knows its instances again (after a restart, once it has looked)."""
        if self._recovered:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._recoveryWaiters.append(d)
        return d

    async def _recover(self) -> None:
        for path in sorted(self.directory.glob("*/instance.json")):
            try:
                data = json.loads(path.read_text())
                record = _Record(**data)
            except (OSError, ValueError, TypeError):
                self.log.warn("ignoring an unreadable instance record {path}", path=str(path))
                continue
            self._records[record.instance] = record
        if not self._records:
            return
        pods = {pod.instance: pod for pod in await self.runtime.pods()}
        for record in list(self._records.values()):
            pod = pods.get(record.instance)
            if record.state in HOLDS_POD:
                if pod is not None and pod.running:
                    self._set(record.instance, "running", None)
                    self.log.info("found {instance} running again", instance=record.instance)
                else:
                    why = "The instance stopped while its compute node was restarting."
                    self._set(record.instance, "errored", why)
                    await self.runtime.stop(record.instance)

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
        if not self.accepting or self.load() >= self.capacity:
            raise NodeFull(f"node {self.nodeName} takes no more instances")
        stale = current is not None or self._podDirectory(instance).exists()
        record = _Record(instance, image, port, digest, "starting")
        self._records[instance] = record
        self._save(record)
        self._emit(record)
        Deferred.fromCoroutine(self._start(record, stale, token))
        return succeed(None)

    async def _start(self, record: _Record, stale: bool, token: str | None = None) -> None:
        directory = self._podDirectory(record.instance)
        try:
            if stale:
                # A new life for an instance stopped here before: a fresh pod.
                await self.runtime.discard(record.instance)
                directory.mkdir(parents=True, exist_ok=True)
                self._save(record)
            key = generate_private_key()
            keyFile = directory / "instance.key"
            save_private_key(key, keyFile)
            jwk = public_jwk(key)
            current = self._records.get(record.instance)
            if current is not None:
                self._records[record.instance] = current = replace(current, jwk=jwk)
                self._save(current)
            for observer in self._observers:
                observer.instanceKey(self, record.instance, jwk)
            environment = HelperEnvironment(
                instance=record.instance,
                keyFile=str(keyFile),
                portal=self.portal,
                portalInternal=self.portalInternal or "",
                routing=self.routing,
                routingAudience=self.routingAudience,
                stateDir=str(directory / "state"),
                fileServer=self.fileServer,
                fileServerHostKey=self.fileServerHostKey if self.fileServer else None,
            ).toEnvironment()
            archive = None
            if record.image.startswith(("http://", "https://")):
                archive = await self._fetch(record, directory / "image.tar", token)
            spec = PodSpec(
                record.instance, record.image, record.port, directory, environment, record.digest, archive
            )
            await self.runtime.start(spec)
            if archive is not None:
                archive.unlink(missing_ok=True)
        except RuntimeError_ as e:
            self._failed(record.instance, str(e))
            return
        except Exception:
            self.log.failure("could not start {instance}", instance=record.instance)
            self._failed(record.instance, "The compute node could not start this instance.")
            return
        await self._waitUntilReady(record.instance)

    async def _fetch(self, record: _Record, path: Path, token: str | None) -> Path:
        """A saved image from the image server, checked against its digest."""
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
        digest = hashlib.sha256()
        temporary = path.with_suffix(".partial")
        with temporary.open("wb") as out:

            def write(data: bytes) -> None:
                digest.update(data)
                out.write(data)

            await treq.collect(response, write)
        if f"sha256:{digest.hexdigest()}" != record.digest:
            temporary.unlink(missing_ok=True)
            raise RuntimeError_("The saved image does not match its digest; it was not started.")
        temporary.replace(path)
        return path

    def _uploadProgress(self, instance: str, progress: Path) -> None:
        """How much of a saved image the upload helper has sent, shown to the person."""
        try:
            counts = json.loads(progress.read_text())
            sent, total = int(counts["sent"]), int(counts["total"])
        except (OSError, ValueError, KeyError, TypeError):
            return
        reason = f"{sent / 1e6:.1f} of {total / 1e6:.1f} MB sent to the image server"
        record = self._records.get(instance)
        if record is not None and record.state == "uploading" and record.reason != reason:
            self._set(instance, "uploading", reason)

    async def _waitUntilReady(self, instance: str) -> None:
        deadline = self.reactor.seconds() + self.startTimeout
        while self._state(instance) == "starting":
            try:
                if await self.runtime.ready(instance):
                    if self._state(instance) == "starting":
                        self._set(instance, "running", None)
                    return
            except Exception:
                self.log.failure("checking whether {instance} answers", instance=instance)
            if self.reactor.seconds() >= deadline:
                await self.runtime.stop(instance)
                self._set(instance, "errored", f"The tool did not answer within {self.startTimeout:g} s.")
                return
            d: Deferred[None] = Deferred()
            self.reactor.callLater(self.readyInterval, d.callback, None)
            await d

    def _failed(self, instance: str, reason: str) -> None:
        self.log.warn("{instance} failed: {reason}", instance=instance, reason=reason)
        self._set(instance, "errored", reason)

    def stop(self, instance: str) -> Deferred[None]:
        return Deferred.fromCoroutine(self._stop(instance, "stopped"))

    def save(self, instance: str) -> Deferred[None]:
        return Deferred.fromCoroutine(self._stop(instance, "save"))

    async def _stop(self, instance: str, then: str) -> None:
        record = self._records.get(instance)
        if record is None:
            # Unknown here: nothing to stop (the portal hears "stopped").
            self._emitStatus(InstanceStatus(instance, "stopped"))
            return
        if record.state not in HOLDS_POD:
            self._emit(record)
            return
        self._set(instance, "stopping", None)
        try:
            await self.runtime.stop(instance)
        except Exception:
            self.log.failure("could not stop {instance}", instance=instance)
            self._set(instance, "errored", "The compute node could not stop this instance cleanly.")
            return
        if then == "save":
            await self._save_image(instance)
        else:
            self._set(instance, "stopped", None)

    async def _save_image(self, instance: str) -> None:
        """Capture the stopped pod's image, and have the upload helper store and report it."""
        if self.imageServer is None:
            self._set(instance, "errored", "This compute node has no image server to save to; the instance is stopped.")
            return
        self._set(instance, "saving", None)
        directory = self._podDirectory(instance)
        archive = directory / "saved-image.tar"
        try:
            captured = await self.runtime.capture(instance, archive)

            def hashed() -> str:
                digest = hashlib.sha256()
                with archive.open("rb") as f:
                    for block in iter(lambda: f.read(1024 * 1024), b""):
                        digest.update(block)
                return f"sha256:{digest.hexdigest()}"

            digest = captured if captured is not None else await threads.deferToThread(hashed)
        except Exception as e:
            self.log.failure("could not capture {instance}", instance=instance)
            archive.unlink(missing_ok=True)
            self._set(instance, "errored", f"The instance could not be saved: {e}")
            return
        self._set(instance, "uploading", None)
        record = self._records[instance]
        environment = HelperEnvironment(
            instance=instance,
            keyFile=str(directory / "instance.key"),
            portal=self.portal,
            portalInternal=self.portalInternal or "",
            imageServer=self.imageServer,
            imageFile=str(archive),
            imageDigest=digest,
        ).toEnvironment()
        upload = PodProcess(self.reactor, "upload", directory)
        ended: Deferred[str | None] = Deferred()
        upload.onExit(lambda process, reason: ended.callback(reason))

        try:
            upload.start(self.uploadCommand, {**inherited(), **environment})
        except OSError as e:
            self._set(instance, "errored", f"The upload helper could not start: {e.strerror}.")
            return
        watch = LoopingCall(self._uploadProgress, instance, progressFile(str(archive)))
        watch.clock = self.reactor
        watch.start(1.0, now=False)
        try:
            reason = await ended
        finally:
            watch.stop()
        archive.unlink(missing_ok=True)
        progressFile(str(archive)).unlink(missing_ok=True)
        if reason is None or not reason.endswith("exited with status 0."):
            self._set(instance, "errored", f"The saved image could not be uploaded (see the node's upload log): {reason}")
            return
        self.log.info("{instance} saved as {digest} ({image})", instance=instance, digest=digest, image=record.image)
        self._set(instance, "saved", None)

    def discard(self, instance: str) -> Deferred[None]:
        return Deferred.fromCoroutine(self._discard(instance))

    async def _discard(self, instance: str) -> None:
        try:
            await self.runtime.discard(instance)
        except Exception:
            self.log.failure("could not discard {instance}", instance=instance)
        try:
            # What the runtime left (it may have failed half way); a thread: it may be big.
            await threads.deferToThread(removePodDirectory, self._podDirectory(instance))
        except OSError as e:
            self.log.error("discarding {instance}: {error}", instance=instance, error=str(e))
        record = self._records.pop(instance, None)
        status = InstanceStatus(instance, "discarded")
        if record is not None:
            self.log.info("{instance} discarded", instance=instance)
        self._emitStatus(status)

    # -- what happens to pods ----------------------------------------------------------------

    def _podExited(self, instance: str, reason: str) -> None:
        record = self._records.get(instance)
        if record is None or record.state not in ("starting", "running"):
            return
        self.log.warn("{instance} stopped by itself: {reason}", instance=instance, reason=reason)
        self._set(instance, "errored", reason)
        # What is left of the pod (the helpers, when the tool ended) goes too.
        self.runtime.stop(instance).addErrback(lambda f: self.log.failure("stopping {i}", f, i=instance))

    # -- records -------------------------------------------------------------------------------

    def _podDirectory(self, instance: str) -> Path:
        return self.directory / instance

    def _state(self, instance: str) -> str | None:
        record = self._records.get(instance)
        return record.state if record is not None else None

    def _set(self, instance: str, state: str, reason: str | None) -> None:
        record = self._records.get(instance)
        if record is None:
            return
        record = replace(record, state=state, reason=reason)
        self._records[instance] = record
        self._save(record)
        self._emit(record)

    def _save(self, record: _Record) -> None:
        directory = self._podDirectory(record.instance)
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        path = directory / "instance.json"
        temporary = path.with_suffix(".tmp")
        temporary.write_text(json.dumps(record.__dict__))
        temporary.replace(path)

    def _emit(self, record: _Record) -> None:
        self._emitStatus(record.status())

    def _emitStatus(self, status: InstanceStatus) -> None:
        for observer in self._observers:
            observer.instanceState(self, status)

    def stopService(self) -> Deferred[None]:
        # The pods run on: a restarted node finds them again.
        super().stopService()
        self.runtime.forget()
        return succeed(None)
