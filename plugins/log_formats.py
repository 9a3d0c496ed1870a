"""The access-log line formats: geproxy's own, Squid's native, Apache/nginx combined, JSON.

Each format is a function of the connection's Context and the finished Record, returning one
line without its newline. Values a client controls (targets, user names, header values) are
escaped so that a line never splits and a field never runs into the next.
"""

from __future__ import annotations

import json
import os
import time
from typing import Callable, Optional

from geproxy import Context, Record

__all__ = ["FORMATS"]

Format = Callable[[Context, Record], str]


def _field(value: Optional[str]) -> str:
    """A space-separated field: ``-`` when empty; spaces and controls percent-escaped."""
    if not value:
        return "-"
    return "".join(c if " " < c < "\x7f" else f"%{ord(c):02X}" for c in value)


def _upstream(record: Record) -> str:
    address = record.upstream_addr
    if not address:
        return "-"
    return f"[{address[0]}]:{address[1]}" if ":" in address[0] else f"{address[0]}:{address[1]}"


def geproxy_line(ctx: Context, record: Record) -> str:
    """time duration_ms client method target status error bytes_in bytes_out upstream user
    conn rule sni"""
    return " ".join([
        f"{record.started:.3f}", str(int(record.duration * 1000)), ctx.client_addr[0],
        _field(record.method), _field(record.target), str(record.status),
        record.error or "-", str(record.bytes_in), str(record.bytes_out), _upstream(record),
        _field(ctx.user), ctx.conn_id, _field(record.rule), _field(record.sni),
    ])


def _squid_code(record: Record) -> str:
    if record.error == "http_request_denied":
        return "TCP_DENIED"
    if record.method == "CONNECT" and record.status == 200:
        return "TCP_TUNNEL"
    if record.status == 0:
        return "NONE_NONE"
    return "TCP_MISS"


def squid_line(ctx: Context, record: Record) -> str:
    """Squid's native format (``logformat squid``), so Squid log analysers read it:
    ``%ts.%03tu %6tr %>a %Ss/%03>Hs %<st %rm %ru %[un %Sh/%<a %mt``."""
    address = record.upstream_addr
    hierarchy = f"HIER_DIRECT/{address[0]}" if address else "HIER_NONE/-"
    return (f"{record.started:.3f} {int(record.duration * 1000):6d} {ctx.client_addr[0]} "
            f"{_squid_code(record)}/{record.status:03d} {record.bytes_out} "
            f"{_field(record.method)} {_field(record.target)} {_field(ctx.user)} "
            f"{hierarchy} -")


def _quoted(value: Optional[str]) -> str:
    """A double-quoted field of the combined format: quotes, backslashes and controls
    escaped as nginx does (``\\xHH``)."""
    if value is None:
        return '"-"'
    escaped = "".join(f"\\x{ord(c):02X}" if c in '"\\' or not " " <= c < "\x7f" else c
                      for c in value)
    return f'"{escaped}"'


def combined_line(ctx: Context, record: Record) -> str:
    """The Apache/nginx combined format: client, user, time, request line, status, bytes,
    referer and user agent."""
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
    """The client's TLS to the proxy (a tls:// listener): for an audit of who came how."""
    tls = ctx.tls
    if tls is None:
        return None
    return {"version": tls.version, "cipher": tls.cipher, "alpn": tls.alpn,
            "server_name": tls.server_name, "client_subject": tls.client_subject}


def json_line(ctx: Context, record: Record) -> str:
    """One JSON object with every field the record has."""
    address = record.upstream_addr
    return json.dumps({
        "time": round(record.started, 3),
        "client": ctx.client_addr[0],
        "client_port": ctx.client_addr[1],
        "user": ctx.user,
        "method": record.method,
        "target": record.target,
        "version": record.version,
        "upstream": f"{address[0]}:{address[1]}" if address else None,
        "status": record.status,
        "error": record.error,
        "bytes_in": record.bytes_in,
        "bytes_out": record.bytes_out,
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
    }, separators=(",", ":"), ensure_ascii=True)


FORMATS: dict[str, Format] = {
    "geproxy": geproxy_line,
    "squid": squid_line,
    "combined": combined_line,
    "json": json_line,
}
