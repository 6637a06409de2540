"""
Servers killed while an instance runs: each of the routing server, the
portal and the scheduler is killed (SIGKILL, as a crash) and started again.
The instance must come back at the same URL without anyone doing anything,
and the portal's idea of it must match the node's.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from cluster import PASSWORD, Cluster
from flows import logIn, openTool, startTool
from selenium.common.exceptions import WebDriverException


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    made = Cluster(tmp_path / "cluster")
    yield made
    made.stop()


async def runningInstance(cluster: Cluster, browser: Any) -> tuple[str, str]:
    await cluster.start()
    await logIn(browser, cluster.portal, "alice", PASSWORD)
    url = await startTool(browser, cluster.portal, "Notes")
    instance = url.split("//")[1].split(".")[0]
    await openTool(browser, url, "Hello, alice.")
    await cluster.waitForStates(instance, "running")
    return instance, url


@pytest.mark.parametrize("server", ["routing", "portal", "scheduler"])
@pytest_twisted.ensureDeferred
async def test_instance_survives_a_crashed_server(cluster: Cluster, browser: Any, server: str) -> None:
    instance, url = await runningInstance(cluster, browser)

    cluster.kill(server)
    if server == "routing":
        # Nothing routes to the instance while the routing server is down.
        with pytest.raises(WebDriverException, match="ERR_CONNECTION_REFUSED"):
            await browser.get(url)
    await cluster.startAgain(server)

    # Back at the same URL, with nobody doing anything (the listener redials,
    # the scheduler reconnects and reports, the auth helper's session holds).
    await openTool(browser, url, "Hello, alice.", timeout=90)
    await cluster.waitForStates(instance, "running")
    assert (await cluster.instanceState(instance))[1] == url

    # And it still obeys: stopped from the portal, stopped on the node.
    await browser.get(cluster.portal + "/")
    await browser.click(f'tr[data-instance="{instance}"] button.stop')
    await cluster.waitForStates(instance, "stopped")
