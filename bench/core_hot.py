"""The core's work per keep-alive request without sockets: a micro-benchmark.

    python bench/core_hot.py                 # 20,000 requests, best of 5
    python bench/core_hot.py --requests 50000 --repeat 7

What a plain keep-alive GET costs the core in Python alone, step by step, on the heads the
bench's load sends and nginx answers (and a curl-like request with more fields): the
request head parsed, the head sent upstream made, the response head parsed, the answer's
head edited and serialised. No socket, no hook, no plugin: this isolates the head handling
that docs/performance.md counts per request, so that a change to it is measured in
microseconds rather than read from the noise of a rate. Each step runs `--requests` times,
the best of `--repeat` rounds is kept (the least disturbed by the rest of the machine).
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Callable

from geproxy.models import Response
from geproxy.protocol import http11
from geproxy.protocol.semantics import (
    answer_framing,
    client_keeps_alive,
    response_fields,
    upstream_head,
    without_framing,
)

#: The bench's wrk request (wrk_absolute.lua), and curl's through a proxy.
WRK = b"GET http://127.0.0.1:8080/ HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n\r\n"
CURL = (b"GET http://example.com:8080/index.html?q=1 HTTP/1.1\r\nHost: example.com:8080\r\n"
        b"User-Agent: curl/7.88.1\r\nAccept: */*\r\nProxy-Connection: Keep-Alive\r\n\r\n")
#: nginx's answer to the bench's `GET /`.
NGINX = (b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Mon, 07 Dec 2026 23:00:00 GMT\r\n"
         b"Content-Type: application/octet-stream\r\nContent-Length: 29\r\n"
         b"Last-Modified: Mon, 07 Dec 2026 22:00:00 GMT\r\nConnection: keep-alive\r\n"
         b'ETag: "6575a0c0-1d"\r\nAccept-Ranges: bytes\r\n\r\nhello from the bench origin A')


def steps(request_bytes: bytes) -> dict[str, Callable[[], object]]:
    """The steps of one request, each a function of nothing (its inputs made once)."""
    request = http11.RequestHeadParser(65536).feed(request_bytes)
    assert request is not None
    response = http11.ResponseHeadParser(65536).feed(NGINX)
    assert response is not None

    def parse_request() -> object:
        parser = http11.RequestHeadParser(65536)
        return parser.feed(request_bytes)

    def request_checks() -> object:
        assert request is not None
        http11.request_body_reader(request)
        return client_keeps_alive(request)

    def head_upstream() -> object:
        assert request is not None
        return upstream_head(request, None, forwarded="off", client_ip="127.0.0.1",
                             via="geproxy")

    def parse_response() -> object:
        parser = http11.ResponseHeadParser(65536)
        return parser.feed(NGINX)

    def head_to_client() -> object:
        assert request is not None and response is not None
        reader = http11.response_body_reader(request.method, response)
        response.headers.tokens("connection")
        length, _ = answer_framing(reader, response)
        edited = Response(response.status, response_fields(response, "geproxy"), b"",
                          response.reason, response.version)
        headers = without_framing(edited.headers)
        if length is not None:
            headers.add("Content-Length", length)
        headers.add("Connection", "keep-alive") if request.version == "HTTP/1.0" else None
        headers.get("content-type")
        return http11.serialize_head(f"HTTP/1.1 {edited.status} OK", headers)

    return {"parse the request head": parse_request,
            "its framing and keep-alive": request_checks,
            "the head sent upstream": head_upstream,
            "parse the response head": parse_response,
            "the answer's head to the client": head_to_client}


def measure(step: Callable[[], object], requests: int, repeat: int) -> float:
    """The best round's µs per call."""
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        for _ in range(requests):
            step()
        best = min(best, (time.perf_counter() - started) / requests * 1e6)
    return best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args(argv)
    if not 1 <= args.requests <= 10**6 or not 1 <= args.repeat <= 20:
        parser.error("--requests 1-1000000, --repeat 1-20")
    print("| step | wrk's GET, µs | curl's GET, µs |")
    print("|---|---:|---:|")
    made = [steps(WRK), steps(CURL)]
    totals = [0.0, 0.0]
    for name in made[0]:
        cells = []
        for index, found in enumerate(made):
            took = measure(found[name], args.requests, args.repeat)
            totals[index] += took
            cells.append(f"{took:.2f}")
        print(f"| {name} | " + " | ".join(cells) + " |")
    print(f"| **all** | {totals[0]:.2f} | {totals[1]:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
