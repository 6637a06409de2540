"""
The compute nodes page in Chromium against a real installation (portal,
routing server, scheduler and node, each its own process): an
administrator sees the node with its capacity and what it holds, cools it
down (a person's new start is refused with the reason while their running
instance runs on), has it take instances again (a start runs), then drains
it (every instance on it stopped, as its owner's Stop would). A person who
is not an administrator gets 403 from the page and from the API.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import treq
from cluster import PASSWORD, Cluster
from flows import otherBrowser, startTool, submitStart
from support.waiting import eventually

from dit4c.scheduler.scheduler import COOLING


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    made = Cluster(tmp_path / "cluster")
    yield made
    made.stop()


async def startRefused(browser: Any, portal: str) -> str:
    """Start Notes from the home page; the new instance, which errs: its reason as the page shows it."""
    instance = await submitStart(browser, portal, "Notes")
    row = f'#instances tr[data-instance="{instance}"]'
    await browser.waitFor(f'{row} td.state[data-state="errored"]', 30)
    return str(await browser.text(f"{row} td.state"))


@pytest_twisted.ensureDeferred
async def test_an_administrator_cools_down_accepts_and_drains_a_node(cluster: Cluster, browser: Any) -> None:
    await cluster.start()
    await cluster.addAdministrator()
    await browser.logIn(cluster.portal, "alice", PASSWORD)
    first = (await startTool(browser, cluster.portal, "Notes")).split("//")[1].split(".")[0]

    admin = await otherBrowser()
    try:
        await admin.logIn(cluster.portal, "root", PASSWORD)
        await admin.get(cluster.portal + "/admin/")
        await admin.click("#nodes-link")
        node = 'tr[data-node="n1"]'

        seen = [""]

        async def rowIs(expected: str) -> bool:
            """Whether the node's row, as a reload of the page shows it, is ``taking | active | instances``."""
            await admin.get(cluster.portal + "/admin/nodes")
            seen[0] = " | ".join([await admin.text(f"{node} td.{cell}") for cell in ("taking", "active", "instances")])
            return seen[0] == expected

        await admin.waitFor(node)
        assert await admin.text(f"{node} td.link") == "linked"
        assert await admin.text(f"{node} td.capacity") == "8"
        assert await admin.text(f"{node} td.active") == "1"
        assert await admin.text(f"{node} td.instances") == "1 (running 1)"
        assert "stopped, not discarded" in await admin.text("#about-nodes")

        # Cooled down: alice's new start is refused, and says why; her instance runs on.
        await admin.submit(f"{node} button.cool-down")
        await admin.waitForText("#message", "cooling down")
        assert await admin.text(f"{node} td.taking") == "cooling down"
        assert COOLING in await startRefused(browser, cluster.portal)
        assert cluster.nodeState(first) == "running"
        assert (await cluster.instanceState(first))[0] == "running"

        # Taking instances again: a start runs.
        await admin.submit(f"{node} button.accept")
        assert await admin.text(f"{node} td.taking") == "taking"
        second = (await startTool(browser, cluster.portal, "Notes")).split("//")[1].split(".")[0]
        await eventually(lambda: rowIs("taking | 2 | 2 (running 2)"), 15, 0.5, what=lambda: seen[0])

        # Drained: cooled down, and both of alice's instances stopped, not discarded.
        await admin.submit(f"{node} button.drain")
        await admin.waitForText("#message", "stopping: 2")
        for instance in (first, second):
            await browser.waitFor(f'#instances tr[data-instance="{instance}"] td.state[data-state="stopped"]', 60)
            await cluster.waitForStates(instance, "stopped")
        # What the scheduler says follows its nodes' states within a moment.
        await eventually(lambda: rowIs("cooling down | 0 | 2 (stopped 2)"), 15, 0.5, what=lambda: seen[0])
    finally:
        await admin.stop()

    # Not an administrator: 403, from the page and from the API.
    await browser.get(cluster.portal + "/admin/nodes")
    assert "Only administrators" in await browser.text("main")
    cookies = {c["name"]: c["value"] for c in await browser.cookies()}
    page = await treq.get(cluster.portal + "/admin/nodes", cookies=cookies)
    assert page.code == 403
    token = await cluster.apiToken("alice")
    api = await treq.get(cluster.portal + "/api/v1/admin/nodes", headers={"Authorization": f"Bearer {token}"})
    assert api.code == 403
    drain = await treq.post(
        f"{cluster.portal}/api/v1/admin/nodes/{cluster.schedulerId}/n1/accept", headers={"Authorization": f"Bearer {token}"}
    )
    assert drain.code == 403
