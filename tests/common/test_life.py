"""The instance life: the table, and the machine built from it."""

from __future__ import annotations

import pytest

from dit4c.common.errors import IllegalMove
from dit4c.common.life import (
    ACTIONS,
    ACTIVE,
    DEADLINES,
    HOLDS_POD,
    MOVES,
    STATES,
    TRANSIENT,
    Life,
    State,
    actionAllowed,
    expiredReason,
    moveAllowed,
    toJSON,
)


def test_every_state_has_its_moves() -> None:
    assert set(MOVES) == set(STATES)
    for state, targets in MOVES.items():
        assert targets <= set(STATES)
        assert state not in targets  # staying is allowed separately


def test_errored_reachable_from_every_state_but_discarded() -> None:
    for state in STATES:
        if state not in (State.DISCARDED, State.ERRORED):
            assert moveAllowed(state, State.ERRORED), state
    assert not moveAllowed(State.DISCARDED, State.ERRORED)


def test_nothing_comes_back_to_life() -> None:
    assert not moveAllowed("saved", "running")
    assert not moveAllowed("errored", "running")
    assert not moveAllowed("stopped", "starting")
    assert not moveAllowed("discarding", "stopped")
    assert MOVES[State.DISCARDED] == frozenset()
    assert moveAllowed("requested", "running")  # steps may be skipped
    assert moveAllowed("stopping", "saved")
    assert not moveAllowed("running", "no-such-state")


def test_every_transient_state_has_a_deadline_and_can_expire() -> None:
    assert TRANSIENT == {State.STARTING, State.STOPPING, State.SAVING, State.UPLOADING, State.DISCARDING}
    for state in STATES:
        life = Life(state)
        if state in TRANSIENT:
            assert DEADLINES[state] > 0
            assert life.expire() is State.ERRORED
            assert life.state is State.ERRORED
        else:
            with pytest.raises(IllegalMove):
                life.expire()
            assert life.state is state


def test_an_errored_instance_can_always_be_discarded() -> None:
    assert actionAllowed("discard", State.ERRORED)
    life = Life(State.ERRORED)
    assert life.act("discard") is State.DISCARDING
    assert life.move(State.DISCARDED) is State.DISCARDED


def test_actions_follow_the_table() -> None:
    for name, action in ACTIONS.items():
        for state in STATES:
            life = Life(state)
            if state in action.allowedIn:
                assert life.act(name) is action.target(state)
            else:
                with pytest.raises(IllegalMove, match=f"{name} is not allowed from {state.value}"):
                    life.act(name)
                assert life.state is state
    with pytest.raises(IllegalMove):
        Life(State.RUNNING).act("explode")


def test_the_machine_follows_the_moves_table() -> None:
    for state in STATES:
        for target in STATES:
            life = Life(state)
            if target == state or target in MOVES[state]:
                assert life.move(target) is target
                assert life.state is target
            else:
                with pytest.raises(IllegalMove):
                    life.move(target)
                assert life.state is state


def test_a_whole_save() -> None:
    life = Life(State.REQUESTED)
    for step in (State.STARTING, State.RUNNING):
        life.move(step)
    assert life.act("save") is State.STOPPING
    for step in (State.SAVING, State.UPLOADING, State.UPLOADING, State.SAVED):
        life.move(step)
    assert life.act("discard") is State.DISCARDING
    assert life.move(State.DISCARDED) is State.DISCARDED
    with pytest.raises(IllegalMove):
        life.move(State.ERRORED)


def test_a_stopped_instance_is_saved_as_it_is() -> None:
    life = Life(State.STOPPED)
    assert life.act("save") is State.SAVING  # no stop first: its pod is stopped
    for step in (State.UPLOADING, State.SAVED):
        life.move(step)
    assert life.act("discard") is State.DISCARDING
    # And the node may report the whole save at once.
    assert Life(State.STOPPED).move(State.SAVED) is State.SAVED


def test_active_and_pods() -> None:
    assert HOLDS_POD < ACTIVE
    assert State.REQUESTED in ACTIVE and State.REQUESTED not in HOLDS_POD
    assert not (ACTIVE & {State.SAVED, State.STOPPED, State.DISCARDED, State.ERRORED, State.DISCARDING})


def test_reasons_and_json() -> None:
    assert expiredReason(State.STOPPING) == "The instance did not finish stopping within 2 min."
    assert expiredReason(State.UPLOADING) == "The instance did not finish uploading its saved image within 1 hour."
    assert expiredReason(State.STARTING, 1.5) == "The instance did not finish starting within 1.5 s."
    document = toJSON()
    assert document["states"] == [s.value for s in STATES]
    assert document["actions"] == {
        "stop": ["requested", "running", "starting"],
        "save": ["running", "stopped"],
        "discard": ["errored", "saved", "stopped"],
        "resume": ["stopped"],
    }
