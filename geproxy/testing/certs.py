"""Certificates for tests of TLS listeners: the proxy's own, and clients' for mTLS.

trustme makes CAs and server certificates; client certificates need names it does not
write (a URI subject alternative name, a SPIFFE ID say), so they are made here with
``cryptography``, signed by a trustme CA's key.
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

__all__ = ["TLSFiles", "issue_client_cert", "make_tls_files"]


def issue_client_cert(ca: Any, path: Path, common_name: str = "", uris: Sequence[str] = (),
                      dns: Sequence[str] = (), ips: Sequence[str] = ()) -> str:
    """A certificate for client authentication from ``ca`` (a trustme CA), its key in the
    same PEM file at ``path``; returns the path."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    ca_key = serialization.load_pem_private_key(ca.private_key_pem.bytes(), password=None)
    ca_cert = x509.load_pem_x509_certificate(ca.cert_pem.bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    names = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "geproxy tests")]
    if common_name:
        names.append(x509.NameAttribute(NameOID.COMMON_NAME, common_name))
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name(names))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]),
                       critical=False)
    )
    alt = ([x509.UniformResourceIdentifier(uri) for uri in uris]
           + [x509.DNSName(name) for name in dns]
           + [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips])
    if alt:
        builder = builder.add_extension(x509.SubjectAlternativeName(alt), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
    path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                          serialization.NoEncryption())
        + cert.public_bytes(serialization.Encoding.PEM))
    return str(path)


@dataclass
class TLSFiles:
    """What a test TLS listener needs, as files: ``certificate`` (with its key) for
    127.0.0.1 and localhost, ``ca_file`` that clients trust it by, ``client_ca`` for mTLS;
    ``client`` (CN ``svc-a``, URI SAN ``spiffe://example.test/svc-a``, DNS SAN
    ``svc-a.internal``) is a client certificate from ``client_ca``, ``stranger`` one from
    another CA."""

    certificate: str
    ca_file: str
    client_ca: str
    client: str
    stranger: str
    directory: Path
    client_authority: Any

    def ini(self, **options: str) -> str:
        """A ``[tls]`` section with this certificate and any ``options``."""
        lines = [f"certificate = {self.certificate}"]
        lines += [f"{key} = {value}" for key, value in options.items()]
        return "[tls]\n" + "\n".join(lines) + "\n"

    def client_cert(self, name: str, **names: Any) -> str:
        """Another client certificate from ``client_ca`` (see ``issue_client_cert``)."""
        return issue_client_cert(self.client_authority, self.directory / f"{name}.pem",
                                 **names)


def make_tls_files(ca: Any, directory: Path) -> TLSFiles:
    import trustme

    directory.mkdir(parents=True, exist_ok=True)
    certificate = directory / "proxy.pem"
    ca.issue_cert("127.0.0.1", "::1", "localhost").private_key_and_cert_chain_pem.write_to_path(
        str(certificate))
    ca_file = directory / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    client_ca = trustme.CA(organization_name="geproxy tests: clients")
    client_ca_file = directory / "client-ca.pem"
    client_ca.cert_pem.write_to_path(str(client_ca_file))
    client = issue_client_cert(client_ca, directory / "client.pem", common_name="svc-a",
                               uris=["spiffe://example.test/svc-a"], dns=["svc-a.internal"])
    stranger = issue_client_cert(trustme.CA(), directory / "stranger.pem",
                                 common_name="svc-a")
    return TLSFiles(str(certificate), str(ca_file), str(client_ca_file), client, stranger,
                    directory, client_ca)
