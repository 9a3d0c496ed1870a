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
from geproxy.hosts import authority

__all__ = ["FORMATS"]

Format = Callable[[Context, Record], str]


def _field(value: Optional[str]) -> str:
    """A space-separated field: ``-`` when empty; spaces and controls percent-escaped."""
    if not value:
        return "-"
    return "".join(c if " " < c < "\x7f" else f"%{ord(c):02X}" for c in value)


def _upstream(record: Record) -> str:
    address = record.upstream_addr
    return authority(*address) if address else "-"


def geproxy_line(ctx: Context, record: Record) -> str:
    """time duration_ms client method target status error bytes_in bytes_out upstream user
    conn rule sni"""
    return " ".join([
        f"{record.started:.3f}", str(int(record.duration * 1000)), ctx.client_addr[0],
        _field(record.method), _field(record.target), str(record.status),
        record.error or "-", str(record.bytes_in), str(record.bytes_out), _upstream(record),
        _field(ctx.user), ctx.conn_id, _field(record.rule), _field(record.sni),
    ])


#: Proxy-Status errors of a policy refusal: Squid's ``http_access deny`` (TCP_DENIED).
_DENIALS = frozenset({"http_request_denied", "destination_ip_prohibited"})


def _squid_code(record: Record) -> str:
    """Squid's result code (``%Ss``), as Squid 5 writes it for the same outcome: TCP_DENIED
    for a refusal by policy (403, 407, or a connection closed for it), TCP_TUNNEL for an
    established CONNECT, NONE_NONE when no request was read, it was malformed or a CONNECT
    failed (Squid tags a CONNECT only once its tunnel is up), TCP_MISS for the rest (every
    answer is a miss: nothing is cached), with ``_ABORTED`` when the client went away in the
    middle of a plain request or its answer."""
    if record.error in _DENIALS and record.status < 500:
        return "TCP_DENIED"
    if record.method == "CONNECT":
        return "TCP_TUNNEL" if 200 <= record.status < 300 else "NONE_NONE"
    if record.request is None or record.error == "http_request_error":
        return "NONE_NONE"
    return "TCP_MISS_ABORTED" if record.close_reason == "client" else "TCP_MISS"


def _squid_hierarchy(record: Record) -> str:
    """``%Sh/%<a``: how the upstream was chosen, and its address. A parent's code is Squid's
    for its peers in order (``never_direct``): FIRSTUP_PARENT when the first parent offered
    served the request, ANY_OLD_PARENT when it fell over to a later one. Without a connection,
    a parent is named by its configured host; a direct request is ``HIER_NONE/-``."""
    address = record.upstream_addr
    route = record.route
    if route is None:
        return f"HIER_DIRECT/{address[0]}" if address else "HIER_NONE/-"
    code = "FIRSTUP_PARENT" if record.routes_tried <= 1 else "ANY_OLD_PARENT"
    return f"{code}/{address[0] if address else route.host}"


def _mime_type(value: Optional[str]) -> str:
    """``%mt``: the Content-Type without its parameters, as Squid logs it (``text/html``
    for ``text/html; charset=utf-8``); ``-`` when the answer had none."""
    if value is None:
        return "-"
    return _field(value.split(";", 1)[0].split("\t", 1)[0].strip())


def squid_line(ctx: Context, record: Record) -> str:
    """Squid's native format (``logformat squid``), so Squid log analysers read it:
    ``%ts.%03tu %6tr %>a %Ss/%03>Hs %<st %rm %ru %[un %Sh/%<a %mt``. The time is when the
    line is written, the end of the request or tunnel, as Squid's is."""
    ended = record.started + record.duration
    return (f"{ended:.3f} {int(record.duration * 1000):6d} {ctx.client_addr[0]} "
            f"{_squid_code(record)}/{record.status:03d} {record.bytes_out} "
            f"{_field(record.method)} {_field(record.target)} {_field(ctx.user)} "
            f"{_squid_hierarchy(record)} {_mime_type(record.content_type)}")


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
    address, route = record.upstream_addr, record.route
    return json.dumps({
        "time": round(record.started, 3),
        "client": ctx.client_addr[0],
        "client_port": ctx.client_addr[1],
        "user": ctx.user,
        "method": record.method,
        "target": record.target,
        "version": record.version,
        "upstream": authority(*address) if address else None,
        # The parent's host and port, never its credentials.
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
    }, separators=(",", ":"), ensure_ascii=True)


FORMATS: dict[str, Format] = {
    "geproxy": geproxy_line,
    "squid": squid_line,
    "combined": combined_line,
    "json": json_line,
}
