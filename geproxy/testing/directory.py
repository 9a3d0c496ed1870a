"""An OpenLDAP directory for tests: ``slapd`` on loopback with a few users and groups.

The ``ldap_directory`` fixture (session scope) starts Debian's ``slapd`` with a slapd.conf
generated in a temp dir (never the system's /etc/ldap/slapd.d), its data loaded by
``slapadd`` before the start::

    dc=corp,dc=example
      cn=geproxy            the service account (password SERVICE_PASSWORD)
      ou=people             alice, bob, mallory (uid=NAME, password NAME-pw), memberOf kept
                            as a plain attribute (as Active Directory keeps it)
      ou=groups             groupOfNames staff (alice, bob) and admins (alice)

It listens on ``ldap://127.0.0.1:port`` (StartTLS offered) and ``ldaps://127.0.0.1:tls_port``
with a certificate from the kit's ``tls_ca`` (so ``ca_file`` verifies it). People are read
only by a bound client (the service account, or a user itself): an anonymous search finds
nobody; groups are readable by anyone. ``binds()`` counts the binds slapd logged (its
``-d 256`` log), for tests of caches that must spare the directory.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator, Optional

import gevent
import pytest

from .clients import free_port, require_tool, stop_process

__all__ = ["Directory", "ldap_directory", "SERVICE_PASSWORD"]

BASE = "dc=corp,dc=example"
SERVICE_DN = f"cn=geproxy,{BASE}"
SERVICE_PASSWORD = "service-pw"
#: Users and their groups; each one's password is NAME-pw.
USERS = {"alice": ("staff", "admins"), "bob": ("staff",), "mallory": ()}
GROUPS = ("staff", "admins")
SCHEMAS = Path("/etc/ldap/schema")
MODULES = Path("/usr/lib/ldap")

#: memberOf as a plain attribute (no overlay: slapadd would not run it), with the OID
#: Active Directory gives it, on an auxiliary class the users carry.
_MEMBER_OF_SCHEMA = """\
attributetype ( 1.2.840.113556.1.2.102 NAME 'memberOf'
  EQUALITY distinguishedNameMatch SYNTAX 1.3.6.1.4.1.1466.115.121.1.12 )
objectclass ( 1.3.6.1.4.1.99999.1.1 NAME 'geproxyMember' AUXILIARY MAY memberOf )
"""


def _ldif() -> str:
    entries = [
        f"dn: {BASE}\nobjectClass: dcObject\nobjectClass: organization\ndc: corp\no: corp\n",
        f"dn: {SERVICE_DN}\nobjectClass: organizationalRole\nobjectClass: simpleSecurityObject"
        f"\ncn: geproxy\nuserPassword: {SERVICE_PASSWORD}\n",
        f"dn: ou=people,{BASE}\nobjectClass: organizationalUnit\nou: people\n",
        f"dn: ou=groups,{BASE}\nobjectClass: organizationalUnit\nou: groups\n",
    ]
    for user, groups in USERS.items():
        member_of = "".join(f"memberOf: cn={group},ou=groups,{BASE}\n" for group in groups)
        entries.append(
            f"dn: uid={user},ou=people,{BASE}\nobjectClass: inetOrgPerson\n"
            f"objectClass: geproxyMember\nuid: {user}\ncn: {user.title()}\nsn: {user}\n"
            f"userPassword: {user}-pw\n{member_of}")
    for group in GROUPS:
        members = "".join(f"member: uid={user},ou=people,{BASE}\n"
                          for user, groups in USERS.items() if group in groups)
        entries.append(f"dn: cn={group},ou=groups,{BASE}\nobjectClass: groupOfNames\n"
                       f"cn: {group}\n{members}")
    return "\n".join(entries)


def _conf(root: Path, cert: Path, key: Path, ca: Path) -> str:
    schemas = "".join(f"include {SCHEMAS / name}.schema\n"
                      for name in ("core", "cosine", "inetorgperson"))
    return f"""\
{schemas}include {root / "memberof.schema"}
modulepath {MODULES}
moduleload back_mdb
pidfile {root / "slapd.pid"}
argsfile {root / "slapd.args"}
TLSCACertificateFile {ca}
TLSCertificateFile {cert}
TLSCertificateKeyFile {key}

database mdb
maxsize 16777216
suffix "{BASE}"
rootdn "cn=admin,{BASE}"
directory {root / "data"}
access to attrs=userPassword by anonymous auth by * none
access to dn.subtree="ou=people,{BASE}" by users read by anonymous auth
access to * by * read
"""


class Directory:
    """A running slapd; see the module's docstring."""

    base = BASE
    service_dn = SERVICE_DN
    service_password = SERVICE_PASSWORD
    users = USERS

    def __init__(self, tls_ca: Any, limit: float = 20.0) -> None:
        slapd = require_tool("slapd")
        slapadd = require_tool("slapadd")
        self.root = Path(tempfile.mkdtemp(prefix="geproxy-slapd-"))
        self.process: Optional[subprocess.Popen[bytes]] = None
        try:
            self._start(slapd, slapadd, tls_ca, limit)
        except BaseException:
            self.stop()
            raise

    def _start(self, slapd: str, slapadd: str, tls_ca: Any, limit: float) -> None:
        root = self.root
        (root / "data").mkdir()
        (root / "memberof.schema").write_text(_MEMBER_OF_SCHEMA)
        cert, key, ca = root / "cert.pem", root / "key.pem", root / "ca.pem"
        issued = tls_ca.issue_cert("127.0.0.1", "localhost")
        issued.cert_chain_pems[0].write_to_path(str(cert))
        issued.private_key_pem.write_to_path(str(key))
        tls_ca.cert_pem.write_to_path(str(ca))
        #: The CA file that verifies the directory's certificate.
        self.ca_file = str(ca)
        conf = root / "slapd.conf"
        conf.write_text(_conf(root, cert, key, ca))
        ldif = root / "data.ldif"
        ldif.write_text(_ldif())
        env = {**os.environ, "LDAPNOINIT": "1"}
        loaded = subprocess.run([slapadd, "-f", str(conf), "-l", str(ldif)], env=env,
                                capture_output=True, timeout=limit)
        if loaded.returncode:
            raise RuntimeError(f"slapadd failed: {loaded.stderr.decode(errors='replace')}")
        self.port, self.tls_port = free_port(), free_port()
        self.log_path = root / "slapd.log"
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [slapd, "-f", str(conf), "-d", "256",
                 "-h", f"ldap://127.0.0.1:{self.port}/ ldaps://127.0.0.1:{self.tls_port}/"],
                stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + limit
        for port in (self.port, self.tls_port):
            while not self._accepts(port):
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("slapd did not start: " + self.log()[-2000:])
                gevent.sleep(0.05)

    @staticmethod
    def _accepts(port: int) -> bool:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
        except OSError:
            return False
        return True

    @property
    def url(self) -> str:
        return f"ldap://127.0.0.1:{self.port}"

    @property
    def tls_url(self) -> str:
        return f"ldaps://127.0.0.1:{self.tls_port}"

    def log(self) -> str:
        """slapd's log so far (connections, binds, searches with their filters)."""
        return self.log_path.read_text(errors="replace")

    def binds(self, dn: str = "") -> int:
        """The binds slapd logged so far (those of ``dn`` only, when given; any case)."""
        found = re.findall(r'BIND dn="([^"]*)"', self.log())
        return sum(1 for bound in found if not dn or bound.lower() == dn.lower())

    def user_dn(self, user: str) -> str:
        return f"uid={user},ou=people,{BASE}"

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process)
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="session")
def ldap_directory(tls_ca: Any) -> Iterator[Directory]:
    """A running slapd (see :class:`Directory`), shared by a session's tests: treat it as
    read-only."""
    directory = Directory(tls_ca)
    yield directory
    directory.stop()
