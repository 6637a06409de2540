"""
A compute node's Prometheus figures (``twistd dit4c-node --metrics``): a
real node with the process runtime starts, stops, resumes, saves and
discards instances, and a scrape over a loopback socket shows what it
holds and what it did; the option, and ``twistd`` serving them as an
operator runs it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import treq
from standins import POD_HELPER, TOOLS, Watcher
from support.metrics import Figures, samples
from support.waiting import eventually
from twisted.internet import reactor
from twisted.internet.endpoints import serverFromString
from twisted.python import usage

from dit4c.channel.errors import NodeFull
from dit4c.common.adminsite import adminSite
from dit4c.common.keys import generatePrivateKey, jwks
from dit4c.common.life import STATES
from dit4c.common.service import ListeningService
from dit4c.node import tap as nodeTap
from dit4c.node.metrics import NodeMetrics
from dit4c.node.node import Node
from dit4c.node.process import ProcessRuntime

#: A stand-in upload helper that reports as the real one does: the image's
#: size in its progress file (written once it has read the last byte) and
#: its result beside the image; it keeps the size it saw for the test.
UPLOADS = [
    sys.executable, "-c",
    "import json, os, pathlib;"
    "f = os.environ['DIT4C_IMAGE_FILE']; n = os.path.getsize(f);"
    "pathlib.Path(f + '.progress').write_text(json.dumps({'sent': n, 'total': n}));"
    "(pathlib.Path(f).parent / 'uploaded.size').write_text(str(n));"
    "pathlib.Path(f + '.done').write_text(json.dumps({'url': 'http://images.test/1'}))",
]  # fmt: skip
#: One that fails, as the real one does when the image server will not take the image.
FAILS = [sys.executable, "-c", "import sys; sys.exit('the image server said no')"]


def instances(figures: Figures) -> dict[str, float]:
    """The instances by state, only the states that have any."""
    counts = {state.value: figures[("dit4c_node_instances", (("state", state.value),))] for state in STATES}
    return {state: count for state, count in counts.items() if count}


def operation(figures: Figures, op: str, outcome: str) -> float:
    return figures[("dit4c_node_operations_total", (("op", op), ("outcome", outcome)))]


def operations(figures: Figures) -> dict[str, float]:
    """The operations counted, ``op outcome``, only those that happened."""
    return {
        f"{dict(labels)['op']} {dict(labels)['outcome']}": value
        for (name, labels), value in figures.items()
        if name == "dit4c_node_operations_total" and value
    }


class Served:
    """A real node (process runtime), its figures on a loopback port."""

    def __init__(self, directory: Path, **options: Any) -> None:
        self.runtime = ProcessRuntime(reactor, directory, TOOLS, helpers=POD_HELPER, stopGrace=2)
        self.node = Node(reactor, self.runtime, directory, portal="http://localhost:8000", **options)
        self.watcher = Watcher()
        self.node.subscribe(self.watcher.observer())
        self.node.startService()
        self.port: Any = None

    async def listen(self) -> None:
        metrics = NodeMetrics(self.node)
        endpoint = serverFromString(reactor, "tcp:0:interface=127.0.0.1")
        self.port = await endpoint.listen(adminSite(metrics, metrics.health))
        self.url = f"http://127.0.0.1:{self.port.getHost().port}"

    async def scrape(self) -> Figures:
        response = await treq.get(self.url + "/metrics", timeout=10)
        assert response.code == 200
        return samples(await response.text())

    async def state(self, instance: str, state: str, count: int = 1) -> None:
        """Wait until ``instance`` has reached ``state`` ``count`` times."""
        await eventually(
            lambda: self.watcher.history(instance).count(state) >= count,
            timeout=20,
            what=lambda: f"{instance} {state} x{count}: {self.watcher.history(instance)}",
        )

    async def close(self) -> None:
        if self.port is not None:
            await self.port.stopListening()
        await self.node.whenIdle()
        for instance in list(self.runtime._pods):
            await self.runtime.discard(instance)
        self.node.stopService()


@pytest_twisted.async_yield_fixture
async def served(tmp_path: Path) -> Any:
    made: list[Served] = []

    async def make(**options: Any) -> Served:
        s = Served(tmp_path / "node", **options)
        made.append(s)
        await s.listen()
        return s

    yield make
    for s in made:
        await s.close()


@pytest_twisted.ensureDeferred
async def test_the_figures_follow_an_instance_through_its_life(served: Any) -> None:
    s = await served(capacity=2)
    before = await s.scrape()
    assert before[("dit4c_node_capacity", ())] == 2
    assert before[("dit4c_node_cooling_down", ())] == 0
    assert before[("dit4c_node_load", ())] == 0
    assert before[("dit4c_node_pods_running", ())] == 0
    assert before[("dit4c_node_uploaded_bytes_total", ())] == 0
    assert instances(before) == {}
    assert operations(before) == {}
    assert operation(before, "start", "ok") == 0  # every op and outcome is there from the start

    await s.node.start("met1", "web", None)
    await s.state("met1", "running")
    running = await s.scrape()
    assert instances(running) == {"running": 1}
    assert running[("dit4c_node_load", ())] == 1
    assert running[("dit4c_node_pods_running", ())] == 1
    assert operations(running) == {"start ok": 1}

    await s.node.stop("met1")
    stopped = await s.scrape()
    assert instances(stopped) == {"stopped": 1}
    assert stopped[("dit4c_node_load", ())] == 0
    assert stopped[("dit4c_node_pods_running", ())] == 0  # its processes ended; its files stay
    assert operations(stopped) == {"start ok": 1, "stop ok": 1}

    await s.node.resume("met1")
    await s.state("met1", "running", count=2)
    resumed = await s.scrape()
    assert instances(resumed) == {"running": 1}
    assert resumed[("dit4c_node_pods_running", ())] == 1
    assert operations(resumed) == {"start ok": 1, "stop ok": 1, "resume ok": 1}

    await s.node.stop("met1")
    await s.node.discard("met1")
    gone = await s.scrape()
    assert instances(gone) == {}
    assert gone[("dit4c_node_pods_running", ())] == 0
    assert operations(gone) == {"start ok": 1, "stop ok": 2, "resume ok": 1, "discard ok": 1}
    health = await (await treq.get(s.url + "/health", timeout=10)).json()
    assert health == {"status": "ok", "instances": 0, "accepting": True}


@pytest_twisted.ensureDeferred
async def test_failed_and_refused_operations_are_errors(served: Any) -> None:
    s = await served(capacity=2)
    await s.node.start("bad1", "no-such-tool", None)
    await s.state("bad1", "errored")
    await s.node.resume("nowhere")  # this node holds nothing of it
    figures = await s.scrape()
    assert instances(figures) == {"errored": 1}
    assert operations(figures) == {"start error": 1, "resume error": 1}

    s.node.accepting = False  # cooling down: it takes no new instance
    with pytest.raises(NodeFull):
        await s.node.start("met2", "web", None)
    cooling = await s.scrape()
    assert cooling[("dit4c_node_cooling_down", ())] == 1
    assert operations(cooling) == {"start error": 2, "resume error": 1}
    health = await (await treq.get(s.url + "/health", timeout=10)).json()
    assert health == {"status": "ok", "instances": 1, "accepting": False}

    await s.node.discard("bad1")
    assert operations(await s.scrape()) == {"start error": 2, "resume error": 1, "discard ok": 1}


@pytest_twisted.ensureDeferred
async def test_a_save_counts_the_bytes_it_uploaded(served: Any, tmp_path: Path) -> None:
    s = await served(imageServer="http://images.test", uploadCommand=UPLOADS)
    await s.node.start("sav1", "web", None)
    await s.state("sav1", "running")
    (tmp_path / "node" / "sav1" / "work" / "results.csv").write_text("1,2,3\n" * 1000)
    await s.node.save("sav1")
    await s.state("sav1", "saved")
    size = int((tmp_path / "node" / "sav1" / "uploaded.size").read_text())
    assert size > 6000
    saved = await s.scrape()
    assert saved[("dit4c_node_uploaded_bytes_total", ())] == size
    assert operations(saved) == {"start ok": 1, "save ok": 1}
    assert instances(saved) == {"saved": 1}

    # An upload that fails: a save gone wrong, and no bytes counted.
    s.node.uploadCommand = FAILS
    await s.node.start("sav2", "web", None)
    await s.state("sav2", "running")
    await s.node.save("sav2")
    await s.state("sav2", "errored")
    failed = await s.scrape()
    assert failed[("dit4c_node_uploaded_bytes_total", ())] == size
    assert operations(failed) == {"start ok": 2, "save ok": 1, "save error": 1}
    assert instances(failed) == {"saved": 1, "errored": 1}


# -- the option --------------------------------------------------------------------------


def nodeOptions(directory: Path, *extra: str) -> nodeTap.Options:
    schedulerKey = directory / "scheduler.jwks"
    schedulerKey.write_text(json.dumps(jwks(generatePrivateKey())))
    config = nodeTap.Options()
    config.parseOptions([
        "--scheduler-key", str(schedulerKey), "--portal", "http://portal.test", "--routing", "tcp:host=127.0.0.1:port=1",
        "--data-dir", str(directory / "node"), "--listen", "tcp:0:interface=127.0.0.1", *extra,
    ])  # fmt: skip
    return config


def test_the_option_serves_the_figures_on_their_own_endpoint(tmp_path: Path) -> None:
    config = nodeOptions(tmp_path, "--metrics", "tcp:0:interface=127.0.0.1")
    assert config["metrics"] == "tcp:0:interface=127.0.0.1"
    service: Any = nodeTap.makeService(config, reactor)
    listening = [s for s in service if isinstance(s, ListeningService)]
    assert [s.description for s in listening] == ["node metrics"]
    # Without it, nothing listens beside the link (whose port is its own service's).
    without: Any = nodeTap.makeService(nodeOptions(tmp_path), reactor)
    assert not [s for s in without if isinstance(s, ListeningService)]


@pytest.mark.parametrize("endpoint", ["tcp:notaport", "nonsense:1234"])
def test_a_bad_endpoint_is_a_usage_error(tmp_path: Path, endpoint: str) -> None:
    with pytest.raises(usage.UsageError, match="--metrics: bad endpoint"):
        nodeOptions(tmp_path, "--metrics", endpoint)


@pytest_twisted.ensureDeferred
async def test_twistd_serves_the_figures(processes: Any, tmp_path: Path) -> None:
    schedulerKey = tmp_path / "scheduler.jwks"
    schedulerKey.write_text(json.dumps(jwks(generatePrivateKey())))
    proc = processes(
        "dit4c-node", "--scheduler-key", str(schedulerKey), "--portal", "http://portal.test",
        "--routing", "tcp:host=127.0.0.1:port=1", "--data-dir", str(tmp_path / "node"),
        "--listen", "tcp:0:interface=127.0.0.1", "--capacity", "3", "--metrics", "tcp:0:interface=127.0.0.1",
    )  # fmt: skip
    port = await proc.waitForPort("node metrics")
    figures = samples(await (await treq.get(f"http://127.0.0.1:{port}/metrics", timeout=10)).text())
    assert figures[("dit4c_node_capacity", ())] == 3
    assert figures[("dit4c_node_cooling_down", ())] == 0
    assert figures[("dit4c_node_pods_running", ())] == 0
    assert instances(figures) == {}
    health = await (await treq.get(f"http://127.0.0.1:{port}/health", timeout=10)).json()
    assert health == {"status": "ok", "instances": 0, "accepting": True}
