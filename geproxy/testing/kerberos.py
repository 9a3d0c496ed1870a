"""A real MIT Kerberos KDC on loopback, for tests of Negotiate (SPNEGO) authentication.

    kdc = start_kdc(tmp_dir)                  # realm CORP.EXAMPLE, alice, bob, HTTP/localhost
                                              # PARTNER.EXAMPLE (carol), which it trusts
    kdc.kinit("alice", ccache)                # a ticket, as a user gets one
    subprocess.run([...], env=kdc.env(ccache))
    kdc.stop()

The realm is made with the commands an administrator runs (docs/deployment.md, "Joining a
directory"): ``kdb5_util create -s``, ``kadmin.local -q "addprinc ..."``,
``ktadd -k KEYTAB``, and ``krb5kdc -n`` in the foreground, stopped by its PID. Everything
lives in one directory of the test's: the database, ``kdc.conf``, a ``krb5.conf`` that
makes no DNS lookup and knows only loopback, the proxy's keytab, the replay cache. No
process is given the system's ``/etc/krb5.conf``: every command here runs with
``env()``, and so must the test's own (``KRB5_CONFIG``, ``KRB5_KDC_PROFILE``,
``KRB5CCNAME``, ``KRB5RCACHEDIR``).

The proxy's principal is ``HTTP/localhost``: clients address the proxy as ``localhost``
(``curl -x http://localhost:PORT``), and with ``dns_canonicalize_hostname = false`` and
``rdns = false`` that is the name they ask a ticket for.

Fixtures (pytest, registered by ``geproxy.testing``): ``kerberos_kdc``, the KDC, one per
session; ``kerberos``, per test, a ``KerberosClient`` with the test process's environment
pointed at the realm, a credential cache and a replay cache of the test's own
(``kerberos.kinit("alice")``, ``kerberos.keytab``, ``kerberos.env()`` for subprocesses).

This module imports no GSSAPI binding: ``gssapi`` is an optional extra, and a test that
needs it asks ``require_gssapi()``.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path
from typing import Iterator, Optional, Sequence

import pytest

from .clients import stop_process

#: The test realm, and the service principal of the proxy in it.
REALM = "CORP.EXAMPLE"
SERVICE = "HTTP/localhost"
#: The users of the realm, with their passwords (kinit reads them on its standard input).
USERS = {"alice": "alice-secret", "bob": "bob-secret"}
#: A second realm that REALM trusts (its users get tickets for REALM's services, as a
#: partner forest's do), and its user.
PARTNER = "PARTNER.EXAMPLE"
PARTNER_USERS = {f"carol@{PARTNER}": "carol-secret"}
#: The master key's password (``kdb5_util create -P``): nobody types it.
MASTER_PASSWORD = "geproxy-tests-master"
#: The commands the KDC needs, for ``require_tool``.
TOOLS = ("krb5kdc", "kdb5_util", "kadmin.local", "kinit")

KRB5_CONF = """\
[libdefaults]
    default_realm = {realm}
    dns_lookup_kdc = false
    dns_lookup_realm = false
    rdns = false
    dns_canonicalize_hostname = false
    qualify_shortname = ""
    udp_preference_limit = 1
    clockskew = {clockskew}

[realms]
    {realm} = {{
        kdc = 127.0.0.1:{port}
    }}
    {partner} = {{
        kdc = 127.0.0.1:{port}
    }}

[domain_realm]
    localhost = {realm}
"""

KDC_CONF = """\
[kdcdefaults]
    kdc_listen = 127.0.0.1:{port}
    kdc_tcp_listen = 127.0.0.1:{port}

[realms]
    {realm} = {{
        database_name = {directory}/principal
        key_stash_file = {directory}/stash
        acl_file = {directory}/kadm5.acl
        max_life = 10h
        max_renewable_life = 1d
    }}
    {partner} = {{
        database_name = {directory}/partner
        key_stash_file = {directory}/partner-stash
        acl_file = {directory}/kadm5.acl
        max_life = 10h
    }}

[logging]
    kdc = FILE:{directory}/kdc.log
"""


def require_gssapi() -> None:
    """Skip the test when python-gssapi cannot be imported (``pip install
    geproxy[kerberos]``), or fail it when ``GEPROXY_REQUIRE_TOOLS`` is set (CI)."""
    import importlib

    try:
        importlib.import_module("gssapi")
    except ImportError as exc:
        reason = f"python-gssapi is not importable ({exc}): pip install 'geproxy[kerberos]'"
        if os.environ.get("GEPROXY_REQUIRE_TOOLS"):
            pytest.fail(reason)
        pytest.skip(reason)


class KDC:
    """A running KDC for ``REALM`` and the files around it (see the module's docstring).

    ``keytab`` holds the keys of ``SERVICE``; ``krb5_conf`` is the clients' and the
    proxy's configuration; ``log`` is the KDC's log file (one line per ticket issued).
    """

    def __init__(self, directory: Path, realm: str = REALM, clockskew: int = 300) -> None:
        self.directory = directory
        self.realm = realm
        self.clockskew = clockskew
        directory.mkdir(parents=True, exist_ok=True)
        self.krb5_conf = directory / "krb5.conf"
        self.kdc_conf = directory / "kdc.conf"
        self.keytab = directory / "proxy.keytab"
        self.log = directory / "kdc.log"
        self.rcache = directory / "rcache"
        self.rcache.mkdir(exist_ok=True)
        self.port = 0
        self.process: Optional[subprocess.Popen[bytes]] = None

    # -- what every process of the test is given --------------------------------------

    def env(self, ccache: Optional[os.PathLike[str] | str] = None,
            rcache: Optional[os.PathLike[str] | str] = None) -> dict[str, str]:
        """The variables that point a process at this realm and nowhere else: its
        configuration, the KDC's, the credential cache ``ccache`` (a file; the KDC's
        directory's ``ccache`` if None) and the replay cache directory ``rcache``."""
        return {
            "KRB5_CONFIG": str(self.krb5_conf),
            "KRB5_KDC_PROFILE": str(self.kdc_conf),
            "KRB5CCNAME": "FILE:" + str(ccache or self.directory / "ccache"),
            "KRB5RCACHEDIR": str(rcache or self.rcache),
        }

    def _run(self, *command: str, input: Optional[str] = None,
             env: Optional[dict[str, str]] = None, timeout: float = 30) -> str:
        environment = {k: v for k, v in os.environ.items() if not k.startswith("KRB5")}
        environment.update(env or self.env())
        result = subprocess.run(command, input=(input or "").encode(), capture_output=True,
                                env=environment, timeout=timeout, check=False)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(command)}: exit {result.returncode}: "
                               f"{result.stderr.decode(errors='replace').strip()}")
        return result.stdout.decode(errors="replace")

    # -- the realm ----------------------------------------------------------------------

    def write_config(self, krb5_conf: Optional[Path] = None,
                     clockskew: Optional[int] = None) -> Path:
        """Write a ``krb5.conf`` for this realm (the KDC's own by default) with
        ``clockskew`` seconds of tolerance; returns its path."""
        path = krb5_conf or self.krb5_conf
        path.write_text(KRB5_CONF.format(
            realm=self.realm, partner=PARTNER, port=self.port,
            clockskew=self.clockskew if clockskew is None else clockskew))
        return path

    def create(self) -> None:
        """The database, with the users of USERS and the proxy's SERVICE in ``keytab``:
        the commands of docs/deployment.md."""
        self.kdc_conf.write_text(KDC_CONF.format(realm=self.realm, partner=PARTNER,
                                                 port=self.port, directory=self.directory))
        (self.directory / "kadm5.acl").write_text("")
        self.write_config()
        self._run("kdb5_util", "create", "-s", "-r", self.realm, "-P", MASTER_PASSWORD)
        for user, password in USERS.items():
            self.add_principal(user, password)
        self.add_principal(SERVICE)
        self.export_keytab([SERVICE], self.keytab)
        # The partner realm, and the trust: one key, under one name, in both databases.
        self._run("kdb5_util", "create", "-s", "-r", PARTNER, "-P", MASTER_PASSWORD)
        for user, password in PARTNER_USERS.items():
            self.add_principal(user, password)
        trust = f"krbtgt/{self.realm}@{PARTNER}"
        for realm in (self.realm, PARTNER):
            self.kadmin(f"addprinc -pw {MASTER_PASSWORD}-trust {trust}", realm)

    def kadmin(self, query: str, realm: Optional[str] = None) -> str:
        """Run one ``kadmin.local`` request on the database of ``realm`` (REALM's)."""
        return self._run("kadmin.local", "-r", realm or self.realm, "-q", query)

    def add_principal(self, name: str, password: Optional[str] = None) -> None:
        """A user with ``password``, or a service with a random key (``-randkey``), in
        the realm ``name`` ends with (REALM without one)."""
        realm = name.partition("@")[2] or self.realm
        if password is None:
            self.kadmin(f"addprinc -randkey {name}", realm)
        else:
            self.kadmin(f"addprinc -pw {password} {name}", realm)

    def export_keytab(self, principals: Sequence[str], path: Path) -> Path:
        """Write the keys of ``principals`` to the keytab ``path`` (``ktadd -k``; each
        export makes new keys, so tickets issued before it no longer open)."""
        self.kadmin(f"ktadd -k {path} " + " ".join(principals))
        return path

    # -- the server ---------------------------------------------------------------------

    def start(self, attempts: int = 3, limit: float = 15.0) -> None:
        """Create the realm on a free loopback port and run ``krb5kdc -n`` until it
        answers on TCP (bounded: ``attempts`` ports, ``limit`` seconds each)."""
        from .clients import free_port

        for _ in range(attempts):
            self.port = free_port()
            if self.process is None and not self.kdc_conf.exists():
                self.create()
            else:  # another port: the configurations name it
                self.kdc_conf.write_text(KDC_CONF.format(
                    realm=self.realm, partner=PARTNER, port=self.port,
                    directory=self.directory))
                self.write_config()
            environment = {k: v for k, v in os.environ.items() if not k.startswith("KRB5")}
            environment.update(self.env())
            with open(self.directory / "krb5kdc.out", "ab") as output:
                self.process = subprocess.Popen(
                    ["krb5kdc", "-n", "-r", self.realm, "-r", PARTNER], env=environment,
                    stdout=output, stderr=subprocess.STDOUT)
            if self._answers(limit):
                return
            self.stop()
        raise RuntimeError(f"krb5kdc did not start: see {self.log} and "
                           f"{self.directory / 'krb5kdc.out'}")

    def _answers(self, limit: float) -> bool:
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                return False
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return True
            except OSError:
                time.sleep(0.05)
        return False

    def stop(self) -> None:
        """Stop the KDC this started (by its PID)."""
        process, self.process = self.process, None
        if process is not None:
            stop_process(process)

    # -- clients ------------------------------------------------------------------------

    def kinit(self, user: str, ccache: os.PathLike[str] | str,
              lifetime: Optional[str] = None, password: Optional[str] = None) -> str:
        """Get ``user`` (of USERS, or PARTNER_USERS with its realm) a ticket-granting
        ticket into the file ``ccache`` (the password on kinit's standard input, as a user
        types it), valid ``lifetime`` (``kinit -l``: ``10s``, ``1h``) if given; returns
        the ``KRB5CCNAME`` value."""
        command = ["kinit"]
        if lifetime:
            command += ["-l", lifetime]
        principal = user if "@" in user else f"{user}@{self.realm}"
        password = password or {**USERS, **PARTNER_USERS}[user]
        command.append(principal)
        self._run(*command, input=password + "\n", env=self.env(ccache))
        return "FILE:" + str(ccache)

    def issued(self) -> int:
        """How many tickets the KDC's log says it issued (AS and TGS alike)."""
        if not self.log.exists():
            return 0
        return sum(1 for line in self.log.read_text(errors="replace").splitlines()
                   if "ISSUE:" in line)


def start_kdc(directory: Path, realm: str = REALM, clockskew: int = 300) -> KDC:
    """A running KDC for ``realm`` in ``directory`` (see KDC); stop it with ``stop()``."""
    kdc = KDC(directory, realm, clockskew)
    kdc.start()
    return kdc


class KerberosClient:
    """What a test that uses the realm holds (the ``kerberos`` fixture): the KDC, and a
    credential cache and a replay cache of the test's own, which the test process's
    environment names (so that the in-process proxy and the clients it starts use
    them)."""

    def __init__(self, kdc: KDC, directory: Path) -> None:
        self.kdc = kdc
        self.ccache = directory / "ccache"
        self.rcache = directory / "rcache"
        self.rcache.mkdir(parents=True, exist_ok=True)

    @property
    def keytab(self) -> Path:
        return self.kdc.keytab

    def env(self, ccache: Optional[os.PathLike[str] | str] = None) -> dict[str, str]:
        return self.kdc.env(ccache or self.ccache, self.rcache)

    def kinit(self, user: str, lifetime: Optional[str] = None,
              ccache: Optional[os.PathLike[str] | str] = None) -> str:
        """``kinit`` ``user`` into the test's credential cache (or ``ccache``)."""
        return self.kdc.kinit(user, ccache or self.ccache, lifetime)


@pytest.fixture(scope="session")
def kerberos_kdc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KDC]:
    """A KDC for CORP.EXAMPLE (alice, bob, HTTP/localhost in ``keytab``), one per test
    session: skips (or fails, with ``GEPROXY_REQUIRE_TOOLS``) without MIT Kerberos."""
    from .clients import require_tool

    for tool in TOOLS:
        require_tool(tool)
    kdc = start_kdc(tmp_path_factory.mktemp("kdc"))
    yield kdc
    kdc.stop()


@pytest.fixture
def kerberos(kerberos_kdc: KDC, tmp_path: Path,
             monkeypatch: pytest.MonkeyPatch) -> KerberosClient:
    """The realm of ``kerberos_kdc`` for one test: python-gssapi required (see
    ``require_gssapi``), and the test process's environment pointed at the realm, a
    credential cache and a replay cache of the test's (the in-process proxy and every
    client started from the test inherit it)."""
    require_gssapi()
    client = KerberosClient(kerberos_kdc, tmp_path / "kerberos")
    for key, value in client.env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("KRB5_KTNAME", raising=False)
    monkeypatch.delenv("KRB5_TRACE", raising=False)
    return client
