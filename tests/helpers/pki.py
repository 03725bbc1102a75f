"""A throwaway PKI (`cryptography`): a CA, a server certificate for localhost and 127.0.0.1, and a
client certificate, written as PEM files.
"""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


def _cert(name: str, key, issuer_name, issuer_key, *, ca: bool = False, server: bool = False):
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
    return builder.sign(issuer_key, hashes.SHA256())


class Pki:
    """PEM files under `root`: `ca`, `server_cert` and `server_key`, `client_cert` and `client_key`."""

    def __init__(self, root: Path) -> None:
        def write(name: str, key, cert) -> tuple[Path, Path]:
            kp, cp = root / f"{name}.key", root / f"{name}.pem"
            kp.write_bytes(
                key.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                )
            )
            cp.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
            return cp, kp

        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "thermoscope test CA")])
        ca = _cert("thermoscope test CA", ca_key, ca_name, ca_key, ca=True)
        self.ca, _ = write("ca", ca_key, ca)
        server_key, client_key = (
            ec.generate_private_key(ec.SECP256R1()),
            ec.generate_private_key(ec.SECP256R1()),
        )
        self.server_cert, self.server_key = write(
            "server", server_key, _cert("localhost", server_key, ca_name, ca_key, server=True)
        )
        self.client_cert, self.client_key = write(
            "client", client_key, _cert("agent", client_key, ca_name, ca_key)
        )
