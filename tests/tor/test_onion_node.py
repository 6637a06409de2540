"""
Instances a compute node starts, published as Tor onion services: ``twistd
dit4c-node --onion CONTROL_ENDPOINT`` hands every pod the tor's control
port (``DIT4C_ONION``), and the pod helper (``dit4c-helper-pod``, the
process runtime's) publishes the instance there instead of dialling a
routing server, keeps the service's key in the pod's state directory and
reports ``http://<name>.onion/`` to the portal (``--onion-urls``).

Without Tor: the pod helper's choice (a tor where the node gives one, else
the routing servers), the count of its use, and the node's option. On the
private Tor network (tests/tor/conftest.py, shared with the other tests here): a real
portal, scheduler and node as ``twistd`` processes; a person starts an
instance through the API, logs in to it through Tor, stops and resumes it,
and it keeps its .onion name.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import pytest_twisted
import treq
from support.tornet import TorNetwork
from support.waiting import eventually
from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport
from twisted.python import usage

from dit4c.common.keys import generatePrivateKey, jwks, savePrivateKey
from dit4c.listener.onion import ONION_KEY_FILE
from dit4c.listener.service import ListenerService
from dit4c.node import tap as nodeTap
from dit4c.node.node import Node
from dit4c.podhelper import tap as podTap
from dit4c.podhelper.service import CountedOnionService, PodHelperService
from dit4c.portal.reportrules import isOnionV3

# The installation of separate processes the end-to-end tests run, reused as it is.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "e2e"))
from cluster import PASSWORD, Cluster  # noqa: E402

INSTANCE = "abc123"
#: Seconds an instance may take to come up (and to come back after a resume) on a loaded machine.
UP = 90.0

# -- without Tor: the pod helper's choice, its count of use, the node's option -------------------


def podHelper(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, **variables: str) -> PodHelperService:
    """``dit4c-helper-pod`` as a node's process runtime starts it, with ``variables`` over the usual environment."""
    savePrivateKey(generatePrivateKey(), tmp_path / "instance.key")
    environment = {
        "DIT4C_INSTANCE": INSTANCE,
        "DIT4C_INSTANCE_KEY": str(tmp_path / "instance.key"),
        "DIT4C_PORTAL": "http://portal.test",
        "DIT4C_TOOL": "tcp:host=127.0.0.1:port=1",
        "DIT4C_AUTH_LISTEN": "tcp:0:interface=127.0.0.1",
        "DIT4C_STATE_DIR": str(tmp_path / "pod" / "state"),
        **variables,
    }
    for name in ("DIT4C_ONION", "DIT4C_ROUTING"):
        monkeypatch.delenv(name, raising=False)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    (tmp_path / "pod").mkdir(mode=0o700, exist_ok=True)
    options = podTap.Options()
    options.parseOptions([])
    service = podTap.makeService(options, reactor)
    assert isinstance(service, PodHelperService)
    return service


def test_a_pod_given_a_tor_publishes_an_onion_service_and_dials_no_routing_server(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """
    With ``DIT4C_ONION`` the pod helper's listener is an onion service at
    that tor (even where routing servers are named too: as
    ``dit4c-helper-listener`` chooses), its key in the pod's state
    directory under the listener's name for it, the directory made for it;
    without, it dials the routing servers.
    """
    onion = podHelper(
        tmp_path, monkeypatch, DIT4C_ONION="tcp:host=127.0.0.1:port=9051", DIT4C_ROUTING="tcp:host=127.0.0.1:port=2"
    ).listener
    assert isinstance(onion, CountedOnionService)
    assert onion.keyFile == tmp_path / "pod" / "state" / ONION_KEY_FILE
    assert oct((tmp_path / "pod" / "state").stat().st_mode & 0o777) == "0o700"

    routed = podHelper(tmp_path, monkeypatch, DIT4C_ROUTING="tcp:host=127.0.0.1:port=2").listener
    assert isinstance(routed, ListenerService)


def test_a_bad_tor_control_endpoint_is_a_usage_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(usage.UsageError, match="DIT4C_ONION"):
        podHelper(tmp_path, monkeypatch, DIT4C_ONION="nonsense:9051")


def test_what_comes_through_the_onion_service_reaches_the_auth_proxy_and_is_counted_as_use(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """
    Tor's connections to the service's local port go to the auth proxy in
    the same process; each one and the bytes it brings are counted there
    (the idle limit's use), which the plain onion service does not do for
    a protocol factory.
    """
    pod = podHelper(tmp_path, monkeypatch, DIT4C_ONION="tcp:host=127.0.0.1:port=9051")
    onion = pod.listener
    assert isinstance(onion, CountedOnionService)
    assert onion.used() == (0, 0)
    # What the onion service listens with (OnionService.factory) is the counted auth proxy.
    protocol = onion.factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
    transport = StringTransport()
    protocol.makeConnection(transport)
    request = b"GET /notes HTTP/1.1\r\nHost: x.onion\r\nAccept: text/html\r\n\r\n"
    protocol.dataReceived(request)
    assert onion.used() == (1, len(request))
    # The auth proxy answered it: a browser with no session is sent to log in at the portal.
    answer = transport.value().decode("latin-1")
    assert re.match(r"HTTP/1\.1 30[23] ", answer), answer[:300]
    assert "Location: http://portal.test/oauth/authorize?" in answer, answer[:600]
    protocol.connectionLost(None)  # type: ignore[arg-type]


def nodeOptions(tmp_path: Path, *extra: str) -> nodeTap.Options:
    schedulerKey = tmp_path / "scheduler.jwks"
    schedulerKey.write_text(json.dumps(jwks(generatePrivateKey())))
    config = nodeTap.Options()
    config.parseOptions([
        "--scheduler-key", str(schedulerKey), "--portal", "http://portal.test",
        "--data-dir", str(tmp_path / "node"), "--listen", "tcp:0:interface=127.0.0.1", *extra,
    ])  # fmt: skip
    return config


def test_a_node_given_a_tor_needs_no_routing_server(tmp_path: Path) -> None:
    control = "unix:path=/run/tor/control"
    service = nodeTap.makeService(nodeOptions(tmp_path, "--onion", control), reactor)
    node = next(s for s in service if isinstance(s, Node))  # type: ignore[attr-defined]
    assert node.onion == control and node.routing == ()


def test_a_node_takes_a_routing_server_or_a_tor(tmp_path: Path) -> None:
    with pytest.raises(usage.UsageError, match="--routing \\(or --onion\\) is required"):
        nodeOptions(tmp_path)
    with pytest.raises(usage.UsageError, match="not both"):
        nodeOptions(tmp_path, "--onion", "tcp:host=127.0.0.1:port=9051", "--routing", "tcp:host=127.0.0.1:port=2")
    with pytest.raises(usage.UsageError, match="onion"):
        nodeOptions(tmp_path, "--onion", "nonsense:9051")


# -- on the private Tor network: a portal, a scheduler and a node, each its own process -----------


class OnionCluster(Cluster):
    """The end-to-end installation, its node started with ``--onion`` in place of ``--routing``."""

    def __init__(self, directory: Path, control: str) -> None:
        super().__init__(directory, portalOptions=("--onion-urls",), nodeOptions=("--onion", control))

    def _start(self, name: str, plugin: str, *args: str, **kwargs: Any) -> Any:
        if plugin == "dit4c-node":
            at = args.index("--routing")
            args = args[:at] + args[at + 2 :]
        return super()._start(name, plugin, *args, **kwargs)


@pytest.fixture
def cluster(tmp_path: Path, tornet: TorNetwork) -> Iterator[OnionCluster]:
    assert tornet.service is not None
    made = OnionCluster(tmp_path / "cluster", tornet.service.controlEndpoint)
    yield made
    made.stop()


@pytest.mark.slow
@pytest_twisted.ensureDeferred
async def test_a_node_publishes_each_instance_as_an_onion_service_that_keeps_its_name_across_a_resume(
    cluster: OnionCluster, tornet: TorNetwork
) -> None:
    """
    A person starts an instance (the API) on a node run with ``--onion``:
    it runs, the portal records ``http://<name>.onion/``, and through Tor
    the auth helper sends the person's browser to log in at the portal,
    which returns it to the .onion callback and then to the tool's page.
    Stopped and resumed, the instance is published again under the same
    name, and answers there.
    """
    # The whole login through Tor's helpers (imported here: that module needs tor to be there).
    from test_onion_network import (
        BROWSER,
        Cookies,
        firstAnswer,
        httpGet,
        logInForTheCallback,
        parsed,
        sentToLogIn,
    )

    await cluster.start()
    token = await cluster.apiToken("alice")
    api = f"http://127.0.0.1:{cluster.portalPort}/api/v1"
    bearer = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    response = await treq.post(f"{api}/instances", json.dumps({"image": cluster.imageId}).encode(), headers=bearer)
    body = await response.json()
    assert response.code == 201, body
    instance = body["id"]
    await cluster.waitForStates(instance, "running", UP)

    async def onionURL() -> str | None:
        url = (await cluster.instanceState(instance))[1]
        return url if url and re.fullmatch(r"http://[a-z2-7]{56}\.onion/", url) else None

    def unpublished() -> str:
        """What a failure shows: the pod's own logs and the service tor's (its view of the descriptor's upload)."""
        pod = cluster.podsDirectory() / instance
        logs = "".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}\n" for p in sorted(pod.rglob("*.log")))
        service = tornet.service
        assert service is not None
        return f"the portal recorded the instance's .onion URL\n{logs}--- tor service\n{service.log()}\n{service.onionLog()}"

    url = await eventually(onionURL, UP, 0.2, unpublished)
    host = urlsplit(url).hostname
    assert host is not None and isOnionV3(host)
    assert not (cluster.podsDirectory() / instance / "state" / ONION_KEY_FILE).stat().st_mode & 0o077

    # Through Tor: the auth helper sends the browser to log in at the portal.
    authorize, onionCookies = await sentToLogIn(tornet, host, "/", cluster.portal, instance, url)
    portalCookies = Cookies()

    async def atPortal(method: str, where: str, **kw: Any) -> tuple[int, str]:
        """A browser's request at the portal (not through Tor: the portal is an ordinary site)."""
        response = await treq.request(
            method, where, allow_redirects=False, headers={"Accept": "text/html", **portalCookies.header()}, **kw
        )
        portalCookies.keep([("set-cookie", v) for v in response.headers.getRawHeaders("set-cookie", [])])
        location = response.headers.getRawHeaders("location", [""])[0]
        return response.code, location if location else await response.text()

    callback = await logInForTheCallback(atPortal, cluster.portal, authorize, url, PASSWORD)
    # Back at the .onion, through Tor: the callback, then the tool's page.
    path = callback[len(url) - 1 :]
    status, headers, _ = parsed(await httpGet(tornet.dial(host, 80), host, path, BROWSER + onionCookies.lines()))
    onionCookies.keep(headers)
    assert status in (302, 303) and dict(headers)["location"].endswith("/"), headers
    status, headers, page = parsed(await httpGet(tornet.dial(host, 80), host, "/", BROWSER + onionCookies.lines()))
    assert status == 200 and b"<html" in page.lower(), (status, headers, page[:300])

    # Stopped and resumed: the same name (its key kept in the pod), published again and reported
    # again (the record's URL is taken away while it is stopped, so only the resumed pod can set it).
    response = await treq.post(f"{api}/instances/{instance}/stop", headers=bearer)
    assert response.code == 200, await response.text()
    await cluster.waitForStates(instance, "stopped", UP)
    store = await cluster.openStore()
    try:
        await store.updateInstance(instance, url=None)
    finally:
        await store.close()
    response = await treq.post(f"{api}/instances/{instance}/resume", headers=bearer)
    assert response.code == 200, await response.text()
    await cluster.waitForStates(instance, "running", UP)
    assert await eventually(onionURL, UP, 0.2, unpublished) == url
    # The session goes on: the tool's page through Tor at the same name.
    raw, seconds = await firstAnswer(tornet.dial(host, 80), host, "/", BROWSER + onionCookies.lines())
    print(f"after the resume the instance answered through Tor in {seconds:.1f} s")
    status, headers, page = parsed(raw)
    assert status == 200 and b"<html" in page.lower(), (status, headers, page[:300])
