"""
The host's network held still while the tests run.

Chromium watches the host's addresses (netlink) and, when an IPv4 address
comes or goes, ends every request it has in flight with
``ERR_NETWORK_CHANGED``: a page load in any browser test shows Chromium's
"Your connection was interrupted" page instead of the page under test. The
tests change the host's addresses themselves, from other workers:

- podman makes its bridge ``podman0`` (10.88.0.1/16) when the first
  container on its default network starts, and removes it when the last one
  ends; the podman tests start and end pods all through a run;
- the behind-NAT test links a network namespace to the host.

So the run holds the bridge up from its start to its end with one pod of
its own (:func:`holdPodmanBridge`, called by the process that runs the
session, before any worker starts a browser), and the namespace's link is a
port of that bridge with no address of its own on the host
(``cluster.Namespace``). Measured: 300 page loads in each of two Chromiums
while a loop made and removed an addressed link failed 6 times with
``ERR_NETWORK_CHANGED``; links without an address never did.

Blocking (subprocesses): call these outside the reactor.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

from support.podman import podmanEnv, podmanUnavailable

#: podman's bridge for its default network, and the bridge's own address.
BRIDGE = "podman0"
BRIDGE_ADDRESS = "10.88.0.1"
BRIDGE_PREFIX = 16

#: The holding pods' names; the number is the holding process's pid.
HOLD_NAME = "dit4c-tests-hold-{pid}"
_HOLD = re.compile(r"^dit4c-tests-hold-(\d+)$")


def _podman(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["podman", *args], env=podmanEnv(), capture_output=True, text=True, timeout=120)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def bridgeHeld() -> bool:
    """Whether podman's bridge is up now (so a link may join it)."""
    return (Path("/sys/class/net") / BRIDGE / "bridge").is_dir()


def holdPodmanBridge() -> str | None:
    """
    Start a pod on podman's default network that lives until
    :func:`releasePodmanBridge`, so ``podman0`` stays up all the while;
    remove the holds of runs that ended without removing theirs. The pod's
    name, or None where podman cannot run pods (nothing to hold then).
    """
    if podmanUnavailable() is not None:
        return None
    listed = _podman("pod", "ps", "--format", "{{.Name}}")
    for name in listed.stdout.split():
        match = _HOLD.match(name)
        if match and not _alive(int(match.group(1))):
            _podman("pod", "rm", "--force", "--time", "0", name)
    name = HOLD_NAME.format(pid=os.getpid())
    _podman("pod", "rm", "--force", "--time", "0", name)
    made = _podman("pod", "create", "--name", name, "--network", "podman")
    started = _podman("pod", "start", name) if made.returncode == 0 else made
    if started.returncode != 0:
        _podman("pod", "rm", "--force", "--time", "0", name)
        raise RuntimeError(f"could not hold podman's bridge up: {started.stderr.strip()}")
    return name


def releasePodmanBridge(name: str) -> None:
    """Remove the holding pod (podman then removes its bridge, if nothing else is on it)."""
    _podman("pod", "rm", "--force", "--time", "0", name)


__all__ = ["BRIDGE", "BRIDGE_ADDRESS", "BRIDGE_PREFIX", "bridgeHeld", "holdPodmanBridge", "releasePodmanBridge"]
