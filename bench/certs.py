"""Certificates for the TLS measures, made at run time with trustme: a CA, and a certificate
for 127.0.0.1 (an IP address SAN) that every TLS server of the bench presents: geproxy's
and squid's TLS listeners and the origin's TLS server (nginx).

trustme's default key type, ECDSA P-256, is what a certificate authority issues today by
default, and costs a server one cheap signature per full handshake.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

#: How the report describes the certificate.
DESCRIPTION = ("ECDSA P-256 certificate for 127.0.0.1 from a trustme CA, sent alone "
               "(no intermediate)")


@dataclass(frozen=True)
class TLSFiles:
    ca: Path       # what clients trust the servers by
    cert: Path     # the server's certificate alone
    key: Path      # its private key alone
    chain: Path    # certificate and key in one file (geproxy's [tls] certificate)


def make(directory: Path) -> TLSFiles:
    """Write a fresh CA and server certificate into `directory` (created 0755, files 0644:
    squid reads them after switching to its own user)."""
    import trustme  # only a TLS run needs it

    directory.mkdir(mode=0o755, parents=True, exist_ok=True)
    ca = trustme.CA(organization_name="geproxy bench")
    leaf = ca.issue_cert("127.0.0.1")
    files = TLSFiles(directory / "ca.pem", directory / "cert.pem", directory / "key.pem",
                     directory / "chain.pem")
    ca.cert_pem.write_to_path(str(files.ca))
    leaf.cert_chain_pems[0].write_to_path(str(files.cert))
    leaf.private_key_pem.write_to_path(str(files.key))
    leaf.private_key_and_cert_chain_pem.write_to_path(str(files.chain))
    for path in (files.ca, files.cert, files.key, files.chain):
        path.chmod(0o644)
    return files


def missing() -> str | None:
    """Why the TLS measures cannot run here, or None."""
    try:
        import trustme  # noqa: F401
    except ImportError:
        return "trustme is not installed (pip install trustme)"
    return None
