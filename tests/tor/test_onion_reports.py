"""
The portal and an instance's .onion URL (``POST /reports/url``,
docs/protocols.md 8.2), without Tor: a portal started with ``--onion-urls``
takes the URL of a Tor v3 onion service from the instance's listener, and
still refuses every other host that is not ``<id>.<domain>``; a portal
without it refuses any .onion URL.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import treq
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from twisted.internet import reactor
from twisted.internet.task import Clock
from twisted.web.server import Site

from dit4c.common.keys import generatePrivateKey, publicJWK
from dit4c.common.tokens import TokenSigner
from dit4c.portal import tap
from dit4c.portal.app import Portal, PortalConfig
from dit4c.portal.errors import ReportError
from dit4c.portal.keys import KeyRing
from dit4c.portal.reportrules import REPORT_AUDIENCE, checkInstanceURL, isOnionV3
from dit4c.portal.store import openStore

INSTANCE = "abc123"


def onionName(version: int = 3, good: bool = True) -> str:
    """A v3 onion service's name, as Tor makes it from an ed25519 key (rend-spec-v3, 6)."""
    key = Ed25519PrivateKey.generate().public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    v = bytes([version])
    checksum = hashlib.sha3_256(b".onion checksum" + key + v).digest()[:2]
    if not good:
        checksum = bytes([checksum[0] ^ 1, checksum[1]])
    return base64.b32encode(key + checksum + v).decode().lower() + ".onion"


# -- the rule, alone -------------------------------------------------------------------------------


def test_a_v3_onion_name_is_told_from_a_made_up_one() -> None:
    assert isOnionV3(onionName())
    # A checksum that does not hold, another version, the wrong length, a sub-domain.
    assert not isOnionV3(onionName(good=False))
    assert not isOnionV3(onionName(version=2))
    assert not isOnionV3(onionName()[1:])
    assert not isOnionV3("www." + onionName())
    assert not isOnionV3(onionName().replace(".onion", ".example"))


def test_an_onion_url_is_taken_only_where_the_portal_allows_them() -> None:
    url = f"http://{onionName()}/"
    assert checkInstanceURL(url, INSTANCE, onion=True) == url
    assert checkInstanceURL(f"https://{onionName()}:8443/lab", INSTANCE, ["localhost"], onion=True)
    with pytest.raises(ReportError) as refused:
        checkInstanceURL(url, INSTANCE)
    assert (refused.value.status, refused.value.error) == (403, "wrong_host")


@pytest.mark.parametrize(
    "host",
    [
        onionName(good=False),  # forged: its checksum does not hold
        onionName(version=2),
        f"{INSTANCE}.onion",  # the id label under .onion is no onion service
        "other.localhost",  # another instance's name, as before
        "127.0.0.1",
    ],
    # Named, not shown: the made-up names are new at every collection, and
    # parallel workers must collect the same tests.
    ids=["forged-checksum", "version-2", "instance-id-onion", "other-instance", "address"],
)
def test_other_hosts_are_still_refused_where_onion_urls_are_taken(host: str) -> None:
    with pytest.raises(ReportError) as refused:
        checkInstanceURL(f"http://{host}/", INSTANCE, onion=True)
    assert (refused.value.status, refused.value.error) == (403, "wrong_host")


def test_an_instance_domain_url_is_still_taken_where_onion_urls_are() -> None:
    assert checkInstanceURL(f"http://{INSTANCE}.localhost:8080/", INSTANCE, onion=True)


def test_the_portal_takes_onion_urls_only_when_told_to() -> None:
    options = tap.Options()
    options.parseOptions(["--data-dir", "/nonexistent"])
    assert not options["onion-urls"]
    options = tap.Options()
    options.parseOptions(["--data-dir", "/nonexistent", "--onion-urls"])
    assert tap.makeService(options, reactor).onionURLs  # type: ignore[attr-defined]


# -- POST /reports/url, over HTTP --------------------------------------------------------------------


@dataclass
class Reporting:
    portal: Portal
    clock: Clock
    base: str
    instance: Any
    key: Any

    async def report(self, url: str) -> tuple[int, Any]:
        token = TokenSigner(self.key, clock=self.clock).sign(
            {"sub": self.instance.id, "url": url, "jti": secrets.token_urlsafe(16)}, audience=REPORT_AUDIENCE, lifetime=60
        )
        response = await treq.post(self.base + "/reports/url", data=token.encode(), headers={"Content-Type": "application/jwt"})
        return response.code, json.loads(await response.text())


@pytest_twisted.async_yield_fixture
async def reporting(tmp_path: Path) -> AsyncIterator[Reporting]:
    clock = Clock()
    clock.advance(1_800_000_000)
    store = await openStore(f"sqlite:///{tmp_path / 'portal.db'}", reactor, clock=clock)
    portal = Portal(store, KeyRing(tmp_path / "keys", issuer="http://portal.test", clock=clock), PortalConfig(publicURL="http://portal.test"), clock)
    alice = await store.createUser("alice")
    image = await store.createImage("Notes", "notes:latest", port=8888)
    key = generatePrivateKey()
    instance = await store.createInstance(alice.id, image.id, public_jwk=json.dumps(publicJWK(key)))
    instance = await store.updateInstance(instance.id, state="running")
    port = reactor.listenTCP(0, Site(portal.app.resource()), interface="127.0.0.1")
    try:
        yield Reporting(portal, clock, f"http://127.0.0.1:{port.getHost().port}", instance, key)
    finally:
        await port.stopListening()
        await store.close()


@pytest_twisted.ensureDeferred
async def test_a_portal_with_onion_urls_records_an_instances_onion_url(reporting: Reporting) -> None:
    reporting.portal.reports.onionURLs = True
    url = f"http://{onionName()}/"
    status, body = await reporting.report(url)
    assert (status, body["url"]) == (200, url), body
    assert (await reporting.portal.store.instanceById(reporting.instance.id)).url == url
    # A made-up name is refused, and the recorded URL stays.
    status, body = await reporting.report(f"http://{onionName(good=False)}/")
    assert (status, body["error"]) == (403, "wrong_host"), body
    assert (await reporting.portal.store.instanceById(reporting.instance.id)).url == url


@pytest_twisted.ensureDeferred
async def test_a_portal_without_onion_urls_refuses_them(reporting: Reporting) -> None:
    status, body = await reporting.report(f"http://{onionName()}/")
    assert (status, body["error"]) == (403, "wrong_host"), body
    assert (await reporting.portal.store.instanceById(reporting.instance.id)).url is None
