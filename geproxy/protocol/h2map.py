"""HTTP/2 fields to the proxy's messages and back, with no I/O (RFC 9113 section 8).

A stream's request is made from its HEADERS: the pseudo-fields give the method and the
target, cookie fields split for compression are joined again. An answer's fields go out
without the fields HTTP/2 forbids. The h2 package frames them; serve/h2stream.py sends them.
"""

from __future__ import annotations

from typing import Iterable, Optional

from ..errors import ClientError
from ..models import Headers, Request
from . import http11

__all__ = ["request_from_fields", "authority_host_port", "answer_fields", "CONNECTION_FIELDS"]

#: Fields of HTTP/1.1 that HTTP/2 forbids (RFC 9113 section 8.2.2).
CONNECTION_FIELDS = frozenset({"connection", "keep-alive", "proxy-connection",
                               "transfer-encoding", "upgrade"})


def request_from_fields(fields: Iterable[tuple[str, str]]
                        ) -> tuple[Request, Optional[tuple[str, int]]]:
    """The request a stream's HEADERS make, and the host and port the proxy must check
    name itself (a request that is not ``http://``: only one for the proxy itself, such as
    /healthz or the PAC file, may come so), else None. ClientError for what the proxy does
    not serve (extended CONNECT)."""
    pseudo: dict[str, str] = {}
    headers: list[tuple[str, str]] = []
    cookies: list[str] = []
    for name, value in fields:
        if name.startswith(":"):
            pseudo[name] = value
        elif name == "cookie":
            cookies.append(value)  # split for HTTP/2 (RFC 9113 8.2.3), one for 1.1
        else:
            headers.append((name, value))
    if cookies:
        headers.append(("cookie", "; ".join(cookies)))
    method = pseudo.get(":method", "")
    authority = pseudo.get(":authority", "")
    if ":protocol" in pseudo:
        raise ClientError("extended CONNECT is not supported")
    scheme = pseudo.get(":scheme", "")
    for_us: Optional[tuple[str, int]] = None
    if method == "CONNECT":
        target = authority
    elif scheme != "http" or not authority:
        # Anything else than http:// would be forwarded as what the client did not ask.
        target = pseudo.get(":path", "")
        if authority:
            for_us = authority_host_port(authority, scheme)
            headers.append(("host", authority))
    else:
        target = f"http://{authority}{pseudo.get(':path', '/')}"
    request = http11.make_request(method, target, "HTTP/2", Headers(headers, frozen=True))
    return request, for_us


def authority_host_port(authority: str, scheme: str) -> tuple[str, int]:
    """The host and port an ``:authority`` names, the scheme's port when it gives none."""
    try:
        return http11.parse_authority(authority)
    except ClientError:
        return authority.strip("[]"), 443 if scheme == "https" else 80


def answer_fields(status: int, headers: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """An answer's HEADERS: ``:status``, then its fields in lower case, less those HTTP/2
    forbids."""
    fields = [(":status", str(status))]
    fields += [(k.lower(), v) for k, v in headers if k.lower() not in CONNECTION_FIELDS]
    return fields
