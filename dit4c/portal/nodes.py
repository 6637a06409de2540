"""
Compute nodes, as the administrators see them: what each connected
scheduler says about its nodes (docs/protocols.md 7.7), and cooling a
node down, having it take instances again, and draining it.

- :class:`NodeDirectory` belongs to the scheduler channel
  (``ChannelHub.nodes``): it keeps, in memory, the latest ``nodes`` of each
  scheduler with a live channel (forgotten when the channel closes: the
  page then says the scheduler is away) and sends a scheduler its
  ``node-command`` requests, which, like questions about a tool's output,
  are never stored or sent again.
- :class:`NodeAdmin` is what the admin page (``/admin/nodes``) and the REST
  API (``/api/v1/admin/nodes``) do: a drain is a cool-down, then a Stop of
  each instance the node holds, made as its owner's Stop is
  (``Instances.act``), so each instance's state moves as it always does and
  its owner can resume or discard it afterwards.

Several portal processes: each knows what the schedulers connected to it
said; the others ask it (``dit4c.portal.channelrelay``).
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from zope.interface import Interface

from dit4c.channel.nodewire import (
    NODE_OPS,
    NodeCommand,
    NodeDone,
    NodeSummary,
    parseNodeDone,
    parseNodes,
)
from dit4c.channel.questions import QUESTION_TIMEOUT
from dit4c.portal.errors import InstanceError, NotFound, WrongState
from dit4c.portal.instances import Instances
from dit4c.portal.store.interfaces import IStore
from dit4c.portal.store.model import Scheduler, User

__all__ = ["INodeQuestions", "NODE_MESSAGES", "NodeAdmin", "NodeDirectory", "NodeUnavailable", "SchedulerNodes", "directoryOf"]

#: The messages about nodes a scheduler sends up the channel.
NODE_MESSAGES = frozenset({"nodes", "node-done"})


class NodeUnavailable(InstanceError):
    """The scheduler or the node cannot be asked now, or said no; the message says why."""

    status = 503
    code = "node_unavailable"


class NodeDirectory:
    """What each connected scheduler said about its compute nodes, and the requests open on its channel."""

    log = Logger()

    def __init__(
        self, clock: IReactorTime, send: Callable[[str, Mapping[str, Any]], bool], timeout: float = QUESTION_TIMEOUT
    ) -> None:
        """
        :param send: sends a message down a scheduler's live channel;
            whether it could (False: the scheduler is not connected here).
        :param timeout: seconds a request waits for the scheduler's answer.
        """
        self.clock = clock
        self.send = send
        self.timeout = timeout
        self._nodes: dict[str, tuple[NodeSummary, ...]] = {}
        self._open: dict[str, dict[str, Deferred[NodeDone]]] = {}

    def of(self, schedulerId: str) -> tuple[NodeSummary, ...] | None:
        """The scheduler's nodes as it last said; None if it said nothing on a live channel."""
        return self._nodes.get(schedulerId)

    def received(self, schedulerId: str, kind: str, message: Mapping[str, Any]) -> None:
        """
        A ``nodes`` or ``node-done`` from a scheduler.

        :raises ProtocolError: a malformed one (the channel closes).
        """
        if kind == "nodes":
            self._nodes[schedulerId] = parseNodes(message)
            return
        done = parseNodeDone(message)
        d = self._open.get(schedulerId, {}).get(done.id)
        if d is not None:
            d.callback(done)

    def closed(self, schedulerId: str) -> None:
        """The scheduler's channel closed: what it said is no longer known, and nobody answers what is open."""
        self._nodes.pop(schedulerId, None)
        for d in list(self._open.pop(schedulerId, {}).values()):
            d.errback(NodeUnavailable("The scheduler went away before it answered; try again once it is back."))

    def command(self, schedulerId: str, node: str, op: str) -> Deferred[NodeDone]:
        """
        Ask a connected scheduler to cool ``node`` down, have it take
        instances again or drain it; its answer (a refusal is one with an
        ``error``), or ``NodeUnavailable`` if it cannot be asked or did not
        answer within ``timeout``.
        """
        command = NodeCommand(secrets.token_urlsafe(12), node, op)
        if not self.send(schedulerId, command.toJSON()):
            return fail(NodeUnavailable("That scheduler is not connected now; try again once it is back."))
        d: Deferred[NodeDone] = Deferred()
        waiting = self._open.setdefault(schedulerId, {})
        waiting[command.id] = d
        timer = self.clock.callLater(self.timeout, self._timedOut, schedulerId, command.id)

        def settled(result: Any) -> Any:
            if timer.active():
                timer.cancel()
            waiting.pop(command.id, None)
            return result

        def answered(done: NodeDone) -> NodeDone:
            known = self._nodes.get(schedulerId)
            if done.error is None and known is not None:
                # The scheduler did it (its own ``nodes`` follows): the page
                # shown right after the form already says so.
                accepting = op == "accept"
                self._nodes[schedulerId] = tuple(
                    replace(n, accepting=accepting) if n.node == node else n for n in known
                )
            return done

        asked: Deferred[NodeDone] = d.addBoth(settled).addCallback(answered)
        return asked

    def _timedOut(self, schedulerId: str, commandId: str) -> None:
        d = self._open.get(schedulerId, {}).get(commandId)
        if d is not None:
            d.errback(NodeUnavailable(f"The scheduler did not answer within {self.timeout:g} s; look again in a moment."))


class INodeQuestions(Interface):
    """What the portal's scheduler channel answers about compute nodes, whichever portal process holds the channel."""

    def reachable(scheduler_id: str) -> Deferred[bool]:
        """Whether the scheduler has a live channel to a running portal process."""

    def nodesOf(scheduler_id: str) -> Deferred[tuple[NodeSummary, ...] | None]:
        """What the scheduler last said of its nodes; None if nothing, or it is away."""

    def nodeCommand(scheduler_id: str, node: str, op: str) -> Deferred[NodeDone]:
        """Ask the scheduler to act on a node (``NodeDirectory.command``); ``NodeUnavailable`` if it cannot be asked."""


def directoryOf(commands: object) -> INodeQuestions | None:
    """What the portal's scheduler channel answers about nodes (None for a portal without one)."""
    return INodeQuestions(commands, None)


@dataclass(frozen=True)
class SchedulerNodes:
    """A registered scheduler, whether it is connected, and its nodes as it said (None: not known)."""

    scheduler: Scheduler
    connected: bool
    #: None while it is away, or connected but has said nothing of its nodes
    #: (a scheduler older than this portal does not).
    nodes: tuple[NodeSummary, ...] | None

    def toJSON(self) -> dict[str, Any]:
        return {
            "id": self.scheduler.id,
            "name": self.scheduler.name,
            "disabled": self.scheduler.disabled,
            "connected": self.connected,
            "nodes": None if self.nodes is None else [dict(node.toJSON(), active=node.active) for node in self.nodes],
        }


class NodeAdmin:
    """What administrators see of the compute nodes and do to them (the admin page and the REST API alike)."""

    log = Logger()

    def __init__(self, store: IStore, instances: Instances) -> None:
        """:param instances: a drain's stops go through it, as a person's Stop does."""
        self.store = store
        self.instances = instances
        self.directory = directoryOf(instances.commands)

    async def overview(self) -> list[SchedulerNodes]:
        """Every registered scheduler, and the nodes of each connected one."""
        shown = []
        for scheduler in await self.store.listSchedulers():
            connected = await self.instances.commands.reachable(scheduler.id)
            nodes = await self.directory.nodesOf(scheduler.id) if self.directory is not None and connected else None
            shown.append(SchedulerNodes(scheduler, connected, nodes))
        return shown

    async def act(self, admin: User, schedulerId: str, node: str, action: str) -> list[str]:
        """
        Cool ``node`` down, have it take instances again, or drain it; the
        instances a drain stopped.

        :raises InstanceError: no such action, scheduler or node; or the
            scheduler (or node) could not do it now, and why.
        """
        if action not in NODE_OPS:
            raise NotFound(f"There is no such action as {action!r}; there are {', '.join(NODE_OPS)}.")
        if not await self.instances.commands.reachable(schedulerId):
            raise NodeUnavailable("That scheduler is away; its nodes can be changed once it is connected again.")
        nodes = await self.directory.nodesOf(schedulerId) if self.directory is not None else None
        if nodes is None:
            raise NodeUnavailable("That scheduler has not said what compute nodes it has.")
        if node not in {n.node for n in nodes}:
            raise NotFound(f"That scheduler has no compute node called {node!r}.")
        assert self.directory is not None
        done = await self.directory.nodeCommand(schedulerId, node, action)
        if done.error is not None:
            raise NodeUnavailable(done.error)
        stopped = []
        for instanceId in done.stop:
            try:
                await self.instances.act(admin, instanceId, "stop")
            except (WrongState, NotFound):
                continue  # it moved on meanwhile (its owner stopped it), or the portal never had it
            stopped.append(instanceId)
        self.log.info(
            "{admin}: {action} node {node} of scheduler {scheduler}{stops}",
            admin=admin.name, action=action, node=node, scheduler=schedulerId,
            stops=f", stopping {len(stopped)} instances" if action == "drain" else "",
        )  # fmt: skip
        return stopped
