"""
Several routing servers, each serving its own domain: an instance's
listener dials the nearest, and when that routing server dies (SIGKILL,
as a crash) it dials another, reports the URL it is given there, and the
person's open page shows the new link without a reload; following it
reaches the tool. When the first routing server comes back the instance
stays where it is.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import pytest_twisted
from cluster import PASSWORD, Cluster
from flows import logIn, openTool, startTool
from support.browser import POLL
from support.waiting import eventually

DOMAINS = ("r1.localhost", "r2.localhost")
#: Seconds from the SIGKILL to the new link on the person's page, at most.
FAILOVER_DEADLINE = 60


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    made = Cluster(tmp_path / "cluster", routingDomains=DOMAINS)
    yield made
    made.stop()


def routingServerOf(cluster: Cluster, url: str) -> str:
    """The name of the routing server whose domain ``url``'s host is under."""
    host = url.split("//")[1].split(":")[0].split("/")[0]
    domain = host.split(".", 1)[1]
    return cluster.routingNames[cluster.routingDomains.index(domain)]


async def linkOnPage(browser: Any, instance: str) -> str | None:
    """The instance's link as the person's open page shows it now."""
    href: str | None = await browser.execute(
        "const a = document.querySelector(`#instances tr[data-instance=\"${arguments[0]}\"] td.url a`);"
        "return a ? a.href : null;",
        instance,
    )
    return href


@pytest_twisted.ensureDeferred
async def test_an_instance_moves_to_another_routing_server_when_its_own_dies(cluster: Cluster, browser: Any) -> None:
    await cluster.start()
    await logIn(browser, cluster.portal, "alice", PASSWORD)
    first = await startTool(browser, cluster.portal, "Notes")
    instance = first.split("//")[1].split(".")[0]
    dead = routingServerOf(cluster, first)
    other = next(name for name in cluster.routingNames if name != dead)
    otherDomain = cluster.routingDomains[cluster.routingNames.index(other)]
    otherHTTP = cluster.routingPorts[other][0]
    await openTool(browser, first, "Hello, alice.")
    await cluster.waitForStates(instance, "running")

    # The person keeps the portal's page open while the routing server dies.
    await browser.get(cluster.portal + "/")
    await browser.waitFor(f'#instances tr[data-instance="{instance}"] td.url a', 30)
    killed = time.monotonic()
    cluster.kill(dead)

    moved = f"http://{instance}.{otherDomain}:{otherHTTP}/"

    async def linkMoved() -> bool:
        return await linkOnPage(browser, instance) == moved

    await eventually(
        linkMoved,
        FAILOVER_DEADLINE,
        POLL,
        what=lambda: f"the page's link to become {moved}",
    )
    seconds = time.monotonic() - killed
    print(f"\nfailover: {seconds:.1f} s from SIGKILL of {dead} to the page's link on {other}")
    assert (await cluster.instanceState(instance)) == ("running", moved)

    # Following the new link reaches the tool: the auth helper's cookie was
    # for the old host, so the browser goes through the portal's OAuth flow
    # again (the person's portal session holds: no password asked).
    # (The link opens a new tab: the same address, in this one.)
    portalLog = len(cluster.processes["portal"].log())
    await browser.get(moved)
    await browser.waitForText("#greeting", "Hello, alice.", 60)
    callback = quote(f"{moved}.dit4c/callback", safe="")
    assert f"redirect_uri={callback}" in cluster.processes["portal"].log()[portalLog:], (
        "the new host's auth helper did not send the browser through the portal's OAuth flow"
    )

    # The dead routing server comes back: the instance stays where it is.
    await cluster.startAgain(dead)
    await openTool(browser, moved, "Hello, alice.")
    await browser.get(cluster.portal + "/")
    await browser.waitFor(f'#instances tr[data-instance="{instance}"] td.url a', 30)
    assert await linkOnPage(browser, instance) == moved
    assert (await cluster.instanceState(instance)) == ("running", moved)
    assert instance not in cluster.processes[dead].log(), "the instance dialled the routing server that came back"
