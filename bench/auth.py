"""Authentication: what a request costs the proxy with credentials remembered, from the
htpasswd file and from an LDAP directory, and how hard a password guesser can make the
proxy hit the directory.

    python bench/auth.py                  # 3 rounds of 4,000 keep-alive requests each
    python bench/auth.py --quick          # 1 round of 500: a smoke run

Issue 18's bench line: CPU per request with LDAP auth cached against Basic htpasswd cached
(they should cost the same), and the directory's query rate under a password-guessing client
(bounded by the negative cache).

It starts Debian's slapd (the test kit's ``geproxy.testing.directory``: a few users, in a
temp dir, on loopback), the bench's origin (nginx, or bench/origin.c), and one geproxy
(``workers = 1``, every built-in plugin on, access log off) per configuration:

- ``none``: no ``[auth]``: the baseline;
- ``htpasswd``: alice in an htpasswd file (bcrypt, cost 5);
- ``ldap``: ``[auth] ldap_url`` to slapd, search then bind with a service account.

Each round sends N absolute-form GETs for ``/`` on one kept-alive connection, each with
alice's ``Proxy-Authorization`` (after a first request that fills the cache), and reads the
proxy's CPU (utime + stime of its process, /proc) before and after: the table gives the
median over the rounds of microseconds of proxy CPU per request, and each configuration's
ratio to ``none`` and of ``ldap`` to ``htpasswd``. The rounds alternate the configurations.

Then the guesser, against the ``ldap`` proxy (``negative_ttl = 1m``, ``max_failures = 10``):
G requests for alice, each with another wrong password, and G with one wrong password
repeated for bob; the binds slapd logged meanwhile are counted. Without the cache each
request would be a bind (two with the service account's search); with it, bob's repeated
password costs one, and alice's guesses at most ``max_failures``.
"""

from __future__ import annotations

import argparse
import base64
import json
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import origin as origins  # noqa: E402
import procs  # noqa: E402
import subjects  # noqa: E402

CONFIGS = ("none", "htpasswd", "ldap")
RECV = 65536


def _basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def _config(kind: str, port: int, workdir: Path, directory: Any) -> str:
    ini = subjects.geproxy_config(port, "1")
    if kind == "htpasswd":
        from passlib.hash import bcrypt

        path = workdir / "htpasswd"
        path.write_text(f"alice:{bcrypt.using(ident='2y', rounds=5).hash('alice-pw')}\n")
        ini += f"\n[auth]\nhtpasswd = {path}\n"
    elif kind == "ldap":
        secret = workdir / "service.pw"
        secret.write_text(directory.service_password + "\n")
        ini += ("\n[auth]\n"
                f"ldap_url = {directory.url}\n"
                f"ldap_base = ou=people,{directory.base}\n"
                "ldap_filter = (uid={user})\n"
                f"ldap_bind_user = {directory.service_dn}\n"
                f"ldap_bind_password_file = {secret}\n"
                "negative_ttl = 1m\nmax_failures = 10\n")
    return ini


def _start(kind: str, workdir: Path, directory: Any) -> procs.Server:
    port = procs.free_port()
    home = workdir / kind
    home.mkdir(exist_ok=True)
    conf = home / "geproxy.ini"
    conf.write_text(_config(kind, port, home, directory))
    command = [*subjects._geproxy_command(), "--config", str(conf)]
    return procs.start_server(f"geproxy-{kind}", command, port, home)


def _read_answer(sock: socket.socket, buffer: bytearray) -> int:
    """Read one answer with Content-Length from ``sock``; its status."""
    while b"\r\n\r\n" not in buffer:
        chunk = sock.recv(RECV)
        if not chunk:
            raise ConnectionError("the proxy closed the connection")
        buffer += chunk
    head, _, _ = bytes(buffer).partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    whole = len(head) + 4 + length
    while len(buffer) < whole:
        chunk = sock.recv(RECV)
        if not chunk:
            raise ConnectionError("the proxy closed the connection")
        buffer += chunk
    del buffer[:whole]
    return status


def _requests(port: int, origin_port: int, credentials: list[str]) -> list[int]:
    """One GET per credentials on one kept-alive connection (None: no field); statuses."""
    statuses = []
    buffer = bytearray()
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        for value in credentials:
            field = f"Proxy-Authorization: {value}\r\n" if value else ""
            sock.sendall(f"GET http://127.0.0.1:{origin_port}/ HTTP/1.1\r\n"
                         f"Host: 127.0.0.1:{origin_port}\r\n{field}\r\n".encode())
            statuses.append(_read_answer(sock, buffer))
    return statuses


def measure(server: procs.Server, origin_port: int, kind: str, count: int) -> float:
    """Microseconds of proxy CPU per request, for ``count`` requests after a warm-up."""
    value = "" if kind == "none" else _basic("alice", "alice-pw")
    warm = _requests(server.port, origin_port, [value] * 20)
    if set(warm) != {200}:
        raise RuntimeError(f"{kind}: the warm-up was answered {sorted(set(warm))}")
    before = procs.cpu_seconds(server.pid)
    statuses = _requests(server.port, origin_port, [value] * count)
    spent = procs.cpu_seconds(server.pid) - before
    if set(statuses) != {200}:
        raise RuntimeError(f"{kind}: answered {sorted(set(statuses))}")
    return spent / count * 1e6


def guesser(server: procs.Server, origin_port: int, directory: Any, count: int) -> dict:
    """Binds slapd logged for ``count`` guesses at alice's password and ``count`` repeats
    of one wrong password of bob's."""
    alice, bob = directory.user_dn("alice"), directory.user_dn("bob")
    before = directory.binds(), directory.binds(alice)
    statuses = []
    for start in range(0, count, 50):  # several connections, 50 requests each
        batch = [_basic("alice", f"guess-{n}") for n in range(start, min(count, start + 50))]
        statuses += _requests(server.port, origin_port, batch)
    guessing = directory.binds() - before[0], directory.binds(alice) - before[1]
    before = directory.binds(), directory.binds(bob)
    for start in range(0, count, 50):
        statuses += _requests(server.port, origin_port,
                              [_basic("bob", "stale-pw")] * min(50, count - start))
    repeating = directory.binds() - before[0], directory.binds(bob) - before[1]
    if set(statuses) != {407}:
        raise RuntimeError(f"guesses answered {sorted(set(statuses))}")
    return {"attempts": count, "binds_guessing": guessing[0], "user_binds_guessing": guessing[1],
            "binds_repeating": repeating[0], "user_binds_repeating": repeating[1]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=4000)
    parser.add_argument("--guesses", type=int, default=200)
    parser.add_argument("--quick", action="store_true", help="1 round of 500, 100 guesses")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.requests, args.guesses = 1, 500, 100
    import trustme

    from geproxy.testing.directory import Directory

    workdir = Path(tempfile.mkdtemp(prefix="geproxy-bench-auth-"))
    directory = Directory(trustme.CA())
    origin = origins.start("auto", workdir, 1 << 20, 4096)
    servers: dict[str, procs.Server] = {}
    try:
        for kind in CONFIGS:
            servers[kind] = _start(kind, workdir, directory)
        figures: dict[str, list[float]] = {kind: [] for kind in CONFIGS}
        for _ in range(args.rounds):
            for kind in CONFIGS:
                figures[kind].append(measure(servers[kind], origin.port, kind,
                                             args.requests))
        guessed = guesser(servers["ldap"], origin.port, directory, args.guesses)
    finally:
        for server in servers.values():
            procs.stop_server(server)
        origin.stop()
        directory.stop()
    median = {kind: statistics.median(values) for kind, values in figures.items()}
    if args.json:
        print(json.dumps({"cpu_us_per_request": figures, "guesser": guessed}))
        return 0
    print(f"auth bench: {args.rounds} round(s) of {args.requests} keep-alive GETs, "
          f"origin {origin.version}; {time.strftime('%Y-%m-%d')}")
    print(f"{'config':<10} {'us CPU/request':>15} {'range':>17} {'vs none':>8}")
    for kind in CONFIGS:
        low, high = min(figures[kind]), max(figures[kind])
        print(f"{kind:<10} {median[kind]:>15.1f} {low:>8.1f}-{high:<8.1f} "
              f"{median[kind] / median['none']:>8.2f}")
    print(f"ldap / htpasswd: {median['ldap'] / median['htpasswd']:.2f}")
    print(f"guesser: {guessed['attempts']} different wrong passwords for one user: "
          f"{guessed['user_binds_guessing']} binds as the user "
          f"({guessed['binds_guessing']} with the service account's); the same wrong "
          f"password {guessed['attempts']} times: {guessed['user_binds_repeating']} "
          f"({guessed['binds_repeating']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
