"""
The ``process`` runtime: each pod is three local processes, the embedded
default that needs no container engine.

The tool is a command from the node's tool table, run in the pod's own
working directory and given a free loopback port; the auth helper listens on
another free loopback port in front of it; the listener dials the routing
server and forwards to the auth helper. Nothing isolates the tool from
other local users here (it listens on loopback): that is what the
``podman`` runtime is for.
"""

from __future__ import annotations

import json
import shutil
import socket
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from twisted.internet import threads
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from zope.interface import implementer

from dit4c.common.helperenv import inherited
from dit4c.node.interfaces import IRuntime, PodSpec, PodStatus, RuntimeError_, helperCommand
from dit4c.node.processes import PodProcess, removePodDirectory

__all__ = ["ProcessRuntime", "Tool", "builtinTools", "toolsFromFile"]


@dataclass(frozen=True)
class Tool:
    """A command that serves a web tool on ``{port}`` (in ``{dir}``, its working directory)."""

    name: str
    command: tuple[str, ...]
    #: Extra environment for the tool (``{port}`` and ``{dir}`` are substituted).
    environment: Mapping[str, str] | None = None

    def argv(self, port: int, directory: Path) -> list[str]:
        return [part.format(port=port, dir=directory, python=sys.executable) for part in self.command]


def builtinTools() -> dict[str, Tool]:
    """
    Tools that work on a fresh machine: ``dit4c/notes`` (part of DIT4C),
    ``dit4c/static`` (the working directory as a static web site), and
    ``jupyter/lab`` when JupyterLab is installed.
    """
    tools = {
        "dit4c/notes": Tool("dit4c/notes", ("{python}", "-m", "dit4c.tools.notes", "--port", "{port}")),
        # The instance's working directory as a plain static web site.
        "dit4c/static": Tool(
            "dit4c/static", ("{python}", "-m", "http.server", "{port}", "--bind", "127.0.0.1", "--directory", "{dir}")
        ),
    }
    lab = shutil.which("jupyter-lab") or _besidePython("jupyter-lab")
    if lab:
        tools["jupyter/lab"] = Tool(
            "jupyter/lab",
            (
                lab, "--no-browser", "--ip=127.0.0.1", "--port={port}", "--ServerApp.root_dir={dir}",
                # The auth helper in front decides who gets in; JupyterLab's own token would ask again.
                "--IdentityProvider.token=", "--ServerApp.password=",
                "--ServerApp.allow_remote_access=True", "--ServerApp.disable_check_xsrf=True",
            ),
        )  # fmt: skip
    return tools


def _besidePython(program: str) -> str | None:
    candidate = Path(sys.executable).parent / program
    return str(candidate) if candidate.exists() else None


def toolsFromFile(path: str | Path) -> dict[str, Tool]:
    """
    A tool table from JSON: ``{"tools": {"name": {"command": [...], "environment": {...}}}}``.

    :raises ValueError: the file is not such a table.
    """
    data = json.loads(Path(path).read_text())
    tools: dict[str, Tool] = {}
    for name, entry in dict(data["tools"]).items():
        command = entry["command"]
        if not isinstance(command, list) or not command or not all(isinstance(p, str) for p in command):
            raise ValueError(f"tool {name!r}: command must be a non-empty list of strings")
        tools[name] = Tool(name, tuple(command), entry.get("environment"))
    return tools


def freePort() -> int:
    """A TCP port free on loopback now (the process given it binds it soon after)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


_ROLES = ("tool", "auth", "listener")
#: Started only when the node has a file server.
_STORAGE = "storage"

#: The member of a saved archive that says which tool it is.
IMAGE_METADATA = ".dit4c-image.json"
#: What ``capture`` writes: a tar of the working directory.
IMAGE_FORMAT = "dit4c-process-archive/1"


def _pack(work: Path, archive: Path, tool: str) -> str:
    """Blocking: a tar of ``work`` with the metadata first (runs in a thread); its digest."""
    import io
    import tarfile

    temporary = archive.with_suffix(".partial")
    hashing = _Hashing(temporary.open("wb"))
    with hashing.raw, tarfile.open(fileobj=cast(Any, hashing), mode="w") as tar:
        metadata = json.dumps({"format": IMAGE_FORMAT, "tool": tool}).encode()
        info = tarfile.TarInfo(IMAGE_METADATA)
        info.size = len(metadata)
        info.mode = 0o600
        tar.addfile(info, io.BytesIO(metadata))
        for path in sorted(work.rglob("*")):
            if path.name == IMAGE_METADATA and path.parent == work:
                continue
            tar.add(path, arcname=str(path.relative_to(work)), recursive=False)
        tar.close()
    digest = f"sha256:{hashing.digest.hexdigest()}"
    temporary.replace(archive)
    return digest


class _Hashing:
    """A file written through, hashed on the way (one pass over a big archive, not two)."""

    def __init__(self, raw: Any) -> None:
        import hashlib

        self.raw = raw
        self.digest = hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        written: int = self.raw.write(data)
        return written

    def tell(self) -> int:
        position: int = self.raw.tell()
        return position

    def close(self) -> None:
        pass  # the raw file is closed by its own context


def _unpack(archive: Path, work: Path) -> str:
    """
    Blocking: a saved archive into ``work``; the tool's name. Only plain
    files and directories inside ``work`` come out (tarfile's ``data``
    filter: no absolute paths, no ``..``, no links out, no devices).
    """
    import tarfile

    try:
        with tarfile.open(archive, "r") as tar:
            try:
                member = tar.extractfile(IMAGE_METADATA)
            except KeyError:
                member = None
            if member is None:
                raise RuntimeError_("The saved image says nothing of its tool.")
            metadata = json.loads(member.read())
            if metadata.get("format") != IMAGE_FORMAT or not isinstance(metadata.get("tool"), str):
                raise RuntimeError_("The saved image is not one this node can start.")
            tar.extractall(work, filter="data")
    except (tarfile.TarError, ValueError, KeyError) as e:
        raise RuntimeError_(f"The saved image could not be unpacked: {e}.") from None
    (work / IMAGE_METADATA).unlink(missing_ok=True)
    return str(metadata["tool"])


@implementer(IRuntime)
class ProcessRuntime:
    """Pods as local processes."""

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
    ) -> None:
        """
        :param directory: where the node keeps pods (``<directory>/<instance>/``).
        :param tools: image name → tool (default :func:`builtinTools`).
        :param helpers: ``auth`` / ``listener`` → the command that runs it
            (default: the DIT4C helper plugins).
        """
        self.reactor = reactor
        self.directory = directory
        self.tools = dict(tools) if tools is not None else builtinTools()
        self.helpers = {
            "auth": list(helperCommand("dit4c-helper-auth")),
            "listener": list(helperCommand("dit4c-helper-listener")),
            "storage": list(helperCommand("dit4c-helper-storage")),
            **{k: list(v) for k, v in (helpers or {}).items()},
        }
        self.stopGrace = stopGrace
        self._pods: dict[str, dict[str, PodProcess]] = {}
        self._ports: dict[str, int] = {}
        self._authPorts: dict[str, int] = {}
        self._exitCallbacks: list[Callable[[str, str], object]] = []

    def onExit(self, callback: Callable[[str, str], object]) -> None:
        self._exitCallbacks.append(callback)

    def _processes(self, instance: str, directory: Path) -> dict[str, PodProcess]:
        roles = (*_ROLES, _STORAGE) if (directory / "mnt").is_dir() else _ROLES
        processes = {role: PodProcess(self.reactor, role, directory, stopGrace=self.stopGrace) for role in roles}
        def exited(process: PodProcess, reason: str) -> None:
            self._exited(instance, reason)

        for process in processes.values():
            process.onExit(exited)
        return processes

    def _exited(self, instance: str, reason: str) -> None:
        for callback in self._exitCallbacks:
            callback(instance, reason)

    def start(self, spec: PodSpec) -> Deferred[None]:
        return Deferred.fromCoroutine(self._start(spec))

    async def _start(self, spec: PodSpec) -> None:
        spec.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        work = spec.directory / "work"
        work.mkdir(exist_ok=True)
        toolName = spec.image
        if spec.archive is not None:
            toolName = await threads.deferToThread(_unpack, spec.archive, work)
        tool = self.tools.get(toolName)
        if tool is None:
            raise RuntimeError_(f"This compute node has no tool called {toolName!r}.")
        toolPort = spec.port if spec.port is not None else freePort()
        authPort = freePort()
        # The person's shared storage, if the node has a file server: mounted
        # beside the working directory (never inside it: a save would copy it).
        storage = spec.directory / "mnt" if spec.environment.get("DIT4C_FILE_SERVER") else None
        if storage is not None:
            storage.mkdir(exist_ok=True)
        processes = self._processes(spec.instance, spec.directory)
        base = inherited()
        helperEnv = {
            **base,
            **spec.environment,
            "DIT4C_TOOL": f"tcp:host=127.0.0.1:port={toolPort}",
            "DIT4C_AUTH_LISTEN": f"tcp:{authPort}:interface=127.0.0.1",
            "DIT4C_AUTH": f"tcp:host=127.0.0.1:port={authPort}",
        }
        if storage is not None:
            helperEnv["DIT4C_STORAGE_MOUNT"] = str(storage)
        toolEnv = {
            **base,
            **({"DIT4C_STORAGE": str(storage)} if storage is not None else {}),
            "PORT": str(toolPort),
            "HOME": str(work),
            **{k: v.format(port=toolPort, dir=work) for k, v in (tool.environment or {}).items()},
        }
        (spec.directory / "pod.json").write_text(json.dumps({"tool": toolPort, "auth": authPort, "image": tool.name}))
        try:
            if storage is not None:
                processes[_STORAGE].start(self.helpers["storage"], helperEnv)
            processes["tool"].start(tool.argv(toolPort, work), toolEnv, cwd=work)
            processes["auth"].start(self.helpers["auth"], helperEnv)
            processes["listener"].start(self.helpers["listener"], helperEnv)
        except OSError as e:
            for process in processes.values():
                process.stop()
            raise RuntimeError_(f"The tool could not be started: {e.strerror or e}.") from None
        self._pods[spec.instance] = processes
        self._ports[spec.instance] = toolPort
        self._authPorts[spec.instance] = authPort
        self.log.info("{instance}: {tool} on port {port}", instance=spec.instance, tool=tool.name, port=toolPort)

    def capture(self, instance: str, archive: Path) -> Deferred[str | None]:
        """
        The pod's working directory as a tar archive, with the tool's name
        in ``.dit4c-image.json``; its digest (hashed as it is written).
        """
        directory = self.directory / instance
        try:
            tool = json.loads((directory / "pod.json").read_text())["image"]
        except (OSError, ValueError, KeyError) as e:
            raise RuntimeError_(f"Nothing to save: the instance has no pod here ({e}).") from None
        return threads.deferToThread(_pack, directory / "work", archive, str(tool))

    def ready(self, instance: str) -> Deferred[bool]:
        """Whether the tool, and the auth helper in front of it, accept connections."""
        if instance not in self._ports:
            return succeed(False)
        ports = [self._ports[instance], *([self._authPorts[instance]] if instance in self._authPorts else [])]
        return Deferred.fromCoroutine(self._ready(ports))

    async def _ready(self, ports: list[int]) -> bool:
        for port in ports:
            if not await self._accepts(port):
                return False
        return True

    def _accepts(self, port: int) -> Deferred[bool]:
        endpoint = TCP4ClientEndpoint(self.reactor, "127.0.0.1", port, timeout=2)

        def connected(protocol: Protocol) -> bool:
            if protocol.transport is not None:
                protocol.transport.loseConnection()
            return True

        return connectProtocol(endpoint, Protocol()).addCallbacks(connected, lambda _: False)

    def stop(self, instance: str) -> Deferred[None]:
        processes = self._pods.get(instance, {})
        # The listener first, so no one reaches a tool that is going; the
        # storage last, once the tool cannot be writing to it.
        order = [processes[role] for role in ("listener", "auth", "tool") if role in processes]
        d = DeferredList([p.stop() for p in order], consumeErrors=True)
        if _STORAGE in processes:
            d.addCallback(lambda _: processes[_STORAGE].stop())
        return d.addCallback(lambda _: None)

    def discard(self, instance: str) -> Deferred[None]:
        def remove(_: object) -> Deferred[None]:
            self._pods.pop(instance, None)
            self._ports.pop(instance, None)
            self._authPorts.pop(instance, None)
            # A working directory may hold gigabytes: not on the reactor thread.
            return threads.deferToThread(removePodDirectory, self.directory / instance)

        return self.stop(instance).addCallback(remove)

    def pods(self) -> Deferred[list[PodStatus]]:
        found: list[PodStatus] = []
        for record in sorted(self.directory.glob("*/pod.json")):
            instance = record.parent.name
            processes = self._pods.get(instance)
            if processes is None:
                processes = self._processes(instance, record.parent)
                alive = [role for role, p in processes.items() if p.adopt()]
                self._pods[instance] = processes
                try:
                    ports = json.loads(record.read_text())
                    self._ports[instance] = int(ports["tool"])
                    self._authPorts[instance] = int(ports["auth"])
                except (OSError, ValueError, KeyError):
                    pass
            else:
                alive = [role for role, p in processes.items() if p.running]
            missing = [role for role in processes if role not in alive]
            reason = f"Not running: {', '.join(missing)}." if missing else None
            found.append(PodStatus(instance, not missing, reason))
        return succeed(found)

    def forget(self) -> None:
        """Stop watching the pods (the node is stopping; they run on)."""
        for processes in self._pods.values():
            for process in processes.values():
                process.forget()
