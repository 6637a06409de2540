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
timeout; the reactor is never blocked. The layout is described in
``docs/_podman_section.md`` ("The podman runtime").
"""

from __future__ import annotations

import enum
import json
import os
import re
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import LoopingCall, deferLater
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from dit4c.common.helperenv import VARIABLES, toEnvironment
from dit4c.node.interfaces import IRuntime, PodSpec, PodStatus, RuntimeError_, helperCommand
from dit4c.node.processes import PodProcess, isMount, removePodDirectory

__all__ = ["CONTAINERS_CONF", "PodmanRuntime", "PodmanError", "AUTH_PORT"]

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

#: Labels on the pod and the tool's container.
LABEL_PREFIX = "dit4c.prefix"
LABEL_INSTANCE = "dit4c.instance"
LABEL_DIRECTORY = "dit4c.directory"
LABEL_ROLE = "dit4c.role"
LABEL_TOOL_PORT = "dit4c.tool-port"

#: Host environment variables the helpers inherit (besides the pod's own).
INHERITED = ("PATH", "PYTHONPATH", "LANG", "LC_ALL", "TZ")

_INSTANCE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
_PREFIX = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.-]{0,40}$")


class PodmanError(RuntimeError_):
    """A podman command failed."""


class _Phase(enum.Enum):
    """Where one pod is, as this runtime sees it (the instance's own life is the node's)."""

    MAKING = "being made"
    UP = "up"
    #: Its tool or a helper ended by itself.
    ENDED = "ended by itself"
    GOING = "being stopped"
    DOWN = "down"


#: podman's word (``podman ps``) for a container that runs.
_CONTAINER_UP = "running"


@dataclass
class _Pod:
    """What this node holds of one pod."""

    instance: str
    directory: Path
    state: _Phase
    processes: dict[str, PodProcess] = field(default_factory=dict)
    #: The tool's port in the pod, and the pid of a process in its network namespace.
    toolPort: int | None = None
    #: The auth helper's port in the pod (unknown for a pod found again after a restart).
    authPort: int | None = None
    infraPid: int | None = None
    #: Why the pod failed while starting (a helper exited).
    failure: str | None = None


class _Collect(ProcessProtocol):
    """Gathers a child's output; kills it after ``timeout`` seconds."""

    def __init__(self, reactor: Any, timeout: float, stdin: bytes | None) -> None:
        self.reactor = reactor
        self.timeout = timeout
        self.stdin = stdin
        self.out: list[bytes] = []
        self.err: list[bytes] = []
        self.timedOut = False
        self.done: Deferred[tuple[bytes, bytes, int | None]] = Deferred()
        self._timer: IDelayedCall | None = None

    def connectionMade(self) -> None:
        self._timer = self.reactor.callLater(self.timeout, self._kill)
        if self.stdin is not None:
            self.transport.write(self.stdin)  # type: ignore[union-attr]
        self.transport.closeStdin()  # type: ignore[union-attr]

    def _kill(self) -> None:
        self._timer = None
        self.timedOut = True
        try:
            self.transport.signalProcess("KILL")  # type: ignore[union-attr]
        except Exception:
            pass

    def outReceived(self, data: bytes) -> None:
        self.out.append(data)

    def errReceived(self, data: bytes) -> None:
        self.err.append(data)

    def processEnded(self, reason: Failure) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        code = getattr(reason.value, "exitCode", None)
        self.done.callback((b"".join(self.out), b"".join(self.err), code))


def summarise(stderr: bytes, limit: int = 300) -> str:
    """
    The gist of podman's standard error: its last ``Error:`` line (or last
    line), without the log decoration, shortened to ``limit`` characters.
    """
    lines = [line.strip() for line in stderr.decode("utf-8", "replace").splitlines() if line.strip()]
    if not lines:
        return "no message"
    errors = [line for line in lines if line.startswith("Error:")]
    line = errors[-1] if errors else lines[-1]
    match = re.search(r'msg="((?:[^"\\]|\\.)*)"', line)
    if match:
        line = match.group(1).replace('\\"', '"')
    line = re.sub(r"^Error:\s*", "", line)
    return line if len(line) <= limit else line[: limit - 3] + "..."


def listening(pid: int, port: int) -> bool:
    """Whether a TCP socket listens on ``port`` in the network namespace of process ``pid``."""
    for table in ("tcp", "tcp6"):
        try:
            lines = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            # local address "HEXIP:HEXPORT", state 0A is LISTEN
            if len(fields) > 3 and fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                return True
    return False


def firewallRules(authPort: int, ipv6: bool = False) -> bytes:
    """
    ``iptables-restore`` input for the pod's network namespace: inbound
    connections only from the pod itself (loopback) or to the auth helper's
    port; replies to the pod's own outbound traffic pass.
    """
    rejectRest = "-A INPUT -p ipv6-icmp -j ACCEPT\n" if ipv6 else "-A INPUT -j REJECT\n"
    return (
        "*filter\n"
        ":INPUT ACCEPT [0:0]\n"
        "-A INPUT -i lo -j ACCEPT\n"
        "-A INPUT -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT\n"
        f"-A INPUT -p tcp --dport {authPort} -j ACCEPT\n"
        "-A INPUT -p tcp -j REJECT --reject-with tcp-reset\n"
        f"{rejectRest}"
        "COMMIT\n"
    ).encode()


@implementer(IRuntime)
class PodmanRuntime:
    """Runs each instance as a rootful podman pod; its helpers as host processes."""

    name = "podman"
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
        """
        if not _PREFIX.match(prefix):
            raise ValueError(f"bad pod name prefix {prefix!r}")
        self.storageCommand = list(storageCommand) if storageCommand is not None else helperCommand("dit4c-helper-storage")
        self.mountTimeout = mountTimeout
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
        self._pods: dict[str, _Pod] = {}
        self._callbacks: list[Callable[[str, str], object]] = []
        self._poll: LoopingCall | None = None
        self._forgotten = False

    # -- names -----------------------------------------------------------------------------

    def podName(self, instance: str) -> str:
        return f"{self.prefix}-{instance}"

    def toolName(self, instance: str) -> str:
        return f"{self.prefix}-{instance}-tool"

    # -- running podman ---------------------------------------------------------------------

    def _env(self) -> dict[str, str]:
        return dict(os.environ, CONTAINERS_CONF=str(self.containersConf))

    async def _spawn(
        self, argv: Sequence[str], timeout: float | None = None, stdin: bytes | None = None
    ) -> tuple[bytes, bytes, int | None, bool]:
        executable = shutil.which(argv[0]) or argv[0]
        proto = _Collect(self.reactor, timeout or self.commandTimeout, stdin)
        try:
            self.reactor.spawnProcess(proto, executable, list(argv), env=self._env())
        except OSError as e:
            raise RuntimeError_(f"cannot run {argv[0]}: {e.strerror}") from None
        out, err, code = await proto.done
        return out, err, code, proto.timedOut

    async def _run(
        self,
        *args: str,
        timeout: float | None = None,
        stdin: bytes | None = None,
        what: str | None = None,
        command: Sequence[str] | None = None,
    ) -> bytes:
        """
        Run ``podman <args>`` (or ``command``); its standard output.

        :raises PodmanError: it failed or timed out; the message says what
            was being done and podman's own reason.
        """
        argv = list(command) if command is not None else [self.podman, *args]
        label = what or " ".join(argv[:3])
        self.log.debug("running {argv}", argv=argv)
        out, err, code, timedOut = await self._spawn(argv, timeout, stdin)
        if timedOut:
            raise PodmanError(f"{label}: podman did not finish within {timeout or self.commandTimeout:g} s")
        if code != 0:
            # nsenter ... -- program: the program's status (or nsenter's own)
            program = argv[argv.index("--") + 1] if "--" in argv[:-1] else argv[0]
            reason = summarise(err) if err.strip() else f"{program} exited with status {code}"
            raise PodmanError(f"{label}: {reason}")
        return out

    async def _json(self, *args: str, what: str | None = None) -> Any:
        out = await self._run(*args, what=what)
        try:
            return json.loads(out or b"null")
        except ValueError:
            raise PodmanError(f"{what or args[0]}: podman's answer is not JSON") from None

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

    async def _capture(self, instance: str, archive: Path) -> str | None:
        tag = f"localhost/dit4c-saved/{instance}:latest"
        await self._run("commit", "--quiet", self.toolName(instance), tag, what="saving the tool's container")
        temporary = archive.with_suffix(".partial")
        try:
            await self._run(
                "save", "--quiet", "--format", "oci-archive", "--output", str(temporary), tag,
                timeout=self.pullTimeout, what="writing the saved image",
            )  # fmt: skip
            temporary.replace(archive)
        finally:
            temporary.unlink(missing_ok=True)
            await self._spawn([self.podman, "rmi", tag])
        return None  # podman wrote it: the node hashes it

    async def _load(self, archive: Path) -> str:
        """A saved archive into podman's images; its reference."""
        out = await self._run(
            "load", "--input", str(archive), timeout=self.pullTimeout, what="loading the saved image"
        )
        for line in out.decode("utf-8", "replace").splitlines():
            if line.startswith("Loaded image"):
                return line.split(":", 1)[1].strip().split(",")[0].strip()
        raise RuntimeError_("the saved image could not be loaded: podman named no image")

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

    # -- starting ---------------------------------------------------------------------------

    async def _start(self, spec: PodSpec) -> None:
        instance = spec.instance
        if not _INSTANCE.match(instance):
            raise RuntimeError_(f"{instance!r} is not a valid instance id")
        if instance in self._pods:
            raise RuntimeError_(f"instance {instance} already has a pod on this node")
        programs = {"auth helper": self.authCommand, "listener": self.listenerCommand, "nsenter": [self.nsenter]}
        for role, argv in programs.items():
            if not argv or shutil.which(argv[0]) is None:
                program = argv[0] if argv else ""
                raise RuntimeError_(f"the {role}'s program {program!r} is not installed on this node")
        pod = _Pod(instance, Path(spec.directory), _Phase.MAKING)
        self._pods[instance] = pod
        made = False
        try:
            if await self._exists("pod", self.podName(instance)):
                raise RuntimeError_(f"instance {instance} already has a pod on this node: discard it first")
            image = spec.image
            if spec.archive is not None:
                image = await self._load(spec.archive)
            else:
                await self._ensureImage(image)
            toolPort = spec.port if spec.port is not None else await self._exposedPort(image)
            authPort = self.authPort if toolPort != self.authPort else self.authPort + 1
            pod.directory.mkdir(parents=True, exist_ok=True)
            made = True
            hostPort = await self._createPod(pod, authPort, toolPort)
            pod.toolPort = toolPort
            pod.authPort = authPort
            pod.infraPid = await self._infraPid(instance)
            netns = f"/proc/{pod.infraPid}/ns/net"
            await self._firewall(netns, authPort)
            volumes: list[str] = []
            if spec.environment.get(VARIABLES["fileServer"]):
                # The person's storage, mounted on the host by the storage
                # helper, then bound into the tool's container at /mnt.
                mount = await self._mountStorage(pod, spec)
                volumes = ["--volume", f"{mount}:/mnt"]
            await self._run(
                "run", "--detach", "--init", "--pull=never",
                *volumes,
                "--pod", self.podName(instance),
                "--name", self.toolName(instance),
                "--label", f"{LABEL_PREFIX}={self.prefix}",
                "--label", f"{LABEL_INSTANCE}={instance}",
                "--label", f"{LABEL_ROLE}=tool",
                image,
                what="starting the tool",
            )  # fmt: skip
            self._startHelpers(pod, spec, netns, toolPort, authPort, hostPort)
            if pod.failure is not None:
                raise RuntimeError_(pod.failure)
        except BaseException as e:
            self.log.warn("pod {instance} did not start: {error}", instance=instance, error=str(e))
            pod.state = _Phase.GOING
            try:
                await self._removeAll(pod, removePod=made, removeDirectory=False)
            except Exception as cleanup:
                self.log.error("cleaning up pod {instance}: {error}", instance=instance, error=str(cleanup))
            if self._pods.get(instance) is pod:
                del self._pods[instance]
            if isinstance(e, RuntimeError_):
                raise
            if isinstance(e, Exception):
                raise RuntimeError_(f"the pod could not start: {e}") from e
            raise
        pod.state = _Phase.UP
        self.log.info("pod {instance} started (host port {port})", instance=instance, port=hostPort)
        self._watch()

    async def _exists(self, kind: str, name: str) -> bool:
        out, err, code, timedOut = await self._spawn([self.podman, kind, "exists", name])
        if timedOut or code not in (0, 1):
            raise PodmanError(f"checking {kind} {name}: {summarise(err)}")
        return code == 0

    async def _ensureImage(self, image: str) -> None:
        if not image or image.startswith("-"):
            raise RuntimeError_(f"{image!r} is not an image reference")
        out, err, code, timedOut = await self._spawn([self.podman, "image", "exists", image])
        if code == 0 and not timedOut:
            return
        if code != 1 or timedOut:
            raise PodmanError(f"could not get the image {image!r}: {summarise(err)}")
        await self._run("pull", "--quiet", image, timeout=self.pullTimeout, what=f"could not get the image {image!r}")

    async def _exposedPort(self, image: str) -> int:
        info = await self._json("image", "inspect", "--format", "json", image, what=f"inspecting the image {image!r}")
        config = (info[0] if info else {}).get("Config") or {}
        ports = []
        for key in config.get("ExposedPorts") or {}:
            number, _, protocol = key.partition("/")
            if protocol in ("", "tcp") and number.isdigit():
                ports.append(int(number))
        if not ports:
            raise RuntimeError_("the image exposes no port")
        return min(ports)

    async def _createPod(self, pod: _Pod, authPort: int, toolPort: int) -> int:
        """
        Create and start the pod (its infra container) publishing the auth
        port on a host loopback port podman chooses; that port, as podman
        reports it. A few tries: podman chooses the port as it creates the
        pod and binds it as it starts it, and another program may take it
        in between.
        """
        for attempt in range(3):
            try:
                await self._run(
                    "pod", "create",
                    "--name", self.podName(pod.instance),
                    "--label", f"{LABEL_PREFIX}={self.prefix}",
                    "--label", f"{LABEL_INSTANCE}={pod.instance}",
                    "--label", f"{LABEL_DIRECTORY}={pod.directory}",
                    "--label", f"{LABEL_TOOL_PORT}={toolPort}",
                    "--publish", f"127.0.0.1::{authPort}",
                    what="creating the pod",
                )  # fmt: skip
                await self._run("pod", "start", self.podName(pod.instance), what="starting the pod")
            except PodmanError as e:
                if "address already in use" in str(e) and attempt < 2:
                    await self._run("pod", "rm", "--ignore", "--force", self.podName(pod.instance))
                    continue
                raise
            return await self._hostPort(pod.instance, authPort)
        raise AssertionError("unreachable")

    async def _hostPort(self, instance: str, authPort: int) -> int:
        """The host port the pod publishes ``authPort`` on (``podman pod inspect``: its infra container's bindings)."""
        info = await self._json("pod", "inspect", self.podName(instance), what="inspecting the pod")
        if isinstance(info, list):
            info = info[0] if info else {}
        bindings = ((info.get("InfraConfig") or {}).get("PortBindings") or {}).get(f"{authPort}/tcp") or []
        for binding in bindings:
            port = str(binding.get("HostPort", ""))
            if port.isdigit() and int(port) > 0:
                return int(port)
        raise RuntimeError_(f"podman published the auth port {authPort} on no host port")

    async def _infraPid(self, instance: str) -> int:
        """The pid of the pod's infra container, which holds the pod's network namespace."""
        info = await self._json("pod", "inspect", self.podName(instance), what="inspecting the pod")
        if isinstance(info, list):
            info = info[0] if info else {}
        infra = info.get("InfraContainerID")
        if not infra:
            raise RuntimeError_("the pod has no infra container")
        out = await self._run("inspect", "--format", "{{.State.Pid}}", infra, what="inspecting the pod")
        pid = int(out.strip() or 0)
        if pid <= 0:
            raise RuntimeError_("the pod's network is not up")
        return pid

    async def _ready(self, instance: str) -> bool:
        pod = self._pods.get(instance)
        if pod is None or pod.state is not _Phase.UP or pod.toolPort is None:
            return False
        if pod.infraPid is None or not Path(f"/proc/{pod.infraPid}").exists():
            try:
                pod.infraPid = await self._infraPid(instance)
            except RuntimeError_:
                return False
        # The tool, and the auth helper in front of it (people reach the tool only through it).
        if pod.authPort is not None and not listening(pod.infraPid, pod.authPort):
            return False
        return listening(pod.infraPid, pod.toolPort)

    async def _firewall(self, netns: str, authPort: int) -> None:
        await self._run(
            command=[self.nsenter, f"--net={netns}", "--", self.iptablesRestore],
            stdin=firewallRules(authPort),
            what="closing the pod's network to all but the auth helper",
        )
        if self.ip6tablesRestore is not None:
            await self._run(
                command=[self.nsenter, f"--net={netns}", "--", self.ip6tablesRestore],
                stdin=firewallRules(authPort, ipv6=True),
                what="closing the pod's network to all but the auth helper (IPv6)",
            )

    def _helperEnv(self, spec: PodSpec, **chosen: str) -> dict[str, str]:
        """A helper's environment: the pod's, and what this runtime chose (helper environment attributes)."""
        env = {k: os.environ[k] for k in INHERITED if k in os.environ}
        env.update(spec.environment)
        env.update(toEnvironment(**chosen))
        return env

    def _process(self, pod: _Pod, name: str) -> PodProcess:
        process = PodProcess(self.reactor, name, pod.directory, stopGrace=self.helperStopGrace)
        process.onExit(lambda p, reason: self._exited(pod, reason))
        pod.processes[name] = process
        return process

    def _startHelpers(
        self, pod: _Pod, spec: PodSpec, netns: str, toolPort: int, authPort: int, hostPort: int
    ) -> None:
        nsenter = shutil.which(self.nsenter) or self.nsenter
        auth = self._process(pod, "auth")
        try:
            auth.start(
                [nsenter, f"--net={netns}", "--", *self.authCommand],
                self._helperEnv(
                    spec, tool=f"tcp:host=127.0.0.1:port={toolPort}", authListen=f"tcp:{authPort}:interface=0.0.0.0"
                ),
            )
            listener = self._process(pod, "listener")
            listener.start(
                self.listenerCommand,
                self._helperEnv(spec, auth=f"tcp:host=127.0.0.1:port={hostPort}"),
            )
        except OSError as e:
            raise RuntimeError_(f"a helper could not start: {e.strerror or e}") from None

    async def _mountStorage(self, pod: _Pod, spec: PodSpec) -> Path:
        mount = pod.directory / "mnt"
        mount.mkdir(exist_ok=True)
        storage = self._process(pod, "storage")
        try:
            storage.start(self.storageCommand, self._helperEnv(spec, storageMount=str(mount)))
        except OSError as e:
            raise RuntimeError_(f"the storage helper could not start: {e.strerror or e}") from None
        deadline = self.reactor.seconds() + self.mountTimeout
        while not isMount(mount):
            if pod.failure is not None:
                raise RuntimeError_(pod.failure)
            if self.reactor.seconds() > deadline:
                raise RuntimeError_(f"the person's storage was not mounted within {self.mountTimeout:g} s")
            await deferLater(self.reactor, 0.1, lambda: None)
        return mount

    # -- exits ------------------------------------------------------------------------------

    def _exited(self, pod: _Pod, reason: str) -> None:
        if self._forgotten or self._pods.get(pod.instance) is not pod:
            return
        if pod.state is _Phase.MAKING:
            pod.failure = pod.failure or reason
            return
        if pod.state is not _Phase.UP:
            return
        pod.state = _Phase.ENDED
        self.log.info("pod {instance} stopped by itself: {reason}", instance=pod.instance, reason=reason)
        for callback in list(self._callbacks):
            try:
                callback(pod.instance, reason)
            except Exception:
                self.log.failure("onExit callback failed")

    def _watch(self) -> None:
        if self._poll is None and not self._forgotten:
            self._poll = LoopingCall(self._pollOnce)
            self._poll.clock = self.reactor
            self._poll.start(self.pollInterval, now=False).addErrback(
                lambda f: self.log.failure("watching the pods", f)
            )

    def _pollOnce(self) -> Deferred[None] | None:
        if not any(pod.state is _Phase.UP for pod in self._pods.values()):
            if self._poll is not None and self._poll.running:
                self._poll.stop()
            self._poll = None
            return None
        d = Deferred.fromCoroutine(self._checkTools())
        d.addErrback(lambda f: self.log.warn("checking the tools: {error}", error=f.getErrorMessage()))
        return d

    async def _checkTools(self) -> None:
        containers = await self._json("ps", "--all", "--filter", f"label={LABEL_PREFIX}={self.prefix}", "--format", "json")
        tools = {}
        for c in containers or []:
            labels = c.get("Labels") or {}
            if labels.get(LABEL_ROLE) == "tool" and LABEL_INSTANCE in labels:
                tools[labels[LABEL_INSTANCE]] = c
        for pod in list(self._pods.values()):
            if pod.state is not _Phase.UP:
                continue
            c = tools.get(pod.instance)
            if c is None:
                self._exited(pod, "The tool's container is gone.")
            elif c.get("State") != _CONTAINER_UP:
                self._exited(pod, f"The tool exited with status {c.get('ExitCode')}.")

    # -- finding again ----------------------------------------------------------------------

    async def _find(self, instance: str) -> _Pod | None:
        """The pod from podman's record (after a node restart), its helpers adopted; None if none."""
        if not _INSTANCE.match(instance):
            return None
        if not await self._exists("pod", self.podName(instance)):
            return None
        info = await self._json("pod", "inspect", self.podName(instance), what="inspecting the pod")
        if isinstance(info, list):
            info = info[0] if info else {}
        labels = info.get("Labels") or {}
        if labels.get(LABEL_PREFIX) != self.prefix:
            return None
        return self._adopt(instance, labels, info.get("State") == "Running")

    def _adopt(self, instance: str, labels: dict[str, str], running: bool) -> _Pod:
        pod = _Pod(instance, Path(labels.get(LABEL_DIRECTORY, "")), _Phase.UP if running else _Phase.DOWN)
        port = labels.get(LABEL_TOOL_PORT, "")
        pod.toolPort = int(port) if port.isdigit() else None
        self._pods[instance] = pod
        if labels.get(LABEL_DIRECTORY):
            for name in ("auth", "listener", "storage"):
                # Never a stat of the mount point (a dead FUSE mount fails, or waits
                # for a file server this very process may serve): its pid file says.
                if name == "storage" and not (pod.directory / "storage.pid").exists():
                    continue
                process = self._process(pod, name)
                if not process.adopt():
                    del pod.processes[name]
        return pod

    async def _list(self) -> list[PodStatus]:
        entries = await self._json(
            "pod", "ps", "--filter", f"label={LABEL_PREFIX}={self.prefix}", "--format", "json", what="listing the pods"
        )
        statuses = []
        for entry in entries or []:
            labels = entry.get("Labels") or {}
            instance = labels.get(LABEL_INSTANCE)
            if not instance or labels.get(LABEL_PREFIX) != self.prefix:
                continue
            podRunning = entry.get("Status") == "Running"
            pod = self._pods.get(instance)
            if pod is None:
                pod = self._adopt(instance, labels, podRunning)
            statuses.append(self._status(pod, entry, podRunning))
        if any(pod.state is _Phase.UP for pod in self._pods.values()):
            self._watch()
        return statuses

    def _status(self, pod: _Pod, entry: dict[str, Any], podRunning: bool) -> PodStatus:
        if pod.state is _Phase.MAKING:
            return PodStatus(pod.instance, False, "The pod is starting.")
        if pod.state is _Phase.GOING:
            return PodStatus(pod.instance, False, "The pod is stopping.")
        if not podRunning:
            status = entry.get("Status") or "unknown"
            tool = [c for c in entry.get("Containers") or [] if c.get("Names") == self.toolName(pod.instance)]
            if status == "Degraded" and tool:
                reason = f"The tool is not running ({tool[0].get('Status')})."
            elif status in ("Exited", "Stopped"):
                reason = "The pod is stopped."
            else:
                reason = f"The pod is {status.lower()}."
            return PodStatus(pod.instance, False, reason)
        for name in ("auth", "listener"):
            process = pod.processes.get(name)
            if process is None or not process.running:
                return PodStatus(pod.instance, False, f"The {name} helper is not running.")
        if pod.state == "exited":
            return PodStatus(pod.instance, False, "The pod stopped by itself.")
        pod.state = _Phase.UP
        return PodStatus(pod.instance, True)

    # -- stopping and removing ----------------------------------------------------------------

    async def _stopHelpers(self, pod: _Pod) -> None:
        """The listener first, so that no one reaches a tool that is going; then the auth helper."""
        pod.state = _Phase.GOING
        for name in ("listener", "auth"):
            process = pod.processes.get(name)
            if process is not None:
                await process.stop()

    async def _stopStorage(self, pod: _Pod) -> None:
        """Unmount the person's storage, once the tool cannot be writing to it."""
        process = pod.processes.get("storage")
        if process is not None:
            await process.stop()

    async def _stop(self, instance: str) -> None:
        pod = self._pods.get(instance) or await self._find(instance)
        if pod is None:
            return
        await self._stopHelpers(pod)
        await self._run(
            "pod", "stop", "--ignore", "--time", str(self.stopTimeout), self.podName(instance),
            timeout=self.stopTimeout + self.commandTimeout,
            what="stopping the pod",
        )  # fmt: skip
        await self._stopStorage(pod)
        pod.state = _Phase.DOWN
        self.log.info("pod {instance} stopped", instance=instance)

    async def _discard(self, instance: str) -> None:
        pod = self._pods.get(instance) or await self._find(instance)
        if pod is None:
            return
        await self._removeAll(pod, removePod=True, removeDirectory=True)
        if self._pods.get(instance) is pod:
            del self._pods[instance]
        self.log.info("pod {instance} discarded", instance=instance)

    async def _removeAll(self, pod: _Pod, *, removePod: bool, removeDirectory: bool) -> None:
        """
        Stop the helpers, remove the pod's directory, then the pod: if the
        node dies half-way, the pod (and its label) is what is left, and a
        second discard finds it.
        """
        await self._stopHelpers(pod)
        if removePod:
            await self._run(
                "pod", "stop", "--ignore", "--time", str(self.stopTimeout), self.podName(pod.instance),
                timeout=self.stopTimeout + self.commandTimeout, what="stopping the pod",
            )  # fmt: skip
        await self._stopStorage(pod)
        if removePod:
            directory = pod.directory
            if removeDirectory and str(directory) not in ("", "/") and directory.exists():
                await deferToThreadPool(
                    self.reactor, self.reactor.getThreadPool(), removePodDirectory, directory
                )
            await self._run(
                "pod", "rm", "--ignore", "--force", "--time", str(self.stopTimeout), self.podName(pod.instance),
                timeout=self.stopTimeout + self.commandTimeout,
                what="removing the pod",
            )  # fmt: skip
        pod.state = _Phase.DOWN
