"""
The node's record of each instance, and the bookkeeping every part of the
node shares: the record itself (a small JSON file in the pod's directory,
so that a restarted node knows where each instance was), the moves its
life allows, the deadlines of transient states, the observers told of
every move, and the one-at-a-time turn each instance's work takes.

:class:`NodeRecords` is the base of :class:`dit4c.node.node.Node`: the
parts that start (:mod:`dit4c.node.nodestart`), end
(:mod:`dit4c.node.nodestop`) and take back (:mod:`dit4c.node.noderecovery`)
instances all move them through it, and only through it.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, cast

from twisted.internet.defer import Deferred, DeferredLock
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger

from dit4c.channel.interfaces import INode, INodeObserver
from dit4c.channel.wire import MAX_REASON, InstanceStatus
from dit4c.common.errors import IllegalMove
from dit4c.common.life import HOLDS_POD, TRANSIENT, Life, State, expiredReason
from dit4c.node.interfaces import IRuntime
from dit4c.node.processes import RECORD, PodProcess

__all__ = ["GOALS", "OUTCOMES", "InstanceRecord", "NodeRecords"]

#: Each kind of operation the node counts (:mod:`dit4c.node.metrics`), and
#: the state it ends in when it goes well; it goes badly when the instance
#: becomes ``errored`` first.
GOALS: Mapping[str, State] = {
    "start": State.RUNNING,
    "resume": State.RUNNING,
    "stop": State.STOPPED,
    "save": State.SAVED,
    "discard": State.DISCARDED,
}
#: How an operation can end.
OUTCOMES = ("ok", "error")


@dataclass(frozen=True)
class InstanceRecord:
    """What the node keeps of one instance: the JSON file ``RECORD`` in its pod's directory."""

    instance: str
    image: str
    port: int | None
    digest: str | None
    state: State
    reason: str | None = None
    #: The instance's public key (JWK), once made.
    jwk: dict[str, Any] | None = None
    #: When it entered its state (the node's clock), so a deadline outlives a restart.
    since: float = 0.0
    #: Whether a stop under way is the first step of a save.
    saving: bool = False
    #: The digest of the captured image while it is uploaded.
    captured: str | None = None
    #: The CPUs and memory its runtime enforces (``ToolLimits.toJSON``), kept
    #: so that a resume, and a restarted node, apply the same.
    limits: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "state", State(self.state))

    def status(self) -> InstanceStatus:
        return InstanceStatus(self.instance, self.state, _shorten(self.reason))

    def toJSON(self) -> dict[str, Any]:
        data = asdict(self)
        data["state"] = self.state.value
        return data

    @classmethod
    def fromJSON(cls, data: Mapping[str, Any]) -> InstanceRecord:
        known = {name: data[name] for name in cls.__dataclass_fields__ if name in data}
        return cls(**known)


def _shorten(reason: str | None) -> str | None:
    """A reason as the channel carries it (at most ``MAX_REASON`` characters, its end kept)."""
    if reason is None or len(reason) <= MAX_REASON:
        return reason
    return "…" + reason[-(MAX_REASON - 1) :]


class NodeRecords:
    """
    What a node knows of its instances, and the only way their state moves.
    The node's constructor (:class:`dit4c.node.node.Node`) sets what is
    declared here.
    """

    log = Logger()

    reactor: Any
    runtime: IRuntime
    directory: Path
    deadlines: Mapping[State, float]
    _records: dict[str, InstanceRecord]
    _timers: dict[str, IDelayedCall]
    #: Each upload helper under way (it holds its instance's turn until it ends).
    _uploads: dict[str, PodProcess]
    _locks: dict[str, DeferredLock]
    _observers: list[INodeObserver]
    #: Every piece of work under way, for tests and a clean stop.
    _work: set[Deferred[Any]]
    #: The operation (a kind of ``GOALS``) under way on each instance, until it ends.
    _operations: dict[str, str]
    #: Operations ended since the node started, by kind and outcome (``OUTCOMES``).
    outcomes: Counter[tuple[str, str]]
    #: Bytes of saved images the upload helper delivered to the image server since the node started.
    uploadedBytes: int

    @property
    def _node(self) -> INode:
        """This node as its observers know it (the whole :class:`dit4c.node.node.Node` is the INode)."""
        return cast(INode, self)

    def load(self) -> int:
        return sum(1 for r in self._records.values() if r.state in HOLDS_POD)

    # -- operations, counted for the node's figures ----------------------------------------

    def _began(self, instance: str, kind: str) -> None:
        """
        ``kind`` of operation is under way on ``instance``. One it overtakes
        (a start that a stop or a discard cuts short) is not counted: it
        neither went well nor failed.
        """
        self._operations[instance] = kind

    def _reached(self, instance: str, state: State) -> None:
        """Count the operation under way on ``instance`` if ``state`` ends it."""
        kind = self._operations.get(instance)
        if kind is None or state not in (GOALS[kind], State.ERRORED):
            return
        del self._operations[instance]
        self.outcomes[kind, "ok" if state is GOALS[kind] else "error"] += 1

    # -- each instance's turn --------------------------------------------------------------

    async def _idle(self) -> None:
        while self._work:
            for d in list(self._work):
                try:
                    await d
                except Exception:
                    pass

    def _spawn(self, instance: str, what: str, work: Callable[[], Awaitable[Any]]) -> Deferred[None]:
        """
        Run ``work`` on its own, after the work on the same instance that
        came before it (a stop waits for the start under way to settle,
        which it soon does: the start sees it is no longer wanted). A
        failure is logged and costs only this instance.
        """
        lock = self._locks.setdefault(instance, DeferredLock())

        async def guarded() -> None:
            await lock.acquire()
            try:
                await work()
            except Exception:
                self.log.failure("could not {what} {instance}", what=what, instance=instance)
                self._failed(instance, f"The compute node failed to {what} this instance.")
            finally:
                lock.release()
                if not lock.locked and not lock.waiting and self._locks.get(instance) is lock:
                    del self._locks[instance]

        d = Deferred.fromCoroutine(guarded())
        if not d.called:
            self._work.add(d)

            def settled(result: None) -> None:
                self._work.discard(d)
                return result

            d.addBoth(settled)
        return d

    def _failed(self, instance: str, reason: str, *, during: State | None = None) -> None:
        """``instance`` is errored for ``reason`` (only if it is still ``during`` that step, when given)."""
        state = self._state(instance)
        if state in (None, State.ERRORED, State.DISCARDED) or (during is not None and state is not during):
            return
        self.log.warn("{instance} failed: {reason}", instance=instance, reason=reason)
        self._set(instance, State.ERRORED, reason)

    # -- deadlines -------------------------------------------------------------------------------

    def _arm(self, record: InstanceRecord) -> None:
        """A timer for the deadline of ``record``'s state, if it has one (counted from when it entered it)."""
        self._disarm(record.instance)
        if record.state not in TRANSIENT:
            return
        deadline = self.deadlines[record.state]
        delay = max(0.0, record.since + deadline - self.reactor.seconds())
        self._timers[record.instance] = self.reactor.callLater(delay, self._expired, record.instance, record.state)

    def _disarm(self, instance: str) -> None:
        timer = self._timers.pop(instance, None)
        if timer is not None and timer.active():
            timer.cancel()

    def _expired(self, instance: str, state: State) -> None:
        self._timers.pop(instance, None)
        record = self._records.get(instance)
        if record is None or record.state is not state:
            return
        reason = expiredReason(state, self.deadlines[state])
        self.log.warn("{instance}: {reason}", instance=instance, reason=reason)
        self._set(instance, State.ERRORED, reason)
        # Whatever was under way is given up; what may still run is stopped.
        upload = self._uploads.get(instance)
        if upload is not None:
            upload.stop()  # its watcher, which holds the instance's turn, then ends
        if state in (State.STARTING, State.STOPPING):
            self._spawn(instance, "stop", lambda: self.runtime.stop(instance))

    # -- records -------------------------------------------------------------------------------

    def _podDirectory(self, instance: str) -> Path:
        return self.directory / instance

    def _state(self, instance: str) -> State | None:
        record = self._records.get(instance)
        return record.state if record is not None else None

    def _still(self, instance: str, state: State) -> bool:
        """Whether ``instance`` is still in ``state`` (work that awaited asks before it goes on)."""
        return self._state(instance) is state

    def _set(self, instance: str, state: State, reason: str | None, **changes: Any) -> bool:
        """Move ``instance`` to ``state`` if its life allows it; whether it moved."""
        record = self._records.get(instance)
        if record is None:
            return False
        try:
            Life(record.state).move(state)
        except IllegalMove as e:
            self.log.warn("{instance}: {error}; ignored", instance=instance, error=str(e))
            return False
        since = record.since if state is record.state else self.reactor.seconds()
        moved = replace(record, state=state, reason=reason, since=since, **changes)
        self._records[instance] = moved
        self._writeRecord(moved)
        if moved.state is not record.state:
            self._arm(moved)
            self._reached(instance, state)
        self._emit(moved)
        return True

    def _update(self, instance: str, **changes: Any) -> None:
        record = self._records.get(instance)
        if record is not None:
            self._records[instance] = record = replace(record, **changes)
            self._writeRecord(record)

    def _writeRecord(self, record: InstanceRecord) -> None:
        directory = self._podDirectory(record.instance)
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        path = directory / RECORD
        temporary = path.with_suffix(".tmp")
        temporary.write_text(json.dumps(record.toJSON()))
        temporary.replace(path)

    def _emit(self, record: InstanceRecord) -> None:
        self._emitStatus(record.status())

    def _emitStatus(self, status: InstanceStatus) -> None:
        for observer in self._observers:
            observer.instanceState(self._node, status)

