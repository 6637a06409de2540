"""
What a compute node asks of a runtime, whatever runs the pods.

A *pod* is one instance on one node: the tool, and beside it the auth
helper (in front of the tool) and the listener (which dials the routing
server and forwards each stream to the auth helper). The node owns the
instance's life, its key pair and the helper environment; a runtime only
makes, stops, finds and removes pods. Implementations:
:mod:`dit4c.node.process` (local processes, the embedded default) and
:mod:`dit4c.node.podman` (OCI containers).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from twisted.internet.defer import Deferred
from zope.interface import Attribute, Interface

# A runtime's failure, named here too: IRuntime's methods fail with it
# (docs/protocols.md 9.1), and a runtime written elsewhere needs only this module.
from dit4c.channel.wire import LogChunk
from dit4c.common.limits import ToolLimits
from dit4c.node.errors import RuntimeError_

__all__ = ["IRuntime", "PodSpec", "PodStatus", "RuntimeError_", "helperCommand"]


@dataclass(frozen=True)
class PodSpec:
    """Everything a runtime needs to start one pod."""

    #: The instance id (one DNS label); names the pod.
    instance: str
    #: What to run: an image reference (``podman``) or a tool name (``process``).
    image: str
    #: The tool's port inside the pod, or None for the image's or tool's own.
    port: int | None
    #: A node-private directory for this pod: the instance key (``instance.key``),
    #: logs, the helpers' state. The runtime may add files; ``discard`` removes it.
    directory: Path
    #: The helper environment (docs/protocols.md section 9) without the
    #: addresses the runtime chooses: ``DIT4C_TOOL``, ``DIT4C_AUTH_LISTEN``
    #: and ``DIT4C_AUTH`` are the runtime's to add.
    environment: Mapping[str, str] = field(default_factory=dict)
    #: The image's digest, if the portal knows it.
    digest: str | None = None
    #: Start from a saved image: an archive that :meth:`IRuntime.capture`
    #: made (fetched from the image server and checked against ``digest``).
    archive: Path | None = None
    #: The catalogue entry's CPUs and memory, for the runtime to enforce
    #: (docs/protocols.md 9.1, 9.3); the idle limit is not the node's.
    limits: ToolLimits = field(default_factory=ToolLimits)


@dataclass(frozen=True)
class PodStatus:
    """What a runtime found of one pod."""

    instance: str
    #: Whether the tool and its helpers are all running.
    running: bool
    #: Why not, if not.
    reason: str | None = None


class IRuntime(Interface):
    """Runs pods on this node."""

    name = Attribute("The runtime's name in configuration: 'process', 'podman'.")
    resumable = Attribute("Whether ``start`` of a stopped pod's spec carries on with its files as they were.")

    def start(spec: PodSpec) -> Deferred[None]:
        """
        Make and start the pod. Fires when every process of it has started
        (the tool need not answer yet); fails with :class:`RuntimeError_`
        (and leaves nothing running) if it cannot.
        """

    def stop(instance: str) -> Deferred[None]:
        """Stop every process of the pod (gracefully, then by force); keep its files."""

    def capture(instance: str, archive: Path) -> Deferred[str | None]:
        """
        Write the stopped pod's saved image to ``archive``: what a later
        ``start`` with ``PodSpec.archive`` brings back (the tool and its
        files). Fires with its digest (``sha256:<hex>``) if the runtime
        hashed it on the way, else None.
        """

    def discard(instance: str) -> Deferred[None]:
        """Remove the pod: processes, containers, mounts and its directory. Idempotent."""

    def pods() -> Deferred[list[PodStatus]]:
        """Every pod this runtime holds on this node, found again after a node restart."""

    def ready(instance: str) -> Deferred[bool]:
        """Whether the pod's tool accepts connections now (the node polls this after ``start``)."""

    def logs(instance: str, offset: int | None, limit: int) -> Deferred[LogChunk]:
        """
        Up to ``limit`` bytes of the pod's tool's output from byte ``offset``
        (None: its last ``limit`` bytes), running or stopped, until the pod
        is discarded; empty if it wrote nothing yet.
        """

    def forget() -> None:
        """Stop watching the pods: the node is stopping, and they run on until it is back."""

    def onExit(callback: Callable[[str, str], object]) -> None:
        """
        Call ``callback(instance, reason)`` when a pod stops by itself (its
        tool or a helper exits, not through ``stop``).
        """


def helperCommand(plugin: str, *arguments: str) -> list[str]:
    """
    The command that runs a helper plugin in the foreground, logging to
    standard output: ``python -m twisted dit4c-helper-auth``.
    """
    return [sys.executable, "-m", "twisted", "--log-format", "text", plugin, *arguments]
