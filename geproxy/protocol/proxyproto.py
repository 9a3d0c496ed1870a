"""The PROXY protocol (HAProxy's, versions 1 and 2), receiving side, with no I/O.

A load balancer in TCP mode that sends it puts one header before the client's bytes, naming
the client's address. ``parse`` takes the bytes received so far and returns the header's
length and the client address once the header is complete.
"""

from __future__ import annotations

import ipaddress
import struct
from typing import Optional

__all__ = ["V2_SIGNATURE", "ProxyHeaderError", "parse", "MAX_V1"]

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
MAX_V1 = 107  # the longest v1 line, CRLF included
_V2_FIXED = 16
_MAX_V2 = _V2_FIXED + 65535


class ProxyHeaderError(ValueError):
    """The bytes are not a PROXY header this listener accepts."""


Address = Optional[tuple[str, int]]


def parse(data: bytes, versions: str) -> Optional[tuple[int, Address]]:
    """``(header length, client address)`` once ``data`` holds a whole header, or None when
    more bytes are needed. The address is None for v1 ``UNKNOWN`` and v2 ``LOCAL`` (health
    checks of the balancer itself): the connection's own peer stands. ``versions`` is
    ``v1``, ``v2`` or ``any``.
    """
    if versions in ("v2", "any") and data[: len(V2_SIGNATURE)] == V2_SIGNATURE[: len(data)]:
        return _parse_v2(data)
    if versions in ("v1", "any") and data[:6] == b"PROXY "[: len(data)]:
        return _parse_v1(data)
    raise ProxyHeaderError(f"no PROXY protocol {versions} header")


def _parse_v1(data: bytes) -> Optional[tuple[int, Address]]:
    end = data.find(b"\r\n")
    if end == -1:
        if len(data) >= MAX_V1:
            raise ProxyHeaderError("v1 header too long")
        return None
    parts = data[:end].decode("ascii", "replace").split(" ")
    if parts[:2] == ["PROXY", "UNKNOWN"]:
        return end + 2, None
    if len(parts) != 6 or parts[1] not in ("TCP4", "TCP6"):
        raise ProxyHeaderError("malformed v1 header")
    _, family, source, _, source_port, _ = parts
    try:
        address = ipaddress.ip_address(source)
    except ValueError:
        raise ProxyHeaderError("bad v1 source address") from None
    if (address.version == 4) != (family == "TCP4"):
        raise ProxyHeaderError("v1 address does not match its family")
    return end + 2, (str(address), _port(source_port))


def _port(text: str) -> int:
    if not text.isdigit() or len(text) > 5 or int(text) > 65535:
        raise ProxyHeaderError("bad v1 port")
    return int(text)


def _parse_v2(data: bytes) -> Optional[tuple[int, Address]]:
    if len(data) < _V2_FIXED:
        return None
    version_command, family, length = struct.unpack("!BBH", data[12:16])
    if version_command >> 4 != 2 or version_command & 0x0F not in (0, 1):
        raise ProxyHeaderError("unsupported v2 version or command")
    total = _V2_FIXED + length
    if len(data) < total:
        return None
    if version_command & 0x0F == 0:  # LOCAL: the balancer speaking for itself
        return total, None
    body = data[_V2_FIXED:total]
    if family == 0x11 and length >= 12:  # TCP over IPv4
        source = str(ipaddress.IPv4Address(body[0:4]))
        return total, (source, struct.unpack("!H", body[8:10])[0])
    if family == 0x21 and length >= 36:  # TCP over IPv6
        source = str(ipaddress.IPv6Address(body[0:16]))
        return total, (source, struct.unpack("!H", body[32:34])[0])
    if family == 0x00:  # UNSPEC
        return total, None
    raise ProxyHeaderError("unsupported v2 address family")
