"""
Signing keys: generate, store, load, and publish them as JWKs.

Every DIT4C component that signs (portal, scheduler, each instance) holds one
private key in a PEM file, and every component that checks signatures learns
the public half from a JWKS document. Only two key types are accepted, EC
P-256 (``ES256``) and Ed25519 (``EdDSA``), so that the verifier's algorithm
list can be pinned (docs/protocols.md section 2).

JWK conversion is PyJWT's (``jwt.algorithms``); this module only chooses the
members that may leave the process: a published JWK never carries ``d``.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, TypeAlias

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from jwt.algorithms import ECAlgorithm, OKPAlgorithm
from jwt.utils import base64url_encode
from twisted.logger import Logger

from dit4c.common.errors import KeyFileError, UnsupportedKey

__all__ = [
    "PrivateKey",
    "PublicKey",
    "algorithmFor",
    "generatePrivateKey",
    "jwks",
    "keyID",
    "loadOrCreatePrivateKey",
    "loadPrivateKey",
    "loadPublicKey",
    "publicJWK",
    "publicKeyFromPEM",
    "savePrivateKey",
]

PrivateKey: TypeAlias = ec.EllipticCurvePrivateKey | Ed25519PrivateKey
PublicKey: TypeAlias = ec.EllipticCurvePublicKey | Ed25519PublicKey
AnyKey: TypeAlias = PrivateKey | PublicKey

_log = Logger(namespace="dit4c.common.keys")

# RFC 7638 section 3.2: the required members of each key type, the only ones
# that go into a thumbprint.
_THUMBPRINT_MEMBERS = {"EC": ("crv", "kty", "x", "y"), "OKP": ("crv", "kty", "x")}


def _checkType(key: object, where: str) -> None:
    """
    Refuse every key that is not P-256 or Ed25519, so that nothing signed
    here can need an algorithm outside the pinned list.
    """
    if isinstance(key, ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey):
        if not isinstance(key.curve, ec.SECP256R1):
            raise UnsupportedKey(f"{where}: EC curve {key.curve.name} (need P-256)")
        return
    if isinstance(key, Ed25519PrivateKey | Ed25519PublicKey):
        return
    raise UnsupportedKey(f"{where}: {type(key).__name__} (need EC P-256 or Ed25519)")


def _public(key: AnyKey) -> PublicKey:
    if isinstance(key, ec.EllipticCurvePrivateKey | Ed25519PrivateKey):
        return key.public_key()
    return key


def generatePrivateKey() -> ec.EllipticCurvePrivateKey:
    """A fresh EC P-256 key: ES256 is what every JOSE library can check."""
    return ec.generate_private_key(ec.SECP256R1())


def _fsyncDirectory(directory: Path) -> None:
    """Make a rename durable; some platforms cannot open directories."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def savePrivateKey(key: PrivateKey, path: str | Path, *, overwrite: bool = True) -> None:
    """
    Write ``key`` to ``path`` as unencrypted PEM PKCS#8, mode 0600.

    The key is written to a temporary file in the same directory and then
    moved into place, so a crash never leaves a half-written key and a reader
    never sees one. With ``overwrite=False`` the move is a hard link, which
    fails with :class:`FileExistsError` if ``path`` exists: two processes
    creating the same key file cannot both win.
    """
    _checkType(key, str(path))
    path = Path(path)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    # mkstemp creates the file with mode 0600 whatever the umask.
    fd, tmpName = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(tmpName)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o600)
            f.write(pem)
            f.flush()
            os.fsync(f.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)
            except FileExistsError:
                raise
            except OSError:
                # No hard links on this file system: an exclusive create is
                # still race-free, only not crash-atomic.
                _writeExclusive(path, pem)
    finally:
        tmp.unlink(missing_ok=True)
    _fsyncDirectory(path.parent)


def _writeExclusive(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _privateKeyFromPEM(data: bytes, where: str) -> PrivateKey:
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError as e:
        raise KeyFileError(f"{where}: encrypted private keys are not supported") from e
    except (ValueError, UnsupportedAlgorithm) as e:
        raise KeyFileError(f"{where}: not a PEM private key") from e
    _checkType(key, where)
    assert isinstance(key, ec.EllipticCurvePrivateKey | Ed25519PrivateKey)
    return key


def loadPrivateKey(path: str | Path) -> PrivateKey:
    """
    Read a PEM private key (EC P-256 or Ed25519) from ``path``.

    :raises KeyFileError: the file holds no usable private key.
    :raises OSError: the file cannot be read (for example it does not exist).
    """
    path = Path(path)
    data = path.read_bytes()
    key = _privateKeyFromPEM(data, str(path))
    try:
        mode = path.stat().st_mode
    except OSError:
        mode = 0
    if mode & 0o077:
        _log.warn(
            "private key file {path} can be read by other users (mode {mode:o})",
            path=str(path),
            mode=mode & 0o777,
        )
    return key


def publicKeyFromPEM(data: bytes, where: str = "key") -> PublicKey:
    """
    The public key in PEM ``data``: a public key, or the public half of a
    private key, so that a verifier can be pointed at either file.

    :raises KeyFileError: ``data`` holds no usable key.
    """
    try:
        public = serialization.load_pem_public_key(data)
    except (ValueError, UnsupportedAlgorithm):
        return _privateKeyFromPEM(data, where).public_key()
    _checkType(public, where)
    assert isinstance(public, ec.EllipticCurvePublicKey | Ed25519PublicKey)
    return public


def loadPublicKey(path: str | Path) -> PublicKey:
    """Read a PEM public key, or the public half of a PEM private key."""
    path = Path(path)
    return publicKeyFromPEM(path.read_bytes(), str(path))


def loadOrCreatePrivateKey(path: str | Path) -> PrivateKey:
    """
    Load the key at ``path``, creating it (and its directory, mode 0700)
    the first time, so that a component keeps its identity across restarts
    without an installation step.
    """
    path = Path(path)
    try:
        return loadPrivateKey(path)
    except FileNotFoundError:
        pass
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    key = generatePrivateKey()
    try:
        savePrivateKey(key, path, overwrite=False)
    except FileExistsError:
        # Another process created it first: theirs is the key.
        return loadPrivateKey(path)
    _log.info("created a new private key {path} with key id {kid}", path=str(path), kid=keyID(key))
    return key


def _jwkMembers(key: AnyKey) -> dict[str, Any]:
    """The public JWK members PyJWT derives for ``key`` (never ``d``)."""
    _checkType(key, "key")
    public = _public(key)
    if isinstance(public, ec.EllipticCurvePublicKey):
        return ECAlgorithm.to_jwk(public, as_dict=True)
    return OKPAlgorithm.to_jwk(public, as_dict=True)


def keyID(public_key: AnyKey) -> str:
    """
    The RFC 7638 JWK thumbprint (SHA-256, base64url) of the key's public half.

    A key id derived from the key itself needs no registry: the same key has
    the same id in the portal, in a JWKS file and in a token header.
    """
    members = _jwkMembers(public_key)
    required = {name: members[name] for name in _THUMBPRINT_MEMBERS[members["kty"]]}
    canonical = json.dumps(required, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return base64url_encode(hashlib.sha256(canonical.encode("utf-8")).digest()).decode("ascii")


def algorithmFor(key: AnyKey) -> str:
    """The JWS algorithm for ``key``: ``ES256`` for P-256, ``EdDSA`` for Ed25519."""
    _checkType(key, "key")
    if isinstance(key, ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey):
        return "ES256"
    return "EdDSA"


def publicJWK(key: AnyKey, kid: str | None = None) -> dict[str, Any]:
    """
    The public JWK for ``key`` (private or public), fit to publish.

    Only public members are included, whatever ``key`` is, so passing a
    private key here cannot leak it.
    """
    jwk = _jwkMembers(key)
    jwk["kid"] = kid if kid is not None else keyID(key)
    jwk["alg"] = algorithmFor(key)
    jwk["use"] = "sig"
    return jwk


def jwks(*keys: AnyKey) -> dict[str, Any]:
    """A JWKS document (RFC 7517 section 5) publishing the public halves of ``keys``."""
    return {"keys": [publicJWK(k) for k in keys]}
