"""
Where ``twistd dit4c-helper-listener`` gets its routing tokens: signed
afresh for every dial with ``--key-file`` (or the helper environment's
instance key), or read from ``--token-file`` at every dial.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import jwt
import pytest
from twisted.internet.task import Clock
from twisted.logger import formatEvent, globalLogPublisher

from dit4c.common.keys import generatePrivateKey, jwks, savePrivateKey
from dit4c.common.tokens import StaticKeySource, TokenVerifier, checkLifetime, checkTokenID
from dit4c.listener.tap import Options, TokenFile, makeService

ROUTING = ["--routing", "tcp:host=127.0.0.1:port=1", "--target", "tcp:host=127.0.0.1:port=2"]


@pytest.fixture
def keyFile(tmp_path: Path) -> Path:
    path = tmp_path / "listener.pem"
    savePrivateKey(generatePrivateKey(), path)
    return path


def options(*args: str) -> Options:
    config = Options()
    config.parseOptions(list(args))
    return config


def verify(token: str, keyFile: Path, clock: Clock) -> dict[str, Any]:
    """As a routing server given ``dit4c jwks KEY`` as its --jwks-file checks it."""
    from dit4c.common.keys import loadPrivateKey

    verifier = TokenVerifier(
        StaticKeySource(jwks(loadPrivateKey(keyFile))), audience="dit4c-routing", clock=clock
    )
    results: list[Any] = []
    verifier.verify(token).addBoth(results.append)
    assert isinstance(results[0], dict), results[0]
    return results[0]


def test_key_file_signs_a_new_token_for_every_dial(
    keyFile: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("DIT4C_INSTANCE", raising=False)
    clock = Clock()
    clock.advance(1_700_000_000)
    listener = makeService(options(*ROUTING, "--key-file", str(keyFile), "--instance", "byhand"), reactor=clock)
    tokens = [listener.token() for _ in range(3)]  # type: ignore[attr-defined]
    claims = [verify(t, keyFile, clock) for t in tokens]
    assert len({checkTokenID(c) for c in claims}) == 3
    assert {c["sub"] for c in claims} == {"byhand"}
    assert all(checkLifetime(c, 300) <= 300 for c in claims)


def test_the_helper_environment_signs_with_the_instance_key(
    keyFile: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in {
        "DIT4C_INSTANCE": "inst1",
        "DIT4C_INSTANCE_KEY": str(keyFile),
        "DIT4C_PORTAL": "http://127.0.0.1:1",
    }.items():
        monkeypatch.setenv(name, value)
    config = options(*ROUTING)
    assert (config["instance"], config["scoped"]) == ("inst1", True)
    listener = makeService(config, reactor=Clock())
    token = listener.token()  # type: ignore[attr-defined]
    assert jwt.get_unverified_header(token)["kid"] == "instance:inst1"
    assert jwt.decode(token, options={"verify_signature": False})["jti"]


def test_a_token_file_is_read_at_every_dial_and_a_resent_token_is_warned_of(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text("first.token.x\n")
    source = TokenFile(str(path))
    logged: list[str] = []

    def observer(event: dict[str, Any]) -> None:
        logged.append(formatEvent(event) or "")

    globalLogPublisher.addObserver(observer)
    try:
        assert source() == "first.token.x"
        assert logged == []
        assert source() == "first.token.x"  # nothing new written: sent again, and said so
        assert len(logged) == 1 and "was sent before" in logged[0] and "--key-file" in logged[0]
        assert "first.token.x" not in logged[0]
        path.write_text("second.token.y")
        assert source() == "second.token.y"
        assert len(logged) == 1
    finally:
        globalLogPublisher.removeObserver(observer)


def test_the_key_is_named_as_dit4c_jwks_publishes_it(keyFile: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DIT4C_INSTANCE", raising=False)
    from dit4c.cli import main

    out = io.StringIO()
    assert main(["jwks", str(keyFile)], stdout=out) == 0
    [published] = json.loads(out.getvalue())["keys"]
    listener = makeService(options(*ROUTING, "--key-file", str(keyFile), "--instance", "byhand"), reactor=Clock())
    assert jwt.get_unverified_header(listener.token())["kid"] == published["kid"]  # type: ignore[attr-defined]
