"""
Tests for the ``dit4c`` command.

The main paths run ``python -m dit4c`` as a real subprocess, the way a person
runs it; the error paths call :func:`dit4c.cli.main` in-process, which is
faster and checks the same code.
"""

from __future__ import annotations

import io
import json
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from twisted.python.failure import Failure

from dit4c.cli import COMMANDS, main
from dit4c.common.keys import generatePrivateKey, keyID, loadPrivateKey, savePrivateKey
from dit4c.common.tokens import ROUTING_AUDIENCE, StaticKeySource, TokenVerifier


def dit4c(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dit4c", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )


def runMain(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    try:
        status = main(list(args), stdout=out, stderr=err)
    except SystemExit as e:  # argparse usage errors
        status = int(e.code or 0)
    return status, out.getvalue(), err.getvalue()


def verified(token: str, keyFile: Path, audience: str = ROUTING_AUDIENCE, **kw: Any) -> Any:
    verifier = TokenVerifier(StaticKeySource.fromFile(keyFile), audience=audience, **kw)
    results: list[object] = []
    verifier.verify(token).addBoth(results.append)
    (result,) = results
    if isinstance(result, Failure):
        result.raiseException()
    return result


def test_registry() -> None:
    assert {"keygen", "jwks", "token"} <= set(COMMANDS)
    for name, cmd in COMMANDS.items():
        assert cmd.name == name and cmd.help


def test_keygen_jwks_token(tmp_path: Path) -> None:
    """The whole flow through real subprocesses: make a key, publish it, sign."""
    keygen = dit4c(tmp_path, "keygen", "keys/portal.pem")
    assert keygen.returncode == 0, keygen.stderr
    path = tmp_path / "keys" / "portal.pem"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    document = json.loads(keygen.stdout)
    key = loadPrivateKey(path)
    [jwk] = document["keys"]
    assert jwk["kid"] == keyID(key.public_key())
    assert jwk["alg"] == "ES256" and jwk["crv"] == "P-256"
    assert "d" not in jwk

    printed = dit4c(tmp_path, "jwks", "keys/portal.pem")
    assert printed.returncode == 0, printed.stderr
    assert json.loads(printed.stdout) == document

    issued = dit4c(
        tmp_path,
        "token",
        "--key",
        "keys/portal.pem",
        "--subject",
        "01hqz6y4d7",
        "--issuer",
        "https://portal.example",
        "--lifetime",
        "120",
        "--claim",
        "scope=tunnel",
        "--claim",
        "n=3",
        "--claim",
        'tags=["a","b"]',
    )
    assert issued.returncode == 0, issued.stderr
    assert issued.stderr == ""
    assert issued.stdout.endswith("\n") and issued.stdout.count("\n") == 1
    token = issued.stdout.strip()
    assert token.count(".") == 2

    # Verified against the private key file, and against the printed JWKS.
    jwksFile = tmp_path / "jwks.json"
    jwksFile.write_text(printed.stdout)
    for keyFile in (path, jwksFile):
        claims = verified(token, keyFile, issuer="https://portal.example")
        assert claims["sub"] == "01hqz6y4d7"
        assert claims["aud"] == ROUTING_AUDIENCE
        assert claims["iss"] == "https://portal.example"
        assert claims["exp"] - claims["iat"] == 120
        assert claims["scope"] == "tunnel"
        assert claims["n"] == 3
        assert claims["tags"] == ["a", "b"]
    assert jwt.get_unverified_header(token)["kid"] == jwk["kid"]


def test_keygen_refuses_to_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "key.pem"
    assert dit4c(tmp_path, "keygen", str(path)).returncode == 0
    before = path.read_bytes()

    again = dit4c(tmp_path, "keygen", str(path))
    assert again.returncode == 1
    assert "exists" in again.stderr and "--force" in again.stderr
    assert again.stdout == ""
    assert path.read_bytes() == before

    forced = dit4c(tmp_path, "keygen", "--force", str(path))
    assert forced.returncode == 0, forced.stderr
    assert path.read_bytes() != before
    assert json.loads(forced.stdout)["keys"][0]["kid"] == keyID(loadPrivateKey(path))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_token_other_audience(tmp_path: Path) -> None:
    """Only routing tokens need an instance id as subject."""
    key = tmp_path / "key.pem"
    savePrivateKey(generatePrivateKey(), key)
    issued = dit4c(
        tmp_path, "token", "--key", "key.pem", "--audience", "dit4c-imageserver", "--subject", "Bob"
    )
    assert issued.returncode == 0, issued.stderr
    claims = verified(issued.stdout.strip(), key, audience="dit4c-imageserver")
    assert claims["sub"] == "Bob"
    assert claims["exp"] - claims["iat"] == 3600
    assert "iss" not in claims


def test_jwks_several_files(tmp_path: Path) -> None:
    a, b = generatePrivateKey(), generatePrivateKey()
    savePrivateKey(a, tmp_path / "a.pem")
    (tmp_path / "b.pub").write_bytes(
        b.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    status, out, err = runMain("jwks", str(tmp_path / "a.pem"), str(tmp_path / "b.pub"))
    assert status == 0, err
    assert [k["kid"] for k in json.loads(out)["keys"]] == [keyID(a), keyID(b)]
    assert '"d"' not in out


@pytest.mark.parametrize("subject", ["ABC", "-abc", "a.b", "a" * 64, ""])
def test_token_refuses_bad_instance_id(tmp_path: Path, subject: str) -> None:
    savePrivateKey(generatePrivateKey(), tmp_path / "key.pem")
    status, out, err = runMain("token", "--key", str(tmp_path / "key.pem"), f"--subject={subject}")
    assert status == 1
    assert out == ""
    assert "instance id" in err


def test_routing_tokens_are_single_use_and_short(tmp_path: Path) -> None:
    """Each token gets a new jti; a routing token lives 300 s unless told less, and never more."""
    key = tmp_path / "key.pem"
    savePrivateKey(generatePrivateKey(), key)
    claims = []
    for _ in range(2):
        status, out, err = runMain("token", "--key", str(key), "--subject", "inst")
        assert status == 0, err
        claims.append(verified(out.strip(), key))
    assert claims[0]["jti"] != claims[1]["jti"]
    assert [c["exp"] - c["iat"] for c in claims] == [300, 300]

    status, out, err = runMain("token", "--key", str(key), "--subject", "inst", "--lifetime", "3600")
    assert (status, out) == (1, "")
    assert "routing servers refuse tokens that live longer than 300 s" in err
    # Other audiences keep their own default, and get a jti too.
    status, out, _ = runMain("token", "--key", str(key), "--audience", "other", "--subject", "x", "--lifetime", "7200")
    assert status == 0
    assert verified(out.strip(), key, audience="other")["jti"]


@pytest.mark.parametrize(
    "extra",
    [
        ["--claim", "jti=chosen"],
        ["--claim", "exp=1"],
        ["--claim", "sub=other"],
        ["--claim", "aud=x"],
        ["--claim", "novalue"],
        ["--claim", "=x"],
        ["--lifetime", "0"],
        ["--lifetime", "-5"],
        ["--lifetime", "soon"],
        ["--lifetime", "inf"],
    ],
)
def test_token_usage_errors(tmp_path: Path, extra: list[str]) -> None:
    savePrivateKey(generatePrivateKey(), tmp_path / "key.pem")
    status, out, _ = runMain("token", "--key", str(tmp_path / "key.pem"), "--subject", "a", *extra)
    assert status == 2
    assert out == ""


def test_claim_values(tmp_path: Path) -> None:
    key = tmp_path / "key.pem"
    savePrivateKey(generatePrivateKey(), key)
    status, out, err = runMain(
        "token",
        "--key",
        str(key),
        "--subject",
        "a",
        "--claim",
        "s=plain text",
        "--claim",
        "t=true",
        "--claim",
        "e=",
        "--claim",
        "eq=a=b",
    )
    assert status == 0, err
    claims = verified(out.strip(), key)
    assert claims["s"] == "plain text"
    assert claims["t"] is True
    assert claims["e"] == ""
    assert claims["eq"] == "a=b"


@pytest.mark.parametrize("command", ["jwks", "token"])
def test_missing_or_bad_key_file(tmp_path: Path, command: str) -> None:
    (tmp_path / "garbage.pem").write_text("not a key")
    for name in ("missing.pem", "garbage.pem"):
        path = str(tmp_path / name)
        args = ["jwks", path] if command == "jwks" else ["token", "--key", path, "--subject", "a"]
        status, out, err = runMain(*args)
        assert status == 1, (name, err)
        assert out == ""
        assert err.startswith(f"dit4c {command}: error: ")
        assert name in err


def test_keygen_unwritable(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    # A file where a directory should be: mkdir fails, reported not raised.
    status, out, err = runMain("keygen", str(blocker / "key.pem"))
    assert status == 1
    assert out == ""
    assert err.startswith("dit4c keygen: error: cannot write ")


def test_no_subcommand() -> None:
    status, out, _ = runMain()
    assert status == 2
    assert out == ""


def test_user_add_prints_a_password_once_that_logs_in(tmp_path: Path) -> None:
    """``dit4c user-add`` creates a portal user whose printed password verifies."""
    import re

    data = tmp_path / "portal"
    # A data directory that holds no portal (a mistyped path) is refused...
    refused = subprocess.run(
        [sys.executable, "-m", "dit4c", "user-add", "carol", "--admin", "--data-dir", str(data)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert refused.returncode == 1 and "no portal database" in refused.stderr and "--create" in refused.stderr
    assert not data.exists()
    # ... unless told to make one; a name that is no login name, too.
    bad = subprocess.run(
        [sys.executable, "-m", "dit4c", "user-add", "<script>", "--data-dir", str(data), "--create"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert bad.returncode == 1 and "not a login name" in bad.stderr
    result = subprocess.run(
        [sys.executable, "-m", "dit4c", "user-add", "carol", "--admin", "--data-dir", str(data), "--create"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    match = re.search(r"password \(shown only now\): (\S+)", result.stdout)
    assert match
    again = subprocess.run(
        [sys.executable, "-m", "dit4c", "user-add", "carol", "--data-dir", str(data)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert again.returncode == 1 and "taken" in again.stderr
    # The password is stored only as a hash.
    for path in data.glob("portal.db*"):
        assert match.group(1).encode() not in path.read_bytes()


def test_a_download_is_named_in_this_directory_only() -> None:
    """The name a portal gives a download is a file name here, never a path elsewhere."""
    from dit4c.cli.remote import _attachmentName

    assert _attachmentName('attachment; filename="my-work.oci.tar"') == "my-work.oci.tar"
    assert _attachmentName('attachment; filename="../../etc/passwd"') == "passwd"
    assert _attachmentName('attachment; filename="/root/.bashrc"') == ".bashrc"
    assert _attachmentName('attachment; filename=".."') == "image.oci.tar"
    assert _attachmentName(None) == "image.oci.tar"
