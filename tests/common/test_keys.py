"""Tests for dit4c.common.keys: key files and their public JWKs."""

from __future__ import annotations

import base64
import hashlib
import json
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from dit4c.common.errors import KeyFileError, UnsupportedKey
from dit4c.common.keys import (
    algorithmFor,
    generatePrivateKey,
    jwks,
    keyID,
    loadOrCreatePrivateKey,
    loadPrivateKey,
    loadPublicKey,
    publicJWK,
    savePrivateKey,
)


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def publicBytes(key: ec.EllipticCurvePrivateKey | Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def privateScalar(key: ec.EllipticCurvePrivateKey | Ed25519PrivateKey) -> str:
    """The JWK "d" member of ``key``, computed without PyJWT."""
    if isinstance(key, Ed25519PrivateKey):
        return b64url(
            key.private_bytes(
                serialization.Encoding.Raw,
                serialization.PrivateFormat.Raw,
                serialization.NoEncryption(),
            )
        )
    return b64url(key.private_numbers().private_value.to_bytes(32, "big"))


def writePEM(path: Path, key: object) -> None:
    path.write_bytes(
        key.private_bytes(  # type: ignore[attr-defined]
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )


def test_generate_is_p256() -> None:
    key = generatePrivateKey()
    assert isinstance(key.curve, ec.SECP256R1)
    assert algorithmFor(key) == "ES256"
    assert algorithmFor(key.public_key()) == "ES256"


def test_save_load_round_trip(tmp_path: Path) -> None:
    key = generatePrivateKey()
    path = tmp_path / "key.pem"
    savePrivateKey(key, path)
    assert path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    loaded = loadPrivateKey(path)
    assert publicBytes(loaded) == publicBytes(key)
    assert keyID(loaded.public_key()) == keyID(key.public_key())
    # Only the key file is left behind: no temporary files.
    assert [p.name for p in tmp_path.iterdir()] == ["key.pem"]


def test_saved_file_mode_0600(tmp_path: Path) -> None:
    path = tmp_path / "key.pem"
    savePrivateKey(generatePrivateKey(), path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    # Replacing keeps the mode too (the new file is a new inode).
    savePrivateKey(generatePrivateKey(), path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_save_without_overwrite_refuses(tmp_path: Path) -> None:
    path = tmp_path / "key.pem"
    first = generatePrivateKey()
    savePrivateKey(first, path)
    with pytest.raises(FileExistsError):
        savePrivateKey(generatePrivateKey(), path, overwrite=False)
    assert publicBytes(loadPrivateKey(path)) == publicBytes(first)
    assert [p.name for p in tmp_path.iterdir()] == ["key.pem"]


def test_save_overwrite_replaces(tmp_path: Path) -> None:
    path = tmp_path / "key.pem"
    savePrivateKey(generatePrivateKey(), path)
    second = generatePrivateKey()
    savePrivateKey(second, path)
    assert publicBytes(loadPrivateKey(path)) == publicBytes(second)


def test_load_or_create(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "dir" / "key.pem"
    created = loadOrCreatePrivateKey(path)
    assert path.exists()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    again = loadOrCreatePrivateKey(path)
    assert publicBytes(again) == publicBytes(created)


def test_load_ed25519(tmp_path: Path) -> None:
    key = Ed25519PrivateKey.generate()
    path = tmp_path / "ed.pem"
    writePEM(path, key)
    loaded = loadPrivateKey(path)
    assert isinstance(loaded, Ed25519PrivateKey)
    assert publicBytes(loaded) == publicBytes(key)
    assert algorithmFor(loaded) == "EdDSA"
    jwk = publicJWK(loaded)
    assert jwk["kty"] == "OKP" and jwk["crv"] == "Ed25519" and jwk["alg"] == "EdDSA"
    assert "y" not in jwk and "d" not in jwk


def test_save_ed25519(tmp_path: Path) -> None:
    key = Ed25519PrivateKey.generate()
    path = tmp_path / "ed.pem"
    savePrivateKey(key, path)
    assert publicBytes(loadPrivateKey(path)) == publicBytes(key)


@pytest.mark.parametrize(
    "key",
    [
        pytest.param(lambda: ec.generate_private_key(ec.SECP384R1()), id="P-384"),
        pytest.param(
            lambda: rsa.generate_private_key(public_exponent=65537, key_size=1024), id="RSA"
        ),
    ],
)
def test_load_refuses_other_key_types(tmp_path: Path, key: object) -> None:
    path = tmp_path / "other.pem"
    writePEM(path, key())  # type: ignore[operator]
    with pytest.raises(UnsupportedKey):
        loadPrivateKey(path)
    with pytest.raises(UnsupportedKey):
        loadPublicKey(path)


def test_load_refuses_garbage(tmp_path: Path) -> None:
    path = tmp_path / "garbage.pem"
    path.write_bytes(b"not a key\n")
    with pytest.raises(KeyFileError):
        loadPrivateKey(path)
    with pytest.raises(KeyFileError):
        loadPublicKey(path)


def test_load_refuses_encrypted(tmp_path: Path) -> None:
    path = tmp_path / "enc.pem"
    path.write_bytes(
        generatePrivateKey().private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    with pytest.raises(KeyFileError, match="encrypted"):
        loadPrivateKey(path)


def test_load_missing_is_oserror(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        loadPrivateKey(tmp_path / "nope.pem")


def test_load_public_key_from_public_or_private_pem(tmp_path: Path) -> None:
    key = generatePrivateKey()
    private = tmp_path / "key.pem"
    public = tmp_path / "key.pub"
    savePrivateKey(key, private)
    public.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    assert keyID(loadPublicKey(private)) == keyID(key.public_key())
    assert keyID(loadPublicKey(public)) == keyID(key.public_key())


def test_key_id_is_rfc7638_thumbprint_ec() -> None:
    """
    Computed here independently of PyJWT: the required members of an EC
    key, in lexicographic order, no whitespace, SHA-256, base64url.
    """
    key = generatePrivateKey()
    numbers = key.public_key().public_numbers()
    x = b64url(numbers.x.to_bytes(32, "big"))
    y = b64url(numbers.y.to_bytes(32, "big"))
    canonical = '{"crv":"P-256","kty":"EC","x":"' + x + '","y":"' + y + '"}'
    expected = b64url(hashlib.sha256(canonical.encode("ascii")).digest())
    assert keyID(key.public_key()) == expected
    assert keyID(key) == expected
    jwk = publicJWK(key)
    assert jwk["x"] == x and jwk["y"] == y and jwk["kid"] == expected


def test_key_id_rfc8037_vector() -> None:
    """RFC 8037 appendix A.3: the thumbprint of the example Ed25519 key."""
    d = base64.urlsafe_b64decode("nWGxne_9WmC6hEr0kuwsxERJxWl7MmkZcDusAxyuf2A=")
    key = Ed25519PrivateKey.from_private_bytes(d)
    assert publicJWK(key)["x"] == "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"
    assert keyID(key.public_key()) == "kPrK_qmxVWaYVA9wwBF6Iuo3vVzz7TxHCTwXBygrS4k"


@pytest.mark.parametrize("make", [generatePrivateKey, Ed25519PrivateKey.generate])
def test_public_jwk_never_private(make: object) -> None:
    key = make()  # type: ignore[operator]
    for jwk in (publicJWK(key), publicJWK(key.public_key()), jwks(key)["keys"][0]):
        assert "d" not in jwk
        assert jwk["use"] == "sig"
        assert jwk["kid"] == keyID(key.public_key())
        assert set(jwk) <= {"kty", "crv", "x", "y", "kid", "alg", "use"}
    # Even serialised, the private scalar appears nowhere.
    assert privateScalar(key) not in json.dumps(jwks(key))


def test_public_jwk_explicit_kid() -> None:
    key = generatePrivateKey()
    assert publicJWK(key, kid="k1")["kid"] == "k1"


def test_jwks_several_keys() -> None:
    a, b = generatePrivateKey(), Ed25519PrivateKey.generate()
    document = jwks(a, b.public_key())
    assert [k["kid"] for k in document["keys"]] == [keyID(a), keyID(b)]
    assert [k["alg"] for k in document["keys"]] == ["ES256", "EdDSA"]
    json.dumps(document)  # serialisable as is
