"""``geproxy explain`` says what the proxy does: one INI file, a table of requests, each sent
through ``geproxy explain`` (the command) and through a running proxy started from that very
file, with the same verdict (allowed or refused), status and Proxy-Status error for each.

The configuration has the built-ins an operator combines: ``[auth]`` (on and off; through the
proxy with good, wrong and no credentials, through explain with and without ``--user``),
``[acl]`` rules (a deny, a user rule, ``connect_ports``), ``[destinations]``, a parent proxy
(another geproxy process) for some names, the PAC file and the proxy's own pages. Names are
answered by the kit's DNSServer; explain resolves as the proxy does, so the destination guard
and DNS errors show in both. The parent has a DNS server of its own, the only one that knows
``via.test``: a request for it succeeds only if it really went through the parent.

The table says which answer each row is there to exercise (``expect``), so that a setup
mistake cannot make both sides agree on refusing everything; where a status is being changed
elsewhere (the destination guard's), only the error is pinned, and the status compared.
"""

from __future__ import annotations

import base64
import re
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import gevent.pool
import pytest
from passlib.hash import bcrypt

from geproxy.testing import DNSServer, Origin, ProxyProcess, ResponseReader

pytestmark = pytest.mark.timeout(120)

#: The kit origin's answer to ``GET /``: how an answer is known to come from upstream.
ORIGIN_BODY = b"hello\n"
PASSWORD = "alice-pw"
#: A status the row does not pin (compared between explain and the proxy only).
ANY = -1
#: The identities a request is sent with: Proxy-Authorization to the proxy, and the
#: ``--user`` explain gets for it (a user explain is told of is an authenticated one).
IDENTITIES = {"none": (None, None), "alice": (f"alice:{PASSWORD}", "alice"),
              "wrong password": ("alice:not-her-password", None)}


@dataclass(frozen=True)
class Outcome:
    """What a client got. ``status`` None: the origin's own answer, forwarded."""

    status: Optional[int]
    error: Optional[str]

    @property
    def verdict(self) -> str:
        return "allowed" if self.status is None or self.status < 400 else "refused"


@dataclass(frozen=True)
class Row:
    name: str
    method: str
    target: str
    #: What the proxy answers a client it lets through (authenticated, or no [auth]).
    expect: Outcome
    #: Answered before authentication (requests for the proxy itself, denials that need no
    #: user).
    challenged: bool = True
    #: Another answer for some users.
    by_user: dict[str, Outcome] = field(default_factory=dict)


def _rows(origin_port: int) -> list[Row]:
    o = origin_port
    denied = Outcome(403, "http_request_denied")
    return [
        Row("tunnel", "CONNECT", f"127.0.0.1:{o}", Outcome(200, None)),
        Row("forwarded", "GET", f"http://origin.test:{o}/", Outcome(None, None)),
        # A deny the acl walk reaches without needing a user is a 403 even without
        # credentials: no password is asked to be refused anyway.
        Row("acl deny", "GET", f"http://blocked.test:{o}/", denied, challenged=False),
        Row("acl deny, CONNECT", "CONNECT", f"blocked.test:{o}", denied, challenged=False),
        Row("acl user rule", "GET", f"http://staff.test:{o}/", denied,
            by_user={"alice": Outcome(None, None)}),
        Row("connect_ports", "CONNECT", f"origin.test:{o + 1 if o < 65535 else o - 1}",
            denied, challenged=False),
        Row("destination guard, CONNECT", "CONNECT", f"127.0.0.2:{o}",
            Outcome(ANY, "destination_ip_prohibited")),
        Row("destination guard, name", "GET", f"http://private.test:{o}/",
            Outcome(ANY, "destination_ip_prohibited")),
        Row("no such name", "GET", f"http://nxdomain.test:{o}/", Outcome(502, "dns_error")),
        Row("parent, plain", "GET", f"http://via.test:{o}/", Outcome(None, None)),
        Row("parent, CONNECT", "CONNECT", f"via.test:{o}", Outcome(200, None)),
        Row("the proxy's page", "GET", "/healthz", Outcome(200, None), challenged=False),
        Row("no such page", "GET", "/nothing-here", Outcome(404, None), challenged=False),
        Row("PAC file", "GET", "/proxy.pac", Outcome(200, None), challenged=False),
    ]


def _expected(row: Row, auth: bool, identity: str) -> Outcome:
    if auth and row.challenged and IDENTITIES[identity][1] is None:
        return Outcome(407, "http_request_denied")
    return row.by_user.get(identity if auth else "none", row.expect)


# -- the two ways of asking -----------------------------------------------------------------


@dataclass(frozen=True)
class Said:
    """What ``geproxy explain`` printed and how it exited."""

    outcome: Outcome
    verdict: str
    exit_status: int
    stdout: str

    def agrees(self, got: Outcome) -> bool:
        return (self.outcome == got and self.verdict == got.verdict
                and self.exit_status == (0 if got.verdict == "allowed" else 1))


def _explain(config: Path, method: str, target: str, user: Optional[str]) -> Said:
    """Run ``geproxy explain``: its last ``answer`` line (a status, or "forwarded upstream"
    for the origin's), the Proxy-Status error there, its verdict and exit status."""
    args = [sys.executable, "-m", "geproxy", "explain", "--config", str(config)]
    if user:
        args += ["--user", user]
    done = subprocess.run([*args, method, target], capture_output=True, text=True, timeout=60)
    answers = re.findall(r"^answer +(.*)$", done.stdout, re.M)
    verdict = re.search(r"^verdict +(\S+)$", done.stdout, re.M)
    text = answers[-1] if answers else ""
    status = re.match(r"(\d{3}) ", text)
    error = re.search(r"error=([\w-]+)", text)
    outcome = Outcome(int(status.group(1)) if status else None,
                      error.group(1) if error else None)
    return Said(outcome, verdict.group(1) if verdict else "", done.returncode,
                done.stdout + done.stderr)


def _send(proxy: tuple[str, int], method: str, target: str,
          credentials: Optional[str]) -> Outcome:
    """The request as a client sends it; a tunnel counts only once it carried an exchange."""
    host = target if method == "CONNECT" else (target.partition("://")[2].partition("/")[0]
                                               or "proxy")
    head = f"{method} {target} HTTP/1.1\r\nHost: {host}\r\n"
    if credentials:
        head += ("Proxy-Authorization: Basic "
                 f"{base64.b64encode(credentials.encode()).decode()}\r\n")
    if method != "CONNECT":
        head += "Connection: close\r\n"
    with socket.create_connection(proxy, timeout=10) as sock:
        sock.sendall((head + "\r\n").encode())
        answer, body = ResponseReader(sock).read()
        status = int(answer.split(b" ", 2)[1])
        error = re.search(rb"(?im)^proxy-status:.*error=([\w-]+)", answer)
        outcome = Outcome(status, error.group(1).decode() if error else None)
        if method == "CONNECT" and status == 200:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: origin\r\nConnection: close\r\n\r\n")
            inner, inner_body = ResponseReader(sock).read()
            assert inner_body == ORIGIN_BODY, (target, inner, inner_body)
        elif status == 200 and body == ORIGIN_BODY and re.search(rb"(?im)^via:", answer):
            outcome = Outcome(None, None)  # the origin's answer, forwarded
    return outcome


# -- the setup ------------------------------------------------------------------------------


@pytest.fixture
def parent_dns() -> Iterator[DNSServer]:
    """The parent's DNS server: ``via.test`` is known there only."""
    server = DNSServer()
    server.add("via.test", "A", "127.0.0.1")
    yield server
    server.stop()


def _resolver(dns: DNSServer) -> str:
    return f"[resolver]\nnameservers = {dns.nameserver}\nipv6 = off\n"


def _config(tmp_path: Path, dns_server: DNSServer, parent: ProxyProcess, origin: Origin,
            auth: bool) -> str:
    for name in ("origin.test", "staff.test"):
        dns_server.add(name, "A", "127.0.0.1")
    dns_server.add("private.test", "A", "127.0.0.2")
    assert parent.address is not None
    text = ("[geproxy]\nlisten = 127.0.0.1:0\naccess_log = off\n" + _resolver(dns_server)
            + f"[acl]\nconnect_ports = 443 {origin.port}\nrules =\n"
              "    blocked: deny dst blocked.test\n"
              "    staff: allow user alice dst staff.test\n"
              "    staff_only: deny dst staff.test\n"
              "    others: allow all\n"
              # The origin and the parent, on 127.0.0.1; 127.0.0.2 stays denied.
              "[destinations]\nallow = 127.0.0.1/32\n"
              f"[parents]\nparents = http://127.0.0.1:{parent.address[1]}\n"
              "rules =\n    parent via.test\n"
              "[pac]\npaths = /proxy.pac\n")
    if auth:
        htpasswd = tmp_path / "htpasswd"
        htpasswd.write_text(f"alice:{bcrypt.using(ident='2y', rounds=5).hash(PASSWORD)}\n")
        text += f"[auth]\nhtpasswd = {htpasswd}\n"
    return text


@pytest.mark.parametrize("auth", [False, True], ids=["auth-off", "auth-on"])
def test_explain_gives_the_proxys_answer(auth: bool, tmp_path: Path, origin: Origin,
                                         dns_server: DNSServer, parent_dns: DNSServer,
                                         proxy_process: Callable[[str], ProxyProcess]) -> None:
    # The parent: another geproxy, with a Via name of its own (the child's is no loop).
    parent = proxy_process("via = parent\n" + _resolver(parent_dns))
    running = proxy_process(_config(tmp_path, dns_server, parent, origin, auth))
    config, proxy = Path(running.config_path), running.address
    assert proxy is not None
    identities = list(IDENTITIES) if auth else ["none"]
    cases = [(row, identity) for row in _rows(origin.port) for identity in identities]
    # explain once per (request, --user); the runs are independent processes, so in parallel.
    asked = sorted({(row.method, row.target, IDENTITIES[identity][1] if auth else None)
                    for row, identity in cases}, key=str)
    pool = gevent.pool.Pool(4)
    explained = dict(zip(asked, pool.map(lambda key: _explain(config, *key), asked),
                         strict=True))
    mismatches: list[Any] = []
    for row, identity in cases:
        credentials, user = IDENTITIES[identity] if auth else (None, None)
        said = explained[(row.method, row.target, user)]
        got = _send(proxy, row.method, row.target, credentials)
        expected = _expected(row, auth, identity)
        if not said.agrees(got):
            mismatches.append((row.name, identity, "explain", said.outcome, said.verdict,
                               said.exit_status, "proxy", got, got.verdict))
        elif (expected.status not in (ANY, got.status) or expected.error != got.error
              or (expected.status == ANY and got.verdict != "refused")):
            mismatches.append((row.name, identity, "both", got, "expected", expected))
    assert not mismatches, "\n".join(map(str, mismatches))


@pytest.mark.parametrize("mode", ["answer", "close"])
def test_explain_and_the_proxy_agree_on_a_client_refused_by_its_address(
        proxy_process: Callable[[str], ProxyProcess], mode: str) -> None:
    """``--from`` a client the ACL refuses by its address alone: a 403 to its request
    (``refuse_at_connect = answer``), or a close before any byte (``close``), in both."""
    running = proxy_process("[acl]\nconnect_ports = 1-65535\n"
                            f"refuse_at_connect = {mode}\n"
                            "rules =\n    outsiders: deny src 127.0.0.2\n    allow all\n")
    config, proxy = running.config_path, running.address
    done = subprocess.run([sys.executable, "-m", "geproxy", "explain", "--config",
                           str(config), "--from", "127.0.0.2", "GET", "/healthz"],
                          capture_output=True, text=True, timeout=60)
    answer = re.findall(r"^answer +(.*)$", done.stdout, re.M)[-1]
    assert done.returncode == 1 and re.search(r"^verdict +refused$", done.stdout, re.M)
    with socket.create_connection(proxy, timeout=10, source_address=("127.0.0.2", 0)) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: proxy\r\n\r\n")
        try:
            got = sock.recv(65536)
        except ConnectionResetError:
            got = b""  # closed with the request unread: a reset, as good as a close
    if mode == "answer":
        assert got.startswith(b"HTTP/1.1 403 ") and b"error=http_request_denied" in got
        assert answer.startswith("403 ") and "error=http_request_denied" in answer
    else:
        assert got == b""
        assert answer.startswith("none: the connection is closed before any byte is read")
        assert "(rule outsiders)" in answer
