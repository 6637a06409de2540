"""
Behind NAT, as the architecture promises: the scheduler and the compute
node (and so every pod: tool, auth helper, listener) run in a network
namespace that can dial out but accepts no connection from outside. The
portal and the routing server are on the host. A person uses the tool end
to end all the same.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from cluster import PASSWORD, Cluster, Namespace, namespacesUnavailable
from flows import logIn, openTool, refused, startTool


@pytest.fixture
def namespace() -> Iterator[Namespace]:
    why = namespacesUnavailable()
    if why:
        if os.environ.get("CI"):
            pytest.fail(why)
        pytest.skip(why)
    made = Namespace(f"dit4c{os.getpid() % 100000}", os.getpid() % 250 + 1)
    made.create()
    yield made
    made.destroy()


@pytest.fixture
def cluster(tmp_path: Path, namespace: Namespace) -> Iterator[Cluster]:
    made = Cluster(tmp_path / "cluster", netns=namespace.name, hostAddress=namespace.hostAddress)
    yield made
    made.stop()


def reachable(address: str, port: int, timeout: float = 2.0) -> bool:
    try:
        with socket.create_connection((address, port), timeout=timeout):
            return True
    except OSError:
        return False


@pytest_twisted.ensureDeferred
async def test_a_node_behind_nat(cluster: Cluster, namespace: Namespace, browser: Any) -> None:
    await cluster.start()

    # The node listens on every address in its namespace, yet nothing from
    # outside gets in; the scheduler beside it reaches it.
    assert not reachable(namespace.address, cluster.nodePort)
    assert "node link listening" in cluster.processes["node"].log()

    await logIn(browser, cluster.portal, "alice", PASSWORD)
    url = await startTool(browser, cluster.portal, "Notes")
    instance = url.split("//")[1].split(".")[0]
    await openTool(browser, url, "Hello, alice.")
    await browser.waitForText("#status", "connected", 15)
    await browser.fill("#note", "from behind the NAT")
    await browser.click("#add button")
    await browser.waitForText("#notes li", "from behind the NAT", 15)
    await cluster.waitForStates(instance, "running")

    await refused(url, "bob", PASSWORD)

    await browser.get(cluster.portal + "/")
    await browser.click(f'tr[data-instance="{instance}"] button.stop')
    await cluster.waitForStates(instance, "stopped")
