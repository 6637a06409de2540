"""
An instance's life: the one place that names its states.

Everything that knows of an instance's state takes it from here: the
portal's record (store, pages, REST API, OpenAPI document, the page's
script), the scheduler channel's wire format, the scheduler and the compute
node's record. The table below is the whole behaviour:

- :class:`State`: every state, by the name the wire, the store and the API use;
- :data:`MOVES`: where each state may go when a compute node (through its
  scheduler) says so. Steps may be skipped, never undone; staying in a
  state is always allowed (its reason or URL may change);
- :data:`ACTIONS`: which person's action is legal in which state, and the
  state it leads to;
- :data:`DEADLINES`: how long each transient state may last before the
  instance becomes ``errored`` with a reason (:func:`expiredReason`).

:data:`LIFE` is the state machine built from the table (automat): the
portal's and the node's records are instances of it, started in the
state they hold, so an illegal move is refused in one place
(:class:`dit4c.common.errors.IllegalMove`).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from automat import NoTransition, TypeMachine, TypeMachineBuilder
from automat._typed import TypedState

from dit4c.common.errors import IllegalMove

__all__ = [
    "ACTIONS",
    "ACTIVE",
    "DEADLINES",
    "HOLDS_POD",
    "LIFE",
    "MOVES",
    "SAVING_IMAGE",
    "STATES",
    "TERMINAL",
    "TRANSIENT",
    "Life",
    "LifeInputs",
    "State",
    "actionAllowed",
    "describeDeadline",
    "expiredReason",
    "lifeOf",
    "moveAllowed",
    "toJSON",
]


class State(enum.StrEnum):
    """Every state an instance can be in (DESIGN.md, "Instance life")."""

    #: The portal made it and sent the start command; no node has taken it on yet.
    REQUESTED = "requested"
    #: A node is making its pod (fetching, pulling, waiting for the tool to answer).
    STARTING = "starting"
    #: The tool answers through its auth helper.
    RUNNING = "running"
    #: Its pod is being stopped (then ``stopped``, or ``saving`` for a save).
    STOPPING = "stopping"
    #: Its image is being captured.
    SAVING = "saving"
    #: The upload helper is sending the captured image to the image server.
    UPLOADING = "uploading"
    #: The image server holds its saved image; the pod's files stay until discarded.
    SAVED = "saved"
    #: Its pod is stopped; its files stay until discarded.
    STOPPED = "stopped"
    #: Everything of it is being removed.
    DISCARDING = "discarding"
    #: Nothing of it is left anywhere.
    DISCARDED = "discarded"
    #: Something went wrong; ``reason`` says what. It can always be discarded.
    ERRORED = "errored"


#: Every state, in the order of a life.
STATES: tuple[State, ...] = tuple(State)

#: States in which an instance holds (or is about to hold) compute: these
#: count against a person's quota, and its key is published.
ACTIVE: frozenset[State] = frozenset(
    {State.REQUESTED, State.STARTING, State.RUNNING, State.STOPPING, State.SAVING, State.UPLOADING}
)

#: States in which a node holds a live (or half-made) pod for it.
HOLDS_POD: frozenset[State] = ACTIVE - {State.REQUESTED}

#: States in which an instance's helpers may report the image it saved (and
#: the image server may take its bytes).
SAVING_IMAGE: frozenset[State] = frozenset({State.SAVING, State.UPLOADING})

#: States with nothing more to come.
TERMINAL: frozenset[State] = frozenset({State.DISCARDED})

#: Seconds each transient state may last before the instance is errored.
#: ``starting`` covers fetching a saved image or pulling a container image
#: (the podman runtime allows a pull 900 s); ``saving`` and ``uploading``
#: cover archives of several GB.
DEADLINES: Mapping[State, float] = {
    State.STARTING: 1200.0,
    State.STOPPING: 120.0,
    State.SAVING: 3600.0,
    State.UPLOADING: 3600.0,
    State.DISCARDING: 300.0,
}

#: The states that have a deadline.
TRANSIENT: frozenset[State] = frozenset(DEADLINES)

#: Where each state may go when a node says so (through its scheduler).
MOVES: Mapping[State, frozenset[State]] = {
    State.REQUESTED: frozenset(
        {State.STARTING, State.RUNNING, State.STOPPING, State.STOPPED, State.DISCARDING, State.DISCARDED, State.ERRORED}
    ),
    State.STARTING: frozenset({State.RUNNING, State.STOPPING, State.STOPPED, State.DISCARDED, State.ERRORED}),
    State.RUNNING: frozenset({State.STOPPING, State.SAVING, State.STOPPED, State.DISCARDED, State.ERRORED}),
    State.STOPPING: frozenset({State.SAVING, State.UPLOADING, State.SAVED, State.STOPPED, State.DISCARDED, State.ERRORED}),
    State.SAVING: frozenset({State.UPLOADING, State.SAVED, State.DISCARDED, State.ERRORED}),
    State.UPLOADING: frozenset({State.SAVED, State.DISCARDED, State.ERRORED}),
    State.SAVED: frozenset({State.DISCARDING, State.DISCARDED, State.ERRORED}),
    # A stopped instance saved: its files are captured where they are.
    State.STOPPED: frozenset(
        {State.SAVING, State.UPLOADING, State.SAVED, State.DISCARDING, State.DISCARDED, State.ERRORED}
    ),
    State.DISCARDING: frozenset({State.DISCARDED, State.ERRORED}),
    # An errored instance never comes back to life by itself: it can only
    # be stopped (what is left of its pod) and cleaned up.
    State.ERRORED: frozenset({State.STOPPING, State.STOPPED, State.DISCARDING, State.DISCARDED}),
    State.DISCARDED: frozenset(),
}


@dataclass(frozen=True)
class Action:
    """Something a person can do to an instance."""

    #: As in URLs and the API: ``stop``, ``save``, ``discard``.
    name: str
    #: The states it is legal in.
    allowedIn: frozenset[State]
    #: The state it moves the instance to at once (the node goes on from there).
    to: State
    #: The command the scheduler is sent.
    op: str = field(default="")
    #: Where it moves the instance from some states instead of ``to``.
    toFrom: Mapping[State, State] = field(default_factory=dict)

    def target(self, state: State) -> State:
        """The state the action moves an instance in ``state`` to."""
        return self.toFrom.get(state, self.to)


#: What a person can do, in which states, and where it leads.
ACTIONS: Mapping[str, Action] = {
    "stop": Action("stop", frozenset({State.REQUESTED, State.STARTING, State.RUNNING}), State.STOPPING, "stop"),
    # A running instance is stopped first; a stopped one is saved as it is
    # (its pod's files are still on its node).
    "save": Action(
        "save", frozenset({State.RUNNING, State.STOPPED}), State.STOPPING, "save", {State.STOPPED: State.SAVING}
    ),
    "discard": Action("discard", frozenset({State.STOPPED, State.SAVED, State.ERRORED}), State.DISCARDING, "discard"),
    # A stopped instance's pod (its files, its container) is still on its
    # node: started again there, it carries on where it stopped.
    "resume": Action("resume", frozenset({State.STOPPED}), State.STARTING, "resume"),
}


def moveAllowed(old: str, new: str) -> bool:
    """Whether a node may move an instance from ``old`` to ``new`` (staying is allowed)."""
    try:
        before, after = State(old), State(new)
    except ValueError:
        return False
    return before == after or after in MOVES[before]


def actionAllowed(action: str, state: str) -> bool:
    """Whether a person may do ``action`` to an instance in ``state``."""
    entry = ACTIONS.get(action)
    return entry is not None and state in entry.allowedIn


def describeDeadline(seconds: float) -> str:
    """``120`` → ``2 min``: a deadline as a person reads it."""
    if seconds >= 3600 and seconds % 3600 == 0:
        hours = int(seconds // 3600)
        return f"{hours} hour{'s' if hours != 1 else ''}"
    if seconds >= 60 and seconds % 60 == 0:
        return f"{int(seconds // 60)} min"
    return f"{seconds:g} s"


_VERBS: Mapping[State, str] = {
    State.STARTING: "starting",
    State.STOPPING: "stopping",
    State.SAVING: "saving its image",
    State.UPLOADING: "uploading its saved image",
    State.DISCARDING: "being discarded",
}


def expiredReason(state: State, deadline: float | None = None) -> str:
    """The reason an instance gets when ``state`` outlives its deadline."""
    seconds = DEADLINES[state] if deadline is None else deadline
    return f"The instance did not finish {_VERBS[state]} within {describeDeadline(seconds)}."


def toJSON() -> dict[str, object]:
    """The life as data, for the page's script and the API (``GET /api/v1/states``)."""
    return {
        "states": [s.value for s in STATES],
        "active": sorted(s.value for s in ACTIVE),
        "transient": {s.value: DEADLINES[s] for s in STATES if s in DEADLINES},
        "actions": {name: sorted(s.value for s in a.allowedIn) for name, a in ACTIONS.items()},
        "serving": State.RUNNING.value,
        "terminal": sorted(s.value for s in TERMINAL),
    }


# -- the state machine ---------------------------------------------------------------------------


class LifeInputs(Protocol):
    """
    What can happen to an instance. Each input returns the state it leads to;
    one the life does not allow from the current state raises
    :class:`IllegalMove` (via automat's ``NoTransition``).
    """

    # A node's word (through its scheduler): one input per state it names.
    def requested(self) -> State: ...
    def starting(self) -> State: ...
    def running(self) -> State: ...
    def stopping(self) -> State: ...
    def saving(self) -> State: ...
    def uploading(self) -> State: ...
    def saved(self) -> State: ...
    def stopped(self) -> State: ...
    def discarding(self) -> State: ...
    def discarded(self) -> State: ...
    def errored(self) -> State: ...

    # A person's action.
    def stop(self) -> State: ...
    def save(self) -> State: ...
    def discard(self) -> State: ...
    def resume(self) -> State: ...

    # A transient state outlived its deadline.
    def expire(self) -> State: ...


class _Core:
    """The machine needs no data of its own: the record around it holds it."""


def _build() -> tuple[TypeMachine[LifeInputs, _Core], dict[State, TypedState[LifeInputs, _Core]]]:
    builder = TypeMachineBuilder(LifeInputs, _Core)
    states = {s: builder.state(s.value) for s in STATES}
    for state, node in states.items():
        # Staying is a move too (its reason or URL changed).
        for target in (state, *sorted(MOVES[state])):
            node.upon(getattr(LifeInputs, target.value)).to(states[target]).returns(target)
        for action in ACTIONS.values():
            if state in action.allowedIn:
                goal = action.target(state)
                node.upon(getattr(LifeInputs, action.name)).to(states[goal]).returns(goal)
        if state in TRANSIENT:
            node.upon(LifeInputs.expire).to(states[State.ERRORED]).returns(State.ERRORED)
    return builder.build(), states


_MACHINE, _STATES = _build()


class Life:
    """
    One instance's life, in the state it is in now: feed it what happens
    (:meth:`move`, :meth:`act`, :meth:`expire`) and it says where that
    leads, or raises :class:`IllegalMove`.
    """

    def __init__(self, state: State | str) -> None:
        self.state = State(state)
        self._inputs: LifeInputs = _MACHINE(_Core(), _STATES[self.state])

    def _feed(self, name: str, what: str) -> State:
        try:
            new: State = getattr(self._inputs, name)()
        except NoTransition:
            raise IllegalMove(self.state, what) from None
        self.state = new
        return new

    def move(self, state: State | str) -> State:
        """A node says the instance is now in ``state``."""
        target = State(state)
        return self._feed(target.value, f"moving to {target.value}")

    def act(self, action: str) -> State:
        """A person does ``action`` (``stop``, ``save``, ``discard``)."""
        if action not in ACTIONS:
            raise IllegalMove(self.state, f"{action!r}")
        return self._feed(action, f"{action}")

    def expire(self) -> State:
        """The current (transient) state outlived its deadline."""
        return self._feed("expire", "expiring")

    def allows(self, state: State | str) -> bool:
        """Whether a move to ``state`` is legal now (without making it)."""
        return moveAllowed(self.state, state)


def lifeOf(state: State | str) -> Life:
    """A life in ``state``."""
    return Life(state)


#: The machine itself, for drawing (``LIFE.asDigraph()``) and tests.
LIFE = _MACHINE


def parseState(value: object) -> State:
    """
    A state by its name.

    :raises ValueError: not a state.
    """
    if not isinstance(value, str):
        raise ValueError(f"not a state: {value!r}")
    return State(value)


def states(values: Iterable[State]) -> list[str]:
    """The names of ``values``, in life order (for SQL ``IN`` lists and the like)."""
    chosen = set(values)
    return [s.value for s in STATES if s in chosen]
