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
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from twisted.internet import threads
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.endpoints import (
    TCP4ClientEndpoint,
    UNIXClientEndpoint,
    connectProtocol,
    quoteStringArgument,
)
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from zope.interface import implementer

from dit4c.common.helperenv import VARIABLES, inherited, toEnvironment
from dit4c.node import confine
from dit4c.node.confine import STORAGE_WAIT
from dit4c.node.interfaces import IRuntime, PodSpec, PodStatus, RuntimeError_, helperCommand
from dit4c.node.processes import (
    POD_RECORD,
    PodProcess,
    killRecorded,
    killStrays,
    removePodDirectory,
)
from dit4c.podhelper.forkserver import ForkServer

__all__ = ["TOOL_UIDS", "ProcessRuntime", "Tool", "builtinTools", "toolsFromFile"]


_PLACEHOLDER = re.compile(r"\{(port|dir|socket|python)\}")


@dataclass(frozen=True)
class Tool:
    """
    A command that serves a web tool, in ``{dir}`` (its working directory):
    on the Unix socket ``{socket}`` if the command or its environment names
    it, else on the loopback TCP port ``{port}`` (also in ``$PORT``).
    ``{python}`` is the node's own Python.
    """

    name: str
    command: tuple[str, ...]
    #: Extra environment for the tool (``{port}``, ``{socket}``, ``{dir}`` and ``{python}`` are substituted).
    environment: Mapping[str, str] | None = None

    @property
    def socket(self) -> bool:
        """Whether the tool listens on the Unix socket it is given (rather than on TCP)."""
        return any("{socket}" in part for part in (*self.command, *(self.environment or {}).values()))

    def _fill(self, text: str, port: int | None, directory: Path, socket: Path | None) -> str:
        values = {"port": port, "dir": directory, "socket": socket, "python": sys.executable}
        # Only the placeholders: any other brace (a script, JSON) stays as it is.
        return _PLACEHOLDER.sub(lambda m: str(values[m.group(1)]), text)

    def argv(self, port: int | None, directory: Path, socket: Path | None = None) -> list[str]:
        return [self._fill(part, port, directory, socket) for part in self.command]

    def env(self, port: int | None, directory: Path, socket: Path | None = None) -> dict[str, str]:
        return {k: self._fill(v, port, directory, socket) for k, v in (self.environment or {}).items()}


def builtinTools() -> dict[str, Tool]:
    """
    Tools that work on a fresh machine: ``dit4c/notes`` (part of DIT4C),
    ``dit4c/static`` (the working directory as a static web site, also
    DIT4C's own), and ``jupyter/lab`` when JupyterLab is installed. All
    listen on the Unix socket they are given.
    """
    tools = {
        "dit4c/notes": Tool("dit4c/notes", ("{python}", "-m", "dit4c.tools.notes", "--socket", "{socket}")),
        "dit4c/static": Tool(
            "dit4c/static", ("{python}", "-m", "dit4c.tools.static", "--socket", "{socket}", "--directory", "{dir}")
        ),
    }
    lab = shutil.which("jupyter-lab") or _besidePython("jupyter-lab")
    if lab:
        tools["jupyter/lab"] = Tool(
            "jupyter/lab",
            (
                lab, "--no-browser", "--ServerApp.sock={socket}", "--ServerApp.root_dir={dir}",
                # The auth helper in front decides who gets in; JupyterLab's own token would ask again.
                "--IdentityProvider.token=", "--ServerApp.password=",
                "--ServerApp.allow_remote_access=True", "--ServerApp.disable_check_xsrf=True",
                # Kernels on Unix sockets too (in the runtime directory, mode 0700), not on loopback ports.
                "--KernelManager.transport=ipc",
            ),
            # A short path (a Unix socket's is at most 107 bytes): /tmp is the tool's own.
            {"JUPYTER_RUNTIME_DIR": "/tmp/jupyter-runtime"},
        )  # fmt: skip
    return tools


def _besidePython(program: str) -> str | None:
    candidate = Path(sys.executable).parent / program
    return str(candidate) if candidate.exists() else None


def toolsFromFile(path: str | Path) -> dict[str, Tool]:
    """
    A tool table from JSON: ``{"tools": {"name": {"command": [...], "environment": {...}}}}``.
    The command and environment may use ``{socket}`` (a Unix socket to
    listen on: the tool is then reachable only through its auth helper),
    ``{port}`` (a loopback TCP port, for a tool that speaks only TCP),
    ``{dir}`` and ``{python}``.

    :raises ValueError: the file is not such a table.
    """
    data = json.loads(Path(path).read_text())
    tools: dict[str, Tool] = {}
    for name, entry in dict(data["tools"]).items():
        command = entry["command"]
        if not isinstance(command, list) or not command or not all(isinstance(p, str) for p in command):
            raise ValueError(f"tool {name!r}: command must be a non-empty list of strings")
        environment = entry.get("environment")
        if environment is not None and (
            not isinstance(environment, dict) or not all(isinstance(v, str) for v in environment.values())
        ):
            raise ValueError(f"tool {name!r}: environment must map names to strings")
        tools[name] = Tool(name, tuple(command), environment)
    return tools


def freePort() -> int:
    """
    A TCP port free on loopback now, for a tool that only speaks TCP (the
    tool binds it soon after; another process may take it meanwhile, and
    the tool then fails to start, saying so in its log). The one port the
    node picks for another program: every server of DIT4C's own listens on
    port 0 or on a Unix socket instead.
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


#: The uids (and gids) of tools when the node runs as root: one per
#: instance, the lowest free. Above the ranges ``/etc/subuid`` usually hands
#: out first; none need exist in ``/etc/passwd``.
TOOL_UIDS = range(1_000_000, 1_065_536)
#: Where a tool listens, in the pod's directory: a directory only the tool
#: (and the node's user: the auth helper) may enter, and the socket in it.
SOCKET_DIRECTORY = "sock"
SOCKET_NAME = "tool.sock"
#: Where the pod's auth helper listens, in the pod's directory (mode 0600).
AUTH_SOCKET = "auth.sock"
#: The longest path a Unix socket may have (``sun_path`` less its NUL).
MAX_SOCKET_PATH = 107

_probed: list[str | None] = []


def _probe() -> str | None:
    """Whether tools can be confined here (None), else why not; asked of the kernel once."""
    if not _probed:
        _probed.append(confine.probe())
    return _probed[0]


def _home() -> Path:
    """The node's user's home directory (as the system knows it, not ``$HOME``)."""
    import pwd

    try:
        return Path(pwd.getpwuid(os.getuid()).pw_dir)
    except KeyError:
        return Path(os.environ.get("HOME", "/"))


def _exposed() -> list[str]:
    """
    What the built-in tools need of the node's installation: the Python
    that runs them (a virtual environment and its base) and DIT4C itself,
    bound back read-only where the tool could not otherwise reach them.
    """
    import dit4c

    paths = {sys.prefix, sys.base_prefix, str(Path(dit4c.__file__).resolve().parent.parent)}
    return sorted(str(Path(p).resolve()) for p in paths)


def _own(paths: Sequence[Path], uid: int, gid: int) -> None:
    """Blocking (runs in a thread): hand ``paths``, and all under them, to the tool's uid."""
    for top in paths:
        os.lchown(top, uid, gid)
        for root, directories, files in os.walk(top):
            for name in (*directories, *files):
                os.lchown(os.path.join(root, name), uid, gid)


def _unixEndpoint(path: Path) -> str:
    return f"unix:path={quoteStringArgument(str(path))}"


def _unixServerEndpoint(path: Path) -> str:
    """A server endpoint on the Unix socket ``path``, mode 0600 (the node removes a stale one first)."""
    return f"unix:address={quoteStringArgument(str(path))}:mode=600:lockfile=0"


def _socketPath(path: Path, what: str) -> Path:
    """
    ``path``, if it fits a Unix socket's address.

    :raises RuntimeError_: it is too long, naming what would listen there.
    """
    if len(os.fsencode(path)) > MAX_SOCKET_PATH:
        raise RuntimeError_(
            f"The pod's directory is too long a path for {what}'s Unix socket ({path}): "
            "the compute node needs a shorter data directory."
        )
    return path


#: A pod's processes: the tool and its one helper process.
_ROLES = ("tool", "helpers")
_HELPERS = "helpers"
#: A pod's processes with ``podHelpers="separate"`` (and every pod before
#: there was one helper process): the storage helper too with a file server.
_SEPARATE_ROLES = ("tool", "auth", "listener")
_STORAGE = "storage"
_KNOWN_ROLES = frozenset((*_ROLES, *_SEPARATE_ROLES, _STORAGE))
#: How a pod's helpers run: forked from the node's fork server (one process
#: per pod), started afresh (one process per pod), or three processes.
POD_HELPERS = ("forked", "one", "separate")
#: Seconds a pod's helper process may take to stop beyond waiting for the
#: tool: unmounting the storage (``fusermount``, then sshfs's end: 5 s,
#: SIGTERM and 5 s, SIGKILL and 5 s).
STORAGE_STOP = 20.0

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
        toolUids: range = TOOL_UIDS,
        hide: Sequence[Path] | None = None,
        storageWait: float = STORAGE_WAIT,
        podHelpers: str = "forked",
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
        """
        self.reactor = reactor
        self.directory = directory
        self.root = os.geteuid() == 0
        self.toolUids = toolUids
        if hide is None:
            hide = [directory.resolve().parent, *([] if self.root else [_home()])]
        self.hide = [Path(path).resolve() for path in hide]
        self.storageWait = storageWait
        self._uids: dict[str, int] = {}
        self.confined = _probe()
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
        self.tools = dict(tools) if tools is not None else builtinTools()
        if podHelpers not in POD_HELPERS:
            raise ValueError(f"podHelpers is one of {', '.join(POD_HELPERS)}, not {podHelpers!r}")
        self.podHelpers = podHelpers
        #: Fork pod helpers, unless a command for them was given.
        self.forkServer: ForkServer | None = None
        if podHelpers == "forked" and _HELPERS not in (helpers or {}):
            self.forkServer = ForkServer(reactor, directory / "helpers.sock", directory / "helpers-forkserver.log")
        self.helpers = {
            _HELPERS: list(helperCommand("dit4c-helper-pod")),
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

    def _roles(self, storage: bool) -> tuple[str, ...]:
        """The processes a new pod has."""
        if self.podHelpers == "separate":
            return (*_SEPARATE_ROLES, _STORAGE) if storage else _SEPARATE_ROLES
        return _ROLES

    @property
    def _hold(self) -> float:
        """Seconds a stopping helper process keeps the storage mounted, waiting for the tool (stopped by then)."""
        return self.stopGrace + 5.0

    def _processes(self, instance: str, directory: Path, roles: Sequence[str]) -> dict[str, PodProcess]:
        processes = {
            role: PodProcess(
                self.reactor, role, directory,
                stopGrace=self._hold + STORAGE_STOP if role == _HELPERS else self.stopGrace,
            )
            for role in roles
        }  # fmt: skip

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
        if self.root and self.confined is not None:
            raise RuntimeError_(f"This compute node cannot confine its tools, so it runs none: {self.confined}.")
        spec.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        # Only the node's user enters the pod: the key, and the storage
        # mounted for another uid, are behind it.
        os.chmod(spec.directory, 0o700)
        work = spec.directory / "work"
        work.mkdir(exist_ok=True)
        toolName = spec.image
        if spec.archive is not None:
            toolName = await threads.deferToThread(_unpack, spec.archive, work)
        tool = self.tools.get(toolName)
        if tool is None:
            raise RuntimeError_(f"This compute node has no tool called {toolName!r}.")
        owner = self._owner(spec.instance) if self.root else None
        try:
            await self._launch(spec, tool, work, owner)
        finally:
            # Held only until pod.json says whose uid it is.
            self._uids.pop(spec.instance, None)

    async def _launch(self, spec: PodSpec, tool: Tool, work: Path, owner: tuple[int, int] | None) -> None:
        """The tool's socket directory, its files handed over, pod.json, and the pod's processes."""
        sockets = spec.directory / SOCKET_DIRECTORY
        socketPath = _socketPath(sockets / SOCKET_NAME, "the tool") if tool.socket else None
        authPath = _socketPath(spec.directory / AUTH_SOCKET, "the auth helper")
        # Left by a pod that ended without removing it: the auth helper binds afresh.
        authPath.unlink(missing_ok=True)
        if socketPath is not None:
            sockets.mkdir(mode=0o700, exist_ok=True)
            os.chmod(sockets, 0o700)
            socketPath.unlink(missing_ok=True)
        if owner is not None:
            handed = [work, *([sockets] if socketPath else [])]
            if spec.archive is not None:
                # A restored archive may hold many files: not on the reactor thread.
                await threads.deferToThread(_own, handed, *owner)
            else:
                # Two new directories: at once, so that a new pod's processes are
                # started (and known to stop or discard) before anything else runs.
                _own(handed, *owner)
        toolPort = None if socketPath is not None else (spec.port if spec.port is not None else freePort())
        # The person's shared storage, if the node has a file server: mounted
        # beside the working directory (never inside it: a save would copy it).
        storage = spec.directory / "mnt" if spec.environment.get(VARIABLES["fileServer"]) else None
        if storage is not None:
            storage.mkdir(exist_ok=True)
        roles = self._roles(storage is not None)
        processes = self._processes(spec.instance, spec.directory, roles)
        base = inherited()
        helperEnv = {
            **base,
            **spec.environment,
            **toEnvironment(
                tool=_unixEndpoint(socketPath) if socketPath else f"tcp:host=127.0.0.1:port={toolPort}",
                authListen=_unixServerEndpoint(authPath),
                auth=_unixEndpoint(authPath),
                storageMount=str(storage) if storage is not None else None,
            ),
        }
        toolEnv = {
            **base,
            **({"DIT4C_STORAGE": str(storage)} if storage is not None else {}),
            **({"PORT": str(toolPort)} if toolPort is not None else {}),
            "HOME": str(work),
            **tool.env(toolPort, work, socketPath),
        }
        plan = confine.Plan(
            tool.argv(toolPort, work, socketPath),
            str(work),
            uid=owner[0] if owner else None,
            gid=owner[1] if owner else None,
            hide=[str(path) for path in self.hide],
            bind=[str(work), *([str(sockets)] if socketPath else [])],
            expose=_exposed(),
            storage=str(storage) if storage is not None else None,
            storageWait=self.storageWait,
        )
        record = {"tool": toolPort, "socket": str(socketPath) if socketPath else None, "auth": str(authPath)}
        (spec.directory / POD_RECORD).write_text(
            json.dumps({
                **record, "image": tool.name, "uid": owner[0] if owner else None, "storage": storage is not None,
                "roles": list(roles),
            })
        )  # fmt: skip
        ownerOption = ["--owner", f"{owner[0]}:{owner[1]}"] if owner and storage is not None else []
        try:
            if _HELPERS in processes:
                # First, so that the storage is being mounted as the tool starts.
                await self._startHelpers(
                    processes[_HELPERS],
                    [*ownerOption, "--tool-pid-file", str(processes["tool"].pidPath), "--hold", str(self._hold)],
                    helperEnv,
                )
            elif storage is not None:
                processes[_STORAGE].start([*self.helpers["storage"], *ownerOption], helperEnv)
            processes["tool"].start(confine.command(sys.executable, plan), toolEnv, cwd=work)
            if _HELPERS not in processes:
                processes["auth"].start(self.helpers["auth"], helperEnv)
                processes["listener"].start(self.helpers["listener"], helperEnv)
        except OSError as e:
            for process in processes.values():
                process.stop()
            raise RuntimeError_(f"The tool could not be started: {e.strerror or e}.") from None
        self._pods[spec.instance] = processes
        self._ports[spec.instance] = socketPath or cast(int, toolPort)
        self._auth[spec.instance] = authPath
        self.log.info(
            "{instance}: {tool} on {where}, as uid {uid}",
            instance=spec.instance, tool=tool.name, where=socketPath or f"port {toolPort}",
            uid=owner[0] if owner else os.getuid(),
        )  # fmt: skip

    async def _startHelpers(self, process: PodProcess, arguments: list[str], environment: Mapping[str, str]) -> None:
        """
        The pod's helper process: forked by the fork server, or, without
        one (or if it fails), started afresh.

        :raises OSError: it could not be started, or ended at once.
        """
        if self.forkServer is not None:
            try:
                pid = await self.forkServer.spawn(arguments, environment, process.directory, process.logPath)
            except Exception as e:
                self.log.warn("pod helpers cannot be forked ({why}): starting them afresh", why=e)
            else:
                if not process.watch(pid, ["dit4c-helper-pod", *arguments]):
                    raise OSError(f"the pod's helper process ended at once (see {process.logPath})")
                return
        process.start([*self.helpers[_HELPERS], *arguments], environment)

    def _owner(self, instance: str) -> tuple[int, int]:
        """The uid and gid the instance's tool runs as (a root node): its own, or the lowest free."""
        taken: dict[int, str] = {uid: name for name, uid in self._uids.items()}
        for record in self.directory.glob(f"*/{POD_RECORD}"):
            try:
                uid = json.loads(record.read_text()).get("uid")
            except (OSError, ValueError, AttributeError):
                continue
            if isinstance(uid, int):
                taken.setdefault(uid, record.parent.name)
        mine = next((uid for uid, name in taken.items() if name == instance), None)
        if mine is None:
            mine = next((uid for uid in self.toolUids if uid not in taken), None)
            if mine is None:
                raise RuntimeError_("This compute node has no tool uid left for another instance.")
        self._uids[instance] = mine
        return mine, mine

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
        return threads.deferToThread(_pack, directory / "work", archive, str(tool))

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

    def _adopt(self, instance: str) -> dict[str, PodProcess] | None:
        """
        The pod's processes, found again from its ``pod.json`` and pid files
        if this runtime did not start them (a node restart): each is
        watched from now on. None if there is no such pod.

        Which processes the pod has is read from ``pod.json`` (its
        ``roles``; a pod started before there was one helper process has
        none, and a storage helper if ``storage`` or its pid file says so):
        never by looking at the mount point, which on a dead FUSE mount
        fails, or waits for a file server that may be served by this very
        process.
        """
        processes = self._pods.get(instance)
        if processes is not None:
            return processes
        directory = self.directory / instance
        try:
            pod = json.loads((directory / POD_RECORD).read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(pod, dict):
            return None
        roles = pod.get("roles")
        if not isinstance(roles, list) or not roles or not all(role in _KNOWN_ROLES for role in roles):
            storage = bool(pod.get("storage", (directory / f"{_STORAGE}.pid").exists()))
            roles = [*_SEPARATE_ROLES, *([_STORAGE] if storage else [])]
        processes = self._processes(instance, directory, roles)
        for process in processes.values():
            process.adopt()
        self._pods[instance] = processes
        try:
            self._ports[instance] = Path(pod["socket"]) if pod.get("socket") else int(pod["tool"])
            auth = pod["auth"]
            # A path; a port number in a pod an older node started.
            self._auth[instance] = Path(auth) if isinstance(auth, str) else int(auth)
        except (KeyError, ValueError, TypeError):
            pass
        return processes

    def stop(self, instance: str) -> Deferred[None]:
        processes = self._adopt(instance) or {}
        if _HELPERS in processes:
            # The helper process first: its tunnel and auth helper close at
            # once, so no one reaches a tool that is going; it unmounts the
            # storage only once the tool has ended (--tool-pid-file).
            both = [processes[role].stop() for role in (_HELPERS, "tool") if role in processes]
            return DeferredList(both, consumeErrors=True).addCallback(lambda _: None)
        # The listener first, so no one reaches a tool that is going; the
        # storage last, once the tool cannot be writing to it.
        order = [processes[role] for role in ("listener", "auth", "tool") if role in processes]
        d = DeferredList([p.stop() for p in order], consumeErrors=True)
        if _STORAGE in processes:
            d.addCallback(lambda _: processes[_STORAGE].stop())
        return d.addCallback(lambda _: None)

    def discard(self, instance: str) -> Deferred[None]:
        """
        Stop the pod, then make sure nothing of it is left: every process a
        pid file in its directory names, and any other process still in it
        (working in its directory, or carrying its instance id), is killed,
        what is mounted in it unmounted, and the directory removed.
        """
        directory = self.directory / instance

        def remove(_: object) -> Deferred[None]:
            self._pods.pop(instance, None)
            self._ports.pop(instance, None)
            self._auth.pop(instance, None)
            # Scanning processes and a working directory of gigabytes: not on the reactor thread.
            return threads.deferToThread(_removeAll, directory, instance)

        return self.stop(instance).addCallback(remove)

    def pods(self) -> Deferred[list[PodStatus]]:
        found: list[PodStatus] = []
        for record in sorted(self.directory.glob(f"*/{POD_RECORD}")):
            instance = record.parent.name
            processes = self._adopt(instance)
            if processes is None:
                found.append(PodStatus(instance, False, "Its pod record is unreadable."))
                continue
            missing = [role for role, p in processes.items() if not p.running]
            reason = f"Not running: {', '.join(missing)}." if missing else None
            found.append(PodStatus(instance, not missing, reason))
        return succeed(found)

    def forget(self) -> None:
        """Stop watching the pods (the node is stopping; they run on)."""
        for processes in self._pods.values():
            for process in processes.values():
                process.forget()
        if self.forkServer is not None:
            self.forkServer.stop()


def _removeAll(directory: Path, instance: str) -> None:
    """Blocking (a thread): nothing of the pod left, processes and mounts included; then its directory."""
    killRecorded(directory)
    killStrays(directory, instance)
    removePodDirectory(directory)
