"""``sni``: check the server name a TLS client asks for inside a CONNECT tunnel, without
interception.

The ``[sni]`` section (docs/configuration.md has the full reference)::

    [sni]
    mode = enforce
    deny = .internal.example
    require = on
    require_ports = 443

The plugin reads the client's first bytes in a tunnel (``on_tunnel_data``). When they are a
TLS ClientHello, it takes the ``server_name`` extension (RFC 6066, type ``host_name``) out of
it and puts the name in ``record.sni``, the access log's 14th field. It holds no certificate
and decrypts nothing: the bytes go on unchanged, or the tunnel is closed before any of them
reach the upstream.

``mode``:

- ``off`` (the default): nothing is read. The hook returns at its first line; see "Cost".
- ``log``: the name is recorded, and what ``enforce`` would close is logged as a warning
  (``sni would close CONNECT ...``), nothing more.
- ``enforce``: a tunnel is closed (its record gets ``error`` ``http_request_denied``, the
  rule id below, ``close_reason`` ``denied``) when

  1. ``sni_mismatch``: the CONNECT named a host and the ClientHello names another (compared in
     lower case, without a trailing dot). This stops a client from opening a tunnel to a name
     the ACL allows and asking the TLS server behind it for another one (domain fronting by
     SNI on a shared front end);
  2. ``sni_deny``: the name matches ``deny`` (names, ``.domains``, globs, networks for IP
     literals). The CONNECT of a name already had to pass the ACL with that name, so this is
     for CONNECTs to a bare IP address, whose name the ACL never sees: the plugin cannot ask
     the ACL, hence its own list;
  3. ``sni_missing``: ``require`` is on, the CONNECT port is one of ``require_ports``, and
     the first bytes are no ClientHello with a server name (plain text, a ClientHello without
     the extension, or one cut short before it).

What it cannot see: a client that sends its ClientHello in pieces (a first segment ending
before the ``server_name`` extension, or TLS records of a few bytes each past the first piece)
has no name in the first piece, and is judged as one without SNI: only ``require`` closes
those. Encrypted Client Hello hides the real name inside; the outer name is what is checked.
What the client says inside TLS (an HTTP ``Host``) is out of sight: this is a check of what
the client claims in clear, not a substitute for interception.

Cost: with ``mode = off`` the hook is still registered (pluggy cannot unregister one method),
so the core hands each tunnel's first piece to it, and it returns ``None`` after one attribute
test. ``inspects_tunnels`` is False then, for a core that wants to skip such plugins; to pay
nothing at all, ``disable = sni`` in ``[geproxy]``. When on, a parse is a walk over a few
length fields of the first piece (at most 64 KiB, about 500 bytes for a ClientHello), with no
copy unless the hello spans several TLS records.
"""

from __future__ import annotations

import logging
import re
from typing import Optional

from geproxy import (
    Config,
    ConfigError,
    Context,
    Denied,
    HostPatterns,
    OptionRegistry,
    Record,
    Request,
    hookimpl,
)
from geproxy.hosts import ip_literal

__all__ = ["SNI", "parse_sni", "read_client_hello", "MODES"]

log = logging.getLogger(__name__)

SECTION = "sni"
MODES = ("off", "log", "enforce")
DEFAULT_REQUIRE_PORTS = "443"
#: Rule ids of the plugin's closures, for ``record.rule`` and the access log.
MISMATCH_RULE = "sni_mismatch"
DENY_RULE = "sni_deny"
MISSING_RULE = "sni_missing"

#: Why ``read_client_hello`` found no name.
NOT_TLS = "not a TLS handshake"
NOT_HELLO = "not a ClientHello"
NO_NAME = "ClientHello without server_name"
TRUNCATED = "ClientHello cut short before a complete server_name"
MALFORMED = "malformed ClientHello"

_HANDSHAKE_RECORD = 0x16
_CLIENT_HELLO = 1
_SERVER_NAME = 0
_HOST_NAME = 0
#: RFC 6066 3: HostName is at most 255 bytes (OpenSSL refuses longer ones).
_MAX_NAME = 255
_PRINTABLE = re.compile(rb"[\x21-\x7e]+")

# -- the ClientHello ------------------------------------------------------------------------


class _Short(Exception):
    """The data ends inside a field: the hello was cut short."""


class _Malformed(Exception):
    """A field runs past the structure that holds it, or says something twice."""


class _Reader:
    """Reads big-endian fields of ``buf[pos:end]``; ``end`` is the end the structure
    declares, which may lie beyond the bytes there are (a hello cut short)."""

    __slots__ = ("buf", "pos", "end")

    def __init__(self, buf: bytes, pos: int, end: int) -> None:
        self.buf = buf
        self.pos = pos
        self.end = end

    def _take(self, size: int) -> int:
        start = self.pos
        if start + size > self.end:
            raise _Malformed
        if start + size > len(self.buf):
            raise _Short
        self.pos = start + size
        return start

    def u8(self) -> int:
        return self.buf[self._take(1)]

    def u16(self) -> int:
        start = self._take(2)
        return int.from_bytes(self.buf[start:start + 2], "big")

    def u24(self) -> int:
        start = self._take(3)
        return int.from_bytes(self.buf[start:start + 3], "big")

    def skip(self, size: int) -> None:
        self._take(size)

    def vector(self, width: int) -> "_Reader":
        """A length-prefixed field (``width`` bytes of length), to read from; it need not
        be all there: reading past the data raises _Short."""
        length = self.u8() if width == 1 else self.u16()
        start = self.pos
        if start + length > self.end:
            raise _Malformed
        self.pos = start + length
        return _Reader(self.buf, start, start + length)

    def rest(self) -> bytes:
        """The whole field, which must be all there."""
        if self.end > len(self.buf):
            raise _Short
        data = self.buf[self.pos:self.end]
        self.pos = self.end
        return data

    def at_end(self) -> bool:
        if self.pos >= self.end:
            return True
        if self.pos >= len(self.buf):
            raise _Short
        return False


def _handshake_bytes(data: bytes) -> bytes:
    """The handshake-protocol bytes of the TLS records ``data`` starts with, joined.

    A ClientHello may be split over several records (RFC 8446 5.1); the TLS server joins
    them, so the name is looked for in what they carry together. Stops at the first record
    of another type. Each turn moves on at least five bytes: at most len(data) / 5 turns.
    """
    pieces = []
    pos = 0
    while pos + 5 <= len(data) and data[pos] == _HANDSHAKE_RECORD and data[pos + 1] == 3:
        length = int.from_bytes(data[pos + 3:pos + 5], "big")
        pieces.append(data[pos + 5:pos + 5 + length])
        pos += 5 + length
    return pieces[0] if len(pieces) == 1 else b"".join(pieces)


def read_client_hello(data: bytes) -> tuple[Optional[str], str]:
    """The server name a TLS ClientHello at the start of ``data`` asks for.

    Returns ``(name, "")``, or ``(None, why)`` with ``why`` one of NOT_TLS, NOT_HELLO,
    NO_NAME, TRUNCATED, MALFORMED. Never raises, whatever ``data`` is; every loop moves on
    through ``data``, so the work is bounded by its length.

    The name is lower-cased and loses a trailing dot; a name in UTF-8 becomes its IDNA
    A-label (``xn--...``), and bytes that are neither are shown escaped (``\\xff``), so the
    name is one printable token that matches no valid host. A ClientHello cut short still
    yields the name when its ``server_name`` extension is whole in ``data``. Forms a TLS
    server would refuse or could read two ways (two ``server_name`` extensions, two host
    names, an empty or over-long name) give MALFORMED.
    """
    if not data or data[0] != _HANDSHAKE_RECORD or (len(data) > 1 and data[1] != 3):
        return None, NOT_TLS
    handshake = _handshake_bytes(data)
    if not handshake:
        return None, TRUNCATED  # a record header, or less, so far
    if handshake[0] != _CLIENT_HELLO:
        return None, NOT_HELLO
    try:
        return _client_hello(handshake)
    except _Short:
        return None, TRUNCATED
    except _Malformed:
        return None, MALFORMED


def parse_sni(data: bytes) -> Optional[str]:
    """The server name of a ClientHello at the start of ``data``, or None."""
    return read_client_hello(data)[0]


def _client_hello(handshake: bytes) -> tuple[Optional[str], str]:
    head = _Reader(handshake, 0, 4)
    head.skip(1)
    length = head.u24()
    hello = _Reader(handshake, 4, 4 + length)
    hello.skip(2 + 32)  # legacy_version, random
    hello.vector(1)  # legacy_session_id
    hello.vector(2)  # cipher_suites
    hello.vector(1)  # legacy_compression_methods
    if hello.at_end():
        return None, NO_NAME  # a hello without extensions (TLS 1.2 and older may)
    extensions = hello.vector(2)
    found: Optional[str] = None
    try:
        while not extensions.at_end():  # each turn moves on at least four bytes
            kind = extensions.u16()
            body = extensions.vector(2)
            if kind != _SERVER_NAME:
                continue
            if found is not None:
                raise _Malformed  # servers refuse a repeated extension; do not guess
            found = _host_name(body)
    except _Short:
        if found is None:
            raise
        # The rest of the hello is yet to come: the name found is the one the server gets.
    if found is None:
        return None, NO_NAME
    return found, ""


def _host_name(body: _Reader) -> str:
    """The host_name of a server_name extension's ServerNameList (RFC 6066 3)."""
    names = body.vector(2)
    if not body.at_end():
        raise _Malformed  # the list must fill the extension
    raw: Optional[bytes] = None
    while not names.at_end():  # each turn moves on at least three bytes
        kind = names.u8()
        value = names.vector(2)
        if kind != _HOST_NAME:
            continue  # an unknown name type: skipped, as Go's TLS stack does
        if raw is not None:
            raise _Malformed  # one name per type (RFC 6066 3)
        raw = value.rest()
    if raw is None:
        raise _Malformed
    name = _normalize(raw)
    if name is None:
        raise _Malformed
    return name


def _normalize(raw: bytes) -> Optional[str]:
    if not raw or len(raw) > _MAX_NAME or b"\x00" in raw:
        return None
    if not raw.isascii():
        try:
            raw = raw.decode("utf-8").encode("idna")
        except UnicodeError:
            pass  # shown escaped below
    if _PRINTABLE.fullmatch(raw):
        text = raw.decode("ascii")
    else:
        text = "".join(chr(b) if 0x21 <= b <= 0x7E else f"\\x{b:02x}" for b in raw)
    name = text.lower().rstrip(".")
    return name or None


# -- the plugin -----------------------------------------------------------------------------


class SNI:
    """The ``[sni]`` section: ``mode``, ``deny``, ``require``, ``require_ports``."""

    name = SECTION

    def __init__(self) -> None:
        self.mode = "off"
        #: False while mode is off: the hook then returns at once (see "Cost" above).
        self.inspects_tunnels = False
        self.deny = HostPatterns.parse([])
        self.require = False
        self.require_ports: tuple[tuple[int, int], ...] = ((443, 443),)

    @hookimpl
    def add_options(self, registry: OptionRegistry) -> None:
        (
            registry.section(self.name)
            .add("mode", "str", "off",
                 "off reads nothing; log records the ClientHello's server name (record.sni) "
                 "and logs what enforce would close; enforce closes those tunnels.",
                 choices=MODES)
            .add("deny", "list", "",
                 "Server names no tunnel may ask for (names, .domains, globs, networks): "
                 "for CONNECTs to a bare IP address, which the ACL judges by address only.")
            .add("require", "bool", "off",
                 "In enforce mode, close tunnels to require_ports whose first bytes are no "
                 "ClientHello with a server name.")
            .add("require_ports", "ports", DEFAULT_REQUIRE_PORTS,
                 "The CONNECT ports require applies to: ports and ranges (1-65535: all).")
        )

    @hookimpl
    def configure(self, config: Config) -> None:
        section = config.section(self.name)
        try:
            deny = HostPatterns.parse(section["deny"])
        except ValueError as exc:
            raise ConfigError(str(exc), path=config.path, section=self.name,
                              key="deny") from None
        ports = section["require_ports"]
        self.mode = section["mode"]
        self.inspects_tunnels = self.mode != "off"
        self.deny = deny
        self.require = section["require"]
        self.require_ports = ports
        if self.mode == "enforce" and self.require and not ports:
            log.warning("[sni] require = on with no require_ports: it closes nothing")

    @hookimpl
    def on_tunnel_data(self, ctx: Context, request: Request, record: Record,
                       data: bytes) -> Optional[Denied]:
        if not self.inspects_tunnels:
            return None
        name, why = read_client_hello(data)
        if name is not None:
            record.sni = name
        elif why == TRUNCATED:
            log.debug("[%s] CONNECT %s: no complete server_name in the first %d bytes",
                      ctx.conn_id, request.authority, len(data))
        verdict = self.decide(request.host, request.port, name, why)
        if verdict is None or self.mode == "enforce":
            return verdict
        log.warning("[%s] sni would close CONNECT %s from %s: %s (rule %s)", ctx.conn_id,
                    request.authority, ctx.client_ip, verdict.detail, verdict.rule)
        return None

    def decide(self, host: str, port: int, name: Optional[str],
               why: str = NO_NAME) -> Optional[Denied]:
        """What enforce mode does with a CONNECT to ``host``:``port`` whose ClientHello
        named ``name`` (None: no name, for the reason ``why``): None lets it go on."""
        if name is None:
            if self.require and any(lo <= port <= hi for lo, hi in self.require_ports):
                return Denied(f"[sni] no server name ({why}); require is on for port {port}",
                              rule=MISSING_RULE)
            return None
        if ip_literal(host) is None and name != host:
            return Denied(f"[sni] ClientHello names {name}, CONNECT was to {host}",
                          rule=MISMATCH_RULE)
        if self.deny.match(name):
            return Denied(f"[sni] ClientHello names {name}, denied by [sni] deny",
                          rule=DENY_RULE)
        return None
