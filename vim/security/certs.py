"""A private CA for the control plane, and the server and client certificates it issues.

`make_ca(dir)` writes `ca.pem` and `ca.key`; `issue(dir, name, sans)` writes
`<name>.pem` and `<name>.key` signed by that CA. Server certificates carry the
hosts they answer for as subject alternative names (IP addresses and DNS
names), because gRPC clients verify the name they dialled against them; client
certificates (`client=True`) are for mutual TLS, where `vim-api
--tls-client-ca ca.pem` requires them.

Invariants: keys are ECDSA P-256 and written with mode 0600 (never readable by
others, even for a moment: the file is created with that mode); certificates
are PEM; nothing is written outside the given directory. This is for demos,
tests and small sites: a production site may use its own PKI instead, since
`vim-api` only reads PEM files.

    python -m vim.security.certs --out DIR --hosts 127.0.0.1 localhost api.example
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_NAME = "ca"
DEFAULT_DAYS = 365
CA_DAYS = 3650
DEFAULT_HOSTS = ("127.0.0.1", "::1", "localhost")


@dataclass(frozen=True, slots=True)
class Issued:
    """Where a certificate and its private key were written."""

    cert: Path
    key: Path


def make_ca(directory: Path, *, common_name: str = "vim private CA") -> Issued:
    """A new self-signed CA in `directory` (ca.pem, ca.key), replacing any old one."""
    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    cert = (
        _builder(name, name, key.public_key(), CA_DAYS)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_usage(ca=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .sign(key, hashes.SHA256())
    )
    return _write(directory, CA_NAME, cert, key)


def issue(
    directory: Path,
    name: str,
    sans: Sequence[str] = DEFAULT_HOSTS,
    *,
    client: bool = False,
    days: int = DEFAULT_DAYS,
) -> Issued:
    """A certificate for `name` signed by the CA in `directory` (see `make_ca`)."""
    ca_cert = x509.load_pem_x509_certificate((directory / f"{CA_NAME}.pem").read_bytes())
    ca_key = serialization.load_pem_private_key((directory / f"{CA_NAME}.key").read_bytes(), None)
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise ValueError("the CA key must be an EC key made by make_ca")
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    usage = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
    builder = (
        _builder(subject, ca_cert.subject, key.public_key(), days)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_usage(ca=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
    )
    if sans:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([_general_name(s) for s in sans]), critical=False
        )
    return _write(directory, name, builder.sign(ca_key, hashes.SHA256()), key)


def _builder(
    subject: x509.Name, issuer: x509.Name, public_key: ec.EllipticCurvePublicKey, days: int
) -> x509.CertificateBuilder:
    now = dt.datetime.now(dt.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))  # tolerate small clock skew
        .not_valid_after(now + dt.timedelta(days=days))
    )


def _usage(*, ca: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not ca,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


def _general_name(san: str) -> x509.GeneralName:
    """An IP address SAN when it parses as one, a DNS name otherwise."""
    try:
        return x509.IPAddress(ipaddress.ip_address(san))
    except ValueError:
        return x509.DNSName(san)


def _write(
    directory: Path, name: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey
) -> Issued:
    cert_path, key_path = directory / f"{name}.pem", directory / f"{name}.key"
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    key_path.unlink(missing_ok=True)  # O_CREAT's mode applies only to a new file
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as sink:
        sink.write(key_pem)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return Issued(cert_path, key_path)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m vim.security.certs`: a CA, a server certificate and a client one."""
    p = argparse.ArgumentParser(prog="python -m vim.security.certs", description=main.__doc__)
    p.add_argument("--out", type=Path, required=True, help="directory for the PEM files")
    p.add_argument(
        "--hosts", nargs="+", default=list(DEFAULT_HOSTS), help="server names and IPs (SANs)"
    )
    p.add_argument("--server-name", default="server", help="file name of the server pair")
    p.add_argument("--client-name", default="client", help="file name of the mTLS client pair")
    p.add_argument("--keep-ca", action="store_true", help="reuse an existing ca.pem/ca.key")
    a = p.parse_args(argv)
    if not (a.keep_ca and (a.out / f"{CA_NAME}.key").exists()):
        make_ca(a.out)
    server = issue(a.out, a.server_name, a.hosts)
    client = issue(a.out, a.client_name, [a.client_name], client=True)
    print(f"CA: {a.out / (CA_NAME + '.pem')}")
    print(f"server: --tls-cert {server.cert} --tls-key {server.key}")
    print(f"client (mTLS): {client.cert} {client.key}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
