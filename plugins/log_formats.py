"""The access-log line formats: geproxy's own, Squid's native, Apache/nginx combined, JSON.

Each format is a function of the connection's Context and the finished Record, returning one
line without its newline. Values a client controls (targets, user names, header values) are
escaped so that a line never splits and a field never runs into the next.

They run once per request, on its path: each is written for speed (a value with nothing to
escape is taken as it is; the JSON object is put together as text, not by ``json.dumps``;
the combined format's time is formatted once per second), and tests/test_access_log.py holds
each to the plain definition it replaced, byte for byte.
"""

from __future__ import annotations

import functools
import json
import math
import os
import time
from json.encoder import encode_basestring_ascii
from typing import Callable, Optional

from geproxy import Context, Record
from geproxy.hosts import authority

__all__ = ["FORMATS"]

Format = Callable[[Context, Record], str]


def _field(value: Optional[str]) -> str:
    """A space-separated field: ``-`` when empty; spaces and controls percent-escaped."""
    if not value:
        return "-"
    # isascii and isprintable: every character in " " to "~"; the space aside, nothing to do.
    if value.isascii() and value.isprintable() and " " not in value:
        return value
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
    if value.isascii() and value.isprintable() and '"' not in value and "\\" not in value:
        return f'"{value}"'
    escaped = "".join(f"\\x{ord(c):02X}" if c in '"\\' or not " " <= c < "\x7f" else c
                      for c in value)
    return f'"{escaped}"'


@functools.lru_cache(maxsize=4)
def _stamp(second: int) -> str:
    """``%t`` of the second: the same for every line of that second (localtime takes whole
    seconds, and the offset from UTC changes only at a second's start)."""
    return time.strftime("%d/%b/%Y:%H:%M:%S %z", time.localtime(second))


def combined_line(ctx: Context, record: Record) -> str:
    """The Apache/nginx combined format: client, user, time, request line, status, bytes,
    referer and user agent."""
    stamp = _stamp(math.floor(record.started))
    request = record.request
    headers = request.headers if request is not None else None
    line = f"{record.method} {record.target} {record.version}"
    return (f"{ctx.client_addr[0]} - {_field(ctx.user)} [{stamp}] {_quoted(line)} "
            f"{record.status} {record.bytes_out} "
            f"{_quoted(headers.get('referer') if headers else None)} "
            f"{_quoted(headers.get('user-agent') if headers else None)}")


#: A JSON string of ``str`` (ensure_ascii, as ``json.dumps`` writes one): C code.
_string = encode_basestring_ascii


def _text(value: Optional[str]) -> str:
    """A JSON string, or ``null``."""
    return "null" if value is None else _string(value)


def _rounded(value: float) -> str:
    """What ``json.dumps(round(value, 3))`` writes, at half its cost: ``%.3f`` rounds as
    ``round`` does (both correctly, to the nearest of the exact binary value), and below
    1e12 the 3-decimal number has at most 15 significant digits, so the shortest repr of
    the float nearest it (json's form) is that number without its trailing zeros. Anything
    else (an int, huge, infinite, NaN: never a measured time) is json's own."""
    if value.__class__ is float and -1e12 < value < 1e12:
        text = ("%.3f" % value).rstrip("0")
        return text + "0" if text[-1] == "." else text
    return json.dumps(round(value, 3))


def _ms(seconds: Optional[float]) -> str:
    """Milliseconds to the microsecond, ``null`` for a step that did not happen."""
    return "null" if seconds is None else _rounded(seconds * 1000)


def _tls(ctx: Context) -> str:
    """The client's TLS to the proxy (a tls:// listener): for an audit of who came how."""
    tls = ctx.tls
    if tls is None:
        return "null"
    return (f'{{"version":{_text(tls.version)},"cipher":{_text(tls.cipher)},'
            f'"alpn":{_text(tls.alpn)},"server_name":{_text(tls.server_name)},'
            f'"client_subject":{_text(tls.client_subject)}}}')


#: This process's id, for the ``worker`` field: os.getpid() is a system call, read once here
#: and again in each forked child (the workers fork after ``configure``), never per line.
_pid = os.getpid()


def _forked() -> None:
    global _pid
    _pid = os.getpid()


os.register_at_fork(after_in_child=_forked)


def json_line(ctx: Context, record: Record) -> str:
    """One JSON object with every field the record has: what ``json.dumps(fields,
    separators=(",", ":"), ensure_ascii=True)`` writes for the dict of these keys, in this
    order (the test holds it to that), put together as text: strings by json's own encoder,
    integers by ``str``, the rounded times as json writes a float, None as ``null``."""
    address, route, client = record.upstream_addr, record.route, ctx.client_addr
    # The parent's host and port, never its credentials.
    return (
        f'{{"time":{_rounded(record.started)},"client":{_string(client[0])},'
        f'"client_port":{client[1]},"user":{_text(ctx.user)},'
        f'"method":{_string(record.method)},"target":{_string(record.target)},'
        f'"version":{_string(record.version)},'
        f'"upstream":{_string(authority(*address)) if address else "null"},'
        f'"parent":{_string(route.authority) if route else "null"},'
        f'"routes_tried":{record.routes_tried},"status":{record.status},'
        f'"error":{_text(record.error)},"bytes_in":{record.bytes_in},'
        f'"bytes_out":{record.bytes_out},"content_type":{_text(record.content_type)},'
        f'"dns_ms":{_ms(record.dns_time)},"connect_ms":{_ms(record.connect_time)},'
        f'"first_byte_ms":{_ms(record.first_byte_time)},"total_ms":{_ms(record.duration)},'
        f'"close_reason":{_string(record.close_reason) if record.close_reason else "null"},'
        f'"rule":{_text(record.rule)},"sni":{_text(record.sni)},"tls":{_tls(ctx)},'
        f'"worker":{_pid},"conn":{_string(ctx.conn_id)}}}'
    )


FORMATS: dict[str, Format] = {
    "geproxy": geproxy_line,
    "squid": squid_line,
    "combined": combined_line,
    "json": json_line,
}
