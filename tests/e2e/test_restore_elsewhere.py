"""
Work survives its node: an instance saved on one compute node is started
again on another that never ran it (the first one gone), from the image
server, with what was written before the save. Separate twistd processes:
portal, routing server, image server, scheduler and two nodes.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from cluster import PASSWORD, Cluster
from flows import logIn, openTool, startTool


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    made = Cluster(tmp_path / "cluster", nodes=("n1", "n2"), images=True)
    yield made
    made.stop()


@pytest_twisted.ensureDeferred
async def test_saved_on_one_node_started_on_another(cluster: Cluster, browser: Any) -> None:
    await cluster.start()
    await logIn(browser, cluster.portal, "alice", PASSWORD)
    url = await startTool(browser, cluster.portal, "Notes")
    instance = url.split("//")[1].split(".")[0]
    assert (cluster.nodeDirectory("n1") / "pods" / instance).is_dir(), "placed on n1 (the first with room)"
    await openTool(browser, url, "Hello, alice.")
    await browser.waitForText("#status", "connected", 15)
    await browser.fill("#note", "made on n1")
    await browser.click("#add button")
    await browser.waitForText("#notes li", "made on n1", 15)

    await browser.get(cluster.portal + "/")
    await browser.click(f'tr[data-instance="{instance}"] button.save')
    await cluster.waitForStates(instance, "saved")
    [stored] = list((cluster.directory / "images" / "sha256").iterdir())

    # n1 is gone for good: the saved image must start on n2, which never ran it.
    cluster.kill("node")
    await cluster.processes["scheduler"].waitForLog("link to node n1 lost", timeout=10)
    restored = await startTool(browser, cluster.portal, "Notes (saved")
    again = restored.split("//")[1].split(".")[0]
    assert (cluster.nodeDirectory("n2") / "pods" / again).is_dir()
    assert not (cluster.nodeDirectory("n1") / "pods" / again).exists()
    await openTool(browser, restored, "Hello, alice.")
    await browser.waitForText("#notes li", "made on n1", 15)
    assert stored.exists()
