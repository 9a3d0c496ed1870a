"""The access log's cost per line, without a network: format and write N lines of one
keep-alive GET (a Context and Record as the proxy builds them) to a file in a temp dir.

    python bench/access_log.py                   # 200,000 lines per format and way
    python bench/access_log.py --lines 50000 --formats json

For each format, µs per line, in this process, one way after the other:

- ``old``: the access log as it was before issue 19 (the BASELINE below, a copy kept here
  only to measure against): ``logging.Logger.info`` through a ``WatchedFileHandler`` (an
  ``os.stat`` of the path and a flush per line) of the old formatters.
- ``new format``, ``new write``: the plugin's formatter alone, its FileSink alone (the line
  already made), and ``new``, both: what ``on_close`` does per line now.
- ``buffered``: the new formatter into a 64 KiB buffer written when full: what a ``buffer``
  option would save per line, to decide whether it pays (it is not in the plugin).

Nothing is asserted; tests/test_access_log.py checks that the new formatters write what the
BASELINE does, byte for byte.
"""

from __future__ import annotations

import argparse
import json
import logging
import logging.handlers
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

from geproxy_plugins import access_log, log_formats

from geproxy import Context, Record
from geproxy.hosts import authority
from geproxy.models import Headers, Request

Format = Callable[[Context, Record], str]


# -- BASELINE: plugins/log_formats.py and the writer before issue 19, unchanged ---------------


def _field(value: Optional[str]) -> str:
    if not value:
        return "-"
    return "".join(c if " " < c < "\x7f" else f"%{ord(c):02X}" for c in value)


def _upstream(record: Record) -> str:
    address = record.upstream_addr
    return authority(*address) if address else "-"


def old_geproxy_line(ctx: Context, record: Record) -> str:
    return " ".join([
        f"{record.started:.3f}", str(int(record.duration * 1000)), ctx.client_addr[0],
        _field(record.method), _field(record.target), str(record.status),
        record.error or "-", str(record.bytes_in), str(record.bytes_out), _upstream(record),
        _field(ctx.user), ctx.conn_id, _field(record.rule), _field(record.sni),
    ])


_DENIALS = frozenset({"http_request_denied", "destination_ip_prohibited"})


def _squid_code(record: Record) -> str:
    if record.error in _DENIALS and record.status < 500:
        return "TCP_DENIED"
    if record.method == "CONNECT":
        return "TCP_TUNNEL" if 200 <= record.status < 300 else "NONE_NONE"
    if record.request is None or record.error == "http_request_error":
        return "NONE_NONE"
    return "TCP_MISS_ABORTED" if record.close_reason == "client" else "TCP_MISS"


def _squid_hierarchy(record: Record) -> str:
    address = record.upstream_addr
    route = record.route
    if route is None:
        return f"HIER_DIRECT/{address[0]}" if address else "HIER_NONE/-"
    code = "FIRSTUP_PARENT" if record.routes_tried <= 1 else "ANY_OLD_PARENT"
    return f"{code}/{address[0] if address else route.host}"


def _mime_type(value: Optional[str]) -> str:
    if value is None:
        return "-"
    return _field(value.split(";", 1)[0].split("\t", 1)[0].strip())


def old_squid_line(ctx: Context, record: Record) -> str:
    ended = record.started + record.duration
    return (f"{ended:.3f} {int(record.duration * 1000):6d} {ctx.client_addr[0]} "
            f"{_squid_code(record)}/{record.status:03d} {record.bytes_out} "
            f"{_field(record.method)} {_field(record.target)} {_field(ctx.user)} "
            f"{_squid_hierarchy(record)} {_mime_type(record.content_type)}")


def _quoted(value: Optional[str]) -> str:
    if value is None:
        return '"-"'
    escaped = "".join(f"\\x{ord(c):02X}" if c in '"\\' or not " " <= c < "\x7f" else c
                      for c in value)
    return f'"{escaped}"'


def old_combined_line(ctx: Context, record: Record) -> str:
    stamp = time.strftime("%d/%b/%Y:%H:%M:%S %z", time.localtime(record.started))
    request = record.request
    headers = request.headers if request is not None else None
    line = f"{record.method} {record.target} {record.version}"
    return (f"{ctx.client_addr[0]} - {_field(ctx.user)} [{stamp}] {_quoted(line)} "
            f"{record.status} {record.bytes_out} "
            f"{_quoted(headers.get('referer') if headers else None)} "
            f"{_quoted(headers.get('user-agent') if headers else None)}")


def _ms(seconds: Optional[float]) -> Optional[float]:
    return None if seconds is None else round(seconds * 1000, 3)


def _tls(ctx: Context) -> Optional[dict[str, Optional[str]]]:
    tls = ctx.tls
    if tls is None:
        return None
    return {"version": tls.version, "cipher": tls.cipher, "alpn": tls.alpn,
            "server_name": tls.server_name, "client_subject": tls.client_subject}


def old_json_fields(ctx: Context, record: Record) -> dict[str, object]:
    """The old json line's dict: the new json_line writes what json.dumps made of it."""
    address, route = record.upstream_addr, record.route
    return {
        "time": round(record.started, 3),
        "client": ctx.client_addr[0],
        "client_port": ctx.client_addr[1],
        "user": ctx.user,
        "method": record.method,
        "target": record.target,
        "version": record.version,
        "upstream": authority(*address) if address else None,
        "parent": route.authority if route else None,
        "routes_tried": record.routes_tried,
        "status": record.status,
        "error": record.error,
        "bytes_in": record.bytes_in,
        "bytes_out": record.bytes_out,
        "content_type": record.content_type,
        "dns_ms": _ms(record.dns_time),
        "connect_ms": _ms(record.connect_time),
        "first_byte_ms": _ms(record.first_byte_time),
        "total_ms": _ms(record.duration),
        "close_reason": record.close_reason or None,
        "rule": record.rule,
        "sni": record.sni,
        "tls": _tls(ctx),
        "worker": os.getpid(),
        "conn": ctx.conn_id,
    }


def old_json_line(ctx: Context, record: Record) -> str:
    return json.dumps(old_json_fields(ctx, record), separators=(",", ":"), ensure_ascii=True)


OLD_FORMATS: dict[str, Format] = {
    "geproxy": old_geproxy_line,
    "squid": old_squid_line,
    "combined": old_combined_line,
    "json": old_json_line,
}


def old_logger(path: str) -> logging.Logger:
    """The old plugin's writer: a private logger with a WatchedFileHandler, opened late."""
    logger = logging.Logger("geproxy.access")
    handler = logging.handlers.WatchedFileHandler(path, encoding="utf-8", delay=True)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    return logger


# -- END OF BASELINE ---------------------------------------------------------------------------


def keep_alive_get() -> tuple[Context, Record]:
    """A keep-alive GET on a pooled upstream connection, as the proxy records it: absolute
    form, no DNS or connect time (the connection was reused), an nginx answer."""
    ctx = Context(client_addr=("127.0.0.1", 48212), server_addr=("127.0.0.1", 3128),
                  config=None, conn_id="c1042", requests=37)
    headers = Headers([("Host", "127.0.0.1:8080"), ("User-Agent", "wrk/4.2.0"),
                       ("Accept", "*/*")])
    request = Request("GET", "http://127.0.0.1:8080/index.html", "HTTP/1.1", headers,
                      scheme="http", host="127.0.0.1", port=8080, path="/index.html")
    record = Record(ctx, method="GET", target=request.target, version="HTTP/1.1",
                    status=200, upstream_addr=("127.0.0.1", 8080), bytes_in=78,
                    bytes_out=853, started=time.time(), duration=0.000213,
                    first_byte_time=0.000187, request=request, content_type="text/html")
    return ctx, record


def per_line(lines: int, run: Callable[[], None]) -> float:
    """µs per line of ``run`` called ``lines`` times (bounded): the best of five rounds of a
    fifth each, the least disturbed by whatever else the machine runs."""
    rounds, best = 5, float("inf")
    each = max(1, lines // rounds)
    for _ in range(rounds):
        began = time.perf_counter()
        for _ in range(each):
            run()
        best = min(best, time.perf_counter() - began)
    return best / each * 1e6


class Buffered:
    """A 64 KiB buffer of whole lines written by one os.write when full: the experiment."""

    def __init__(self, path: str, size: int = 65536) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        self.size, self.parts, self.held = size, [], 0

    def write(self, line: str) -> None:
        data = (line + "\n").encode("utf-8", "backslashreplace")
        self.parts.append(data)
        self.held += len(data)
        if self.held >= self.size:
            os.write(self.fd, b"".join(self.parts))
            self.parts, self.held = [], 0


def measure(name: str, lines: int, directory: Path) -> dict[str, float]:
    ctx, record = keep_alive_get()
    old, new = OLD_FORMATS[name], log_formats.FORMATS[name]
    logger = old_logger(str(directory / f"{name}.old.log"))
    sink = access_log.FileSink(str(directory / f"{name}.new.log"))
    buffered = Buffered(str(directory / f"{name}.buffered.log"))
    line = new(ctx, record)
    try:
        return {
            "old format": per_line(lines, lambda: old(ctx, record)),
            "old": per_line(lines, lambda: logger.info("%s", old(ctx, record))),
            "new format": per_line(lines, lambda: new(ctx, record)),
            "new write": per_line(lines, lambda: sink.write(line)),
            "new": per_line(lines, lambda: sink.write(new(ctx, record))),
            "buffered": per_line(lines, lambda: buffered.write(new(ctx, record))),
        }
    finally:
        for handler in logger.handlers:
            handler.close()
        sink.close()
        os.close(buffered.fd)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lines", type=int, default=200_000, help="per measure (200,000)")
    parser.add_argument("--formats", default="geproxy,squid,combined,json",
                        help="comma-separated (all four)")
    args = parser.parse_args(argv)
    names = args.formats.split(",")
    if not 3 <= args.lines <= 10_000_000 or not set(names) <= set(OLD_FORMATS):
        parser.error("--lines 3-10000000, --formats of geproxy,squid,combined,json")
    columns = ["old format", "old", "new format", "new write", "new", "buffered"]
    print(f"µs per line, {args.lines:,} lines each, Python {sys.version.split()[0]}\n")
    print("| format | " + " | ".join(columns) + " | old / new |")
    print("|---" * (len(columns) + 2) + "|")
    with tempfile.TemporaryDirectory(prefix="geproxy-alog-") as tmp:
        for name in names:
            got = measure(name, args.lines, Path(tmp))
            cells = " | ".join(f"{got[column]:.2f}" for column in columns)
            print(f"| {name} | {cells} | {got['old'] / got['new']:.1f}x |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
