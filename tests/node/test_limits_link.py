"""
A start command's ``limits`` (docs/protocols.md 7.3) from the scheduler,
across a real node link on loopback, to the node: kept in the instance's
record as the runtime got them; limits that are not valid error the
instance with the reason, and the node carries on.
"""

from __future__ import annotations

import json

import pytest_twisted
from test_link import Link, link  # noqa: F401 (the fixture)

from dit4c.channel.wire import Command
from dit4c.scheduler.scheduler import Scheduler


@pytest_twisted.ensureDeferred
async def test_the_limits_reach_the_node_and_bad_ones_error_the_instance(link: Link) -> None:  # noqa: F811
    await link.startNode()
    remote, watcher = link.remote(name="n1")
    await remote.whenConnected()
    scheduler = Scheduler([remote])

    await scheduler.command(Command("c1", "start", "lim1", {"image": "web", "port": None, "limits": {"cpus": 1.5, "memory": 2048}}))
    await watcher.waitFor("lim1", "running")
    record = json.loads((link.directory / "lim1" / "instance.json").read_text())
    assert record["limits"] == {"cpus": 1.5, "memory": 2048, "idle": None, "idle_action": "stop"}

    await scheduler.command(Command("c2", "start", "lim2", {"image": "web", "port": None, "limits": {"memory": 1}}))
    errored = await watcher.waitFor("lim2", "errored")
    assert errored.reason == "The catalogue entry's limits cannot be applied: The memory limit must be between 16 and 16777216 MiB."

    # No limits at all: none kept.
    await scheduler.command(Command("c3", "start", "lim3", {"image": "web", "port": None}))
    await watcher.waitFor("lim3", "running")
    assert json.loads((link.directory / "lim3" / "instance.json").read_text())["limits"] is None
