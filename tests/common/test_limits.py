"""A catalogue entry's limits as the API, the forms, the store and the start command carry them."""

from __future__ import annotations

import pytest

from dit4c.common.limits import LimitError, ToolLimits


def test_round_trips() -> None:
    limits = ToolLimits(cpus=0.5, memory=1024, idle=45, idleAction="save")
    assert ToolLimits.fromJSON(limits.toJSON()) == limits
    assert ToolLimits.loads(limits.dumps()) == limits
    assert ToolLimits().dumps() is None and ToolLimits.loads(None) == ToolLimits()
    assert ToolLimits.fromJSON(None) == ToolLimits() == ToolLimits.fromJSON({})
    assert ToolLimits.fromJSON({"cpus": 2}).cpus == 2.0


def test_forms_take_empty_fields_as_no_limit() -> None:
    assert ToolLimits.fromForm("", "", "", "") == ToolLimits()
    assert ToolLimits.fromForm(" 1.5 ", "2048", "30", "save") == ToolLimits(1.5, 2048, 30, "save")
    with pytest.raises(LimitError, match="The memory limit must be a number"):
        ToolLimits.fromForm("", "lots", "", "")


@pytest.mark.parametrize(
    "value, message",
    [
        ({"cpus": 0}, "between 0.01 and 1024 CPUs"),
        ({"cpus": float("nan")}, "a number of CPUs"),
        ({"cpus": True}, "a number of CPUs"),
        ({"cpus": "2"}, "a number of CPUs"),
        ({"memory": 8}, "between 16 and"),
        ({"memory": 1.5}, "whole number of MiB"),
        ({"idle": 0}, "between 1 and"),
        ({"idle_action": "explode"}, "stop or save"),
        ({"swap": 1}, "Unknown limit 'swap'"),
        ([1, 2], "must be an object"),
    ],
)
def test_what_is_not_a_limit_is_refused_with_why(value: object, message: str) -> None:
    with pytest.raises(LimitError, match=message):
        ToolLimits.fromJSON(value)


def test_people_read_them() -> None:
    assert ToolLimits().describe() == "no limits"
    assert ToolLimits(1, 512, 30, "save").describe() == "1 CPU, 512 MiB, saved after 30 min unused"
    assert ToolLimits(cpus=2.5).describe() == "2.5 CPUs"
