"""A scripted DNS server on loopback (UDP and TCP on one port), and a fake clock.

The server answers from records a test adds, counts every query, and can be made slow, mute,
or to answer with an error code or a truncated UDP reply (so clients retry over TCP).
"""

from __future__ import annotations

import socket
import struct
from collections import Counter
from typing import Optional

import gevent
import gevent.server

__all__ = ["DNSServer", "FakeClock"]


class DNSServer:
    """An authoritative server for whatever names a test adds, on ``127.0.0.1:port``.

    ``add("a.test", "A", "127.0.0.1", ttl=30)`` adds a record; ``fail("b.test", "NXDOMAIN")``
    makes a name answer with an rcode; ``delay`` (seconds) slows every answer; ``mute`` drops
    every query unanswered; ``truncate`` sends UDP answers with the TC bit and no records.
    ``queries[(name, qtype)]`` counts the questions received (over both transports).
    """

    def __init__(self) -> None:
        from dnslib import QTYPE  # noqa: F401  (fail early when the extra is missing)

        self.records: dict[tuple[str, str], list[tuple[str, int]]] = {}
        self.rcodes: dict[str, str] = {}
        self.queries: Counter[tuple[str, str]] = Counter()
        self.delay = 0.0
        self.mute = False
        self.truncate = False
        self._udp, self._tcp = _bind_pair()
        self._servers = [
            gevent.server.DatagramServer(self._udp, self._on_datagram),
            gevent.server.StreamServer(self._tcp, self._on_stream),
        ]
        for server in self._servers:
            server.start()

    @property
    def address(self) -> tuple[str, int]:
        return ("127.0.0.1", self._udp.getsockname()[1])

    @property
    def nameserver(self) -> str:
        """The address as ``[resolver] nameservers`` takes it."""
        return f"127.0.0.1:{self.address[1]}"

    def add(self, name: str, qtype: str, *values: str, ttl: int = 60) -> None:
        key = (name.rstrip(".").lower(), qtype.upper())
        self.records.setdefault(key, []).extend((value, ttl) for value in values)

    def set(self, name: str, qtype: str, *values: str, ttl: int = 60) -> None:
        """Replace the records of ``name`` and ``qtype``."""
        self.records.pop((name.rstrip(".").lower(), qtype.upper()), None)
        self.add(name, qtype, *values, ttl=ttl)

    def fail(self, name: str, rcode: str = "NXDOMAIN") -> None:
        self.rcodes[name.rstrip(".").lower()] = rcode

    def count(self, name: str, qtype: Optional[str] = None) -> int:
        name = name.rstrip(".").lower()
        return sum(n for (q, t), n in self.queries.items()
                   if q == name and (qtype is None or t == qtype.upper()))

    def stop(self) -> None:
        for server in self._servers:
            server.stop(timeout=1)

    # -- answering ----------------------------------------------------------------------

    def _answer(self, data: bytes, udp: bool) -> Optional[bytes]:
        from dnslib import QTYPE, RCODE, RR, DNSRecord

        try:
            query = DNSRecord.parse(data)
        except Exception:  # garbage from a fuzzing test: a real server ignores it too
            return None
        qname = str(query.q.qname).rstrip(".").lower()
        qtype = QTYPE.get(query.q.qtype)
        self.queries[(qname, qtype)] += 1
        if self.delay:
            gevent.sleep(self.delay)
        if self.mute:
            return None
        reply = query.reply()
        if qname in self.rcodes:
            reply.header.rcode = getattr(RCODE, self.rcodes[qname])
            return reply.pack()
        if not any(name == qname for name, _ in self.records):
            reply.header.rcode = RCODE.NXDOMAIN  # the name does not exist at all
            return reply.pack()
        answers = self._chain(qname, qtype)
        if udp and self.truncate and answers:
            reply.header.tc = 1
            return reply.pack()
        for line in answers:
            reply.add_answer(*RR.fromZone(line))
        return reply.pack()

    def _chain(self, qname: str, qtype: str) -> list[str]:
        """The answer as zone lines, following CNAMEs as a recursive server does."""
        lines: list[str] = []
        name = qname
        for _ in range(8):  # a CNAME loop in the test's own records ends here
            records = self.records.get((name, qtype), [])
            if records or qtype == "CNAME":
                lines.extend(f"{name}. {ttl} IN {qtype} {value}" for value, ttl in records)
                return lines
            aliases = self.records.get((name, "CNAME"))
            if not aliases:
                return lines
            target, ttl = aliases[0]
            target = target.rstrip(".").lower()
            lines.append(f"{name}. {ttl} IN CNAME {target}.")
            name = target
        return lines

    def _on_datagram(self, data: bytes, address: tuple[str, int]) -> None:
        answer = self._answer(data, udp=True)
        if answer is not None:
            self._servers[0].sendto(answer, address)

    def _on_stream(self, sock: socket.socket, address: tuple[str, int]) -> None:
        sock.settimeout(10)
        try:
            while True:
                head = _recv_exactly(sock, 2)
                if not head:
                    return
                data = _recv_exactly(sock, struct.unpack("!H", head)[0])
                answer = self._answer(data, udp=False)
                if answer is None:
                    return
                sock.sendall(struct.pack("!H", len(answer)) + answer)
        except OSError:
            return
        finally:
            sock.close()


def _recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        piece = sock.recv(size - len(data))
        if not piece:
            return b""
        data += piece
    return data


def _bind_pair() -> tuple[socket.socket, socket.socket]:
    """A UDP and a TCP socket bound to the same free port of 127.0.0.1."""
    for _ in range(50):  # a port free for UDP may be taken for TCP: try a few
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        udp.bind(("127.0.0.1", 0))
        tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            tcp.bind(("127.0.0.1", udp.getsockname()[1]))
        except OSError:
            udp.close()
            tcp.close()
            continue
        tcp.listen(64)
        return udp, tcp
    raise RuntimeError("no port free for both UDP and TCP on 127.0.0.1")


class FakeClock:
    """A clock for caches under test: ``clock()`` is the time, ``advance(s)`` moves it."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds
