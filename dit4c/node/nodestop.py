"""
How a node ends an instance's pod: a stop; a save, which is a stop, then
the pod's image captured (hashed off the reactor thread) and handed to the
upload helper (``dit4c-helper-upload``), whose progress the person sees;
and a discard, after which nothing of the instance is left on the node.

The upload helper is a process of its own (:class:`dit4c.node.processes.PodProcess`)
so that it outlives a node restart: a restarted node watches it again, or
judges it by the result or failure file it left. Where the runtime has a
fork server, the helper is forked from it rather than started afresh.
"""

from __future__ import annotations

import json
from pathlib import Path

from twisted.internet import threads
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import LoopingCall

from dit4c.channel.wire import InstanceStatus
from dit4c.common.files import removeFile
from dit4c.common.helperenv import HelperEnvironment, inherited, toEnvironment
from dit4c.common.life import Life, State
from dit4c.node.errors import RuntimeError_
from dit4c.node.noderecords import NodeRecords
from dit4c.node.processes import PodProcess, removePodDirectory
from dit4c.podhelper.forkserver import UPLOAD, ForkServer
from dit4c.upload.helper import failureFile, progressFile, resultFile

__all__ = ["ARCHIVE", "NodeStopping"]

#: What a pod's directory holds of a save under way.
ARCHIVE = "saved-image.tar"
#: Seconds between two looks at a forked upload helper (it is not the node's child, whose end the node hears).
UPLOAD_POLL = 0.25


class NodeStopping(NodeRecords):
    """Stopping, saving and discarding instances (a part of :class:`dit4c.node.node.Node`, which sets what is declared here)."""

    portal: str
    portalInternal: str | None
    #: The image server's base URL; None: this node cannot save.
    imageServer: str | None
    #: Runs the upload helper.
    uploadCommand: list[str]
    #: Forks the upload helper instead, if not None.
    uploadForks: ForkServer | None

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
            self._began(instance, "save" if save else "stop")
            if save and self.imageServer is None:
                self._set(instance, State.STOPPING, None)
                return self._spawn(instance, "stop", lambda: self._noImageServer(instance))
            self._set(instance, State.STOPPING, None, saving=save)
            return self._spawn(instance, "stop", lambda: self._finishStop(instance))
        if save and record.state is State.STOPPED:
            # Its pod's files are still here: captured as they are.
            if self.imageServer is None:
                self._set(instance, State.STOPPED, "This compute node has no image server to save to.")
                return succeed(None)
            self._began(instance, "save")
            self._set(instance, State.SAVING, None, saving=True)
            return self._spawn(instance, "save", lambda: self._capture(instance))
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
        archive = directory / ARCHIVE
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
        archive = directory / ARCHIVE
        # Watched every quarter second when forked (not this node's child):
        # the save is done when the helper has ended.
        process = PodProcess(self.reactor, "upload", directory, pollInterval=UPLOAD_POLL)
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
                    if not await self._startUpload(process, {**inherited(), **environment}):
                        ended.callback(None)  # it ended at once: its files say how
                except OSError as e:
                    self._failed(instance, f"The upload helper could not start: {e.strerror or e}.", during=State.UPLOADING)
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
        if succeeded:
            self.uploadedBytes += _uploadedSize(archive)
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

    async def _startUpload(self, process: PodProcess, environment: dict[str, str]) -> bool:
        """
        Fork the upload helper, or (without a fork server, or if it fails)
        start it afresh. Whether it is running.

        :raises OSError: it could not be started.
        """
        forks = self.uploadForks
        if forks is not None:
            try:
                pid = await forks.spawn([], environment, process.directory, process.logPath, program=UPLOAD)
            except Exception as e:
                self.log.warn("the upload helper cannot be forked ({why}): starting it afresh", why=e)
            else:
                return process.watch(pid, [UPLOAD])
        process.start(self.uploadCommand, environment)
        return True

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
            self._operations.pop(instance, None)  # cut short: not counted
            if not Life(record.state).allows(State.DISCARDING):
                # The portal gave up on it (errored there): whatever it was doing here ends.
                self._set(instance, State.ERRORED, f"Discarded while {record.state.value}.")
            self._set(instance, State.DISCARDING, None)
            self._began(instance, "discard")
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
        self._reached(instance, State.DISCARDED)
        self._emitStatus(InstanceStatus(instance, State.DISCARDED))


def _hashFile(path: Path) -> str:
    """Blocking (a thread): ``sha256:<hex>`` of a file."""
    import hashlib

    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1024 * 1024), b""):
            digest.update(block)
    return f"sha256:{digest.hexdigest()}"


def _uploadedSize(archive: Path) -> int:
    """
    The size of an uploaded image: as the upload helper counted it (its
    progress file, written as it read the last byte; small), else the
    archive's own (a stat, not a read).
    """
    try:
        return int(json.loads(progressFile(str(archive)).read_text())["total"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    try:
        return archive.stat().st_size
    except OSError:
        return 0


def _readText(path: Path, limit: int = 2000) -> str | None:
    """A small file's text (the upload helper's failure), if it is there."""
    try:
        return path.read_text(errors="replace")[:limit].strip() or None
    except OSError:
        return None
