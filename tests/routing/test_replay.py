"""
The routing server's memory of spent token ids, and the token rules it
enforces at the handshake (docs/protocols.md section 2), on a ``Clock``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jwt
import pytest
import pytest_twisted
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from dit4c.common.keys import generatePrivateKey, jwks
from dit4c.common.tokens import StaticKeySource, TokenSigner, TokenVerifier
from dit4c.routing.errors import ReplayedToken, TooManyTokens
from dit4c.routing.replay import SeenTokens
from dit4c.routing.server import RoutingServer
from dit4c.tunnel.errors import HandshakeRefused

START = 1_700_000_000.0


@pytest.fixture
def clock() -> Clock:
    clock = Clock()
    clock.advance(START)
    return clock


# -- the memory ----------------------------------------------------------------------


def test_an_id_is_spent_once_per_instance(clock: Clock) -> None:
    seen = SeenTokens(clock)
    seen.spend("a", "j1", START + 60)
    with pytest.raises(ReplayedToken) as info:
        seen.spend("a", "j1", START + 60)
    assert info.value.reason == "token already used"
    # The same id from another instance is another token.
    seen.spend("b", "j1", START + 60)
    assert len(seen) == 2
    assert ("a", "j1") in seen and ("a", "j2") not in seen


def test_an_id_is_kept_until_its_time_then_pruned(clock: Clock) -> None:
    seen = SeenTokens(clock)
    seen.spend("a", "early", START + 10)
    seen.spend("a", "late", START + 100)
    clock.advance(9.9)
    with pytest.raises(ReplayedToken):
        seen.spend("a", "early", START + 10)
    clock.advance(0.1)
    assert seen.prune() == 1
    assert len(seen) == 1
    assert ("a", "early") not in seen and ("a", "late") in seen
    clock.advance(90)
    assert seen.prune() == 1
    assert len(seen) == 0


def test_a_token_past_its_time_is_not_remembered(clock: Clock) -> None:
    seen = SeenTokens(clock)
    seen.spend("a", "old", START)
    assert len(seen) == 0


def test_the_memory_is_bounded_and_refuses_rather_than_forgets(clock: Clock) -> None:
    seen = SeenTokens(clock, maxEntries=3, maxPerInstance=10)
    for i in range(3):
        seen.spend(f"i{i}", "j", START + 10 + i)
    with pytest.raises(TooManyTokens) as info:
        seen.spend("i9", "j", START + 60)
    assert "try again later" in info.value.reason
    # Nothing was recorded for the refused token, and every id kept is still refused.
    assert len(seen) == 3 and ("i9", "j") not in seen
    for i in range(3):
        with pytest.raises(ReplayedToken):
            seen.spend(f"i{i}", "j", START + 10 + i)
    # Once the first one's time is up there is room again.
    clock.advance(10)
    seen.spend("i9", "j", START + 60)
    assert len(seen) == 3


def test_one_instance_cannot_fill_the_memory(clock: Clock) -> None:
    seen = SeenTokens(clock, maxEntries=100, maxPerInstance=2)
    seen.spend("greedy", "1", START + 30)
    seen.spend("greedy", "2", START + 60)
    with pytest.raises(TooManyTokens) as info:
        seen.spend("greedy", "3", START + 60)
    assert "for this instance" in info.value.reason
    seen.spend("other", "1", START + 60)  # others are not held back
    clock.advance(30)
    seen.spend("greedy", "3", START + 60)


def test_entries_are_the_same_size_whatever_the_id(clock: Clock) -> None:
    """A long jti costs the memory no more than a short one."""
    seen = SeenTokens(clock)
    seen.spend("a", "x" * 255, START + 60)
    seen.spend("a", "y", START + 60)
    assert {len(k) for k in seen._until} == {16}


def test_bounds_must_be_positive(clock: Clock) -> None:
    with pytest.raises(ValueError):
        SeenTokens(clock, maxEntries=0)
    with pytest.raises(ValueError):
        SeenTokens(clock, maxPerInstance=0)


# -- the handshake's token rules ------------------------------------------------------------


class _Tunnel:
    """What ``authenticate`` reads of a tunnel: its peer."""

    def __init__(self) -> None:
        self.transport = StringTransport()


@dataclass
class Keyed:
    server: RoutingServer
    signer: TokenSigner

    def sign(self, lifetime: float = 60, **claims: Any) -> str:
        return self.signer.sign(dict({"sub": "inst", "jti": "j1"}, **claims), audience="dit4c-routing", lifetime=lifetime)

    async def refusal(self, token: str) -> str:
        with pytest.raises(HandshakeRefused) as info:
            await self.server.authenticate(token, _Tunnel())  # type: ignore[arg-type]
        return info.value.reason


@pytest.fixture
def keyed(clock: Clock) -> Keyed:
    key = generatePrivateKey()
    verifier = TokenVerifier(StaticKeySource(jwks(key)), audience="dit4c-routing", leeway=30, clock=clock)
    return Keyed(RoutingServer(clock, verifier, "localhost", maxTokenLifetime=300), TokenSigner(key, clock=clock))


@pytest_twisted.ensureDeferred
async def test_a_token_opens_one_tunnel_until_it_expires(keyed: Keyed, clock: Clock) -> None:
    server = keyed.server
    token = keyed.sign(lifetime=60)
    registration = await server.authenticate(token, _Tunnel())  # type: ignore[arg-type]
    assert registration["instance"] == "inst"
    # Replayed while it still verifies (up to exp + leeway): refused as used.
    clock.advance(89)
    assert await keyed.refusal(token) == "token already used"
    assert server.metrics.errors == {"tunnel_auth": 1, "tunnel_replay": 1}
    # After that it is refused as expired, and the memory has let it go.
    clock.advance(1)
    assert await keyed.refusal(token) == "token expired"
    server.seen.prune()
    assert len(server.seen) == 0


@pytest.mark.parametrize(
    "claims, lifetime, reason",
    [
        ({"jti": None}, 60, "missing jti claim"),
        ({"jti": ""}, 60, "bad jti claim"),
        ({"jti": 7}, 60, "bad jti claim"),
        ({"jti": "x" * 256}, 60, "bad jti claim"),
        ({}, 301, "token lifetime 301 s is longer than the 300 s allowed"),
        ({}, 10 * 365 * 86400, "token lifetime 3.1536e+08 s is longer than the 300 s allowed"),
    ],
    ids=["no-jti", "empty-jti", "number-jti", "long-jti", "301s", "ten-years"],
)
@pytest_twisted.ensureDeferred
async def test_tokens_without_jti_or_too_long_lived_are_refused(
    keyed: Keyed, claims: dict[str, Any], lifetime: float, reason: str
) -> None:
    claims = dict({"sub": "inst", "jti": "j1"}, **claims)
    token = keyed.signer.sign(
        {k: v for k, v in claims.items() if v is not None}, audience="dit4c-routing", lifetime=lifetime
    )
    assert await keyed.refusal(token) == reason
    # A refused token is not spent: nothing is remembered for it.
    assert len(keyed.server.seen) == 0


@pytest_twisted.ensureDeferred
async def test_a_token_whose_exp_is_before_its_iat_is_refused(keyed: Keyed, clock: Clock) -> None:
    now = int(clock.seconds())
    claims = {"sub": "inst", "jti": "j", "aud": "dit4c-routing", "iat": now + 20, "exp": now + 10}
    token = jwt.encode(claims, keyed.signer._key, algorithm="ES256", headers={"kid": keyed.signer.kid})
    assert await keyed.refusal(token) == "token lifetime is not positive (exp not after iat)"


@pytest_twisted.ensureDeferred
async def test_the_cap_is_the_servers_to_set(keyed: Keyed) -> None:
    keyed.server.maxTokenLifetime = 30
    assert await keyed.refusal(keyed.sign(lifetime=60)) == "token lifetime 60 s is longer than the 30 s allowed"
    registration = await keyed.server.authenticate(keyed.sign(lifetime=30, jti="j2"), _Tunnel())  # type: ignore[arg-type]
    assert registration["instance"] == "inst"
