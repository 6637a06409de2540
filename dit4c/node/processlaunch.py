"""
How the process runtime launches a pod: its directory (mode 0700), the
tool's working directory (a saved archive unpacked into it), the tool's
socket directory and the auth helper's socket, both handed to the tool's
own uid when the node runs as root, ``pod.json`` (which a restarted node
reads to find the pod again), then the helper process (forked from the
fork server, or started afresh) and the tool, confined by
:mod:`dit4c.node.confine`.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import cast

from twisted.internet import threads
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import quoteStringArgument

from dit4c.common.helperenv import VARIABLES, inherited, toEnvironment
from dit4c.common.limits import ToolLimits
from dit4c.node import confine
from dit4c.node.cgroups import PodCgroup
from dit4c.node.errors import RuntimeError_
from dit4c.node.interfaces import PodSpec
from dit4c.node.processarchive import STORAGE_LINK, unpackArchive
from dit4c.node.processes import POD_RECORD, PodProcess
from dit4c.node.processpods import HELPERS, STORAGE, PodProcesses
from dit4c.node.processtools import Tool, freePort
from dit4c.podhelper.forkserver import ForkServer

__all__ = [
    "AUTH_SOCKET",
    "MAX_SOCKET_PATH",
    "SOCKET_DIRECTORY",
    "SOCKET_NAME",
    "TOOL_UIDS",
    "PodLaunching",
    "homeDirectory",
    "podTool",
    "recorded",
    "toolUid",
    "whyUnconfined",
]

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


def whyUnconfined() -> str | None:
    """Whether tools can be confined here (None), else why not; asked of the kernel once."""
    if not _probed:
        _probed.append(confine.probe())
    return _probed[0]


def homeDirectory() -> Path:
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


class PodLaunching(PodProcesses):
    """
    Launching pods (a part of :class:`dit4c.node.process.ProcessRuntime`,
    which sets what is declared here).
    """

    #: Whether the node runs as root (each tool then runs as a uid of its own).
    root: bool
    #: Why tools cannot be confined here; None: they can.
    confined: str | None
    tools: dict[str, Tool]
    toolUids: range
    hide: list[Path]
    storageWait: float
    forkServer: ForkServer | None
    helpers: dict[str, list[str]]
    #: Each tool uid handed out, held until the pod's ``pod.json`` says whose it is.
    _uids: dict[str, int]

    def start(self, spec: PodSpec) -> Deferred[None]:
        return Deferred.fromCoroutine(self._start(spec))

    async def _start(self, spec: PodSpec) -> None:
        if self.root and self.confined is not None:
            raise RuntimeError_(f"This compute node cannot confine its tools, so it runs none: {self.confined}.")
        work, tool = await podTool(spec, self.tools, POD_RECORD)
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
            linkStorage(work)
        cgroup, notes = self._cgroupFor(spec)
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
            cgroups=[str(path) for path in cgroup.directories] if cgroup is not None else [],
            notes=notes,
        )
        record = {"tool": toolPort, "socket": str(socketPath) if socketPath else None, "auth": str(authPath)}
        (spec.directory / POD_RECORD).write_text(
            json.dumps({
                **record, "image": tool.name, "uid": owner[0] if owner else None, "storage": storage is not None,
                "roles": list(roles), "cgroup": cgroup.toJSON() if cgroup is not None else None,
            })
        )  # fmt: skip
        ownerOption = ["--owner", f"{owner[0]}:{owner[1]}"] if owner and storage is not None else []
        try:
            if HELPERS in processes:
                # First, so that the storage is being mounted as the tool starts.
                await self._startHelpers(
                    processes[HELPERS],
                    [*ownerOption, "--tool-pid-file", str(processes["tool"].pidPath), "--hold", str(self._hold)],
                    helperEnv,
                )
            elif storage is not None:
                processes[STORAGE].start([*self.helpers["storage"], *ownerOption], helperEnv)
            processes["tool"].start(confine.command(sys.executable, plan), toolEnv, cwd=work)
            if HELPERS not in processes:
                processes["auth"].start(self.helpers["auth"], helperEnv)
                processes["listener"].start(self.helpers["listener"], helperEnv)
        except OSError as e:
            for process in processes.values():
                process.stop()
            raise RuntimeError_(f"The tool could not be started: {e.strerror or e}.") from None
        self._pods[spec.instance] = processes
        self._limited(spec.instance, cgroup)
        self._ports[spec.instance] = socketPath or cast(int, toolPort)
        self._auth[spec.instance] = authPath
        self.log.info(
            "{instance}: {tool} on {where}, as uid {uid}",
            instance=spec.instance, tool=tool.name, where=socketPath or f"port {toolPort}",
            uid=owner[0] if owner else os.getuid(),
        )  # fmt: skip

    def _cgroupFor(self, spec: PodSpec) -> tuple[PodCgroup | None, list[str]]:
        """
        The pod's cgroup with its limits set, if it has limits and the node
        can enforce them; else what the tool's log says first.
        """
        limits = ToolLimits(cpus=spec.limits.cpus, memory=spec.limits.memory)
        if limits.empty:
            return None, []
        if isinstance(self.cgroups, str):
            why = f"This compute node does not enforce this instance's limits ({limits.describe()}): {self.cgroups}."
            return None, [why]
        try:
            return self.cgroups.make(spec.instance, limits), []
        except OSError as e:
            raise RuntimeError_(f"The tool's limits ({limits.describe()}) could not be set: {e.strerror or e}.") from None

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
        process.start([*self.helpers[HELPERS], *arguments], environment)

    def _owner(self, instance: str) -> tuple[int, int]:
        """The uid and gid the instance's tool runs as (a root node): its own, or the lowest free."""
        mine = toolUid(self.directory, POD_RECORD, instance, self.toolUids, self._uids)
        self._uids[instance] = mine
        return mine, mine


def toolUid(directory: Path, record: str, instance: str, uids: range, known: Mapping[str, int] | None = None) -> int:
    """
    The uid ``instance``'s tool runs as on a root node: the one its pod's
    record (``<directory>/<instance>/<record>``, its ``uid``) or ``known``
    names, else the lowest of ``uids`` no other pod there has.

    :raises RuntimeError_: every one of ``uids`` is taken.
    """
    taken: dict[int, str] = {uid: name for name, uid in (known or {}).items()}
    for path in directory.glob(f"*/{record}"):
        try:
            uid = json.loads(path.read_text()).get("uid")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(uid, int):
            taken.setdefault(uid, path.parent.name)
    mine = next((uid for uid, name in taken.items() if name == instance), None)
    if mine is None:
        mine = next((uid for uid in uids if uid not in taken), None)
        if mine is None:
            raise RuntimeError_("This compute node has no tool uid left for another instance.")
    return mine


async def podTool(spec: PodSpec, tools: Mapping[str, Tool], record: str) -> tuple[Path, Tool]:
    """
    The pod's working directory, made (in a directory only the node's user
    enters: the key, and the storage mounted for another uid, are behind
    it) and filled from the saved image if it starts from one, and the tool
    it runs: the one the image names, or for a resume of a pod restored
    from a saved image, the one its ``record`` says it ran.

    :raises RuntimeError_: the node has no such tool.
    """
    spec.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(spec.directory, 0o700)
    work = spec.directory / "work"
    work.mkdir(exist_ok=True)
    toolName = spec.image
    if spec.archive is not None:
        toolName = await threads.deferToThread(unpackArchive, spec.archive, work)
    elif toolName not in tools:
        toolName = recorded(spec.directory / record, "image") or toolName
    tool = tools.get(toolName)
    if tool is None:
        raise RuntimeError_(f"This compute node has no tool called {toolName!r}.")
    return work, tool


def recorded(path: Path, key: str) -> str | None:
    """The text a pod's record (a JSON object) holds under ``key``; None if it holds none."""
    try:
        value = json.loads(path.read_text()).get(key)
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, str) else None


def linkStorage(work: Path) -> None:
    """
    ``storage`` in the working directory, a link to the person's storage
    beside it (``../mnt``): a tool that shows or serves its working
    directory (JupyterLab's file browser, the static site at
    ``/storage/...``) shows the person's files too. A save leaves the link
    out (:data:`dit4c.node.processarchive.STORAGE_LINK`); a file or
    folder of the person's own by that name is left as it is.
    """
    link = work / STORAGE_LINK
    if not link.exists() and not link.is_symlink():
        link.symlink_to(Path("..") / "mnt")
