"""
A compute node as its scheduler sees it, whether it runs in the same
process (:class:`dit4c.node.node.Node`) or across the node link
(:class:`dit4c.node.remote.RemoteNode`): the scheduler depends on this, not
on either.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from zope.interface import Attribute, Interface, implementer

from dit4c.channel.wire import Command, InstanceStatus, LogChunk

__all__ = ["INode", "INodeObserver", "observer", "startFrom"]


class INodeObserver(Interface):
    """Who hears what a node does: the scheduler."""

    def instanceState(node: INode, status: InstanceStatus) -> None:
        """An instance moved to a state."""

    def instanceKey(node: INode, instance: str, jwk: dict[str, Any]) -> None:
        """An instance's public key, once made."""

    def nodeChanged(node: INode) -> None:
        """The node's link came or went, or its capacity or its taking of new instances changed."""


class INode(Interface):
    """A compute node as its scheduler sees it (in this process, or over the network)."""

    nodeName = Attribute("The node's name, unique under its scheduler.")
    capacity = Attribute("Instances it may run at once.")
    accepting = Attribute("Whether it takes new instances (administrators cool a node down before removing it).")
    connected = Attribute("Whether its scheduler can reach it now (a node in the scheduler's process always can).")

    def setAccepting(accepting: bool) -> Deferred[None]:
        """
        Cool the node down (False: it takes no new instance; those it runs
        run on) or have it take instances again; fires once the node has.
        Not kept: a node started again takes instances.

        :raises NodeAway: (as the Deferred's failure) the node cannot be reached now.
        """

    def load() -> int:
        """Instances it runs (or is starting) now."""

    def start(
        instance: str,
        image: str,
        port: int | None,
        digest: str | None = None,
        token: str | None = None,
        limits: object = None,
    ) -> Deferred[None]:
        """
        Start an instance; fires once it is under way (states follow). A
        saved ``image`` is an image server URL, read with ``token``.
        ``limits`` is the ``start`` command's ``limits`` as it came (the
        node checks it: one that is not valid errors the instance).

        :raises NodeFull: it takes no more instances.
        """

    def stop(instance: str) -> Deferred[None]:
        """Stop it, keeping its files."""

    def save(instance: str) -> Deferred[None]:
        """Stop it and save its image."""

    def discard(instance: str) -> Deferred[None]:
        """Remove everything it has of the instance."""

    def resume(instance: str) -> Deferred[None]:
        """Start a stopped instance's pod again, its files as they were (states follow)."""

    def instances() -> list[InstanceStatus]:
        """Every instance it knows."""

    def logs(instance: str, offset: int | None, limit: int) -> Deferred[LogChunk]:
        """
        Up to ``limit`` bytes of the instance's tool's output from byte
        ``offset`` (None: the last ``limit`` bytes); fails if the node holds
        nothing of it, or cannot be asked now.
        """

    def whenReported() -> Deferred[None]:
        """Fires once the node knows what it holds (after a restart, once it has looked)."""

    def subscribe(observer: INodeObserver) -> None:
        """Tell ``observer`` of every state and key from now on."""


def startFrom(node: INode, command: Command) -> Deferred[None]:
    """Start what a ``start`` command (docs/protocols.md 7.3) asks for on ``node``."""
    params = command.params

    def text(name: str) -> str | None:
        value = params.get(name)
        return value if isinstance(value, str) else None

    port = params.get("port")
    return node.start(
        command.instance,
        text("image") or "",
        port if isinstance(port, int) and not isinstance(port, bool) else None,
        text("digest"),
        text("token"),
        params.get("limits"),
    )


def observer(
    state: Callable[[INode, InstanceStatus], object],
    key: Callable[[INode, str, dict[str, Any]], object],
    changed: Callable[[INode], object] = lambda node: None,
) -> INodeObserver:
    """An observer made of two functions (three, to hear of the node itself)."""

    @implementer(INodeObserver)
    class _Observer:
        def instanceState(self, node: INode, status: InstanceStatus) -> None:
            state(node, status)

        def instanceKey(self, node: INode, instance: str, jwk: dict[str, Any]) -> None:
            key(node, instance, jwk)

        def nodeChanged(self, node: INode) -> None:
            changed(node)

    return _Observer()
