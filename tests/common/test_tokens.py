"""
Tests for dit4c.common.tokens: signing, verifying and finding keys.

Everything about time runs on ``twisted.internet.task.Clock``. The
``JWKSKeySource`` tests talk to a real twisted.web server on loopback, with a
separate ``Clock`` deciding cache age so that ``min_refetch`` is testable.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, cast

import jwt
import pytest
import pytest_twisted
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support.sockets import refusedPort
from support.waiting import eventually
from treq.client import HTTPClient
from twisted.internet.defer import CancelledError, Deferred, gatherResults, maybeDeferred
from twisted.internet.interfaces import IListeningPort
from twisted.internet.task import Clock
from twisted.logger import ILogObserver, formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site
from zope.interface import implementer
from zope.interface.verify import verifyObject

from dit4c.common.errors import InvalidToken
from dit4c.common.keys import generatePrivateKey, jwks, keyID, publicJWK, savePrivateKey
from dit4c.common.tokens import (
    ALGORITHMS,
    INSTANCE_ID_RE,
    MAX_TOKEN_LENGTH,
    ROUTING_AUDIENCE,
    IKeySource,
    JWKSKeySource,
    StaticKeySource,
    TokenSigner,
    TokenVerifier,
    checkInstanceID,
    checkLifetime,
    checkTokenID,
    parseJWKS,
)

NOW = 1_700_000_000.0
LIFETIME = 300.0
LEEWAY = 30.0

# One key of each type for the whole module: key generation is the slow part.
KEY = generatePrivateKey()
OTHER = generatePrivateKey()
ED_KEY = Ed25519PrivateKey.generate()


# -- helpers -----------------------------------------------------------------


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64json(value: object) -> str:
    return b64url(json.dumps(value).encode("utf-8"))


def fired(d: Deferred[Any]) -> object:
    """The result (value or Failure) of a Deferred that must already have fired."""
    results: list[object] = []
    d.addBoth(results.append)
    assert results, "the Deferred did not fire synchronously"
    return results[0]


def claimsOf(d: Deferred[dict[str, Any]]) -> dict[str, Any]:
    result = fired(d)
    if isinstance(result, Failure):
        result.raiseException()
    assert isinstance(result, dict)
    return result


def refusal(d: Deferred[Any]) -> str:
    """The reason an already-fired verify refused; fails on any other outcome."""
    result = fired(d)
    assert isinstance(result, Failure), f"token was accepted: {result!r}"
    assert result.check(InvalidToken), result.getTraceback()
    return str(result.value)


def outcome(d: Deferred[dict[str, Any]]) -> Deferred[dict[str, Any] | str]:
    """Claims, or the InvalidToken reason; any other failure stays a failure."""

    def refused(failure: Failure) -> str:
        failure.trap(InvalidToken)
        return str(failure.value)

    return d.addErrback(refused)


@pytest.fixture
def clock() -> Clock:
    clock = Clock()
    clock.advance(NOW)
    return clock


@pytest.fixture
def signer(clock: Clock) -> TokenSigner:
    return TokenSigner(KEY, issuer="https://portal.example", clock=clock)


@pytest.fixture
def verifier(clock: Clock) -> TokenVerifier:
    return TokenVerifier(
        StaticKeySource.fromKeys(KEY, ED_KEY),
        audience=ROUTING_AUDIENCE,
        issuer="https://portal.example",
        leeway=LEEWAY,
        clock=clock,
    )


def sign(signer: TokenSigner, sub: str = "abc123", **claims: Any) -> str:
    return signer.sign({"sub": sub, **claims}, audience=ROUTING_AUDIENCE, lifetime=LIFETIME)


def handMade(header: dict[str, Any], payload: dict[str, Any], signature: bytes = b"") -> str:
    return f"{b64json(header)}.{b64json(payload)}.{b64url(signature)}"


def goodPayload(**extra: Any) -> dict[str, Any]:
    return {
        "sub": "abc123",
        "aud": ROUTING_AUDIENCE,
        "iss": "https://portal.example",
        "iat": int(NOW),
        "exp": int(NOW + LIFETIME),
        **extra,
    }


# -- signing and the happy path ----------------------------------------------


def test_valid_token(signer: TokenSigner, verifier: TokenVerifier) -> None:
    token = sign(signer, role="owner")
    claims = claimsOf(verifier.verify(token))
    assert claims["sub"] == "abc123"
    assert claims["role"] == "owner"
    assert claims["aud"] == ROUTING_AUDIENCE
    assert claims["iss"] == "https://portal.example"
    assert claims["iat"] == int(NOW)
    assert claims["exp"] == int(NOW + LIFETIME)


def test_header(signer: TokenSigner) -> None:
    header = jwt.get_unverified_header(sign(signer))
    assert header["alg"] == "ES256"
    assert header["kid"] == keyID(KEY.public_key())
    assert signer.kid == keyID(KEY.public_key())


def test_bytes_token(signer: TokenSigner, verifier: TokenVerifier) -> None:
    assert claimsOf(verifier.verify(sign(signer).encode("ascii")))["sub"] == "abc123"


def test_ed25519(clock: Clock, verifier: TokenVerifier) -> None:
    signer = TokenSigner(ED_KEY, issuer="https://portal.example", clock=clock)
    token = sign(signer)
    assert jwt.get_unverified_header(token)["alg"] == "EdDSA"
    assert claimsOf(verifier.verify(token))["sub"] == "abc123"


def test_signer_sets_times_itself(signer: TokenSigner, verifier: TokenVerifier) -> None:
    """Claims cannot smuggle in a later expiry or another audience."""
    token = signer.sign(
        {"sub": "abc123", "exp": int(NOW) + 10**6, "aud": "other"},
        audience=ROUTING_AUDIENCE,
        lifetime=LIFETIME,
    )
    claims = claimsOf(verifier.verify(token))
    assert claims["exp"] == int(NOW + LIFETIME)
    assert claims["aud"] == ROUTING_AUDIENCE


def test_signer_explicit_kid_and_no_issuer(clock: Clock) -> None:
    signer = TokenSigner(KEY, kid="portal-2024", clock=clock)
    token = signer.sign({}, audience="x", lifetime=1)
    assert jwt.get_unverified_header(token)["kid"] == "portal-2024"
    assert "iss" not in jwt.decode(token, options={"verify_signature": False})


@pytest.mark.parametrize("lifetime", [0, -1, float("nan")])
def test_signer_refuses_non_positive_lifetime(signer: TokenSigner, lifetime: float) -> None:
    with pytest.raises(ValueError):
        signer.sign({}, audience="x", lifetime=lifetime)


def test_signer_default_clock_is_wall_time() -> None:
    token = TokenSigner(KEY).sign({}, audience="x", lifetime=60)
    claims = jwt.decode(token, options={"verify_signature": False})
    assert abs(claims["iat"] - time.time()) < 5


def test_verifier_default_clock_is_wall_time() -> None:
    token = TokenSigner(KEY).sign({}, audience="x", lifetime=60)
    verifier = TokenVerifier(StaticKeySource.fromKeys(KEY), audience="x")
    assert claimsOf(verifier.verify(token))["aud"] == "x"


# -- refusals ------------------------------------------------------------------


def test_forged_same_kid(clock: Clock, verifier: TokenVerifier) -> None:
    forger = TokenSigner(
        OTHER, kid=keyID(KEY.public_key()), issuer="https://portal.example", clock=clock
    )
    assert refusal(verifier.verify(sign(forger))) == "bad signature"


def test_tampered_payload(signer: TokenSigner, verifier: TokenVerifier) -> None:
    header, _, signature = sign(signer).split(".")
    forged = f"{header}.{b64json(goodPayload(sub='victim'))}.{signature}"
    assert refusal(verifier.verify(forged)) == "bad signature"


def test_expired(clock: Clock, signer: TokenSigner, verifier: TokenVerifier) -> None:
    token = sign(signer)
    clock.advance(LIFETIME + LEEWAY - 1)
    claimsOf(verifier.verify(token))  # still inside the leeway
    clock.advance(2)
    assert refusal(verifier.verify(token)) == "token expired"


def test_not_yet_valid_iat(clock: Clock, verifier: TokenVerifier) -> None:
    future = Clock()
    future.advance(NOW + LEEWAY + 60)
    early = TokenSigner(KEY, issuer="https://portal.example", clock=future)
    assert refusal(verifier.verify(sign(early))) == "token not yet valid"
    clock.advance(60)
    claimsOf(verifier.verify(sign(early)))


def test_slightly_future_iat_within_leeway(verifier: TokenVerifier) -> None:
    future = Clock()
    future.advance(NOW + LEEWAY - 5)
    early = TokenSigner(KEY, issuer="https://portal.example", clock=future)
    claimsOf(verifier.verify(sign(early)))


def test_not_yet_valid_nbf(signer: TokenSigner, verifier: TokenVerifier) -> None:
    token = sign(signer, nbf=int(NOW + LEEWAY + 60))
    assert refusal(verifier.verify(token)) == "token not yet valid"


def test_wrong_audience(clock: Clock, signer: TokenSigner) -> None:
    verifier = TokenVerifier(StaticKeySource.fromKeys(KEY), audience="dit4c-other", clock=clock)
    assert refusal(verifier.verify(sign(signer))) == "wrong audience"


def test_wrong_issuer(clock: Clock, signer: TokenSigner) -> None:
    verifier = TokenVerifier(
        StaticKeySource.fromKeys(KEY),
        audience=ROUTING_AUDIENCE,
        issuer="https://evil.example",
        clock=clock,
    )
    assert refusal(verifier.verify(sign(signer))) == "wrong issuer"


def test_missing_issuer_when_required(clock: Clock, verifier: TokenVerifier) -> None:
    unnamed = TokenSigner(KEY, clock=clock)
    assert refusal(verifier.verify(sign(unnamed))) == "missing iss claim"


def test_issuer_not_checked_when_unset(clock: Clock, signer: TokenSigner) -> None:
    verifier = TokenVerifier(StaticKeySource.fromKeys(KEY), audience=ROUTING_AUDIENCE, clock=clock)
    claimsOf(verifier.verify(sign(signer)))


@pytest.mark.parametrize("claim", ["exp", "iat", "aud"])
def test_missing_required_claim(verifier: TokenVerifier, claim: str) -> None:
    payload = goodPayload()
    del payload[claim]
    token = jwt.encode(payload, KEY, algorithm="ES256", headers={"kid": keyID(KEY)})
    assert refusal(verifier.verify(token)) == f"missing {claim} claim"


@pytest.mark.parametrize(
    "value", ["tomorrow", None, True, [1], {"a": 1}, float("inf"), float("nan")]
)
def test_bad_exp_type(verifier: TokenVerifier, value: object) -> None:
    token = jwt.encode(goodPayload(exp=value), KEY, algorithm="ES256", headers={"kid": keyID(KEY)})
    assert refusal(verifier.verify(token)) in {"bad exp claim", "missing exp claim"}


def test_huge_exp_is_fine(verifier: TokenVerifier) -> None:
    token = jwt.encode(
        goodPayload(exp=10**400), KEY, algorithm="ES256", headers={"kid": keyID(KEY)}
    )
    claimsOf(verifier.verify(token))


@pytest.mark.parametrize(
    "header",
    [
        {"alg": "none"},
        {"alg": "none", "typ": "JWT"},
        {"alg": "none", "kid": keyID(KEY)},
        {"alg": "None", "kid": keyID(KEY)},
        {"alg": "NONE", "kid": keyID(KEY)},
        {"kid": keyID(KEY)},
        {"alg": "", "kid": keyID(KEY)},
        {"alg": None, "kid": keyID(KEY)},
        {"alg": ["ES256"], "kid": keyID(KEY)},
    ],
)
def test_alg_none(verifier: TokenVerifier, header: dict[str, Any]) -> None:
    token = handMade(header, goodPayload())
    assert refusal(verifier.verify(token)) == "algorithm not allowed"


def test_alg_none_with_copied_signature(signer: TokenSigner, verifier: TokenVerifier) -> None:
    signature = sign(signer).split(".")[2]
    token = f"{b64json({'alg': 'none', 'kid': signer.kid})}.{b64json(goodPayload())}.{signature}"
    assert refusal(verifier.verify(token)) == "algorithm not allowed"


def publicPEM(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


@pytest.mark.parametrize("alg,digest", [("HS256", hashlib.sha256), ("HS512", hashlib.sha512)])
@pytest.mark.parametrize(
    "secret",
    [
        pytest.param(publicPEM(KEY), id="pem"),
        pytest.param(json.dumps(publicJWK(KEY)).encode(), id="jwk"),
        pytest.param(publicPEM(KEY).strip(), id="pem-stripped"),
    ],
)
def test_hmac_key_confusion(verifier: TokenVerifier, alg: str, digest: Any, secret: bytes) -> None:
    """The classic attack: HMAC with the (public) verification key as secret."""
    signingInput = (
        f"{b64json({'alg': alg, 'typ': 'JWT', 'kid': keyID(KEY)})}.{b64json(goodPayload())}"
    )
    signature = hmac.new(secret, signingInput.encode("ascii"), digest).digest()
    token = f"{signingInput}.{b64url(signature)}"
    assert refusal(verifier.verify(token)) == "algorithm not allowed"


def test_alg_must_match_key_type(clock: Clock, verifier: TokenVerifier) -> None:
    """An EdDSA header naming the EC key's kid is refused before any crypto."""
    confused = TokenSigner(
        ED_KEY, kid=keyID(KEY.public_key()), issuer="https://portal.example", clock=clock
    )
    assert refusal(verifier.verify(sign(confused))) == "algorithm does not match key"


@pytest.mark.parametrize("alg", ["RS256", "PS256", "ES384", "ES512", "ES256K", "HS384"])
def test_other_algorithms_refused(verifier: TokenVerifier, alg: str) -> None:
    token = handMade({"alg": alg, "kid": keyID(KEY)}, goodPayload(), b"\x00" * 64)
    assert refusal(verifier.verify(token)) == "algorithm not allowed"


def test_pinned_subset(clock: Clock) -> None:
    verifier = TokenVerifier(
        StaticKeySource.fromKeys(KEY, ED_KEY),
        audience=ROUTING_AUDIENCE,
        clock=clock,
        algorithms=("ES256",),
    )
    token = sign(TokenSigner(ED_KEY, clock=clock))
    assert refusal(verifier.verify(token)) == "algorithm not allowed"


@pytest.mark.parametrize("algorithms", [(), ("HS256",), ("ES256", "none"), ("RS256",)])
def test_verifier_refuses_unpinned_algorithms(algorithms: tuple[str, ...]) -> None:
    with pytest.raises(ValueError):
        TokenVerifier(StaticKeySource.fromKeys(KEY), audience="x", algorithms=algorithms)


def test_unknown_kid(clock: Clock, verifier: TokenVerifier) -> None:
    stranger = TokenSigner(OTHER, issuer="https://portal.example", clock=clock)
    assert refusal(verifier.verify(sign(stranger))).startswith("unknown key")


def test_no_kid_single_key(clock: Clock) -> None:
    verifier = TokenVerifier(StaticKeySource.fromKeys(KEY), audience="x", clock=clock)
    token = jwt.encode({"aud": "x", "iat": int(NOW), "exp": int(NOW) + 60}, KEY, algorithm="ES256")
    assert "kid" not in jwt.get_unverified_header(token)
    claimsOf(verifier.verify(token))


def test_no_kid_several_keys(verifier: TokenVerifier) -> None:
    token = jwt.encode(goodPayload(), KEY, algorithm="ES256")
    assert refusal(verifier.verify(token)).startswith("unknown key")


def partyVerifier(clock: Clock, **options: Any) -> TokenVerifier:
    """A verifier over a JWKS like the portal's: its own key, an instance's and a scheduler's."""
    document = {
        "keys": [
            publicJWK(KEY),
            publicJWK(ED_KEY, kid="instance:abc123"),
            publicJWK(OTHER, kid="scheduler:hpc"),
        ]
    }
    return TokenVerifier(StaticKeySource(document), audience=ROUTING_AUDIENCE, clock=clock, **options)


def test_instance_key_signs_for_itself(clock: Clock) -> None:
    own = TokenSigner(ED_KEY, kid="instance:abc123", clock=clock)
    assert claimsOf(partyVerifier(clock).verify(sign(own, "abc123")))["sub"] == "abc123"


def test_instance_key_cannot_sign_for_another(clock: Clock) -> None:
    """An instance's key is published beside the portal's; it must not take another instance's name."""
    own = TokenSigner(ED_KEY, kid="instance:abc123", clock=clock)
    assert refusal(partyVerifier(clock).verify(sign(own, "victim"))) == "the instance key of abc123 signs only for abc123"


def test_scheduler_key_refused_unless_allowed(clock: Clock) -> None:
    scheduler = TokenSigner(OTHER, kid="scheduler:hpc", clock=clock)
    assert refusal(partyVerifier(clock).verify(sign(scheduler, "hpc"))) == "scheduler keys may not sign this token"
    allowed = partyVerifier(clock, scopedKeys=("scheduler",))
    assert claimsOf(allowed.verify(sign(scheduler, "hpc")))["sub"] == "hpc"


def test_portal_key_signs_for_anyone(clock: Clock) -> None:
    portal = TokenSigner(KEY, clock=clock)
    assert claimsOf(partyVerifier(clock).verify(sign(portal, "any-instance")))["sub"] == "any-instance"


def test_non_string_kid(verifier: TokenVerifier) -> None:
    token = handMade({"alg": "ES256", "kid": 7}, goodPayload(), b"\x00" * 64)
    assert refusal(verifier.verify(token)) == "invalid token"


GARBAGE = [
    "",
    ".",
    "..",
    "...",
    "a",
    "a.b",
    "a.b.c",
    "a.b.c.d",
    "a.b.c.d.e",
    "!!!.###.$$$",
    "eyJ.eyJ.eyJ",
    "====.====.====",
    f"{b64url(b'not json')}.{b64json({})}.",
    f"{b64json([1, 2])}.{b64json({})}.",
    f"{b64json('ES256')}.{b64json({})}.",
    f"{b64json({'alg': 'ES256', 'kid': keyID(KEY)})}.{b64url(b'not json')}.AAAA",
    f"{b64json({'alg': 'ES256', 'kid': keyID(KEY)})}.{b64json([1])}.AAAA",
    f"{b64json({'alg': 'ES256', 'kid': keyID(KEY)})}.{b64json(goodPayload())}.",
    f"{b64json({'alg': 'ES256', 'kid': keyID(KEY)})}.{b64json(goodPayload())}.!!",
    f"{b64json({'alg': 'ES256', 'crit': ['exp'], 'kid': keyID(KEY)})}.{b64json(goodPayload())}.AAAA",
    f"{b64json({'alg': 'ES256', 'b64': False, 'kid': keyID(KEY)})}.{b64json(goodPayload())}.AAAA",
    "x" * (MAX_TOKEN_LENGTH + 1),
    "é.é.é",
    "\x00.\x00.\x00",
    " " + "a.b.c",
]


@pytest.mark.parametrize("token", GARBAGE)
def test_garbage_strings(verifier: TokenVerifier, token: str) -> None:
    refusal(verifier.verify(token))


@pytest.mark.parametrize("token", [None, 42, ["a.b.c"], b"\xff\xfe.a.b", object()])
def test_garbage_types(verifier: TokenVerifier, token: Any) -> None:
    assert refusal(verifier.verify(token)) == "malformed token"


def test_refusal_never_quotes_token(signer: TokenSigner, verifier: TokenVerifier) -> None:
    header, payload, signature = sign(signer).split(".")
    for token in [f"{header}.{payload}.{signature[:-4]}AAAA", f"{header}.{payload}", header]:
        reason = refusal(verifier.verify(token))
        for part in (header, payload, signature):
            assert part[:8] not in reason


# -- property tests --------------------------------------------------------------

B64URL = st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_=")
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
CLAIMS = st.dictionaries(
    st.sampled_from(["sub", "aud", "iss", "iat", "exp", "nbf", "jti", "x"]) | st.text(max_size=5),
    JSON,
    max_size=8,
)
HEADERS = st.dictionaries(
    st.sampled_from(["alg", "kid", "typ", "crit", "b64", "jku", "x5u"]),
    JSON | st.sampled_from(["ES256", "EdDSA", "none", "HS256", keyID(KEY)]),
    max_size=5,
)


def refusesOrAccepts(verifier: TokenVerifier, token: Any) -> None:
    result = fired(verifier.verify(token))
    if isinstance(result, Failure):
        assert result.check(InvalidToken), result.getTraceback()
        assert isinstance(str(result.value), str)
    else:
        assert isinstance(result, dict)


@pytest.fixture(autouse=True)
def noUnexpectedErrors() -> Iterator[list[dict[str, Any]]]:
    """
    Fail a test in which the verifier met an exception it did not expect:
    it still refuses (fails closed), but such a path is a bug to fix.
    """
    events: list[dict[str, Any]] = []

    def observe(event: dict[str, Any]) -> None:
        if str(event.get("log_format", "")).startswith("unexpected"):
            events.append(event)

    observer = cast(ILogObserver, observe)
    globalLogPublisher.addObserver(observer)
    try:
        yield events
    finally:
        globalLogPublisher.removeObserver(observer)
    assert not events, [formatEvent(e) for e in events]


PROPERTY_SETTINGS = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@PROPERTY_SETTINGS
@given(st.text() | st.binary())
def test_random_tokens(verifier: TokenVerifier, token: str | bytes) -> None:
    refusesOrAccepts(verifier, token)


@PROPERTY_SETTINGS
@given(st.lists(B64URL, min_size=1, max_size=5).map(".".join))
def test_random_segments(verifier: TokenVerifier, token: str) -> None:
    refusesOrAccepts(verifier, token)


@PROPERTY_SETTINGS
@given(HEADERS, CLAIMS, st.binary(max_size=80))
def test_random_headers(
    verifier: TokenVerifier, header: dict[str, Any], claims: dict[str, Any], signature: bytes
) -> None:
    result = fired(verifier.verify(handMade(header, claims, signature)))
    assert isinstance(result, Failure) and result.check(InvalidToken), result


@PROPERTY_SETTINGS
@given(CLAIMS)
def test_random_signed_claims(verifier: TokenVerifier, claims: dict[str, Any]) -> None:
    """Correctly signed but arbitrary claims: accepted or InvalidToken, nothing else."""
    # PyJWS signs any bytes; PyJWT.encode would refuse some claim values.
    payload = json.dumps(claims).encode("utf-8")
    token = jwt.PyJWS().encode(payload, KEY, algorithm="ES256", headers={"kid": keyID(KEY)})
    refusesOrAccepts(verifier, token)


@PROPERTY_SETTINGS
@given(JSON)
def test_random_signed_payloads(verifier: TokenVerifier, payload: object) -> None:
    """Correctly signed payloads that need not even be objects."""
    data = json.dumps(payload).encode("utf-8")
    token = jwt.PyJWS().encode(data, KEY, algorithm="ES256", headers={"kid": keyID(KEY)})
    result = fired(verifier.verify(token))
    assert isinstance(result, Failure) and result.check(InvalidToken), result


@implementer(IKeySource)
class BrokenKeySource:
    def getKey(self, kid: str | None) -> Deferred[Any]:
        raise RuntimeError(f"boom {kid}")


def test_unexpected_error_fails_closed(
    signer: TokenSigner, noUnexpectedErrors: list[dict[str, Any]]
) -> None:
    verifier = TokenVerifier(BrokenKeySource(), audience=ROUTING_AUDIENCE)
    token = sign(signer)
    assert refusal(verifier.verify(token)) == "malformed token"
    logged = [formatEvent(e) for e in noUnexpectedErrors]
    assert logged == ["unexpected RuntimeError while verifying a token"]
    noUnexpectedErrors.clear()


# -- instance ids -------------------------------------------------------------------


@pytest.mark.parametrize("value", ["a", "0", "abc-123", "a" * 63, "01hqz6y4d7-x"])
def test_instance_id_valid(value: str) -> None:
    assert checkInstanceID(value) == value
    assert INSTANCE_ID_RE.fullmatch(value)


@pytest.mark.parametrize(
    "value",
    ["", "-a", "a-", "A", "aB", "a" * 64, "a.b", "a_b", "a\n", "a b", "é", None, 5, b"abc"],
)
def test_instance_id_invalid(value: object) -> None:
    with pytest.raises(InvalidToken, match="bad instance id"):
        checkInstanceID(value)


# -- token ids and lifetimes ----------------------------------------------------------


@pytest.mark.parametrize("value", ["j", "x" * 255, "Zk3-_9"])
def test_token_id_valid(value: str) -> None:
    assert checkTokenID({"jti": value}) == value


@pytest.mark.parametrize(
    "claims, reason",
    [({}, "missing jti claim"), ({"jti": ""}, "bad jti claim"), ({"jti": "x" * 256}, "bad jti claim"),
     ({"jti": 5}, "bad jti claim"), ({"jti": ["a"]}, "bad jti claim")],
)  # fmt: skip
def test_token_id_invalid(claims: dict[str, Any], reason: str) -> None:
    with pytest.raises(InvalidToken) as info:
        checkTokenID(claims)
    assert info.value.reason == reason


def test_a_jti_that_is_no_string_is_refused_as_such(verifier: TokenVerifier, signer: TokenSigner) -> None:
    result = fired(outcome(verifier.verify(sign(signer, jti=5))))
    if isinstance(result, dict):  # PyJWT before 2.10 does not look at jti
        with pytest.raises(InvalidToken, match="bad jti claim"):
            checkTokenID(result)
    else:
        assert result == "bad jti claim"


@pytest.mark.parametrize("iat, exp, lifetime", [(NOW, NOW + 300, 300.0), (NOW, NOW + 0.5, 0.5), (0, 1, 1.0)])
def test_lifetime_within_the_cap(iat: float, exp: float, lifetime: float) -> None:
    assert checkLifetime({"iat": iat, "exp": exp}, 300) == lifetime


@pytest.mark.parametrize(
    "claims, reason",
    [
        ({"iat": NOW, "exp": NOW + 301}, "token lifetime 301 s is longer than the 300 s allowed"),
        ({"iat": NOW, "exp": NOW + 10 * 365 * 86400}, "token lifetime 3.1536e+08 s is longer than the 300 s allowed"),
        ({"iat": 0, "exp": 10**400}, "token lifetime inf s is longer than the 300 s allowed"),
        ({"iat": 1.5, "exp": 10**400}, "token lifetime inf s is longer than the 300 s allowed"),
        ({"iat": NOW, "exp": NOW}, "token lifetime is not positive (exp not after iat)"),
        ({"iat": NOW, "exp": NOW - 5}, "token lifetime is not positive (exp not after iat)"),
        ({"iat": "now", "exp": NOW}, "bad iat claim"),
        ({"iat": NOW, "exp": float("nan")}, "bad exp claim"),
    ],
    ids=["301s", "ten-years", "huge-int", "huge-int-float", "zero", "negative", "string", "nan"],
)
def test_lifetime_refused(claims: dict[str, Any], reason: str) -> None:
    with pytest.raises(InvalidToken) as info:
        checkLifetime(claims, 300)
    assert info.value.reason == reason


def test_the_leeway_is_public(verifier: TokenVerifier, signer: TokenSigner, clock: Clock) -> None:
    """A token verifies until ``exp + leeway``: what a memory of spent ids must cover."""
    token = sign(signer)
    assert verifier.leeway == LEEWAY
    clock.advance(LIFETIME + verifier.leeway - 0.001)
    claimsOf(verifier.verify(token))
    clock.advance(0.001)
    assert refusal(verifier.verify(token)) == "token expired"


# -- static keys ---------------------------------------------------------------------


def test_static_source_provides_interface() -> None:
    assert verifyObject(IKeySource, StaticKeySource.fromKeys(KEY))


def test_algorithms_pinned() -> None:
    assert ALGORITHMS == ("ES256", "EdDSA")


def test_from_file_variants(tmp_path: Path, signer: TokenSigner, clock: Clock) -> None:
    private = tmp_path / "key.pem"
    savePrivateKey(KEY, private)
    public = tmp_path / "key.pub"
    public.write_bytes(publicPEM(KEY))
    document = tmp_path / "jwks.json"
    document.write_text(json.dumps(jwks(KEY, ED_KEY)))
    single = tmp_path / "jwk.json"
    single.write_text(json.dumps(publicJWK(KEY)))
    token = sign(signer)
    for path in (private, public, document, single):
        verifier = TokenVerifier(
            StaticKeySource.fromFile(path), audience=ROUTING_AUDIENCE, clock=clock
        )
        assert claimsOf(verifier.verify(token))["sub"] == "abc123", path


@pytest.mark.parametrize(
    "content", [b"", b"hello", b"{}", b'{"keys": []}', b'{"keys": "x"}', b"{nope"]
)
def test_from_file_refuses(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "bad"
    path.write_bytes(content)
    with pytest.raises(ValueError):  # KeyFileError is a ValueError
        StaticKeySource.fromFile(path)


def test_parse_jwks_skips_unusable_keys() -> None:
    good = publicJWK(KEY)
    ed = publicJWK(ED_KEY)
    p384 = ec.generate_private_key(ec.SECP384R1())
    p384jwk = jwt.algorithms.ECAlgorithm.to_jwk(p384.public_key(), as_dict=True)
    document = {
        "keys": [
            "not a key",
            {"kty": "oct", "k": b64url(b"secret"), "kid": "hmac"},
            {**p384jwk, "kid": "p384"},
            {**good, "alg": "HS256", "kid": "lying-alg"},
            {**good, "use": "enc", "kid": "encryption"},
            {**good, "x": "AAAA", "kid": "bad-point"},
            {**good, "kid": 5},
            {"kty": ["EC"], "crv": "P-256"},
            good,
            {**good, "kid": good["kid"], "x": ed["x"]},  # duplicate kid: first wins
            {k: v for k, v in ed.items() if k != "kid"},
        ]
    }
    keys = parseJWKS(document)
    assert set(keys) == {good["kid"], keyID(ED_KEY)}
    assert keys[good["kid"]].algorithm_name == "ES256"
    assert keys[keyID(ED_KEY)].algorithm_name == "EdDSA"


def test_parse_jwks_drops_private_members() -> None:
    private = jwt.algorithms.ECAlgorithm.to_jwk(KEY, as_dict=True)
    assert "d" in private
    keys = parseJWKS({"keys": [{**private, "kid": "k"}]})
    assert isinstance(keys["k"].key, ec.EllipticCurvePublicKey)


@pytest.mark.parametrize("document", [None, [], {}, {"keys": None}, {"keys": {}}])
def test_parse_jwks_refuses_non_jwks(document: object) -> None:
    with pytest.raises(ValueError):
        parseJWKS(document)


# -- JWKS over HTTP -----------------------------------------------------------------


class JWKSResource(Resource):
    """Serves a JWKS document and counts the requests for it."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.document: Any = jwks(KEY)
        self.requests = 0
        self.status = 200
        self.hang = False
        self.url = ""

    def render_GET(self, request: Any) -> bytes | int:
        self.requests += 1
        if self.hang:
            return NOT_DONE_YET
        request.setResponseCode(self.status)
        request.setHeader(b"content-type", b"application/json")
        if isinstance(self.document, bytes):
            return self.document
        return json.dumps(self.document).encode("utf-8")


def listenLoopback(site: Site) -> tuple[IListeningPort, str]:
    """Listen on a free loopback port; the port and its base URL."""
    from twisted.internet import reactor

    port = cast(Any, reactor).listenTCP(0, site, interface="127.0.0.1")
    return port, f"http://127.0.0.1:{port.getHost().port}"


@pytest_twisted.async_yield_fixture
async def server() -> AsyncIterator[JWKSResource]:
    resource = JWKSResource()
    port, base = listenLoopback(Site(resource))
    resource.url = f"{base}/.well-known/jwks.json"
    yield resource
    await maybeDeferred(port.stopListening)


def httpSource(url: str, clock: Clock, timer: Clock | None = None, **kwargs: Any) -> JWKSKeySource:
    """
    A source fetching over real loopback HTTP; its fetch timeout runs on
    ``timer`` if given (a test then moves it), else on the reactor.
    """
    from twisted.internet import reactor

    kwargs.setdefault("timeout", 5.0)
    if timer is None:
        return JWKSKeySource(url, reactor=reactor, clock=clock, **kwargs)
    http = HTTPClient(Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False)))
    return JWKSKeySource(url, reactor=timer, http_client=http, clock=clock, **kwargs)


def httpVerifier(source: JWKSKeySource, clock: Clock) -> TokenVerifier:
    return TokenVerifier(source, audience=ROUTING_AUDIENCE, clock=clock)


def test_jwks_source_provides_interface(clock: Clock) -> None:
    assert verifyObject(IKeySource, httpSource("http://127.0.0.1:1/", clock))


@pytest_twisted.ensureDeferred
async def test_jwks_fetched_once_and_cached(
    server: JWKSResource, clock: Clock, signer: TokenSigner
) -> None:
    verifier = httpVerifier(httpSource(server.url, clock), clock)
    token = sign(signer)
    # Concurrent first requests share one fetch.
    results = await gatherResults([outcome(verifier.verify(token)) for _ in range(20)])
    assert all(isinstance(r, dict) and r["sub"] == "abc123" for r in results), results
    assert server.requests == 1
    for _ in range(5):
        clock.advance(10)
        assert (await verifier.verify(token))["sub"] == "abc123"
    assert server.requests == 1


@pytest_twisted.ensureDeferred
async def test_jwks_refreshed_when_old(
    server: JWKSResource, clock: Clock, signer: TokenSigner
) -> None:
    verifier = httpVerifier(httpSource(server.url, clock, refresh=300), clock)
    await verifier.verify(sign(signer))
    clock.advance(299)
    await verifier.verify(sign(signer))
    assert server.requests == 1
    clock.advance(2)
    await verifier.verify(sign(signer))
    assert server.requests == 2


@pytest_twisted.ensureDeferred
async def test_unknown_kid_flood_refetches_at_most_once(
    server: JWKSResource, clock: Clock, signer: TokenSigner
) -> None:
    verifier = httpVerifier(httpSource(server.url, clock, min_refetch=10), clock)
    await verifier.verify(sign(signer))
    assert server.requests == 1

    forged = [
        TokenSigner(OTHER, kid=f"forged-{i}", clock=clock).sign(
            {"sub": "abc123"}, audience=ROUTING_AUDIENCE, lifetime=60
        )
        for i in range(50)
    ]

    # Right after a fetch: unknown kids cause no request at all.
    results = await gatherResults([outcome(verifier.verify(t)) for t in forged])
    assert set(results) == {"unknown key"}
    assert server.requests == 1

    # Once min_refetch has passed: one request for the whole flood.
    clock.advance(11)
    results = await gatherResults([outcome(verifier.verify(t)) for t in forged])
    assert set(results) == {"unknown key"}
    assert server.requests == 2

    # And none again until min_refetch passes again.
    clock.advance(5)
    results = await gatherResults([outcome(verifier.verify(t)) for t in forged])
    assert set(results) == {"unknown key"}
    assert server.requests == 2

    # Known keys keep working throughout.
    assert (await verifier.verify(sign(signer)))["sub"] == "abc123"
    assert server.requests == 2


@pytest_twisted.ensureDeferred
async def test_key_rotation(server: JWKSResource, clock: Clock, signer: TokenSigner) -> None:
    verifier = httpVerifier(httpSource(server.url, clock, min_refetch=10), clock)
    oldToken = sign(signer)
    await verifier.verify(oldToken)

    server.document = jwks(OTHER)  # the portal rotates to a new key
    newSigner = TokenSigner(OTHER, clock=clock)
    newToken = sign(newSigner)
    clock.advance(11)
    assert (await verifier.verify(newToken))["sub"] == "abc123"
    assert server.requests == 2
    # The retired key is gone from the cache.
    assert await outcome(verifier.verify(oldToken)) == "unknown key"
    assert server.requests == 2


@pytest_twisted.ensureDeferred
async def test_new_kid_found_right_away_when_rotated_before_first_use(
    server: JWKSResource, clock: Clock
) -> None:
    server.document = jwks(KEY, ED_KEY)
    verifier = httpVerifier(httpSource(server.url, clock), clock)
    token = sign(TokenSigner(ED_KEY, clock=clock))
    assert (await verifier.verify(token))["sub"] == "abc123"
    assert server.requests == 1


@pytest_twisted.ensureDeferred
async def test_server_down(clock: Clock, signer: TokenSigner) -> None:
    from twisted.internet import reactor

    with refusedPort() as port:
        # The fetch's timeout runs on ``clock``, which never moves here: the
        # answer comes from the refusal, seen at once, not from the timeout.
        verifier = httpVerifier(httpSource(f"http://127.0.0.1:{port}/jwks.json", clock, timer=clock), clock)
        reason = await outcome(verifier.verify(sign(signer))).addTimeout(10, reactor)
    assert reason == "unknown key (keys unavailable)"


@pytest_twisted.ensureDeferred
async def test_server_hangs_times_out(
    server: JWKSResource, clock: Clock, signer: TokenSigner
) -> None:
    from twisted.internet import reactor

    server.hang = True
    verifier = httpVerifier(httpSource(server.url, clock, timer=clock, timeout=0.3), clock)
    verdicts = gatherResults([outcome(verifier.verify(sign(signer))) for _ in range(5)])
    await eventually(lambda: server.requests)
    clock.advance(0.29)
    assert not verdicts.called  # all five wait for the one fetch, until its timeout
    clock.advance(0.01)
    results = await verdicts.addTimeout(10, reactor)
    assert set(results) == {"unknown key (keys unavailable)"}
    assert server.requests == 1


@pytest.mark.parametrize(
    "problem",
    ["status", "not-json", "not-jwks", "no-usable-keys", "too-large", "hang"],
)
@pytest_twisted.ensureDeferred
async def test_failed_refetch_keeps_old_keys(
    server: JWKSResource, clock: Clock, signer: TokenSigner, problem: str
) -> None:
    verifier = httpVerifier(
        httpSource(server.url, clock, refresh=300, timeout=0.3, max_size=4096), clock
    )
    token = sign(signer)
    await verifier.verify(token)

    if problem == "status":
        server.status = 500
    elif problem == "not-json":
        server.document = b"<html>oops</html>"
    elif problem == "not-jwks":
        server.document = {"keys": "none"}
    elif problem == "no-usable-keys":
        server.document = {"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}
    elif problem == "too-large":
        server.document = {"keys": [publicJWK(KEY)], "padding": "x" * 10_000}
    else:
        server.hang = True

    clock.advance(301)  # stale: a refetch is attempted and fails
    assert (await verifier.verify(token))["sub"] == "abc123"
    assert server.requests == 2
    # A failure is also rate-limited: no request storm against a broken portal.
    clock.advance(1)
    assert (await verifier.verify(token))["sub"] == "abc123"
    assert server.requests == 2


@pytest_twisted.ensureDeferred
async def test_cancelled_lookup_does_not_break_the_fetch(
    server: JWKSResource, clock: Clock, signer: TokenSigner
) -> None:
    source = httpSource(server.url, clock)
    abandoned = source.getKey(signer.kid)
    abandoned.cancel()
    result = fired(abandoned)
    assert isinstance(result, Failure) and result.check(CancelledError)
    assert (await source.getKey(signer.kid)).key_id == signer.kid
    assert server.requests == 1
