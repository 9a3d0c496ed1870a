"""What HTTP asks of a proxy, as functions of messages alone: no socket, no clock.

Forwarding (relay/forward.py) and both client protocols (serve/http1.py, serve/h2stream.py)
ask these questions; each answer is a table that tests/test_semantics.py reads row by row:
whether a client keeps its connection, whether a request has a body, which fields cross
the proxy, the head a request goes upstream with, how an answer's body is framed.
"""

from __future__ import annotations

import re
from typing import Optional, Sequence

from ..errors import ClientError, ProxyError, UpstreamError
from ..models import Headers, Request, Response
from . import http11

__all__ = [
    "client_keeps_alive", "request_has_body", "wants_upgrade", "end_to_end", "via_loop",
    "max_forwards", "forwarded_for", "upstream_head", "answer_framing",
    "is_final", "Framing", "proxy_status_error", "max_forwards_answer", "response_fields",
    "without_framing", "error_response",
]

#: The framing field a body goes upstream with: ("Content-Length", "12") or
#: ("Transfer-Encoding", "chunked"); None for a message without a body.
Framing = Optional[tuple[str, str]]
CHUNKED: tuple[str, str] = ("Transfer-Encoding", "chunked")

#: Fields the proxy writes itself on the way upstream, whatever the client sent.
_FRAMING = frozenset({"host", "content-length", "transfer-encoding"})


def client_keeps_alive(request: Request) -> bool:
    """Whether the client means to send another request on its connection (RFC 9112 9.3)."""
    tokens = request.headers.tokens("connection")
    if request.version == "HTTP/1.1":
        return "close" not in tokens
    return "keep-alive" in tokens


def request_has_body(request: Request) -> bool:
    """Whether an HTTP/1.1 request's own fields announce a body."""
    headers = request.headers
    return "transfer-encoding" in headers or (headers.get("content-length") or "0").strip() != "0"


def wants_upgrade(request: Request) -> bool:
    """Whether ``request`` asks to switch protocols (Upgrade, named in Connection)."""
    return "upgrade" in request.headers and "upgrade" in request.headers.tokens("connection")


def end_to_end(headers: Headers, also: frozenset[str] = frozenset()) -> list[tuple[str, str]]:
    """The fields of ``headers`` that may cross the proxy (less those named in ``also``)."""
    named = headers.tokens("connection")
    drop = http11.HOP_BY_HOP.union(named, also) if named or also else http11.HOP_BY_HOP
    return [(k, v) for k, v in headers if k.lower() not in drop]


def via_loop(headers: Headers, via: str) -> bool:
    """Whether a Via field already names this proxy (received-by, RFC 9110 7.6.3)."""
    name = via.lower()
    for entry in headers.tokens("via"):
        parts = entry.split()
        if len(parts) >= 2 and parts[1] == name:
            return True
    return False


def max_forwards(request: Request) -> Optional[int]:
    """The Max-Forwards of an OPTIONS or TRACE (RFC 9110 7.6.2); None for any other request
    or without the field. ClientError for a value that is no number."""
    if request.method not in ("OPTIONS", "TRACE") or "max-forwards" not in request.headers:
        return None
    value = (request.headers.get("max-forwards") or "").strip()
    if not value.isdigit():
        raise ClientError("bad Max-Forwards")
    return int(value)


def max_forwards_answer(request: Request) -> Response:
    """The proxy's own answer to an OPTIONS or TRACE whose Max-Forwards is 0."""
    headers = Headers([("Allow", "GET, HEAD, POST, PUT, DELETE, OPTIONS, TRACE, CONNECT")])
    body = b""
    if request.method == "TRACE":
        fields = [(k, v) for k, v in request.headers if k.lower() != "proxy-authorization"]
        body = http11.serialize_head(f"TRACE {request.target} {request.version}", fields)
        headers.add("Content-Type", "message/http")
    return Response(200, headers, body)


def forwarded_for(headers: list[tuple[str, str]], mode: str,
                  client: str) -> list[tuple[str, str]]:
    """X-Forwarded-For and Forwarded: ``off`` passes the client's own on, ``delete`` removes
    them, ``on`` appends the client's address (RFC 7239 for Forwarded)."""
    if mode == "off":
        return headers
    kept = [(k, v) for k, v in headers if k.lower() not in ("x-forwarded-for", "forwarded")]
    if mode == "delete":
        return kept
    earlier_xff = [v for k, v in headers if k.lower() == "x-forwarded-for"]
    earlier_fwd = [v for k, v in headers if k.lower() == "forwarded"]
    node = f'"[{client}]"' if ":" in client else client
    kept.append(("X-Forwarded-For", ", ".join(earlier_xff + [client])))
    kept.append(("Forwarded", ", ".join(earlier_fwd + [f"for={node}"])))
    return kept


def upstream_head(request: Request, framing: Framing, *, forwarded: str, client_ip: str,
                  via: str, parent: bool = False,
                  proxy_authorization: Optional[str] = None) -> bytes:
    """The head ``request`` goes upstream with: origin-form (absolute-form to a ``parent``),
    Host from the target, hop-by-hop fields dropped, Max-Forwards counted down, the body's
    ``framing`` (never the client's fields: a client naming Content-Length in Connection
    must not get its body read upstream as a next request), Via and Forwarded added."""
    authority = request.authority
    if request.port == 80:
        authority = authority[: -len(":80")]
    headers = [("Host", authority)]
    headers.extend(end_to_end(request.headers, _FRAMING))
    hops = max_forwards(request)
    if hops is not None:
        headers = [(k, v) for k, v in headers if k.lower() != "max-forwards"]
        headers.append(("Max-Forwards", str(hops - 1)))
    if wants_upgrade(request):
        headers.append(("Connection", "Upgrade"))
        headers.append(("Upgrade", request.headers.get("upgrade") or ""))
    if framing is not None:
        headers.append(framing)
    headers = forwarded_for(headers, forwarded, client_ip)
    if via:
        headers.append(("Via", f"{request.version[5:]} {via}"))
    target = request.path
    if parent:
        target = f"http://{authority}{request.path}"
        if proxy_authorization:
            headers.append(("Proxy-Authorization", proxy_authorization))
    return http11.serialize_head(f"{request.method} {target} HTTP/1.1", headers)


def answer_framing(reader: http11.BodyReader, response: Response) -> tuple[Optional[str], bool]:
    """How the client is told the length of an upstream answer's body: the Content-Length
    to give (the upstream's, for a HEAD or a length-framed body), and whether the body is
    open-ended (chunked upstream, or ended by its close: the client side frames it as its
    protocol can)."""
    length = response.headers.get("content-length")
    if isinstance(reader, http11.LengthReader) or (
            isinstance(reader, http11.NoBody) and length is not None
            and response.status not in (204, 304) and response.status >= 200):
        return (length or "0").strip(), False
    return None, isinstance(reader, (http11.ChunkedReader, http11.UntilCloseReader))


def is_final(request: Request, response: Response) -> bool:
    """Whether ``response`` ends the wait for an answer: a final status, or the 101 the
    request asked for (UpstreamError for a 101 it did not ask for)."""
    if response.status >= 200 or response.status == 101:
        if response.status == 101 and not wants_upgrade(request):
            raise UpstreamError("101 without an Upgrade request")
        return True
    return False


def response_fields(response: Response, via: str) -> Headers:
    """The fields of an upstream answer that go on to the client (before plugins and the
    framing): end-to-end ones, and Via."""
    headers = Headers(end_to_end(response.headers))
    if via:
        headers.add("Via", f"{response.version[5:]} {via}")
    return headers


def without_framing(headers: Headers, names: Sequence[str] = (
        "content-length", "transfer-encoding", "connection")) -> Headers:
    """``headers`` less the fields that frame a message: the core sets those itself."""
    headers.remove(*names)
    return headers


#: One parameter of a Proxy-Status member: its key and its value, a quoted string (which
#: may hold ``;``: a plugin's ``details``) or a token.
_STATUS_PARAM = re.compile(r';\s*([a-z*][a-z0-9_.*-]*)\s*(?:=\s*("(?:[^"\\]|\\.)*"|[^;]*))?')


def proxy_status_error(value: Optional[str]) -> Optional[str]:
    """The ``error`` parameter of a Proxy-Status field value (RFC 9209), if any."""
    _, sep, params = (value or "").partition(";")  # after the proxy's name
    for match in _STATUS_PARAM.finditer(sep + params):
        if match.group(1) == "error":
            return (match.group(2) or "").strip().strip('"') or None
    return None


def error_response(exc: ProxyError, proxy_name: str) -> Response:
    """The proxy's answer to ``exc``: its status, a one-line body, and Proxy-Status naming
    the error (RFC 9209) with the proxy as ``proxy_name``."""
    reason = http11.reason_phrase(exc.status)
    content_type, body = exc.page or ("text/plain; charset=utf-8",
                                      f"{exc.status} {reason}\n".encode())
    headers = Headers([
        *exc.fields(),
        ("Content-Type", content_type),
        ("Proxy-Status", f"{proxy_name}; {exc.proxy_status_params()}"),
        ("Cache-Control", "no-store"),
    ])
    return Response(exc.status, headers, body, reason)
