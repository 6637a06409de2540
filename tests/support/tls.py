"""
Certificates for tests of TLS carriers and clients.
"""

from __future__ import annotations

from pathlib import Path


def makeCertificate(directory: Path, *names: str) -> tuple[Path, Path]:
    """
    A self-signed certificate (its own CA) for ``names`` (wildcards allowed),
    written as ``server.key`` and ``cert.pem`` in ``directory``; the directory
    then also serves as a ``trustRoots`` directory holding just that cert.
    """
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    keyPath = directory / "server.key"  # not .pem: trustRoots loads every .pem
    certPath = directory / "cert.pem"
    keyPath.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    certPath.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return keyPath, certPath
