"""A throwaway CA and server certificate (for 127.0.0.1 and localhost) for the secured dev stack."""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from connectors.files import write_atomic

CA_FILE = "ca.pem"
SERVER_CERT_FILE = "server.pem"
SERVER_KEY_FILE = "server.key"
SERVER_BUNDLE_FILE = "server-bundle.pem"  # key + certificate chain in one file: Kafka's PEM keystore


@dataclass(frozen=True)
class DevCerts:
    """Where the PEM files are: the CA certificate (what clients trust), the server's certificate,
    its private key (mode 0600) and a bundle of both (mode 0600) for Kafka's PEM keystore."""

    ca: Path
    cert: Path
    key: Path
    bundle: Path


def write_private(path: Path, data: bytes) -> None:
    """Replace `path` with `data` in a file only the owner may read (mode 0600 from its creation on)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def make_certs(directory: Path, *, days: int = 30, hosts: tuple[str, ...] = ("localhost",)) -> DevCerts:
    """Write a new CA and a server certificate signed by it into `directory` (mode 0700).

    The server certificate holds 127.0.0.1 and `hosts` as subject alternative names, so clients can
    check the host name. Keys are EC P-256, unencrypted, in files only the owner may read. Existing
    files are replaced: a new stack gets new keys.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    now = datetime.datetime.now(datetime.UTC)
    start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=days)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pool-pipeline dev CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )  # fmt: skip
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    names += [x509.DNSName(h) for h in hosts]
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0] if hosts else "127.0.0.1")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    key_pem = key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    cert_pem = cert.public_bytes(pem)
    ca_pem = ca_cert.public_bytes(pem)

    certs = DevCerts(
        ca=directory / CA_FILE,
        cert=directory / SERVER_CERT_FILE,
        key=directory / SERVER_KEY_FILE,
        bundle=directory / SERVER_BUNDLE_FILE,
    )
    # The CA's key is not kept: nothing else is ever signed with it.
    write_atomic(certs.ca, ca_pem, f".{CA_FILE}.tmp-{os.getpid()}")
    write_atomic(certs.cert, cert_pem + ca_pem, f".{SERVER_CERT_FILE}.tmp-{os.getpid()}")
    write_private(certs.key, key_pem)
    write_private(certs.bundle, key_pem + cert_pem + ca_pem)
    return certs
