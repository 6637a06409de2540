"""
Login throttling that cannot be turned against people: the portal on a
real loopback socket, people and attackers connecting from addresses of
their own (127.0.0.0/8), the portal's clock a test clock.

What is asserted: good logins never count; wrong passwords for a name from
many addresses never lock its owner out; failures from one address meet
growing delays (1 s, 2 s, 4 s ... after the free ones); ``X-Forwarded-For``
names the client only when it comes from a trusted proxy.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from portal_client import Browser, csrfOf, serve
from support.passwords import cheapHash
from twisted.internet import reactor
from twisted.internet.task import Clock

from dit4c.portal.app import Portal, PortalConfig
from dit4c.portal.keys import KeyRing
from dit4c.portal.security import TrustedProxies, doublingDelay
from dit4c.portal.store import openStore

PASSWORDS = {"alice": "correct horse battery", "bob": "bobs password!", "carol": "carols password!"}


@pytest_twisted.async_yield_fixture
async def portalWith(tmp_path: Path) -> Any:
    """``await portalWith(**config)``: a portal with alice, bob and carol, served on 127.0.0.1."""
    made: list[tuple[Any, Any]] = []
    hashes = {name: cheapHash(password) for name, password in PASSWORDS.items()}

    async def make(**config: Any) -> Portal:
        clock = Clock()
        clock.advance(1_800_000_000)
        store = await openStore(f"sqlite:///{tmp_path / f'portal{len(made)}.db'}", reactor, clock=clock)
        keys = KeyRing(tmp_path / f"keys{len(made)}", issuer="http://portal.test", clock=clock)
        portal = Portal(store, keys, PortalConfig(publicURL="http://portal.test", **config), clock)
        for name, hashed in hashes.items():
            await store.createUser(name, password_hash=hashed)
        made.append((serve(portal), store))
        return portal

    yield make
    for port, store in made:
        await port.stopListening()
        await store.close()


async def attempt(portal: Portal, name: str, password: str, source: str = "127.0.0.1", **headers: str) -> Any:
    """One login, from a fresh browser at ``source``: the response."""
    browser = Browser(portal, source=source, headers=headers)
    _, page = await browser.get("/login")
    response, _ = await browser.post(
        "/login", {"csrf": csrfOf(page), "username": name, "password": password, "next": "/"}
    )
    return response


def retryAfter(response: Any) -> int | None:
    values = response.headers.getRawHeaders("retry-after")
    return int(values[0]) if values else None


@pytest_twisted.ensureDeferred
async def test_good_logins_never_count(portalWith: Any) -> None:
    """Twelve good logins from one address, then a third person's good login there: all in."""
    portal = await portalWith()
    for i in range(12):
        name = ("alice", "bob")[i % 2]
        assert (await attempt(portal, name, PASSWORDS[name])).code == 303
    assert (await attempt(portal, "carol", PASSWORDS["carol"])).code == 303
    assert await portal.store.loginFailures(portal.throttle.keys("alice", "127.0.0.1")[0]) is None


@pytest_twisted.ensureDeferred
async def test_wrong_passwords_from_many_addresses_never_lock_the_owner_out(portalWith: Any) -> None:
    """Eleven wrong passwords for alice from eleven addresses, then alice's own: in, at once."""
    portal = await portalWith()
    for i in range(11):
        response = await attempt(portal, "alice", "wrong guess", source=f"127.0.0.{10 + i}")
        assert response.code == 401
    assert (await attempt(portal, "alice", PASSWORDS["alice"], source="127.0.0.1")).code == 303
    # Even from one of the attackers' addresses (one failure there, under its limits).
    assert (await attempt(portal, "alice", PASSWORDS["alice"], source="127.0.0.10")).code == 303
    # Admins too: the name is never what is throttled.
    for i in range(15):
        assert (await attempt(portal, "admin", "guess", source=f"127.0.1.{i + 1}")).code == 401


@pytest_twisted.ensureDeferred
async def test_failures_from_an_address_meet_growing_delays(portalWith: Any) -> None:
    """
    Ten failures from an address go back to back; then 1 s, 2 s, 4 s
    between attempts. Other addresses are not slowed, and everything is
    forgotten ``loginWindow`` seconds after the latest attempt.
    """
    portal = await portalWith()
    clock = portal.clock
    attacker = "127.0.0.66"
    for i in range(10):
        assert (await attempt(portal, f"name{i}", "wrong", source=attacker)).code == 401
    for delay in (1, 2, 4, 8):
        refused = await attempt(portal, "another", "wrong", source=attacker)
        assert refused.code == 429 and retryAfter(refused) == delay
        # Even the right password is not checked while the address waits.
        assert (await attempt(portal, "alice", PASSWORDS["alice"], source=attacker)).code == 429
        clock.advance(delay - 0.5)
        assert (await attempt(portal, "another", "wrong", source=attacker)).code == 429
        clock.advance(0.5)
        assert (await attempt(portal, "another", "wrong", source=attacker)).code == 401
        # Someone else, elsewhere, at the same time: straight in.
        assert (await attempt(portal, "bob", PASSWORDS["bob"], source="127.0.0.2")).code == 303
    clock.advance(portal.config.loginWindow)
    assert (await attempt(portal, "alice", PASSWORDS["alice"], source=attacker)).code == 303


@pytest_twisted.ensureDeferred
async def test_one_name_from_one_address_waits_sooner(portalWith: Any) -> None:
    """Three wrong passwords for alice from her address: then she waits 1 s, then is in."""
    portal = await portalWith()
    for _ in range(3):
        assert (await attempt(portal, "alice", "typo")).code == 401
    refused = await attempt(portal, "alice", PASSWORDS["alice"])
    assert refused.code == 429 and retryAfter(refused) == 1
    assert (await attempt(portal, "bob", PASSWORDS["bob"])).code == 303  # another name, same address
    portal.clock.advance(1)
    assert (await attempt(portal, "alice", PASSWORDS["alice"])).code == 303
    # Her success cleared her failures there.
    assert (await attempt(portal, "alice", "typo")).code == 401
    assert (await attempt(portal, "alice", PASSWORDS["alice"])).code == 303


@pytest_twisted.ensureDeferred
async def test_x_forwarded_for_names_the_client_only_from_a_trusted_proxy(portalWith: Any) -> None:
    """
    Behind a trusted proxy (127.0.0.1), each client is its own address: one
    attacker's failures do not slow the others, and what the attacker
    writes into X-Forwarded-For (to the left of what the proxy appended)
    changes nothing. From anywhere else, X-Forwarded-For is ignored.
    """
    portal = await portalWith(trustedProxies=("127.0.0.1",))
    attacker = "203.0.113.7"
    for i in range(10):
        response = await attempt(portal, f"n{i}", "wrong", **{"X-Forwarded-For": f"10.9.9.{i}, {attacker}"})
        assert response.code == 401
    assert (await attempt(portal, "x", "wrong", **{"X-Forwarded-For": attacker})).code == 429
    assert (await attempt(portal, "x", "wrong", **{"X-Forwarded-For": f"1.2.3.4, {attacker}"})).code == 429
    # The proxy's other clients, and two proxies deep, are themselves.
    assert (await attempt(portal, "bob", PASSWORDS["bob"], **{"X-Forwarded-For": "198.51.100.1"})).code == 303
    both = {"X-Forwarded-For": "198.51.100.2, 127.0.0.1"}
    assert (await attempt(portal, "carol", PASSWORDS["carol"], **both)).code == 303

    # An untrusted peer's X-Forwarded-For is ignored: its failures are its own.
    for i in range(10):
        response = await attempt(portal, f"m{i}", "wrong", source="127.0.0.9", **{"X-Forwarded-For": f"192.0.2.{i}"})
        assert response.code == 401
    fresh = {"X-Forwarded-For": "192.0.2.200"}
    assert (await attempt(portal, "alice", PASSWORDS["alice"], source="127.0.0.9", **fresh)).code == 429

    # Without a trusted proxy, the header is ignored from everyone.
    plain = await portalWith()
    for i in range(10):
        response = await attempt(plain, f"n{i}", "wrong", **{"X-Forwarded-For": f"192.0.2.{i}"})
        assert response.code == 401
    assert (await attempt(plain, "alice", PASSWORDS["alice"], **{"X-Forwarded-For": "192.0.2.99"})).code == 429


# -- the rules, without a server -----------------------------------------------------------------------


def test_delays_double_up_to_the_most() -> None:
    delay = doublingDelay(3, 1.0, 900.0)
    assert [delay(n) for n in range(16)] == [0, 0, 0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 900, 900, 900]
    assert delay(10**9) == 900.0


class _Peer:
    def __init__(self, host: str | None) -> None:
        if host is not None:
            self.host = host


class _Request:
    def __init__(self, peer: str | None, *forwarded: str) -> None:
        from twisted.web.http_headers import Headers

        self.peer = _Peer(peer)
        self.requestHeaders = Headers({b"x-forwarded-for": [f.encode() for f in forwarded]} if forwarded else {})

    def getClientAddress(self) -> _Peer:
        return self.peer


@pytest.mark.parametrize(
    "trusted, peer, forwarded, client",
    [
        ((), "10.1.1.1", ["6.6.6.6"], "10.1.1.1"),
        (("10.0.0.0/8",), "10.1.1.1", ["6.6.6.6, 192.0.2.1"], "192.0.2.1"),
        (("10.0.0.0/8",), "10.1.1.1", ["192.0.2.1, 10.2.2.2"], "192.0.2.1"),
        (("10.0.0.0/8",), "10.1.1.1", ["192.0.2.1", "10.2.2.2"], "192.0.2.1"),  # two header lines
        (("10.0.0.0/8",), "10.1.1.1", ["10.3.3.3, 10.2.2.2"], "10.3.3.3"),  # all trusted: the leftmost
        (("10.0.0.0/8",), "10.1.1.1", [], "10.1.1.1"),
        (("10.0.0.0/8",), "10.1.1.1", ["not-an-address, 10.2.2.2"], "10.2.2.2"),
        (("10.0.0.0/8",), "10.1.1.1", ["[2001:db8::1]:4711"], "2001:db8::1"),
        (("10.0.0.0/8",), "10.1.1.1", ["192.0.2.1:4711"], "192.0.2.1"),
        (("::1",), "::ffff:127.0.0.1", ["192.0.2.1"], "127.0.0.1"),  # a mapped v4 peer is v4
        (("unix",), None, ["192.0.2.1"], "192.0.2.1"),
        ((), None, ["192.0.2.1"], "unix"),
    ],
)
def test_the_client_behind_trusted_proxies(
    trusted: tuple[str, ...], peer: str | None, forwarded: list[str], client: str
) -> None:
    assert TrustedProxies(trusted).clientAddress(_Request(peer, *forwarded)) == client


def test_ipv6_clients_are_throttled_by_their_64() -> None:
    from dit4c.portal.security import LoginThrottle

    a, _ = LoginThrottle.keys("alice", "2001:db8:1:2::1")
    b, _ = LoginThrottle.keys("alice", "2001:db8:1:2:ffff::9")
    c, _ = LoginThrottle.keys("alice", "2001:db8:1:3::1")
    assert a == b != c
    _, name = LoginThrottle.keys("my password by mistake", "192.0.2.1")
    assert name is not None and "password" not in name


@pytest_twisted.ensureDeferred
async def test_a_password_typed_as_the_name_is_not_logged(portalWith: Any) -> None:
    from twisted.logger import formatEvent, globalLogPublisher

    portal = await portalWith()
    logged: list[str] = []

    def observe(event: dict[str, Any]) -> None:
        logged.append(formatEvent(event))

    globalLogPublisher.addObserver(observe)
    try:
        for _ in range(4):
            await attempt(portal, "Tr0ub4dor&3 secret", "x")
        assert (await attempt(portal, "alice", "wrong")).code == 401
    finally:
        globalLogPublisher.removeObserver(observe)
    assert not [line for line in logged if "tr0ub4dor" in line.lower()]
    assert [line for line in logged if "failed login for alice from 127.0.0.1" in line]
    # Counted all the same, under its hash (names are compared in lower case).
    assert await portal.store.loginFailures(portal.throttle.keys("tr0ub4dor&3 secret", "127.0.0.1")[1]) is not None
