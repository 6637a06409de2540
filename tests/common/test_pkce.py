"""PKCE as the auth helper and the upstream login make it and the portal's authorization server checks it."""

from __future__ import annotations

import re

from dit4c.common.pkce import codeChallenge, newVerifier


def test_the_challenge_is_rfc7636s_s256() -> None:
    # RFC 7636, appendix B.
    assert (
        codeChallenge("dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk")
        == "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"
    )


def test_verifiers_are_fresh_and_of_the_allowed_alphabet() -> None:
    verifiers = {newVerifier() for _ in range(100)}
    assert len(verifiers) == 100
    for verifier in verifiers:
        assert re.fullmatch(r"[A-Za-z0-9_-]{43,128}", verifier)
        assert re.fullmatch(r"[A-Za-z0-9_-]{43}", codeChallenge(verifier))
