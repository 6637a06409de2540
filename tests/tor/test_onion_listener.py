"""
The listener's choice between a routing server and an onion service, and
the onion service's patience with a tor it cannot reach, without Tor: the
options and the environment a node hands it decide which it runs, and an
onion service whose tor refuses tries again after its back-off, and stops
trying once stopped; a browser's connections through it count as use of
the instance, for the portal's idle limit.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python import usage
from zope.interface import implementer

from dit4c.common.keys import generatePrivateKey, savePrivateKey
from dit4c.listener.onion import ONION_KEY_FILE, OnionActivity, OnionService, SpliceFactory
from dit4c.listener.service import ListenerService
from dit4c.listener.tap import Options, makeService

CONTROL = "tcp:host=127.0.0.1:port=9051"
ROUTING = "tcp:host=127.0.0.1:port=8001"
TARGET = "tcp:host=127.0.0.1:port=8765"


@pytest.fixture
def node(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The helper environment a node writes (routing servers, no onion service yet); the pod's state directory."""
    savePrivateKey(generatePrivateKey(), tmp_path / "instance.pem")
    (tmp_path / "state").mkdir()
    for name, value in {
        "DIT4C_INSTANCE": "abc1",
        "DIT4C_INSTANCE_KEY": str(tmp_path / "instance.pem"),
        "DIT4C_PORTAL": "http://portal.test",
        "DIT4C_AUTH": TARGET,
        "DIT4C_ROUTING": ROUTING,
        "DIT4C_STATE_DIR": str(tmp_path / "state"),
    }.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("DIT4C_ONION", raising=False)
    return tmp_path / "state"


def parsed(*args: str) -> Options:
    options = Options()
    options.parseOptions(list(args))
    return options


def test_a_node_that_names_a_tor_gets_an_onion_service_instead_of_a_tunnel(node: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert isinstance(makeService(parsed(), MemoryReactorClock()), ListenerService)
    monkeypatch.setenv("DIT4C_ONION", CONTROL)
    options = parsed()
    service = makeService(options, MemoryReactorClock())
    assert isinstance(service, OnionService)
    # Its key where a resume finds it again.
    assert service.keyFile == node / ONION_KEY_FILE


def test_the_command_line_wins_over_the_environment(node: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DIT4C_ONION", CONTROL)
    assert isinstance(makeService(parsed("--routing", ROUTING), MemoryReactorClock()), ListenerService)
    monkeypatch.delenv("DIT4C_ONION")
    service = makeService(parsed("--onion", CONTROL, "--onion-key", str(node / "mine.key")), MemoryReactorClock())
    assert isinstance(service, OnionService) and service.keyFile == node / "mine.key"


def test_routing_and_onion_together_are_refused(node: Path) -> None:
    with pytest.raises(usage.UsageError, match="--routing or --onion"):
        parsed("--routing", ROUTING, "--onion", CONTROL)


def test_an_onion_service_by_hand_needs_a_target_and_a_control_endpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DIT4C_INSTANCE", raising=False)
    with pytest.raises(usage.UsageError, match="--target"):
        parsed("--onion", CONTROL)
    with pytest.raises(usage.UsageError, match="--onion"):
        parsed("--onion", "nonsense:x", "--target", TARGET)
    # By hand it needs no key: there is no portal to tell, and no state directory: a new name each start.
    service = makeService(parsed("--onion", CONTROL, "--target", TARGET), MemoryReactorClock())
    assert isinstance(service, OnionService) and service.keyFile is None and service.onPublished is None


@implementer(IStreamClientEndpoint)
class RefusingTor:
    """A control endpoint whose tor is not there."""

    def __init__(self) -> None:
        self.attempts = 0

    def connect(self, factory: Any) -> Deferred[Any]:
        self.attempts += 1
        return fail(ConnectionRefusedError("no tor"))


def test_an_onion_service_tries_again_after_its_back_off_until_stopped() -> None:
    reactor = MemoryReactorClock()
    tor = RefusingTor()
    service = OnionService(reactor, tor, RefusingTor(), retryPolicy=lambda attempt: 5.0 * attempt)
    service.startService()
    assert tor.attempts == 1 and service.url is None
    reactor.advance(4.9)
    assert tor.attempts == 1
    reactor.advance(0.1)
    assert tor.attempts == 2
    reactor.advance(10)
    assert tor.attempts == 3
    service.stopService()
    reactor.advance(100)
    assert tor.attempts == 3
    assert not reactor.getDelayedCalls()


@implementer(IStreamClientEndpoint)
class SlowTarget:
    """An auth helper that has not answered yet: the connection from tor waits, paused."""

    def connect(self, factory: Any) -> Deferred[Any]:
        return Deferred()


def test_a_browsers_connections_through_the_onion_service_are_use_of_the_instance(node: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """
    The portal's idle limit hears of an onion-published instance's use as
    of a tunnelled one's: a new connection, or bytes on one, since the last
    look (docs/protocols.md 8.8); a look with neither is no use.
    """
    monkeypatch.setenv("DIT4C_ONION", CONTROL)
    reactor = MemoryReactorClock()
    service = makeService(parsed(), reactor)
    assert isinstance(service, OnionService)
    activity = next(iter(service))
    assert isinstance(activity, OnionActivity)
    fromTor = SpliceFactory(SlowTarget())
    service.factory = fromTor
    assert not activity.used()
    connection = fromTor.buildProtocol(None)
    connection.makeConnection(StringTransport())
    assert activity.used()
    assert not activity.used()
    connection.dataReceived(b"GET / HTTP/1.1\r\n")
    assert activity.used()
    assert not activity.used()


NAME = "a" * 56 + ".onion"


class FakeTor:
    """What txtorcon.connect gives: a tor that makes onion services, and says when its control connection closes."""

    def __init__(self) -> None:
        self.created: list[dict[str, Any]] = []
        self.disconnected: list[Deferred[None]] = []
        self.quitted = False
        self.protocol = self

    def when_disconnected(self) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        self.disconnected.append(d)
        return d

    def create_onion_service(self, **kwargs: Any) -> Deferred[Any]:
        self.created.append(kwargs)
        onion = type("Onion", (), {"hostname": NAME, "private_key": kwargs["private_key"] or "ED25519-V3:made-by-tor"})()
        onion.remove = lambda: succeed(None)  # type: ignore[attr-defined]
        return succeed(onion)

    def quit(self) -> Deferred[None]:
        self.quitted = True
        return succeed(None)

    def lose(self) -> None:
        for d in self.disconnected:
            d.callback(None)


def test_a_tor_that_restarts_gets_the_onion_service_again_on_the_same_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """
    The service is ephemeral: it goes when tor's control connection does.
    The listener publishes it again, with the key it kept, so the name and
    the URL the portal has stay right; once the listener is stopped, a
    closing connection is no reason to publish anything.
    """
    txtorcon = pytest.importorskip("txtorcon")
    tors: list[FakeTor] = []

    def connect(reactor: Any, endpoint: Any) -> Deferred[FakeTor]:
        tors.append(FakeTor())
        return succeed(tors[-1])

    monkeypatch.setattr(txtorcon, "connect", connect)
    published: list[str] = []
    keyFile = tmp_path / ONION_KEY_FILE
    service = OnionService(MemoryReactorClock(), RefusingTor(), RefusingTor(), keyFile=keyFile, onPublished=published.append)
    service.startService()
    assert published == [f"http://{NAME}/"] and len(tors) == 1
    assert tors[0].created[0]["private_key"] is None and tors[0].created[0]["version"] == 3
    assert keyFile.read_text().strip() == "ED25519-V3:made-by-tor"
    tors[0].lose()
    assert len(tors) == 2 and tors[1].created[0]["private_key"] == "ED25519-V3:made-by-tor"
    assert published == [f"http://{NAME}/"] * 2 and service.url == f"http://{NAME}/"
    service.stopService()
    assert tors[1].quitted
    tors[1].lose()
    assert len(tors) == 2 and service.url is None
