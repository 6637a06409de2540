"""
The ``podman`` runtime with real pods: rootful podman, a busybox image made
here (no registry is reachable), busybox ``httpd`` as the tool, and stand-in
helpers (``support.podman``) as host processes: the auth stand-in
forwards the pod's published port to the tool from inside the pod's network
namespace, as the real auth helper does.

Every pod this module makes carries a prefix of its own (``dit4ct<pid>...``),
and the ``runtime`` fixture removes every pod, container and helper of it,
even after a failed test. Skipped where podman cannot run (not installed,
not root); under CI (``CI=true``) that is a failure instead.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
from collections.abc import AsyncIterator
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import treq
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
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.error import ConnectError
from twisted.internet.protocol import Protocol
from twisted.internet.utils import getProcessOutputAndValue
from zope.interface.verify import verifyObject

from dit4c.node.errors import RuntimeError_
from dit4c.node.interfaces import IRuntime, PodSpec
from dit4c.node.podman import LABEL_PREFIX, PodmanRuntime, firewallRules, summarise
from dit4c.node.processes import startTime

requirePodman("podman runtime tests")

PAGE = b"<h1>hello from busybox httpd</h1>\n"
#: Unique per test run, so that no other pod is ever touched.
PREFIX = f"dit4ct{os.getpid()}{secrets.token_hex(2)}"


async def podman(*args: str) -> tuple[str, str, int]:
    out, err, code = await getProcessOutputAndValue("podman", list(args), env=podmanEnv())
    return out.decode(), err.decode(), code


async def httpImage() -> str:
    """httpd on 8000 serving PAGE; exposes 9000 and 8000 (the lowest is the tool's)."""
    return await buildBusyboxImage("httpd", {"/www/index.html": PAGE}, expose=[9000, 8000])


#: The one wait (podman commands are slow: a check five times a second, for up to 20 s).
waitFor = partial(eventually, timeout=20.0, interval=0.2)


async def get(port: int, host: str = "127.0.0.1") -> bytes | None:
    """The page at ``http://host:port/``, or None if nothing answers."""
    try:
        response = await treq.get(f"http://{host}:{port}/", timeout=5, persistent=False)
        return await response.content()
    except (ConnectError, OSError):
        return None
    except Exception as e:  # treq wraps a connection reset before any response
        if "ResponseNeverReceived" in repr(e) or "refused" in repr(e).lower():
            return None
        raise


async def refused(port: int, host: str = "127.0.0.1") -> bool:
    """Whether a TCP connection to host:port is refused (not merely slow)."""
    try:
        protocol = await connectProtocol(TCP4ClientEndpoint(reactor, host, port, timeout=5), Protocol())
    except ConnectError:
        return True
    protocol.transport.loseConnection()
    return False


def readEnv(directory: Path, name: str) -> dict[str, str]:
    return json.loads((directory / f"{name}-env.json").read_text())


def pidOf(directory: Path, name: str) -> int:
    return int(json.loads((directory / f"{name}.pid").read_text())["pid"])


def alive(pid: int) -> bool:
    return startTime(pid) is not None


async def ourContainers() -> list[str]:
    out, _, _ = await podman("ps", "--all", "--format", "{{.Names}}", "--filter", f"label={LABEL_PREFIX}={PREFIX}")
    return out.split()


async def podExists(name: str) -> bool:
    _, _, code = await podman("pod", "exists", name)
    return code == 0


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


@pytest_twisted.async_yield_fixture
async def runtime() -> AsyncIterator[PodmanRuntime]:
    made = makeRuntime()
    try:
        yield made
    finally:
        made.forget()
        await removePods(reactor, PREFIX)


def spec(tmp_path: Path, image: str, port: int | None = None, **env: str) -> PodSpec:
    instance = "i" + secrets.token_hex(4)
    return PodSpec(instance, image, port, tmp_path / instance, {"DIT4C_INSTANCE": instance, **env})


async def hostPortOf(directory: Path) -> int:
    """The pod's published port, as the listener was told it."""
    env = await waitFor(
        lambda: (directory / "listener-env.json").exists() and readEnv(directory, "listener"),
        what="the listener's environment",
    )
    assert env["DIT4C_AUTH"].startswith("tcp:host=127.0.0.1:port=")
    return int(env["DIT4C_AUTH"].rsplit("=", 1)[1])


# -- without podman's help ----------------------------------------------------------------------


def test_summarise_keeps_podmans_reason() -> None:
    err = (
        b'time="2026-01-01T00:00:00Z" level=warning msg="Failed, retrying in 1s ... (2/3)"\n'
        b'Error: short-name "nosuch" did not resolve to an alias\n'
    )
    assert summarise(err) == 'short-name "nosuch" did not resolve to an alias'
    assert summarise(b'time="x" level=error msg="it \\"broke\\""\n') == 'it "broke"'
    assert summarise(b"") == "no message"
    assert len(summarise(b"Error: " + b"x" * 1000)) == 300


def test_firewall_admits_only_the_auth_port() -> None:
    rules = firewallRules(8765).decode()
    assert "-A INPUT -i lo -j ACCEPT" in rules
    assert "--dport 8765 -j ACCEPT" in rules
    assert rules.index("--dport 8765") < rules.index("REJECT")


def test_a_runtime_removes_only_the_working_directory_it_made(tmp_path: Path) -> None:
    """
    conmon and podman run in the runtime's working directory. One the node
    gave it (its data directory) stays; a temporary one the runtime made
    for itself goes when it is forgotten, so that runtimes made and dropped
    (a node started again, a clean-up) leave no directory behind.
    """
    made = PodmanRuntime(reactor, prefix=PREFIX)
    temporary = made.workDirectory
    assert temporary.is_dir()
    (temporary / "oom").write_text("")
    given = PodmanRuntime(reactor, prefix=PREFIX, workDirectory=tmp_path / "podman")
    assert given.workDirectory == tmp_path / "podman"
    (given.workDirectory / "oom").write_text("")
    made.forget()
    given.forget()
    assert not temporary.exists()
    assert (tmp_path / "podman" / "oom").exists()


# -- real pods ------------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_start_stop_discard(runtime: PodmanRuntime, tmp_path: Path) -> None:
    """
    The tool answers only through the process in the pod's network
    namespace; the helpers get their environment; stop keeps the pod,
    discard removes everything, twice.
    """
    verifyObject(IRuntime, runtime)
    image = await httpImage()
    s = spec(tmp_path, image, SOME_SETTING="some value")  # port None: the lowest exposed
    await runtime.start(s)
    podName = f"{PREFIX}-{s.instance}"
    hostPort = await hostPortOf(s.directory)

    assert await waitFor(lambda: runtime.ready(s.instance), what="the tool to listen")
    assert await waitFor(lambda: get(hostPort), what="the tool through the auth stand-in") == PAGE

    # Helpers' environment: the runtime's addresses and the spec's variables.
    auth = await waitFor(lambda: (s.directory / "auth-env.json").exists() and readEnv(s.directory, "auth"))
    assert auth["DIT4C_TOOL"] == "tcp:host=127.0.0.1:port=8000"
    assert auth["DIT4C_AUTH_LISTEN"] == "tcp:8765:interface=0.0.0.0"
    assert auth["DIT4C_INSTANCE"] == s.instance
    assert auth["SOME_SETTING"] == "some value"
    assert "DIT4C_AUTH" not in auth
    listener = readEnv(s.directory, "listener")
    assert listener["DIT4C_INSTANCE"] == s.instance and listener["SOME_SETTING"] == "some value"
    assert "DIT4C_TOOL" not in listener

    # The tool is not reachable from the host: not on loopback, not on the pod's address.
    out, _, _ = await podman("pod", "inspect", podName, "--format", "{{.InfraContainerID}}")
    address, _, _ = await podman("inspect", out.strip(), "--format", "{{.NetworkSettings.IPAddress}}")
    address = address.strip()
    assert address
    assert await refused(8000)
    assert await refused(8000, address)
    assert await refused(9000, address)
    # ... the auth port is, on both (the pod's address is on the node's own bridge).
    assert await get(8765, address) == PAGE

    statuses = {p.instance: p for p in await runtime.pods()}
    assert statuses[s.instance].running, statuses[s.instance].reason
    authPid, listenerPid = pidOf(s.directory, "auth"), pidOf(s.directory, "listener")
    assert alive(authPid) and alive(listenerPid)
    # The auth helper is a host process in the pod's network namespace; the listener in the host's.
    assert os.readlink(f"/proc/{authPid}/ns/net") != os.readlink("/proc/self/ns/net")
    assert os.readlink(f"/proc/{listenerPid}/ns/net") == os.readlink("/proc/self/ns/net")

    exits: list[tuple[str, str]] = []
    runtime.onExit(lambda instance, reason: exits.append((instance, reason)))

    await runtime.stop(s.instance)
    assert not await runtime.ready(s.instance)
    assert await get(hostPort) is None
    assert await podExists(podName)
    assert not alive(authPid) and not alive(listenerPid)
    statuses = {p.instance: p for p in await runtime.pods()}
    assert not statuses[s.instance].running
    assert statuses[s.instance].reason == "The pod is stopped."

    await runtime.discard(s.instance)
    assert not await podExists(podName)
    assert await ourContainers() == []
    assert not s.directory.exists()
    assert s.instance not in {p.instance for p in await runtime.pods()}
    await runtime.discard(s.instance)
    await runtime.discard("never-was")
    await runtime.stop("never-was")
    # No pod left to watch: the runtime stops checking its tools at its next poll, once any check under way
    # has ended. Past that, nothing of this pod could be reported.
    await waitFor(lambda: runtime._poll is None, what="the runtime stopped watching")
    assert exits == []  # stop and discard are no exits


@pytest_twisted.ensureDeferred
async def test_a_new_runtime_finds_the_pod(runtime: PodmanRuntime, tmp_path: Path) -> None:
    """A node restart: a new runtime object finds the running pod and its helpers, and discards them."""
    s = spec(tmp_path, await httpImage(), port=8000)
    await runtime.start(s)
    hostPort = await hostPortOf(s.directory)
    assert await waitFor(lambda: get(hostPort)) == PAGE
    authPid, listenerPid = pidOf(s.directory, "auth"), pidOf(s.directory, "listener")
    runtime.forget()  # the old node goes; the pod stays

    restarted = makeRuntime()
    try:
        statuses = {p.instance: p for p in await restarted.pods()}
        assert statuses[s.instance].running, statuses[s.instance].reason
        assert await restarted.ready(s.instance)
        assert await get(hostPort) == PAGE

        # A helper that exits is reported, now that the new runtime watches it.
        exits: list[tuple[str, str]] = []
        restarted.onExit(lambda instance, reason: exits.append((instance, reason)))
        os.kill(listenerPid, signal.SIGKILL)
        await waitFor(lambda: exits, what="onExit for the listener")
        assert exits[0][0] == s.instance and "listener" in exits[0][1]
        statuses = {p.instance: p for p in await restarted.pods()}
        assert not statuses[s.instance].running

        await restarted.discard(s.instance)
        assert not await podExists(f"{PREFIX}-{s.instance}")
        assert not alive(authPid)
        assert not s.directory.exists()
    finally:
        restarted.forget()


@pytest_twisted.ensureDeferred
async def test_a_tool_that_exits_is_reported(runtime: PodmanRuntime, tmp_path: Path) -> None:
    image = await buildBusyboxImage("exits", expose=8000, cmd=["/bin/sh", "-c", "sleep 1; exit 3"])
    s = spec(tmp_path, image)
    exits: list[tuple[str, str]] = []
    runtime.onExit(lambda instance, reason: exits.append((instance, reason)))
    await runtime.start(s)
    await waitFor(lambda: exits, what="onExit for the tool")
    assert exits == [(s.instance, "The tool exited with status 3.")]
    statuses = {p.instance: p for p in await runtime.pods()}
    assert not statuses[s.instance].running
    assert "tool" in (statuses[s.instance].reason or "")
    await runtime.discard(s.instance)
    assert await ourContainers() == []


@pytest_twisted.ensureDeferred
async def test_a_tools_output_is_read_in_order_after_it_exits(runtime: PodmanRuntime, tmp_path: Path) -> None:
    """Standard output and error, in the order written, from an offset or the end; still there once the tool exited."""
    script = "echo one; sleep 0.2; echo two >&2; sleep 0.2; echo three; exit 3"
    image = await buildBusyboxImage("talks", expose=8000, cmd=["/bin/sh", "-c", script])
    s = spec(tmp_path, image)
    exits: list[tuple[str, str]] = []
    runtime.onExit(lambda instance, reason: exits.append((instance, reason)))
    assert (await runtime.logs(s.instance, None, 100)).text == ""  # no such container yet
    await runtime.start(s)
    await waitFor(lambda: exits, what="onExit for the tool")
    whole = await runtime.logs(s.instance, 0, 1000)
    assert (whole.text, whole.next) == ("one\ntwo\nthree\n", 14)
    assert (await runtime.logs(s.instance, None, 6)).text == "three\n"
    assert (await runtime.logs(s.instance, 4, 4)).text == "two\n"
    await runtime.discard(s.instance)
    assert (await runtime.logs(s.instance, None, 100)).text == ""


@pytest_twisted.ensureDeferred
async def test_failures_leave_nothing_behind(runtime: PodmanRuntime, tmp_path: Path) -> None:
    # An image that cannot be had (a short name resolves nowhere, offline and at once).
    s = spec(tmp_path, "no-such-image-dit4c")
    with pytest.raises(RuntimeError_) as raised:
        await runtime.start(s)
    message = str(raised.value)
    assert "could not get the image 'no-such-image-dit4c'" in message
    assert "short-name" in message and "\n" not in message

    with pytest.raises(RuntimeError_, match="invalid reference format"):
        await runtime.start(spec(tmp_path, "Bad Reference!!"))

    # An image without a port, and no port given.
    quiet = await buildBusyboxImage("quiet", cmd=["/bin/sleep", "1000"])
    with pytest.raises(RuntimeError_, match="^the image exposes no port$"):
        await runtime.start(spec(tmp_path, quiet))

    # A failure after the pod was made (its firewall), and a missing helper program.
    for kwargs, expected in (
        ({"iptablesRestore": "/bin/false"}, "closing the pod's network to all but the auth helper: /bin/false exited with status 1"),
        ({"listenerCommand": ["/no/such/listener"]}, "the listener's program '/no/such/listener' is not installed on this node"),
    ):
        failing = makeRuntime(**kwargs)
        b = spec(tmp_path, await httpImage())
        try:
            with pytest.raises(RuntimeError_) as raised:
                await failing.start(b)
        finally:
            failing.forget()
        assert str(raised.value) == expected
        assert not await podExists(f"{PREFIX}-{b.instance}")
        for name in ("auth", "listener"):
            if (b.directory / f"{name}.pid").exists():
                assert not alive(pidOf(b.directory, name))

    assert await ourContainers() == []
    assert await runtime.pods() == []


# -- saving and restoring ------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_capture_and_start_again_from_the_archive(runtime: PodmanRuntime, tmp_path: Path) -> None:
    """What the tool wrote survives: commit + save to an archive, then load it into a new pod."""
    image = await httpImage()
    first = spec(tmp_path, image)
    await runtime.start(first)
    out, err, code = await podman("exec", runtime.toolName(first.instance), "sh", "-c", "echo kept > /www/kept.txt")
    assert code == 0, err
    await runtime.stop(first.instance)
    archive = tmp_path / "saved.tar"
    await runtime.capture(first.instance, archive)
    assert archive.stat().st_size > 0
    # The saved tag is not left behind: the archive is the image now.
    assert (await podman("image", "exists", f"localhost/dit4c-saved/{first.instance}:latest"))[2] == 1
    await runtime.discard(first.instance)

    again = replace(spec(tmp_path, "unused-when-an-archive-is-given"), archive=archive)
    await runtime.start(again)
    out, err, code = await podman("exec", runtime.toolName(again.instance), "cat", "/www/kept.txt")
    assert (out, code) == ("kept\n", 0), err
    port = await hostPortOf(again.directory)

    async def served() -> str | None:
        try:
            response = await treq.get(f"http://127.0.0.1:{port}/kept.txt", timeout=10)
            return str(await response.text())
        except ConnectError:
            return None  # the helpers are still starting

    assert await waitFor(served, what="the restored tool") == "kept\n"
    # The loaded image goes with the pod: the image server holds it, and a later restore loads it again.
    restored = f"localhost/dit4c-saved/{first.instance}:latest"
    assert (await podman("image", "exists", restored))[2] == 0
    await runtime.discard(again.instance)
    assert (await podman("image", "exists", restored))[2] == 1


@pytest_twisted.ensureDeferred
async def test_a_broken_archive_starts_nothing(runtime: PodmanRuntime, tmp_path: Path) -> None:
    broken = tmp_path / "broken.tar"
    broken.write_bytes(b"not an image at all")
    with pytest.raises(RuntimeError_, match="loading the saved image"):
        await runtime.start(replace(spec(tmp_path, "x"), archive=broken))
    assert (await runtime.pods()) == []
