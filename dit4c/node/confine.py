"""
``python -m dit4c.node.confine [options] -- PROGRAM ARG...``: run a tool of
the ``process`` runtime confined, so that it cannot read the instance's key
or anything else of the node's, and nothing but the auth helper reaches it.

The runtime (:mod:`dit4c.node.process`) starts every tool through this
launcher. It puts the tool in new mount and PID namespaces (and a new user
namespace when the node is not root), where:

- the node's data directory (``--hide``: the pods, their keys, the node's
  own key) and, for a node that is not root, its home directory are covered
  by empty tmpfs mounts; only the tool's working directory, its socket
  directory and the person's storage (``--bind``, ``--storage``) are bound
  back, at the same paths, so every path the runtime gives the tool holds;
- ``/tmp`` and ``/dev/shm`` are fresh tmpfs mounts of the tool's own;
- everything else is read-only (``mount_setattr``): a tool that runs as the
  node's own user cannot change the node's code or files either;
- ``/proc`` is the new PID namespace's: the tool sees only its own
  processes, so it cannot reach the node's through ``/proc/<pid>/root``;
- when the node is root, the tool runs as ``--uid``/``--gid`` (no
  supplementary groups), which need not exist in ``/etc/passwd``;
  directories the tool needs (``--expose``: the Python that runs the
  built-in tools, the tool's own installation) that this uid cannot reach
  are bound back read-only, and what hid them stays covered;
- ``no_new_privs`` is set: no set-uid program gives the tool more rights.

The launcher stays as the process the node watches; in the new PID
namespace a small init (PID 1) reaps orphans and ends with the tool, taking
every process of the tool with it (Jupyter kernels run in sessions of their
own, out of reach of a process-group signal). The tool's exit status is
passed on (a signal ``N`` as ``128 + N``).

Where the kernel refuses an unprivileged user namespace (a sysctl such as
``kernel.unprivileged_userns_clone=0`` or ``user.max_user_namespaces=0``,
or a seccomp filter), a node that is not root runs the tool unconfined, as
its own user, after saying so on standard error (the tool's log); what
still holds is that only that user can enter the socket directory (mode
0700). A root node that cannot make a mount namespace refuses to start the
tool: running it as root, or as another uid that cannot reach its working
directory, would be worse than not running it.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import shutil
import signal
import stat
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from dit4c.common.mounts import isMount

__all__ = ["Plan", "command", "main", "probe"]

CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000

MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_BIND = 0x1000
MS_REC = 0x4000
MS_SLAVE = 0x80000

MOUNT_ATTR_RDONLY = 0x1
AT_FDCWD = -100
AT_RECURSIVE = 0x8000
#: ``mount_setattr`` (Linux 5.12), the same number on every architecture.
SYS_MOUNT_SETATTR = 442

PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4
PR_SET_NO_NEW_PRIVS = 38

#: Seconds the launcher waits for the person's storage to be mounted before
#: it starts the tool without it.
STORAGE_WAIT = 30.0

_libc: Any = None


def _lib() -> Any:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    return _libc


def _check(result: int, what: str) -> None:
    if result != 0:
        number = ctypes.get_errno()
        raise OSError(number, f"{what}: {os.strerror(number)}")


def _say(message: str) -> None:
    print(f"dit4c-confine: {message}", file=sys.stderr, flush=True)


@dataclass
class Plan:
    """What the tool sees, and as whom it runs."""

    argv: list[str]
    chdir: str
    #: None: keep the launcher's (a node that is not root).
    uid: int | None = None
    gid: int | None = None
    #: Covered by an empty tmpfs.
    hide: list[str] = field(default_factory=list)
    #: Bound back read-write, at the same path.
    bind: list[str] = field(default_factory=list)
    #: Bound back read-only where covered or out of the tool's reach.
    expose: list[str] = field(default_factory=list)
    #: The person's storage: waited for, then bound back read-write.
    storage: str | None = None
    storageWait: float = STORAGE_WAIT
    #: Cgroup directories the launcher joins before anything else (the tool's CPU and memory limits).
    cgroups: list[str] = field(default_factory=list)
    #: Said on standard error (the tool's log) before the tool starts.
    notes: list[str] = field(default_factory=list)


def command(python: str, plan: Plan) -> list[str]:
    """The launcher's command line for ``plan`` (what the runtime runs)."""
    argv = [python, "-m", "dit4c.node.confine", "--chdir", plan.chdir]
    if plan.uid is not None and plan.gid is not None:
        argv += ["--uid", str(plan.uid), "--gid", str(plan.gid)]
    for option, paths in (("--hide", plan.hide), ("--bind", plan.bind), ("--expose", plan.expose)):
        for path in paths:
            argv += [option, path]
    if plan.storage is not None:
        argv += ["--storage", plan.storage, "--storage-wait", str(plan.storageWait)]
    for path in plan.cgroups:
        argv += ["--cgroup", path]
    for note in plan.notes:
        argv += ["--say", note]
    return [*argv, "--", *plan.argv]


def _parse(argv: Sequence[str]) -> Plan:
    parser = argparse.ArgumentParser(prog="python -m dit4c.node.confine", description=__doc__.split("\n\n")[0])
    parser.add_argument("--chdir", required=True, help="The tool's working directory.")
    parser.add_argument("--uid", type=int, help="Run the tool as this uid (a root node only).")
    parser.add_argument("--gid", type=int, help="... and this gid.")
    parser.add_argument("--hide", action="append", default=[], help="Cover this directory with an empty tmpfs.")
    parser.add_argument("--bind", action="append", default=[], help="Bind this directory back, read-write.")
    parser.add_argument("--expose", action="append", default=[], help="Bind this directory back read-only if hidden.")
    parser.add_argument("--storage", help="The person's storage: wait until it is mounted, then bind it back.")
    parser.add_argument("--storage-wait", type=float, default=STORAGE_WAIT)
    parser.add_argument("--cgroup", action="append", default=[], help="Join this cgroup directory first.")
    parser.add_argument("--say", action="append", default=[], help="Say this on standard error first.")
    parser.add_argument("program", nargs=argparse.REMAINDER, help="-- PROGRAM ARG...")
    options = parser.parse_args(argv)
    program = options.program[1:] if options.program[:1] == ["--"] else options.program
    if not program:
        parser.error("no program to run (give it after --)")
    if (options.uid is None) != (options.gid is None):
        parser.error("--uid and --gid go together")
    absolute = [options.chdir, *options.hide, *options.bind, *options.expose, *filter(None, [options.storage])]
    for path in absolute:
        if not os.path.isabs(path):
            parser.error(f"{path!r} is not an absolute path")
    return Plan(
        program, os.path.abspath(options.chdir), options.uid, options.gid,
        [os.path.abspath(p) for p in options.hide], [os.path.abspath(p) for p in options.bind],
        [os.path.abspath(p) for p in options.expose],
        os.path.abspath(options.storage) if options.storage else None, options.storage_wait,
        [os.path.abspath(p) for p in options.cgroup], list(options.say),
    )  # fmt: skip


# -- namespaces -----------------------------------------------------------------------------


def _flags(root: bool) -> int:
    return CLONE_NEWNS | CLONE_NEWPID | (0 if root else CLONE_NEWUSER)


def probe() -> str | None:
    """
    Whether this process could confine a tool: None if it could, else why
    not (the kernel's refusal, as text). Forks a child that tries.
    """
    root = os.geteuid() == 0
    flags = _flags(root)
    libc = _lib()  # loaded before the fork: the child of a threaded process must not load libraries
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 0
        if libc.unshare(flags) != 0:
            code = ctypes.get_errno() or 255
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code == 0:
        return None
    what = "mount and PID namespaces" if root else "user, mount and PID namespaces"
    reason = os.strerror(code) if 0 < code < 255 else f"status {code}"
    return f"the kernel refuses {what} ({reason})"


def _enter(root: bool) -> None:
    """New namespaces for this process (the PID namespace for its children)."""
    uid, gid = os.getuid(), os.getgid()
    _check(_lib().unshare(_flags(root)), "unshare")
    if not root:
        # Map only our own ids, to themselves: the tool is not root in there.
        Path("/proc/self/setgroups").write_text("deny")
        Path("/proc/self/uid_map").write_text(f"{uid} {uid} 1")
        Path("/proc/self/gid_map").write_text(f"{gid} {gid} 1")
    # Nothing mounted in here goes back out (the host's mounts still come in).
    _mount(None, "/", None, MS_REC | MS_SLAVE)


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    _check(
        _lib().mount(
            source.encode() if source else None, target.encode(), fstype.encode() if fstype else None,
            ctypes.c_ulong(flags), data.encode() if data else None,
        ),
        f"mount {target}",
    )  # fmt: skip


class _MountAttr(ctypes.Structure):
    _fields_ = [
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    ]


def _setReadOnly(path: str, readOnly: bool, recursive: bool) -> None:
    attr = _MountAttr(MOUNT_ATTR_RDONLY if readOnly else 0, 0 if readOnly else MOUNT_ATTR_RDONLY, 0, 0)
    result = _lib().syscall(
        SYS_MOUNT_SETATTR, AT_FDCWD, path.encode(), AT_RECURSIVE if recursive else 0,
        ctypes.byref(attr), ctypes.sizeof(attr),
    )  # fmt: skip
    _check(result, f"mount_setattr {path}")


def _searchable(path: str, uid: int, gid: int) -> bool:
    try:
        info = os.stat(path)
    except OSError:
        return False
    if info.st_uid == uid:
        return bool(info.st_mode & stat.S_IXUSR)
    if info.st_gid == gid:
        return bool(info.st_mode & stat.S_IXGRP)
    return bool(info.st_mode & stat.S_IXOTH)


def _unreachable(path: str, uid: int, gid: int) -> str | None:
    """The highest directory above ``path`` that ``uid`` cannot pass through, if any."""
    parts = Path(path).parts
    for i in range(1, len(parts)):
        ancestor = str(Path(*parts[:i]))
        if not _searchable(ancestor, uid, gid):
            return ancestor
    return None


def _under(path: str, directory: str) -> bool:
    return path == directory or path.startswith(directory.rstrip("/") + "/")


def _arrange(plan: Plan, root: bool) -> list[str]:
    """
    Cover and bind back (in this mount namespace); the mounts that stay
    writable once everything else is made read-only.

    Covers and binds are made shallowest first: a directory bound back
    brings what lies under it on the host, so a hidden directory inside it
    is covered again after it.
    """
    covers: dict[str, int] = {}
    for scratch in ("/tmp", "/dev/shm"):
        if os.path.isdir(scratch):
            covers[scratch] = 0o1777
    for path in plan.hide:
        if os.path.isdir(path) and path != "/":
            covers.setdefault(path, 0o755)
    writable = [*plan.bind, *([plan.storage] if plan.storage else [])]
    binds: dict[str, bool] = {path: True for path in writable if os.path.isdir(path)}
    for path in plan.expose:
        if os.path.isdir(path) and path not in binds:
            binds[path] = False
    if plan.uid is not None and plan.gid is not None:
        for path in list(binds):
            blocked = _unreachable(path, plan.uid, plan.gid)
            if blocked is not None:
                covers.setdefault(blocked, 0o755)
    # A read-only directory is bound back only where something covers it.
    for path, rw in list(binds.items()):
        if not rw and not any(_under(path, cover) and path != cover for cover in covers):
            del binds[path]
    sources = {path: os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC) for path in binds}
    steps = sorted(
        [(path.count("/"), 0, path) for path in covers] + [(path.count("/"), 1, path) for path in binds]
    )
    for _, kind, path in steps:
        if not os.path.isdir(path):
            os.makedirs(path, mode=0o755, exist_ok=True)
        if kind == 0:
            _mount("tmpfs", path, "tmpfs", MS_NOSUID | MS_NODEV, f"mode={covers[path]:o}")
        else:
            _mount(f"/proc/self/fd/{sources[path]}", path, None, MS_BIND | MS_REC)
    for fd in sources.values():
        os.close(fd)
    return [*[p for p, rw in binds.items() if rw], *[p for p, mode in covers.items() if mode == 0o1777]]


def _dropCapabilities() -> None:
    """Drop every capability (init needs none once the mounts are made)."""

    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    class Data(ctypes.Structure):
        _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]

    _check(_lib().capset(ctypes.byref(Header(0x20080522, 0)), ctypes.byref((Data * 2)())), "capset")


# -- running --------------------------------------------------------------------------------------


def _waitForStorage(path: str, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not isMount(path):
        if time.monotonic() >= deadline:
            _say(f"the storage at {path} is not mounted after {seconds:g} s: starting without it")
            return
        time.sleep(0.1)


def _installation(program: str) -> list[str]:
    """Where ``program`` is installed: the directory above its ``bin``, as named and as resolved."""
    found = shutil.which(program)
    if found is None:
        return []
    return sorted({str(Path(found).parent.parent), str(Path(found).resolve().parent.parent)})


def _exec(plan: Plan) -> NoReturn:
    """Become the tool (in the calling process)."""
    try:
        if plan.uid is not None and plan.gid is not None:
            os.setgroups([])
            os.setgid(plan.gid)
            os.setuid(plan.uid)
        _check(_lib().prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(no_new_privs)")
        os.chdir(plan.chdir)
        os.execvp(plan.argv[0], plan.argv)
    except OSError as e:
        _say(f"could not run {plan.argv[0]}: {e.strerror or e}")
    os._exit(127)


def _statusOf(status: int) -> int:
    code = os.waitstatus_to_exitcode(status)
    return 128 - code if code < 0 else code


def _init(plan: Plan, writable: list[str], parentAlive: int) -> NoReturn:
    """PID 1 of the tool's namespace: finish the mounts, run the tool, reap, end with it."""
    try:
        _check(_lib().prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "prctl(pdeathsig)")
        # The launcher may have gone before that took effect: then its end of the pipe is closed.
        import select

        if select.select([parentAlive], [], [], 0)[0]:
            os._exit(1)
        try:
            _setReadOnly("/", True, recursive=True)
            for path in writable:
                _setReadOnly(path, False, recursive=False)
        except OSError as e:
            _say(f"{e.strerror}: the rest of the file system stays writable where permissions allow")
        _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    except OSError as e:
        _say(f"could not confine the tool: {e.strerror or e}")
        os._exit(1)
    tool = os.fork()
    if tool == 0:
        for number in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(number, signal.SIG_DFL)
        _exec(plan)

    def forward(number: int, frame: object) -> None:
        # The node signals the whole process group, the tool with it; a tool
        # that left the group would miss it.
        try:
            if os.getpgid(tool) != os.getpgrp():
                os.kill(tool, number)
        except OSError:
            pass

    for number in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(number, forward)
    # Nothing the tool does can borrow init's rights in a user namespace of
    # its own (a root init keeps them: the tool's uid cannot reach it anyway).
    try:
        _check(_lib().prctl(PR_SET_DUMPABLE, 0, 0, 0, 0), "prctl(dumpable)")
        if plan.uid is None:
            _dropCapabilities()
    except OSError as e:
        _say(f"init kept its rights: {e.strerror}")
    while True:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            os._exit(1)
        if pid == tool:
            # Leaving ends every other process of the namespace.
            os._exit(_statusOf(status))


def _joinCgroups(paths: Sequence[str]) -> None:
    """
    This launcher (and so init and the tool, its children) into each cgroup
    that limits the tool, before anything of the tool runs.
    """
    for path in paths:
        try:
            with open(os.path.join(path, "cgroup.procs"), "w") as f:
                f.write(str(os.getpid()))
        except OSError as e:
            _say(f"could not join the cgroup that limits the tool ({path}: {e.strerror or e}); it was not started")
            os._exit(1)


def run(plan: Plan) -> NoReturn:
    _joinCgroups(plan.cgroups)
    for note in plan.notes:
        _say(note)
    root = os.geteuid() == 0
    if root and plan.uid is None:
        _say("a root node must give the tool a --uid and --gid")
        os._exit(1)
    if plan.storage is not None:
        _waitForStorage(plan.storage, plan.storageWait)
    plan.expose.extend(_installation(plan.argv[0]))
    try:
        _enter(root)
    except OSError as e:
        if root:
            _say(f"could not confine the tool: {e.strerror or e}; it was not started")
            os._exit(1)
        _say(
            f"the kernel refuses an unprivileged user namespace ({e.strerror or e}): the tool runs unconfined, "
            "as the node's user, and can read what that user can, the instance's key included"
        )
        _exec(plan)
    try:
        writable = _arrange(plan, root)
    except OSError as e:
        _say(f"could not confine the tool: {e.strerror or e}; it was not started")
        os._exit(1)
    alive, holding = os.pipe()
    init = os.fork()
    if init == 0:
        os.close(holding)
        _init(plan, writable, alive)
    os.close(alive)
    # The node signals the whole group: init and the tool have it already.
    for number in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(number, lambda number, frame: None)
    while True:
        try:
            _, status = os.waitpid(init, 0)
        except ChildProcessError:
            os._exit(1)
        os._exit(_statusOf(status))


def main(argv: Sequence[str] | None = None) -> NoReturn:
    plan = _parse(sys.argv[1:] if argv is None else argv)
    if shutil.which(plan.argv[0]) is None and not os.path.exists(plan.argv[0]):
        _say(f"no such program: {plan.argv[0]}")
        os._exit(127)
    run(plan)


if __name__ == "__main__":
    main()
