"""
An idle limit in Chromium against a real installation (portal, routing
server, scheduler and node, each its own process): an administrator gives
the Notes entry an idle limit on the admin page; a person's new instance
of it shows when it will be stopped if nobody uses it; once that time has
passed (the instance's times in the portal's store moved back by the test,
rather than waiting half an hour) the portal stops it, the page says why,
and the person resumes it.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from cluster import PASSWORD, Cluster
from flows import otherBrowser, startTool

pytestmark = pytest.mark.slow


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    # The culler looks every half second (30 s by default).
    made = Cluster(tmp_path / "cluster", portalOptions=("--cull-interval", "0.5"))
    yield made
    made.stop()


@pytest_twisted.ensureDeferred
async def test_an_unused_instance_is_stopped_after_its_limit_and_says_why(cluster: Cluster, browser: Any) -> None:
    await cluster.start()
    await cluster.addAdministrator()

    admin = await otherBrowser()
    try:
        await admin.logIn(cluster.portal, "root", PASSWORD)
        await admin.get(cluster.portal + "/admin/")
        entry = f'#images tr[data-image="{cluster.imageId}"]'
        await admin.click(f"{entry} details summary")
        await admin.fill(f"{entry} form.limits-form [name=idle]", "30")
        await admin.submit(f"{entry} form.limits-form button")
        await admin.waitForText("#message", "Limits set")
        assert "stopped after 30 min unused" in await admin.text(f"{entry} td.limits")
    finally:
        await admin.stop()

    await browser.logIn(cluster.portal, "alice", PASSWORD)
    instance = (await startTool(browser, cluster.portal, "Notes")).split("//")[1].split(".")[0]
    state = f'#instances tr[data-instance="{instance}"] td.state'
    notice = await browser.waitForText(f"{state} small.idle", "if unused (after 30 min)")
    assert notice.startswith("Stopped at ")

    # Half an hour later, as far as the portal's store says: the culler stops it, as alice's Stop would.
    _ageInstance(cluster, instance, seconds=31 * 60)
    await browser.waitFor(f'{state}[data-state="stopped"]', 60)
    assert "Stopped after 30 min without use." in await browser.text(state)
    await cluster.waitForStates(instance, "stopped")

    # Its files are on the node: alice resumes it.
    await browser.submit(f'#instances tr[data-instance="{instance}"] button.resume')
    await browser.waitFor(f'{state}[data-state="running"]', 60)


def _ageInstance(cluster: Cluster, instance: str, seconds: float) -> None:
    """Move the instance's last change and last use back by ``seconds`` in the portal's SQLite store."""
    import sqlite3

    connection = sqlite3.connect(cluster.dataDirectory / "portal" / "portal.db", timeout=10)
    try:
        with connection:
            connection.execute(
                "UPDATE instances SET updated = updated - ?, active_at = active_at - ? WHERE id = ?",
                (seconds, seconds, instance),
            )
    finally:
        connection.close()
