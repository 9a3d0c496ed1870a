"""The ``auth`` plugin's Kerberos: SPNEGO ``Negotiate`` against a real MIT KDC on loopback.

The KDC (geproxy.testing.kerberos: realm CORP.EXAMPLE, users alice and bob, the proxy's
``HTTP/localhost`` in a keytab) runs once per session; each test has its own credential
cache and replay cache, named in the test process's environment (the ``kerberos`` fixture),
which the in-process proxy, curl and the python-gssapi client below all read. Clients name
the proxy ``localhost``, the name of its principal. curl speaks Negotiate as browsers do;
the small client here makes the cases curl cannot (a token kept for a replay, a token only
on a connection's first request, a ticket for another service).
"""

from __future__ import annotations

import base64
import logging
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

import h2.errors
import pytest
from geproxy_plugins.auth.negotiate import reason, split_principal, user_name

from geproxy import ConfigError, hookimpl
from geproxy.testing import (
    ResponseReader,
    StaticResolver,
    curl,
    head_field,
    wait_for_records,
    wait_until,
)
from geproxy.testing.h2client import H2Client
from geproxy.testing.kerberos import PARTNER, REALM, KerberosClient

pytestmark = pytest.mark.timeout(60)

SPNEGO = "1.3.6.1.5.5.2"
ALICE = f"alice@{REALM}"
LOGGER = "geproxy_plugins.auth.negotiate"


class Seen:
    """Each request's user and how it was authenticated, as ``on_close`` saw them (the
    record's ctx is the connection's, which the next request changes)."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, int, Optional[str], Optional[str]]] = []

    @hookimpl
    def on_close(self, ctx: Any, record: Any) -> None:
        self.requests.append((record.method, record.status, ctx.user, ctx.auth_result))


def token(service: str = "HTTP@localhost", ccache: Optional[Path] = None) -> str:
    """A Negotiate token (SPNEGO, as browsers and curl send) for ``service`` from the
    tickets of ``ccache`` (the test's own by default): base64, for the header."""
    import gssapi

    kind = (gssapi.NameType.hostbased_service if "@" in service and "/" not in service
            else gssapi.NameType.kerberos_principal)
    creds = None
    if ccache is not None:
        creds = gssapi.Credentials(usage="initiate", store={"ccache": f"FILE:{ccache}"})
    context = gssapi.SecurityContext(name=gssapi.Name(service, kind), usage="initiate",
                                     mech=gssapi.OID.from_int_seq(SPNEGO), creds=creds)
    return base64.b64encode(context.step()).decode()


def request(target: str, authorization: Optional[str] = None,
            method: str = "GET") -> bytes:
    host = target.split("/")[2] if "://" in target else target
    head = f"{method} {target} HTTP/1.1\r\nHost: {host}\r\n"
    if authorization:
        head += f"Proxy-Authorization: {authorization}\r\n"
    return (head + "\r\n").encode()


class Connection:
    """One kept-alive client connection to the proxy, request by request."""

    def __init__(self, proxy: Any) -> None:
        self.sock = socket.create_connection(proxy.address, timeout=10)
        self.reader = ResponseReader(self.sock)

    def ask(self, target: str, authorization: Optional[str] = None,
            method: str = "GET") -> tuple[int, bytes, bytes]:
        self.sock.sendall(request(target, authorization, method))
        if method == "CONNECT":
            head = b""
            while b"\r\n\r\n" not in head:
                piece = self.sock.recv(65536)
                assert piece, head
                head += piece
            return int(head.split()[1]), head, b""
        head, body = self.reader.read()
        return int(head.split()[1]), head, body

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def connections():
    made: list[Connection] = []

    def connect(proxy: Any) -> Connection:
        made.append(Connection(proxy))
        return made[-1]

    yield connect
    for connection in made:
        connection.close()


@pytest.fixture
def negotiate_proxy(kerberos: KerberosClient, proxy_factory):
    """``negotiate_proxy(extra="", **auth)``: a proxy whose [auth] has the realm's keytab
    and ``HTTP/localhost`` (and the options ``auth``); (proxy, Seen)."""

    def start(extra: str = "", core: str = "", **auth: str):
        options = {"keytab": str(kerberos.keytab), "principal": "HTTP/localhost", **auth}
        seen = Seen()
        proxy = proxy_factory(
            core + "[auth]\n" + "".join(f"{k} = {v}\n" for k, v in options.items()) + extra,
            plugins=[seen], resolver=StaticResolver({"origin.test": ["127.0.0.1"]}))
        return proxy, seen

    return start


def proxy_url(proxy: Any) -> str:
    """The proxy as clients name it: ``localhost``, the host of its principal."""
    return f"http://localhost:{proxy.port}"


def htpasswd(path: Path, users: dict[str, str]) -> Path:
    from passlib.hash import bcrypt

    path.write_text("".join(f"{user}:{bcrypt.using(ident='2y', rounds=4).hash(password)}\n"
                            for user, password in users.items()))
    return path


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


# -- curl, as a user runs it ------------------------------------------------------------------


def test_curl_negotiates_plain_http_and_a_connect_tunnel(kerberos, negotiate_proxy, origin,
                                                         tls_origin, ca_file):
    kerberos.kinit("alice")
    proxy, seen = negotiate_proxy()
    plain = curl("--proxy-negotiate", "-U", ":", "-x", proxy_url(proxy), origin.url("/"))
    assert plain.stdout == b"hello\n", plain.stderr
    tunnel = curl("--proxy-negotiate", "-U", ":", "-x", proxy_url(proxy), "--cacert", ca_file,
                  f"https://origin.test:{tls_origin.port}/")
    assert tunnel.stdout == b"hello\n", tunnel.stderr
    wait_for_records(proxy, 2)
    # curl sends its token with the first request, without waiting for a 407.
    assert seen.requests == [("GET", 200, ALICE, "ok"), ("CONNECT", 200, ALICE, "ok")]
    assert "proxy-authorization" not in origin.seen[-1].headers


def test_curl_anyauth_answers_the_407_with_a_token(kerberos, negotiate_proxy, origin,
                                                    tls_origin, ca_file):
    """The browsers' way: a request without credentials, the 407, then the token on the
    same connection."""
    kerberos.kinit("alice")
    proxy, seen = negotiate_proxy()
    plain = curl("--proxy-anyauth", "-U", ":", "-x", proxy_url(proxy), origin.url("/"))
    assert plain.stdout == b"hello\n", plain.stderr
    tunnel = curl("--proxy-anyauth", "-U", ":", "-x", proxy_url(proxy), "--cacert", ca_file,
                  f"https://origin.test:{tls_origin.port}/")
    assert tunnel.stdout == b"hello\n", tunnel.stderr
    wait_for_records(proxy, 4)
    assert seen.requests == [("GET", 407, None, None), ("GET", 200, ALICE, "ok"),
                             ("CONNECT", 407, None, None), ("CONNECT", 200, ALICE, "ok")]


def test_curl_negotiates_over_a_tls_listener_offering_http2(kerberos, negotiate_proxy,
                                                            origin, tls_files):
    """On a TLS listener with ``http2 = on``, a client speaking HTTP/1.1 (ALPN) is served
    Negotiate: only HTTP/2 streams are sent away."""
    kerberos.kinit("alice")
    proxy, seen = negotiate_proxy(
        core="[geproxy]\nlisten = 127.0.0.1:0, tls://127.0.0.1:0\n" + tls_files.ini(http2="on"))
    result = curl("--proxy-negotiate", "-U", ":", "--proxy-cacert", tls_files.ca_file,
                  "-x", f"https://localhost:{proxy.tls_address[1]}", origin.url("/"))
    assert result.stdout == b"hello\n", result.stderr
    wait_for_records(proxy, 1)
    assert seen.requests == [("GET", 200, ALICE, "ok")]


# -- one connection, one authentication -------------------------------------------------------


def test_a_kept_alive_connection_is_authenticated_once(kerberos, negotiate_proxy, origin,
                                                        connections):
    kerberos.kinit("alice")
    proxy, seen = negotiate_proxy()
    connection = connections(proxy)
    first = token()
    assert connection.ask(origin.url("/"), f"Negotiate {first}")[0] == 200
    assert connection.ask(origin.url("/"))[0] == 200  # no token: the connection's user
    # The same token again (curl resends it): the connection's, not a replay.
    assert connection.ask(origin.url("/"), f"Negotiate {first}")[0] == 200
    wait_for_records(proxy, 3)
    assert seen.requests == [("GET", 200, ALICE, "ok"), ("GET", 200, ALICE, "connection"),
                             ("GET", 200, ALICE, "connection")]


def test_a_tunnel_is_the_connections_user(kerberos, negotiate_proxy, origin, tls_origin,
                                          connections):
    kerberos.kinit("alice")
    proxy, seen = negotiate_proxy()
    connection = connections(proxy)
    assert connection.ask(origin.url("/"), f"Negotiate {token()}")[0] == 200
    status, head, _ = connection.ask(f"origin.test:{tls_origin.port}", method="CONNECT")
    assert status == 200, head
    connection.close()
    wait_for_records(proxy, 2)
    assert seen.requests == [("GET", 200, ALICE, "ok"), ("CONNECT", 200, ALICE, "connection")]


def test_a_replayed_token_is_refused_on_another_connection(kerberos, negotiate_proxy, origin,
                                                           connections, caplog):
    kerberos.kinit("alice")
    proxy, seen = negotiate_proxy()
    stolen = f"Negotiate {token()}"
    assert connections(proxy).ask(origin.url("/"), stolen)[0] == 200
    with caplog.at_level(logging.INFO, logger=LOGGER):
        status, head, _ = connections(proxy).ask(origin.url("/"), stolen)
    assert status == 407, head
    assert head_field(head, b"proxy-authenticate") == b"Negotiate"
    assert "Negotiate token refused: Request is a replay" in caplog.text
    wait_for_records(proxy, 2)
    assert seen.requests == [("GET", 200, ALICE, "ok"), ("GET", 407, None, "failed")]


def test_a_new_token_authenticates_the_connection_anew(kerberos, negotiate_proxy, origin,
                                                       connections, tmp_path, caplog):
    kerberos.kinit("alice")
    bob_cache = tmp_path / "bob.ccache"
    kerberos.kinit("bob", ccache=bob_cache)
    proxy, seen = negotiate_proxy(strip_realm="on")
    connection = connections(proxy)
    assert connection.ask(origin.url("/"), f"Negotiate {token()}")[0] == 200
    assert connection.ask(origin.url("/"), f"Negotiate {token(ccache=bob_cache)}")[0] == 200
    assert connection.ask(origin.url("/"))[0] == 200
    with caplog.at_level(logging.INFO, logger=LOGGER):
        assert connection.ask(origin.url("/"), "Negotiate bm90IGEgdG9rZW4=")[0] == 407
        # A token that failed leaves the connection without a user.
        assert connection.ask(origin.url("/"))[0] == 407
    assert "Negotiate token refused" in caplog.text
    wait_for_records(proxy, 5)
    assert seen.requests == [("GET", 200, "alice", "ok"), ("GET", 200, "bob", "ok"),
                             ("GET", 200, "bob", "connection"), ("GET", 407, None, "failed"),
                             ("GET", 407, None, None)]


def test_ntlm_in_negotiate_is_refused(kerberos, negotiate_proxy, origin, connections,
                                      caplog):
    """What a Windows client outside the domain sends: an NTLM message, not Kerberos."""
    ntlm = base64.b64encode(b"NTLMSSP\0\x01\0\0\0\x07\x82\x08\xa2" + b"\0" * 16).decode()
    proxy, seen = negotiate_proxy()
    with caplog.at_level(logging.INFO, logger=LOGGER):
        status, head, _ = connections(proxy).ask(origin.url("/"), f"Negotiate {ntlm}")
    assert status == 407, head
    assert "Negotiate token refused: An unsupported mechanism was requested" in caplog.text
    wait_for_records(proxy, 1)
    assert seen.requests == [("GET", 407, None, "failed")]


def test_a_malformed_token_is_refused(kerberos, negotiate_proxy, origin, connections, caplog):
    proxy, seen = negotiate_proxy()
    connection = connections(proxy)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        for bad in ("Negotiate not*base64", "Negotiate", "Negotiate ===="):
            assert connection.ask(origin.url("/"), bad)[0] == 407
    assert caplog.text.count("malformed Negotiate token") == 3
    wait_for_records(proxy, 3)
    assert [result for *_, result in seen.requests] == ["failed"] * 3


# -- tickets the proxy must refuse ----------------------------------------------------------


def test_an_expired_ticket_is_refused(kerberos, negotiate_proxy, origin, connections,
                                      monkeypatch, tmp_path, caplog):
    """A token whose ticket ended (with the skew the proxy tolerates) opens nothing, even
    one never used. The MIT client makes no token from an ended ticket, so the token is
    made before the end: its authenticator is then as old, and the library may say so
    first (``Clock skew too great``) rather than ``Ticket expired``."""
    conf = kerberos.kdc.write_config(tmp_path / "krb5-skew.conf", clockskew=1)
    monkeypatch.setenv("KRB5_CONFIG", str(conf))
    kerberos.kinit("alice", lifetime="2s")
    late = f"Negotiate {token()}"  # the ticket for HTTP/localhost ends with the TGT
    expired_at = time.time() + 2 + 1  # its lifetime, and the skew
    proxy, _ = negotiate_proxy()
    assert wait_until(lambda: time.time() > expired_at + 0.5, limit=10)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        status, head, _ = connections(proxy).ask(origin.url("/"), late)
    assert status == 407, head
    assert re.search(r"Negotiate token refused: (Ticket expired|Clock skew too great)",
                     caplog.text), caplog.text


@pytest.fixture
def other_service(kerberos) -> str:
    """A service principal of the realm whose key the proxy's keytab does not hold."""
    kdc = kerberos.kdc
    if "HTTP/elsewhere@" not in kdc.kadmin("listprincs HTTP/elsewhere*"):
        kdc.add_principal("HTTP/elsewhere")
    return "HTTP/elsewhere"


def test_a_ticket_for_another_service_is_refused(kerberos, negotiate_proxy, origin,
                                                 connections, other_service, caplog):
    kerberos.kinit("alice")
    proxy, seen = negotiate_proxy()
    with caplog.at_level(logging.INFO, logger=LOGGER):
        status, head, _ = connections(proxy).ask(origin.url("/"),
                                                 f"Negotiate {token(other_service)}")
    assert status == 407, head
    assert "Negotiate token refused:" in caplog.text
    wait_for_records(proxy, 1)
    assert seen.requests == [("GET", 407, None, "failed")]


def test_a_trusted_realms_user_needs_kerberos_realms(kerberos, negotiate_proxy, origin,
                                                      connections, caplog):
    """carol of PARTNER.EXAMPLE, a realm the proxy's trusts, has a good ticket for the
    proxy: refused while ``kerberos_realms`` is the proxy's realm (the default), let in
    once it names hers too."""
    carol = f"carol@{PARTNER}"
    kerberos.kinit(carol)
    proxy, seen = negotiate_proxy()
    with caplog.at_level(logging.INFO, logger=LOGGER):
        status, _, _ = connections(proxy).ask(origin.url("/"), f"Negotiate {token()}")
    assert status == 407
    assert f"{carol} is not of a realm of kerberos_realms ({REALM})" in caplog.text
    wait_for_records(proxy, 1)
    assert seen.requests == [("GET", 407, None, "failed")]
    proxy, seen = negotiate_proxy(kerberos_realms=f"{REALM} {PARTNER}")
    assert connections(proxy).ask(origin.url("/"), f"Negotiate {token()}")[0] == 200
    wait_for_records(proxy, 1)
    assert seen.requests == [("GET", 200, carol, "ok")]


# -- the user's name --------------------------------------------------------------------------


@pytest.mark.parametrize(("strip", "user"), [("off", ALICE), ("on", "alice")])
def test_strip_realm_names_the_user(kerberos, negotiate_proxy, origin, strip, user, tmp_path):
    kerberos.kinit("alice")
    log = tmp_path / "access.log"
    proxy, seen = negotiate_proxy(core=f"[geproxy]\naccess_log = {log}\n", strip_realm=strip)
    result = curl("--proxy-negotiate", "-U", ":", "-x", proxy_url(proxy), origin.url("/"))
    assert result.stdout == b"hello\n", result.stderr
    wait_for_records(proxy, 1)
    assert seen.requests == [("GET", 200, user, "ok")]
    assert wait_until(lambda: log.exists() and f" {user} " in log.read_text()), (
        log.read_text() if log.exists() else "no log")


@pytest.mark.pure
@pytest.mark.parametrize(("principal", "strip", "fold", "user"), [
    ("alice@CORP.EXAMPLE", False, True, "alice@CORP.EXAMPLE"),
    ("Alice@CORP.EXAMPLE", False, True, "alice@CORP.EXAMPLE"),
    ("Alice@CORP.EXAMPLE", True, True, "alice"),
    ("Alice@CORP.EXAMPLE", True, False, "Alice"),
    ("Alice@CORP.EXAMPLE", False, False, "Alice@CORP.EXAMPLE"),
    ("HTTP/host.corp.example@CORP.EXAMPLE", True, True, "http/host.corp.example"),
    ("alice@PARTNER.EXAMPLE", True, True, "alice"),
    ("alice@FOREIGN.EXAMPLE", True, True, None),
    ("alice@corp.example", False, True, None),  # realms compare exactly
    ("alice", True, True, None),  # no realm: nothing to accept it by
    ("a\\@b@CORP.EXAMPLE", True, True, "a\\@b"),
])
def test_the_user_a_principal_is(principal, strip, fold, user):
    realms = frozenset({"CORP.EXAMPLE", "PARTNER.EXAMPLE"})
    assert user_name(principal, realms, strip, fold) == user


@pytest.mark.pure
def test_principal_names_parse():
    assert split_principal("HTTP/proxy.corp.example") == (["HTTP", "proxy.corp.example"], None)
    assert split_principal("HTTP/proxy@CORP.EXAMPLE") == (["HTTP", "proxy"], "CORP.EXAMPLE")
    assert split_principal("a\\/b@R/S") == (["a\\/b"], "R/S")
    for bad in ("", "HTTP/", "/x", "a@", "a@B@C", "a\\", "a//b@R"):
        with pytest.raises(ValueError):
            split_principal(bad)


@pytest.mark.pure
def test_the_reason_logged_is_gssapis():
    text = ("Major (851968): Unspecified GSS failure.  Minor code may provide more "
            "information, Minor (100005): Request is a replay")
    assert reason(Exception(text)) == "Request is a replay"
    assert reason(Exception("Major (65536): An unsupported mechanism was requested")) == (
        "An unsupported mechanism was requested")
    assert reason(Exception("Major (65536): An unsupported mechanism was requested, "
                            "Minor (0): Unknown error")) == (
        "An unsupported mechanism was requested")


# -- with Basic beside it ---------------------------------------------------------------------


def test_the_407_offers_negotiate_and_basic(kerberos, negotiate_proxy, origin, connections,
                                            tmp_path):
    path = htpasswd(tmp_path / "htpasswd", {"svc": "svc-pw"})
    proxy, _ = negotiate_proxy(htpasswd=str(path), realm="Corp proxy")
    status, head, _ = connections(proxy).ask(origin.url("/"))
    assert status == 407
    offers = [line.partition(b":")[2].strip() for line in head.split(b"\r\n")
              if line.lower().startswith(b"proxy-authenticate:")]
    assert offers == [b"Negotiate", b'Basic realm="Corp proxy"']
    # Basic still works for the users of the file.
    assert connections(proxy).ask(origin.url("/"), basic("svc", "svc-pw"))[0] == 200


def test_basic_of_another_user_on_a_negotiated_connection_is_refused(
        kerberos, negotiate_proxy, origin, connections, tmp_path):
    kerberos.kinit("alice")
    path = htpasswd(tmp_path / "htpasswd", {"alice": "alice-pw", "bob": "bob-pw"})
    proxy, seen = negotiate_proxy(htpasswd=str(path), strip_realm="on")
    connection = connections(proxy)
    assert connection.ask(origin.url("/"), f"Negotiate {token()}")[0] == 200
    # The same user in both: no contradiction.
    assert connection.ask(origin.url("/"), basic("alice", "alice-pw"))[0] == 200
    status, head, _ = connection.ask(origin.url("/"), basic("bob", "bob-pw"))
    assert status == 400, head
    wait_for_records(proxy, 3)
    assert [(status, user) for _, status, user, _ in seen.requests] == [
        (200, "alice"), (200, "alice"), (400, None)]


def _status_as(kerberos: KerberosClient, user: str, tmp_path: Path, proxy: Any,
               origin: Any) -> bytes:
    """The status curl gets for a GET through ``proxy`` with ``user``'s ticket (kinit
    into a credential cache of the user's own)."""
    ccache = tmp_path / f"{user}.ccache"
    kerberos.kinit(user, ccache=ccache)
    done = subprocess.run(
        ["curl", "-q", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--noproxy", "",
         "--proxy-negotiate", "-U", ":", "-x", proxy_url(proxy), origin.url("/")],
        capture_output=True, timeout=30, env={**os.environ, **kerberos.env(ccache)})
    return done.stdout


def test_an_acl_rule_names_the_kerberos_user(kerberos, negotiate_proxy, origin, tmp_path):
    kerberos.kinit("alice")
    proxy, seen = negotiate_proxy(
        "[acl]\nconnect_ports = 1-65535\nrules =\n    allow user alice\n    deny all\n",
        strip_realm="on")
    assert curl("--proxy-negotiate", "-U", ":", "-x", proxy_url(proxy),
                origin.url("/")).stdout == b"hello\n"
    assert _status_as(kerberos, "bob", tmp_path, proxy, origin) == b"403"
    wait_for_records(proxy, 2)
    assert [(status, user) for _, status, user, _ in seen.requests] == [
        (200, "alice"), (403, "bob")]


# -- HTTP/2 -----------------------------------------------------------------------------------


@pytest.fixture
def h2_client(tls_files):
    made: list[H2Client] = []

    def connect(proxy: Any) -> H2Client:
        made.append(H2Client(proxy.tls_address, tls_files.ca_file))
        return made[-1]

    yield connect
    for client in made:
        client.close()


def test_http2_streams_needing_negotiate_are_sent_to_http11(kerberos, negotiate_proxy,
                                                            origin, tls_files, tmp_path,
                                                            h2_client):
    kerberos.kinit("alice")
    path = htpasswd(tmp_path / "htpasswd", {"svc": "svc-pw"})
    proxy, seen = negotiate_proxy(
        core="[geproxy]\nlisten = 127.0.0.1:0, tls://127.0.0.1:0\n" + tls_files.ini(http2="on"),
        htpasswd=str(path))
    client = h2_client(proxy)
    # A CONNECT without credentials: its 407 would offer Negotiate, which needs HTTP/1.1.
    stream = client.connect(f"127.0.0.1:{origin.port}")
    with pytest.raises(ConnectionResetError):
        stream.wait_head()
    assert stream.reset == h2.errors.ErrorCodes.HTTP_1_1_REQUIRED == 0xD
    # A Negotiate token on a stream: the same.
    stream = client.connect(f"127.0.0.1:{origin.port}",
                            [("proxy-authorization", f"Negotiate {token()}")])
    with pytest.raises(ConnectionResetError):
        stream.wait_head()
    assert stream.reset == h2.errors.ErrorCodes.HTTP_1_1_REQUIRED
    # Basic is per request: each stream carries its own, on the same connection.
    status, _, body = client.request("GET", origin.url("/"),
                                     headers=[("proxy-authorization", basic("svc", "svc-pw"))])
    assert (status, body) == (200, b"hello\n")
    wait_for_records(proxy, 3)
    assert seen.requests[-1] == ("GET", 200, "svc", "ok")


# -- configuration: nothing acquired before it is needed ---------------------------------


def _load(tmp_path: Path, section: str) -> Any:
    from geproxy.policy.plugins import load

    path = tmp_path / "auth.ini"
    path.write_text(f"[geproxy]\naccess_log = off\n[auth]\n{section}")
    pm, _ = load(str(path), entry_points=False)
    return pm.get_plugin("auth")


def test_configuration_is_checked_without_acquiring(kerberos, tmp_path):
    with pytest.raises(ConfigError) as caught:
        _load(tmp_path, f"keytab = {tmp_path / 'missing.keytab'}\n")
    assert (caught.value.section, caught.value.key) == ("auth", "keytab")
    assert "No such file" in str(caught.value)
    with pytest.raises(ConfigError) as caught:
        _load(tmp_path, f"keytab = {kerberos.keytab}\nprincipal = HTTP/@CORP.EXAMPLE\n")
    assert caught.value.key == "principal"
    negotiator = _load(tmp_path, f"keytab = {kerberos.keytab}\n"
                                 "principal = HTTP/proxy@PARTNER.EXAMPLE\n").negotiator
    assert negotiator.realms == {"PARTNER.EXAMPLE"} and negotiator._creds is None
    negotiator = _load(tmp_path, f"keytab = {kerberos.keytab}\n").negotiator
    assert negotiator.realms == frozenset()  # the default realm: asked on first use


def test_without_python_gssapi_the_keytab_is_refused(tmp_path, monkeypatch):
    """Whether python-gssapi is installed or not (no KDC needed)."""
    keytab = tmp_path / "proxy.keytab"
    keytab.write_bytes(b"\x05\x02")  # an empty keytab: the check only reads the file
    monkeypatch.setitem(sys.modules, "gssapi", None)  # import gssapi raises ImportError
    monkeypatch.setitem(sys.modules, "gssapi.raw", None)
    with pytest.raises(ConfigError) as caught:
        _load(tmp_path, f"keytab = {keytab}\n")
    assert caught.value.key == "keytab"
    assert "install geproxy[kerberos] (python-gssapi" in str(caught.value)


def test_the_default_realm_comes_from_krb5_conf_on_first_use(kerberos, negotiate_proxy,
                                                             origin, connections):
    kerberos.kinit("alice")
    proxy, seen = negotiate_proxy(principal="")  # any principal of the keytab
    assert connections(proxy).ask(origin.url("/"), f"Negotiate {token()}")[0] == 200
    wait_for_records(proxy, 1)
    assert seen.requests == [("GET", 200, ALICE, "ok")]
    assert proxy.server.pm.get_plugin("auth").negotiator.realms == {REALM}


def test_an_unusable_keytab_is_a_503(kerberos, negotiate_proxy, origin, connections, caplog):
    """A principal the keytab lacks shows on the first token: the backend is unavailable,
    which is the proxy's fault, not the client's."""
    kerberos.kinit("alice")
    proxy, _ = negotiate_proxy(principal="HTTP/missing")
    with caplog.at_level(logging.ERROR, logger=LOGGER):
        status, head, _ = connections(proxy).ask(origin.url("/"), f"Negotiate {token()}")
    assert status == 503, head
    assert b'details="authentication backend unavailable"' in head
    assert "Negotiate cannot be accepted: keytab" in caplog.text


def _trace_pids(path: Path) -> set[int]:
    """The processes that wrote lines to a KRB5_TRACE file."""
    if not path.exists():
        return set()
    return {int(pid) for pid in re.findall(r"^\[(\d+)\]", path.read_text(), re.M)}


def test_workers_negotiate_and_only_workers_touch_kerberos(kerberos, proxy_process, origin,
                                                          monkeypatch, tmp_path):
    """With ``workers = 2``: curl is served by Negotiate, a token replayed on another
    connection (whichever worker takes it) is refused, and the library's trace shows
    that neither ``check-config``, ``explain`` nor the master did anything with
    Kerberos."""
    kerberos.kinit("alice")
    ini = (f"workers = 2\n[auth]\nkeytab = {kerberos.keytab}\nprincipal = HTTP/localhost\n")
    checked = tmp_path / "check.trace"
    path = tmp_path / "check.ini"
    from geproxy.testing import kit_ini

    path.write_text(kit_ini(ini))
    for command in (["check-config"], ["explain", "--user", ALICE, "GET", origin.url("/")]):
        result = subprocess.run([sys.executable, "-m", "geproxy", command[0], "--config",
                                 str(path), *command[1:]], capture_output=True, timeout=30,
                                env={**os.environ, "KRB5_TRACE": str(checked)})
        assert result.returncode == 0, result.stderr
    assert not checked.exists() or not checked.read_text()
    served = tmp_path / "proxy.trace"
    monkeypatch.setenv("KRB5_TRACE", str(served))
    proxy = proxy_process(ini)
    monkeypatch.delenv("KRB5_TRACE")
    assert wait_until(lambda: sum(") serves" in line for line in proxy.log) >= 2)
    assert _trace_pids(served) == set()  # started: nothing acquired yet
    url = f"http://localhost:{proxy.address[1]}"
    for _ in range(4):
        result = curl("--proxy-negotiate", "-U", ":", "-x", url, origin.url("/"))
        assert result.stdout == b"hello\n", result.stderr
    stolen = f"Negotiate {token()}"
    answers = []
    for _ in range(2):
        with socket.create_connection(proxy.address, timeout=10) as sock:
            sock.sendall(request(origin.url("/"), stolen))
            answers.append(ResponseReader(sock).read()[0].split()[1])
    assert answers == [b"200", b"407"]
    pids = _trace_pids(served)
    assert pids and proxy.process.pid not in pids


def test_gssapi_runs_in_the_thread_pool(kerberos, negotiate_proxy, origin, connections,
                                        monkeypatch):
    """Every GSSAPI call of the proxy runs off the event loop's thread."""
    import gssapi.raw
    from gevent import monkey

    get_ident = monkey.get_original("_thread", "get_ident")
    loop_thread = get_ident()
    threads: dict[str, list[int]] = {}

    def spy(name: str) -> Any:
        real = getattr(gssapi.raw, name)

        def call(*args: Any, **kwargs: Any) -> Any:
            threads.setdefault(name, []).append(get_ident())
            return real(*args, **kwargs)

        return call

    for name in ("acquire_cred_from", "accept_sec_context", "canonicalize_name"):
        monkeypatch.setattr(gssapi.raw, name, spy(name))
    kerberos.kinit("alice")
    proxy, _ = negotiate_proxy(principal="")  # the default realm is looked up too
    assert connections(proxy).ask(origin.url("/"), f"Negotiate {token()}")[0] == 200
    assert sorted(threads) == ["accept_sec_context", "acquire_cred_from",
                               "canonicalize_name"]
    assert loop_thread not in {ident for idents in threads.values() for ident in idents}


# -- groups of a Kerberos user, from the directory --------------------------------------------


def test_a_kerberos_users_groups_come_from_the_directory(kerberos, negotiate_proxy, origin,
                                                         ldap_directory, tmp_path):
    """alice@CORP.EXAMPLE (the realm kept) is looked up in the directory as alice: in
    admins, she is let through by ``allow group admins``; bob, in staff only, is not."""
    secret = tmp_path / "service.pw"
    secret.write_text(ldap_directory.service_password + "\n")
    kerberos.kinit("alice")
    proxy, seen = negotiate_proxy(
        "[acl]\nconnect_ports = 1-65535\nrules =\n    admins: allow group admins\n"
        "    others: deny all\n",
        ldap_url=ldap_directory.url, ldap_base=ldap_directory.base,
        ldap_bind_user=ldap_directory.service_dn, ldap_bind_password_file=str(secret),
        ldap_group_base=f"ou=groups,{ldap_directory.base}")
    assert curl("--proxy-negotiate", "-U", ":", "-x", proxy_url(proxy),
                origin.url("/")).stdout == b"hello\n"
    assert _status_as(kerberos, "bob", tmp_path, proxy, origin) == b"403"
    records = wait_for_records(proxy, 2)
    assert [(status, user) for _, status, user, _ in seen.requests] == [
        (200, ALICE), (403, f"bob@{REALM}")]
    assert records[1].rule == "others"
    assert re.search(r"SRCH base=\"ou=groups,dc=corp,dc=example\".*filter=\"\(&\(objectClass="
                     r"groupOfNames\)\(member=uid=alice,", ldap_directory.log())
