"""
One private Tor network (tests/support/tornet.py) for every test here that
needs one: it takes tens of seconds and a few hundred MiB to start, and
each test publishes onion services of its own on it. Package-scoped, so a
parallel run keeps these tests on one worker (``support.ordering``).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import pytest_twisted
from support.tornet import TorNetwork, requireTor, startTorNetwork
from twisted.internet.defer import Deferred


@pytest.fixture(scope="package")
def tornet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TorNetwork]:
    # (A plain fixture waiting with blockon: pytest-twisted's async fixtures take no package scope.)
    requireTor("The tests over a private Tor network")
    net: TorNetwork = pytest_twisted.blockon(Deferred.fromCoroutine(startTorNetwork(tmp_path_factory.mktemp("tornet"))))
    print(f"private Tor network: keys made in {net.keySeconds:.1f} s, bootstrapped {net.bootstrapSeconds:.1f} s later")
    try:
        yield net
    finally:
        peak = sum(node.process.peakRSS() for node in net.nodes() if node.process is not None and node.process.proc.poll() is None)
        print(f"private Tor network: the tors' peak memory together {peak / 2**20:.0f} MiB")
        net.stop()
