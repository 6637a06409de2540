"""
Slow clients at every public port, each server a real process: a
connection that sends its request head (or the tunnel's hello) one byte
every half second, so that no idle timeout ever fires, is cut within 30 s
by the portal (its web port and its scheduler channel port), the routing
server (its public HTTP and its tunnel port), the auth helper and the image
server; 300 of them at once do not keep the portal from answering someone
else; and a body sent as slowly is cut too. 30 s is the bound the fronts promise (docs/security.md);
the servers' own deadlines are shorter.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from security_world import (
    RunningPortal,
    drip,
    exchange,
    slowHead,
    slowTunnelHello,
    startAuthHelper,
    startImageServer,
    startPortal,
    startRouting,
    status,
)
from support.processes import Process

#: Every public port cuts a client that is this slow within this many seconds.
BOUND = 30.0


@pytest_twisted.async_yield_fixture
async def portal(processes: Any, tmp_path: Path) -> Any:
    yield await startPortal(processes, tmp_path)


@pytest_twisted.async_yield_fixture
async def helpers() -> Any:
    started: list[Process] = []
    yield started
    for proc in started:
        proc.stop()


#: The public ports of a head sent a byte at a time.
PORTS = ("portal", "portal scheduler channel", "routing public http", "routing tunnel", "auth helper", "image server")


@pytest_twisted.ensureDeferred
async def test_a_head_sent_a_byte_at_a_time_is_cut(
    portal: RunningPortal,
    processes: Any,
    signing: Any,
    tmp_path: Path,
    helpers: list[Process],
    subtests: pytest.Subtests,
) -> None:
    """
    Every port at once (each a subtest): the clients only wait on the
    servers' deadlines, so they drip side by side rather than one port
    after another.
    """
    from twisted.internet import defer, threads

    routing = await startRouting(processes, signing)
    targets = {
        "portal": (portal.port, slowHead()),
        "portal scheduler channel": (portal.channelPort, slowHead(path=b"/.dit4c/channel")),
        "routing public http": (routing.port("public http"), slowHead()),
        "routing tunnel": (routing.port("tunnel"), slowTunnelHello()),
        "auth helper": (await startAuthHelper(tmp_path, portal.url, helpers), slowHead()),
        "image server": (await startImageServer(processes, tmp_path, portal.url), slowHead()),
    }
    assert tuple(targets) == PORTS
    cuts = await defer.gatherResults(
        [threads.deferToThread(drip, port, slow, 3, 0.5, BOUND + 5) for port, slow in targets.values()]
    )
    for server, cut in zip(targets, cuts, strict=True):
        with subtests.test(server=server):
            assert max(cut) < BOUND, cut


@pytest_twisted.ensureDeferred
async def test_300_slow_clients_do_not_keep_the_portal_from_answering(portal: RunningPortal) -> None:
    answered: list[tuple[int, int]] = []

    def meanwhile(stillOpen: int) -> None:
        answer = exchange(portal.port, b"GET /health HTTP/1.1\r\nHost: p\r\nConnection: close\r\n\r\n", timeout=10)
        answered.append((stillOpen, status(answer)))

    from twisted.internet import threads

    cut = await threads.deferToThread(drip, portal.port, slowHead(), 300, 0.5, BOUND + 5, meanwhile)
    # Answered while all 300 were still holding a connection each ...
    assert answered == [(300, 200)]
    # ... and every one of them was cut.
    assert max(cut) < BOUND, sorted(cut)[-5:]


@pytest_twisted.ensureDeferred
async def test_a_body_sent_a_byte_at_a_time_is_cut(portal: RunningPortal) -> None:
    from twisted.internet import threads

    head = b"POST /login HTTP/1.1\r\nHost: p\r\nContent-Length: 1000\r\n\r\n"
    cut = await threads.deferToThread(drip, portal.port, head + b"u" * 1000, 1, 0.05, BOUND + 5)
    assert max(cut) < BOUND, cut
