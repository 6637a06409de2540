"""
Resuming with the ``podman`` runtime, with real pods (busybox ``httpd`` as
the tool, the stand-in helpers of ``support.podman``): a stop keeps the pod
and its tool's container, and a resume starts them again with the files
the tool wrote, the person's storage mounted again before the tool starts,
fresh helpers in front of it, through a real compute node: a plain
instance, one restored from a saved image whose image server is gone, one
resumed after the node restarted, one whose resume the restart cut short,
one whose resume fails (stopped again, its files kept) and one whose pod is
gone (errored).

Every pod here carries a prefix of its own and the fixtures remove every
pod, helper, mount and saved image of it, even after a failed test. Skipped
where podman cannot run; under CI (``CI=true``) that is a failure instead.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import sys
from collections.abc import AsyncIterator
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import treq
from standins import Watcher
from support.podman import (
    buildBusyboxImage,
    podmanEnv,
    removePods,
    requirePodman,
    standInAuthCommand,
    standInListenerCommand,
)
from support.waiting import eventually
from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol, serverFromString
from twisted.internet.error import ConnectError
from twisted.internet.protocol import Protocol
from twisted.internet.utils import getProcessOutputAndValue
from twisted.web.resource import Resource
from twisted.web.server import Site
from twisted.web.static import File

from dit4c.common.life import State
from dit4c.common.mounts import mountPoints
from dit4c.node.errors import RuntimeError_
from dit4c.node.interfaces import PodSpec
from dit4c.node.node import Node
from dit4c.node.nodestart import FETCHED, RESUMING
from dit4c.node.podman import LABEL_PREFIX, PodmanRuntime
from dit4c.node.podmancommand import SAVED_PREFIX
from dit4c.node.processes import RECORD, startTime

requirePodman("podman resume tests")

PAGE = b"<h1>hello from busybox httpd</h1>\n"
#: Unique per test run, so that no other pod is ever touched.
PREFIX = f"dit4cr{os.getpid()}{secrets.token_hex(2)}"
#: podman commands are slow: a look five times a second, for up to 30 s.
waitFor = partial(eventually, timeout=30.0, interval=0.2)

#: A stand-in storage helper: binds the directory it is given on the pod's
#: mount point (as sshfs mounts the person's storage), and unmounts it on SIGTERM.
STORAGE = """
import os, signal, subprocess, sys, time
mount = os.environ["DIT4C_STORAGE_MOUNT"]
subprocess.run(["mount", "--bind", sys.argv[1], mount], check=True)
def end(*_):
    subprocess.run(["umount", mount])
    os._exit(0)
signal.signal(signal.SIGTERM, end)
while True:
    time.sleep(3600)
"""

#: A stand-in upload helper: keeps a copy of the saved image beside it, and succeeds.
UPLOAD = [
    sys.executable, "-c",
    "import os, shutil, pathlib;"
    "f = pathlib.Path(os.environ['DIT4C_IMAGE_FILE']);"
    "shutil.copy(f, f.parent / 'uploaded.tar')",
]  # fmt: skip


async def podman(*args: str) -> tuple[str, str, int]:
    out, err, code = await getProcessOutputAndValue("podman", list(args), env=podmanEnv())
    return out.decode(), err.decode(), code


async def httpImage() -> str:
    return await buildBusyboxImage("httpd", {"/www/index.html": PAGE}, expose=[9000, 8000])


def makeRuntime(**kwargs: Any) -> PodmanRuntime:
    options: dict[str, Any] = {
        "prefix": PREFIX,
        "authCommand": standInAuthCommand(),
        "listenerCommand": standInListenerCommand(),
        "pollInterval": 0.5,
        "stopTimeout": 1,
        "helperStopGrace": 2.0,
    }
    options.update(kwargs)
    return PodmanRuntime(reactor, **options)


async def removeSaved(instances: list[str]) -> None:
    """The saved images this module's instances were restored from, if any is left."""
    for instance in instances:
        await podman("rmi", "--force", f"{SAVED_PREFIX}{instance}:latest")


@pytest_twisted.async_yield_fixture
async def runtime() -> AsyncIterator[PodmanRuntime]:
    made = makeRuntime()
    try:
        yield made
    finally:
        made.forget()
        await removePods(reactor, PREFIX)


def readEnv(directory: Path, name: str) -> dict[str, str]:
    return json.loads((directory / f"{name}-env.json").read_text())


def pidOf(directory: Path, name: str) -> int:
    return int(json.loads((directory / f"{name}.pid").read_text())["pid"])


async def hostPortOf(directory: Path) -> int:
    env = await waitFor(
        lambda: (directory / "listener-env.json").exists() and readEnv(directory, "listener"),
        what="the listener's environment",
    )
    return int(env["DIT4C_AUTH"].rsplit("=", 1)[1])


async def fetch(port: int, path: str = "/", host: str = "127.0.0.1") -> bytes | None:
    """``http://host:port/path`` (the pod's published port: through the auth stand-in), or None."""
    try:
        response = await treq.get(f"http://{host}:{port}{path}", timeout=5, persistent=False)
        if response.code != 200:
            await response.content()
            return None
        return bytes(await response.content())
    except (ConnectError, OSError):
        return None
    except Exception as e:  # treq wraps a connection reset before any response
        if "ResponseNeverReceived" in repr(e) or "refused" in repr(e).lower():
            return None
        raise


async def refused(host: str, port: int) -> bool:
    """Whether a TCP connection to host:port is refused (not merely slow)."""
    try:
        protocol = await connectProtocol(TCP4ClientEndpoint(reactor, host, port, timeout=5), Protocol())
    except ConnectError:
        return True
    protocol.transport.loseConnection()
    return False


async def inTool(runtime: PodmanRuntime, instance: str, script: str) -> str:
    out, err, code = await podman("exec", runtime.toolName(instance), "sh", "-c", script)
    assert code == 0, err
    return out


async def containerId(runtime: PodmanRuntime, instance: str) -> str:
    out, err, code = await podman("container", "inspect", "--format", "{{.Id}}", runtime.toolName(instance))
    assert code == 0, err
    return out.strip()


# -- the runtime ----------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_stopped_pod_starts_again_with_its_files(runtime: PodmanRuntime, tmp_path: Path) -> None:
    """
    The same container, its files as the tool left them, answering through
    fresh helpers on the port the pod was published on, behind its firewall.
    """
    assert runtime.resumable
    instance = "i" + secrets.token_hex(4)
    spec = PodSpec(instance, await httpImage(), None, tmp_path / instance, {"DIT4C_INSTANCE": instance, "SETTING": "first"})
    await runtime.start(spec)
    port = await hostPortOf(spec.directory)
    assert await waitFor(lambda: fetch(port)) == PAGE
    await inTool(runtime, instance, "echo kept > /www/kept.txt")
    container = await containerId(runtime, instance)
    before = pidOf(spec.directory, "auth")

    await runtime.stop(instance)
    assert await fetch(port) is None
    (spec.directory / "auth-env.json").unlink()

    # The node gives the helpers their environment afresh.
    again = replace(spec, image="not-pulled-for-a-resume", environment={**spec.environment, "SETTING": "second"})
    await runtime.start(again)
    assert await waitFor(lambda: runtime.ready(instance), what="the tool to listen again")
    assert await waitFor(lambda: fetch(port, "/kept.txt"), what="the kept file through the auth stand-in") == b"kept\n"
    assert await containerId(runtime, instance) == container
    auth = readEnv(spec.directory, "auth")
    assert auth["SETTING"] == "second" and auth["DIT4C_TOOL"] == "tcp:host=127.0.0.1:port=8000"
    assert pidOf(spec.directory, "auth") != before and startTime(pidOf(spec.directory, "auth")) is not None
    assert await hostPortOf(spec.directory) == port
    statuses = {p.instance: p for p in await runtime.pods()}
    assert statuses[instance].running, statuses[instance].reason

    # The firewall is up again: on the pod's own address, the tool is not reachable; the auth port is.
    out, _, _ = await podman("pod", "inspect", runtime.podName(instance), "--format", "{{.InfraContainerID}}")
    address, _, _ = await podman("inspect", out.strip(), "--format", "{{.NetworkSettings.IPAddress}}")
    assert address.strip()
    assert await refused(address.strip(), 8000)
    assert await fetch(8765, "/kept.txt", address.strip()) == b"kept\n"

    with pytest.raises(RuntimeError_, match="already has a pod"):
        await runtime.start(again)
    await runtime.discard(instance)
    out, _, _ = await podman("ps", "--all", "--quiet", "--filter", f"label={LABEL_PREFIX}={PREFIX}")
    assert out.split() == [] and not spec.directory.exists()


@pytest_twisted.ensureDeferred
async def test_the_persons_storage_is_mounted_again_before_the_tool_starts(tmp_path: Path) -> None:
    """What the tool wrote to /mnt is on the person's storage, and there again in the resumed container."""
    storage = tmp_path / "storage"
    storage.mkdir()
    runtime = makeRuntime(storageCommand=[sys.executable, "-c", STORAGE, str(storage)])
    instance = "i" + secrets.token_hex(4)
    directory = tmp_path / instance
    env = {"DIT4C_INSTANCE": instance, "DIT4C_FILE_SERVER": "files.example:2222"}
    spec = PodSpec(instance, await httpImage(), 8000, directory, env)
    try:
        await runtime.start(spec)
        await inTool(runtime, instance, "echo before > /mnt/before.txt")
        assert (storage / "before.txt").read_text() == "before\n"
        await runtime.stop(instance)
        assert str(directory / "mnt") not in mountPoints()

        await runtime.start(spec)
        assert str(directory / "mnt") in mountPoints()
        assert await inTool(runtime, instance, "cat /mnt/before.txt") == "before\n"
        await inTool(runtime, instance, "echo after > /mnt/after.txt")
        assert (storage / "after.txt").read_text() == "after\n"
        await runtime.discard(instance)
        assert str(directory / "mnt") not in mountPoints()
        assert sorted(p.name for p in storage.iterdir()) == ["after.txt", "before.txt"]
    finally:
        runtime.forget()
        await removePods(reactor, PREFIX)


# -- through a compute node -------------------------------------------------------------------------


class Nodes:
    """A compute node on the podman runtime, made (and made again: a restart) on one directory."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.node: Node | None = None
        self.runtime: PodmanRuntime | None = None
        self.watcher = Watcher()
        #: Every instance id handed out (their saved images are removed at the end).
        self.made: list[str] = []

    def ids(self, count: int) -> list[str]:
        """Instance ids of this test run's own."""
        made = [f"r{secrets.token_hex(5)}" for _ in range(count)]
        self.made += made
        return made

    def start(self) -> tuple[Node, PodmanRuntime]:
        self.runtime = makeRuntime()
        self.node = Node(
            reactor, self.runtime, self.directory, portal="http://localhost:8000",
            imageServer="http://images.example:8600", uploadCommand=UPLOAD, readyInterval=0.2,
        )  # fmt: skip
        self.node.subscribe(self.watcher.observer())
        self.node.startService()
        return self.node, self.runtime

    def stop(self) -> None:
        """The node process ends; its pods stay."""
        if self.node is not None:
            self.node.stopService()
        self.node = None

    def record(self, instance: str) -> dict[str, Any]:
        return dict(json.loads((self.directory / instance / RECORD).read_text()))

    async def reaches(self, instance: str, state: State, timeout: float = 60.0) -> Any:
        """Until ``instance``'s latest state is ``state``; that status."""

        def latest() -> Any:
            found = [s for s in self.watcher.states if s.instance == instance]
            return found[-1] if found and found[-1].state == state else None

        return await eventually(latest, timeout, interval=0.1, what=lambda: f"{instance} {state.value}: {self.watcher.history(instance)}")


@pytest_twisted.async_yield_fixture
async def nodes(tmp_path: Path) -> AsyncIterator[Nodes]:
    made = Nodes(tmp_path / "node")
    try:
        yield made
    finally:
        made.stop()
        await removePods(reactor, PREFIX)
        await removeSaved(made.made)


async def serve(directory: Path) -> Any:
    root = Resource()
    root.putChild(b"images", File(str(directory)))
    return await serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(Site(root))


async def answers(runtime: PodmanRuntime, directory: Path, path: str) -> bytes:
    """What the tool serves at ``path`` through the auth stand-in, once it does."""
    port = await hostPortOf(directory)
    found: bytes = await waitFor(lambda: fetch(port, path), what=f"{path} through the auth stand-in")
    return found


@pytest_twisted.ensureDeferred
async def test_a_node_resumes_stopped_and_restored_instances_also_after_a_restart(nodes: Nodes, tmp_path: Path) -> None:
    first, restored = nodes.ids(2)
    node, runtime = nodes.start()
    image = await httpImage()
    await node.start(first, image, 8000)
    await nodes.reaches(first, State.RUNNING)
    key = nodes.watcher.keys[first]
    await inTool(runtime, first, "echo mine > /www/mine.txt")
    await node.stop(first)
    await nodes.reaches(first, State.STOPPED)
    await node.resume(first)
    await nodes.reaches(first, State.RUNNING)
    assert nodes.watcher.history(first)[-3:] == ["stopped", "starting", "running"]
    assert await answers(runtime, tmp_path / "node" / first, "/mine.txt") == b"mine\n"
    assert nodes.watcher.keys[first] == key

    # Saved, and a new instance restored from the saved image.
    await node.save(first)
    await nodes.reaches(first, State.SAVED)
    archive = (tmp_path / "node" / first / "uploaded.tar").read_bytes()
    served = tmp_path / "served"
    served.mkdir()
    (served / "saved.tar").write_bytes(archive)
    port = await serve(served)
    try:
        url = f"http://127.0.0.1:{port.getHost().port}/images/saved.tar"
        await node.start(restored, url, None, "sha256:" + hashlib.sha256(archive).hexdigest(), "read-token")
        await nodes.reaches(restored, State.RUNNING)
    finally:
        await port.stopListening()
    pod = tmp_path / "node" / restored
    assert await answers(runtime, pod, "/mine.txt") == b"mine\n"
    await inTool(runtime, restored, "echo restored > /www/since.txt")
    await node.stop(restored)
    await nodes.reaches(restored, State.STOPPED)

    # The image server is gone: a resume neither fetches nor loads the saved image again.
    await node.resume(restored)
    await nodes.reaches(restored, State.RUNNING)
    assert await answers(runtime, pod, "/since.txt") == b"restored\n"
    out, _, _ = await podman("container", "inspect", "--format", "{{.ImageName}}", runtime.toolName(restored))
    assert out.strip() == f"{SAVED_PREFIX}{first}:latest"
    assert not (pod / FETCHED).exists()

    # The node process restarts between the stop and the resume.
    await node.stop(restored)
    await nodes.reaches(restored, State.STOPPED)
    nodes.stop()
    node, runtime = nodes.start()
    await node.resume(restored)
    await nodes.reaches(restored, State.RUNNING)
    assert await answers(runtime, pod, "/since.txt") == b"restored\n"

    # ... and right after a resume was recorded, before anything of the pod started: the resume goes on.
    await node.stop(restored)
    await nodes.reaches(restored, State.STOPPED)
    nodes.stop()
    record = nodes.record(restored)
    (pod / RECORD).write_text(json.dumps({**record, "state": "starting"}))
    (pod / RESUMING).touch()
    node, runtime = nodes.start()
    await nodes.reaches(restored, State.RUNNING)
    assert await answers(runtime, pod, "/since.txt") == b"restored\n"
    # The mark goes once the resume has ended, just after it reports the instance running.
    await eventually(lambda: not (pod / RESUMING).exists(), 10, what="the resume's mark removed")

    await node.stop(restored)
    await nodes.reaches(restored, State.STOPPED)
    for instance in (first, restored):
        await node.discard(instance)
        await nodes.reaches(instance, State.DISCARDED)
    # The loaded saved image went with the pod restored from it.
    assert (await podman("image", "exists", f"{SAVED_PREFIX}{first}:latest"))[2] == 1


@pytest_twisted.ensureDeferred
async def test_a_failed_resume_keeps_the_files_and_a_lost_pod_is_errored(nodes: Nodes, tmp_path: Path) -> None:
    (third,) = nodes.ids(1)
    node, runtime = nodes.start()
    await node.start(third, await httpImage(), 8000)
    await nodes.reaches(third, State.RUNNING)
    await inTool(runtime, third, "echo mine > /www/mine.txt")
    await node.stop(third)
    await nodes.reaches(third, State.STOPPED)

    # The pod's firewall cannot be set up: stopped again, with the reason; tried again, it runs.
    runtime.iptablesRestore = "/bin/false"
    await node.resume(third)
    stopped = await nodes.reaches(third, State.STOPPED)
    assert nodes.watcher.history(third)[-2:] == ["starting", "stopped"]
    assert stopped.reason == (
        "It could not be resumed; its files are kept. "
        "Closing the pod's network to all but the auth helper: /bin/false exited with status 1."
    )
    assert node.outcomes["resume", "error"] == 1
    statuses = {p.instance: p for p in await runtime.pods()}
    assert not statuses[third].running
    runtime.iptablesRestore = "iptables-restore"
    await node.resume(third)
    await nodes.reaches(third, State.RUNNING)
    assert await answers(runtime, tmp_path / "node" / third, "/mine.txt") == b"mine\n"

    # Its pod removed behind the node's back: nothing to resume.
    await node.stop(third)
    await nodes.reaches(third, State.STOPPED)
    _, err, code = await podman("pod", "rm", "--force", runtime.podName(third))
    assert code == 0, err
    await node.resume(third)
    errored = await nodes.reaches(third, State.ERRORED)
    assert errored.reason == "Nothing of this instance's pod is left on this compute node: it cannot be resumed."
    await node.discard(third)
    await nodes.reaches(third, State.DISCARDED)
    assert not (tmp_path / "node" / third).exists()
