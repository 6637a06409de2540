"""
CPU and memory limits for the process runtime's tools, in cgroups.

Each pod whose catalogue entry has limits gets a cgroup of its own, made
before its tool starts (the confinement launcher, :mod:`dit4c.node.confine`,
moves itself into it before it runs the tool, so every process of the tool
is in it from its first instruction), removed when the pod is discarded.
Where it is is kept in the pod's ``pod.json``, so a restarted node finds it
again.

Which cgroups, in order:

- **cgroup v2**, where the unified hierarchy offers the ``cpu`` and
  ``memory`` controllers: ``cpu.max``, ``memory.max`` and
  ``memory.swap.max`` 0; an OOM kill is ``oom_kill`` in ``memory.events``;
- **cgroup v1**, where the ``cpu``, ``cpuacct`` and ``memory`` hierarchies
  are mounted and writable: ``cpu.cfs_quota_us`` over ``cpu.cfs_period_us``,
  ``memory.limit_in_bytes`` and ``memory.memsw.limit_in_bytes`` (where swap
  is accounted); an OOM kill is ``oom_kill`` in ``memory.oom_control``;
- **none** (no cgroup file system, or not writable: a node that is not
  root): tools run without limits, the node says why once as it starts and
  each limited tool's log begins with it.

A node's cgroups are under its own cgroup in each hierarchy, in a directory
named after its data directory (``dit4c-<hash>``), one per instance, so
several nodes on one machine never share one.
"""

from __future__ import annotations

import errno
import hashlib
import os
import signal
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dit4c.common.limits import ToolLimits

__all__ = ["CPU_PERIOD", "MIB", "Cgroups", "PodCgroup", "detect", "memoryCgroup", "oomKillsAt", "reachedAt", "removeCgroup"]

#: Microseconds of the CPU quota's period (cgroup v1 and v2).
CPU_PERIOD = 100_000
MIB = 1024 * 1024
#: What each version's pod cgroup holds, by role.
V1_ROLES = ("cpu", "cpuacct", "memory")
V2_ROLES = ("unified",)


def _write(path: Path, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


def _field(path: Path, name: str) -> int:
    """A ``name value`` line's value in a cgroup file (0 if absent)."""
    try:
        for line in path.read_text().splitlines():
            parts = line.split()
            if len(parts) == 2 and parts[0] == name:
                return int(parts[1])
    except (OSError, ValueError):
        pass
    return 0


@dataclass(frozen=True)
class PodCgroup:
    """One pod's cgroup: a directory per role (v1: cpu, cpuacct, memory; v2: unified) and its limits."""

    version: int
    paths: Mapping[str, Path]
    limits: ToolLimits

    @property
    def directories(self) -> list[Path]:
        """Each distinct directory (a process joins each: ``cgroup.procs``)."""
        return sorted(set(self.paths.values()))

    def cpuSeconds(self) -> float:
        """CPU time the pod's tool used, all its processes together, in seconds."""
        if self.version == 2:
            return _field(self.paths["unified"] / "cpu.stat", "usage_usec") / 1e6
        try:
            return int((self.paths["cpuacct"] / "cpuacct.usage").read_text()) / 1e9
        except (OSError, ValueError):
            return 0.0

    def oomKills(self) -> int:
        """Processes of the tool the kernel killed for passing the memory limit."""
        if self.version == 2:
            return _field(self.paths["unified"] / "memory.events", "oom_kill")
        return _field(self.paths["memory"] / "memory.oom_control", "oom_kill")

    def counted(self) -> bool:
        """Whether the kernel counts OOM kills here (cgroup v1 before Linux 4.13 does not)."""
        name, file = ("memory.events", "unified") if self.version == 2 else ("memory.oom_control", "memory")
        try:
            return "oom_kill " in (self.paths[file] / name).read_text()
        except OSError:
            return False

    def reachedLimit(self) -> bool:
        """Whether the tool's memory reached its limit (``memory.failcnt``): with a SIGKILL, an OOM kill uncounted."""
        try:
            return int((self.paths["memory"] / "memory.failcnt").read_text()) > 0
        except (KeyError, OSError, ValueError):
            return False

    def oomReason(self) -> str:
        return f"The tool used more than its {self.limits.memory} MiB of memory and was stopped."

    def toJSON(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "paths": {role: str(path) for role, path in self.paths.items()},
            "limits": self.limits.toJSON(),
        }

    @classmethod
    def fromJSON(cls, data: object) -> PodCgroup | None:
        """From ``pod.json`` (None if it holds none, or not one this module wrote)."""
        if not isinstance(data, dict):
            return None
        try:
            version = int(data["version"])
            paths = {str(role): Path(path) for role, path in data["paths"].items()}
            limits = ToolLimits.fromJSON(data.get("limits"))
        except (KeyError, TypeError, ValueError, AttributeError):
            return None
        roles = V2_ROLES if version == 2 else V1_ROLES
        if any(role not in paths for role in roles) or any(not p.is_absolute() for p in paths.values()):
            return None
        return cls(version, paths, limits)


class Cgroups:
    """Where this node makes its pods' cgroups (one directory per role, the node's own)."""

    def __init__(self, version: int, bases: Mapping[str, Path]) -> None:
        self.version = version
        self.bases = dict(bases)

    def describe(self) -> str:
        return f"cgroup v{self.version} under {', '.join(sorted({str(p) for p in self.bases.values()}))}"

    def make(self, instance: str, limits: ToolLimits) -> PodCgroup:
        """
        The pod's cgroup with ``limits`` set, made afresh (one a stopped pod
        left, with no process in it, is removed first: its counts start at nought).

        :raises OSError: the kernel refused.
        """
        paths = {role: base / instance for role, base in self.bases.items()}
        pod = PodCgroup(self.version, paths, limits)
        if self.version == 2:
            _delegate(self.bases["unified"])
        for base in set(self.bases.values()):
            base.mkdir(exist_ok=True)
        for directory in pod.directories:
            try:
                directory.rmdir()
            except OSError:
                pass
            directory.mkdir(exist_ok=True)
        if self.version == 2:
            self._limitV2(paths["unified"], limits)
        else:
            self._limitV1(paths, limits)
        return pod

    @staticmethod
    def _limitV2(directory: Path, limits: ToolLimits) -> None:
        quota = "max" if limits.cpus is None else str(max(1000, round(limits.cpus * CPU_PERIOD)))
        _write(directory / "cpu.max", f"{quota} {CPU_PERIOD}")
        _write(directory / "memory.max", "max" if limits.memory is None else str(limits.memory * MIB))
        if (directory / "memory.swap.max").exists():
            # Swap would let the tool past its memory limit, only slower.
            _write(directory / "memory.swap.max", "max" if limits.memory is None else "0")

    @staticmethod
    def _limitV1(paths: Mapping[str, Path], limits: ToolLimits) -> None:
        cpu = paths["cpu"]
        _write(cpu / "cpu.cfs_period_us", str(CPU_PERIOD))
        quota = -1 if limits.cpus is None else max(1000, round(limits.cpus * CPU_PERIOD))
        _write(cpu / "cpu.cfs_quota_us", str(quota))
        memory = paths["memory"]
        value = "-1" if limits.memory is None else str(limits.memory * MIB)
        files = [memory / "memory.limit_in_bytes"]
        if (memory / "memory.memsw.limit_in_bytes").exists():
            # Memory and swap together: swap does not take the tool past its limit.
            files.append(memory / "memory.memsw.limit_in_bytes")
        try:
            for path in files:  # lowering: memory first (memsw may not be below it)
                _write(path, value)
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
            for path in reversed(files):  # raising: memsw first
                _write(path, value)


def removeCgroup(pod: PodCgroup, wait: float = 5.0) -> None:
    """
    Blocking: the pod's cgroup removed, any process still in it killed
    first. Idempotent; a cgroup that outlives ``wait`` seconds stays (said
    by the OSError).
    """
    deadline = time.monotonic() + wait
    for directory in pod.directories:
        while directory.exists():
            try:
                directory.rmdir()
                break
            except FileNotFoundError:
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
            try:
                for pid in (directory / "cgroup.procs").read_text().split():
                    try:
                        os.kill(int(pid), signal.SIGKILL)
                    except (OSError, ValueError):
                        pass
            except OSError:
                pass
            time.sleep(0.05)
    for directory in pod.directories:
        try:
            directory.parent.rmdir()  # the node's own, once its last pod's is gone
        except OSError:
            pass


def _mounts(mountinfo: Path) -> list[tuple[str, str, set[str]]]:
    """The cgroup file systems mounted: (mount point, type, options)."""
    found = []
    try:
        text = mountinfo.read_text()
    except OSError:
        return []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 4 or parts[2] not in ("cgroup", "cgroup2"):
            continue
        found.append((parts[1], parts[2], set(parts[3].split(","))))
    return found


def _own(procCgroup: Path) -> dict[str, str]:
    """This process's cgroup in each hierarchy: controller (or ``""`` for v2) → path."""
    own: dict[str, str] = {}
    try:
        text = procCgroup.read_text()
    except OSError:
        return own
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3:
            for controller in parts[1].split(",") if parts[1] else [""]:
                own[controller] = parts[2]
    return own


def detect(
    name: str, mounts: Path = Path("/proc/self/mounts"), procCgroup: Path = Path("/proc/self/cgroup")
) -> Cgroups | str:
    """
    Where this node (``name``: its data directory) can make its pods'
    cgroups; or why it cannot, for people. Nothing is made until a pod needs it.
    """
    node = "dit4c-" + hashlib.sha256(name.encode()).hexdigest()[:12]
    found = _mounts(mounts)
    own = _own(procCgroup)
    why: list[str] = []
    unified = next((point for point, kind, _ in found if kind == "cgroup2"), None)
    if unified is not None:
        base = Path(unified + own.get("", "/"))
        try:
            controllers = set((Path(unified) / "cgroup.controllers").read_text().split())
        except OSError:
            controllers = set()
        if not {"cpu", "memory"} <= controllers:
            why.append("cgroup v2 has no cpu and memory controllers here")
        elif not os.access(base, os.W_OK) or not os.access(base / "cgroup.subtree_control", os.W_OK):
            why.append(f"cgroup v2: the node may not write to its cgroup {base}")
        elif base != Path(unified) and (base / "cgroup.procs").read_text().strip():
            why.append(
                f"cgroup v2: the node's cgroup {base} holds processes, so it cannot hand the cpu and memory "
                "controllers down (run the node in a cgroup of its own, e.g. systemd's Delegate=yes)"
            )
        else:
            return Cgroups(2, {"unified": base / node})
    points: dict[str, str] = {}
    for point, kind, options in found:
        for role in V1_ROLES:
            if kind == "cgroup" and role in options:
                points[role] = point
    if all(role in points for role in V1_ROLES):
        bases = {role: Path(points[role] + own.get(role, "/")) for role in V1_ROLES}
        refused = [str(base) for base in bases.values() if not os.access(base, os.W_OK)]
        if not refused:
            return Cgroups(1, {role: base / node for role, base in bases.items()})
        why.append(f"cgroup v1: the node may not write to {', '.join(sorted(set(refused)))}")
    else:
        why.append("no cgroup v1 cpu, cpuacct and memory hierarchies are mounted")
    return "; ".join(why)


def _delegate(directory: Path) -> None:
    """
    The node's directory (under its own cgroup) with the cpu and memory
    controllers handed down to its pods' cgroups (``cgroup.subtree_control``).
    """
    wanted = {"cpu", "memory"}
    directory.mkdir(exist_ok=True)
    for level in (directory.parent, directory):
        if not wanted <= set((level / "cgroup.subtree_control").read_text().split()):
            _write(level / "cgroup.subtree_control", " ".join(f"+{c}" for c in sorted(wanted)))


# -- a container's cgroup, as podman names it ------------------------------------------------------


def memoryCgroup(path: str, mounts: Path = Path("/proc/self/mounts")) -> tuple[int, Path] | None:
    """
    Where the cgroup ``path`` (as podman reports it: ``/libpod_parent/...``)
    is in this machine's memory hierarchy: its version and directory.
    """
    found = _mounts(mounts)
    for point, kind, options in found:
        if kind == "cgroup" and "memory" in options:
            return 1, Path(point + path)
    for point, kind, _ in found:
        if kind == "cgroup2":
            return 2, Path(point + path)
    return None


def oomKillsAt(path: str) -> int:
    """OOM kills the kernel counted in the cgroup ``path`` (v2: and under it); 0 if it is gone."""
    where = memoryCgroup(path)
    if where is None:
        return 0
    version, directory = where
    return _field(directory / ("memory.events" if version == 2 else "memory.oom_control"), "oom_kill")


def reachedAt(path: str, limit: int) -> bool:
    """
    Whether the memory of the cgroup ``path`` (a pod's, holding its tool's)
    reached ``limit`` bytes or the kernel killed in it for memory: what is
    left to tell an OOM kill once the tool's own cgroup went with it (under
    cgroup v1 its kills are counted in it alone).
    """
    where = memoryCgroup(path)
    if where is None:
        return False
    version, directory = where
    if version == 2:
        return _field(directory / "memory.events", "oom_kill") > 0
    try:
        return int((directory / "memory.max_usage_in_bytes").read_text()) >= limit
    except (OSError, ValueError):
        return False
