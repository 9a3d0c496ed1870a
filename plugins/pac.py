"""``pac``: the proxy auto-config file (PAC, and WPAD's ``wpad.dat``), served by the proxy.

    [pac]
    paths = /proxy.pac /wpad.dat
    max_age = 5m
    direct_local = on
    fallback_direct = off
    proxy =

``GET /proxy.pac`` on the proxy port (an origin-form request addressed to the proxy, or an
absolute-form one whose target is the very address and port the client reached) answers a
JavaScript ``FindProxyForURL(url, host)`` made from the configuration, as
``application/x-ns-proxy-autoconfig`` with ``Cache-Control: max-age``. HEAD answers the same
head; any other method on those paths is answered ``405`` with ``Allow: GET, HEAD``. Every
other request, and absolute-form requests for other hosts' ``/proxy.pac``, go on as usual.

What the script returns, in this order:

1. With ``direct_local``: ``DIRECT`` for plain host names (``isPlainHostName``),
   ``localhost`` and names under ``.localhost``, ``127.0.0.0/8`` and ``::1``: the browser's
   own machine and its LAN, which the proxy cannot reach for it.
2. The ``[parents] rules`` of the ``parent`` plugin, in their order, first match wins as
   in the plugin: ``direct`` lines answer ``DIRECT`` and ``parent`` lines the proxy, for
   names (``host == ...``), ``.domains`` (the domain itself and ``dnsDomainIs``), globs
   (``shExpMatch``; a glob with ``[...]`` becomes a regular expression, as browsers'
   ``shExpMatch`` do not agree on brackets) and IP networks (``isInNet`` for IPv4, a small
   helper for IPv6), tested on IP-literal hosts only, exactly as ``HostPatterns`` matches:
   a name never matches a network, so the script never makes the browser resolve a name.
   ``all`` answers for every host left. A line this plugin cannot read ends the list (with
   a warning): the PAC errs towards the proxy, since going through it is always right and
   going direct only when the rules say so. Hosts no rule names go to the proxy, although
   the proxy itself would connect to them directly.
3. Otherwise ``PROXY host:port``: the address the client reached (``ctx.server_addr``, the
   concrete local address even on a wildcard listener; IPv6 in brackets), or the addresses
   of ``proxy`` (behind a load balancer or NAT). With ``fallback_direct`` ``; DIRECT`` is
   added, so browsers go direct when the proxy is down: off by default, since an egress
   proxy is usually the only way out and its policy must not be skipped.

The ``[parents]`` section is read from the Config, not from the ``parent`` plugin: without
that plugin (disabled, not installed) the PAC has only the local rules. Browsers pass
``host`` with IPv6 literals in brackets or not, and may keep a trailing dot: the script
lower-cases the host and takes both off first.

Why a wrapper of ``on_request``: the PAC is a local page, answered only when every policy
plugin (``auth``, ``acl``) let the request through, whatever the plugins' order; a client
the ACL denies gets its 403, not the list of internal domains. The text is built once per
proxy address and kept in a bounded cache, rebuilt at each ``configure``.
"""

from __future__ import annotations

import fnmatch
import ipaddress
import json
import logging
import re
from dataclasses import dataclass
from typing import Any, Generator, Iterator, Optional, Sequence

from cachetools import LRUCache

from geproxy import (
    Config,
    ConfigError,
    Context,
    Headers,
    HostPatterns,
    OptionRegistry,
    Request,
    Response,
    RouteRule,
    hookimpl,
    hosts,
)

__all__ = ["PAC", "Script", "parse_parent_rules", "render_proxy"]

log = logging.getLogger(__name__)

SECTION = "pac"
#: The ``parent`` plugin's section, read when some plugin declares it.
PARENTS = "parents"
CONTENT_TYPE = "application/x-ns-proxy-autoconfig"
ALLOW = "GET, HEAD"
#: Proxy addresses whose PAC text is kept: listen addresses, or a wildcard's local ones.
CACHE_SIZE = 64

_HOSTNAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?")
#: What a shExpMatch pattern may hold and mean the same in every browser.
_PLAIN_GLOB = re.compile(r"[a-z0-9_.*?!-]+")


# -- the rules ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Check:
    """One line of ``[parents] rules`` as the PAC sees it: DIRECT or the proxy, for these
    hosts (None: ``all``, every host)."""

    direct: bool
    hosts: Optional[HostPatterns]
    line: int


def parse_parent_rules(lines: Sequence[str]) -> tuple[Check, ...]:
    """The checks the PAC makes for ``rules``, in order.

    The ``parent`` plugin's grammar, ``geproxy.RouteRule``: ``direct|parent`` and host
    patterns, or ``all`` alone. The list ends after an ``all`` line (nothing after it is
    reachable) and before a line that is no rule (logged: nothing after it can be said to
    go direct).
    """
    checks: list[Check] = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rule = RouteRule.parse(line)
        except ValueError as exc:
            log.warning("pac: [parents] rules line %d and the lines after it are left out "
                        "of the PAC (every host they name goes to the proxy): %s", number, exc)
            break
        checks.append(Check(not rule.via_parent, rule.patterns, number))
        if rule.patterns is None:  # all
            break
    # A check for the proxy after the last DIRECT one says what the final return says.
    while checks and not checks[-1].direct:
        checks.pop()
    return tuple(checks)


# -- JavaScript -----------------------------------------------------------------------------


def _js(text: str) -> str:
    return json.dumps(text)


def _glob_regex(glob: str) -> str:
    """A JavaScript regular expression literal matching what fnmatch matches for ``glob``.

    Each ``[...]`` class is spelt out as the ASCII characters fnmatch lets it match (a host
    passed to a PAC is ASCII), so brackets, ``!`` and reversed ranges mean what they mean to
    ``HostPatterns``, and the literal can never be a syntax error.
    """
    out: list[str] = []
    i, n = 0, len(glob)
    while i < n:
        char = glob[i]
        i += 1
        if char == "*":
            if not out or out[-1] != ".*":
                out.append(".*")
        elif char == "?":
            out.append(".")
        elif char == "[":
            j = i
            if j < n and glob[j] == "!":
                j += 1
            if j < n and glob[j] == "]":
                j += 1
            while j < n and glob[j] != "]":
                j += 1
            if j >= n:
                out.append("\\[")
                continue
            members = [c for c in range(128) if fnmatch.fnmatchcase(chr(c), glob[i - 1:j + 1])]
            i = j + 1
            out.append(_char_class(members))
        elif char.isalnum() or char in "_-!":
            out.append(char)
        elif char in ".]":
            out.append("\\" + char)
        else:
            out.append(f"\\x{ord(char):02x}")
    return "/^" + "".join(out) + "$/"


def _char_class(codes: list[int]) -> str:
    if not codes:
        return "(?!)"
    ranges: list[list[int]] = []
    for code in codes:
        if ranges and ranges[-1][1] == code - 1:
            ranges[-1][1] = code
        else:
            ranges.append([code, code])
    parts = (f"\\x{lo:02x}" if lo == hi else f"\\x{lo:02x}-\\x{hi:02x}" for lo, hi in ranges)
    return "[" + "".join(parts) + "]"


def _ipv6_groups(network: ipaddress.IPv6Network) -> str:
    value = int(network.network_address)
    groups = [(value >> (16 * (7 - i))) & 0xFFFF for i in range(8)]
    return "[" + ", ".join(str(g) for g in groups) + "]"


def _conditions(found: HostPatterns) -> Iterator[str]:
    """The JavaScript conditions that together match what ``found`` matches."""
    names: list[str] = [f"host == {_js(name)}" for name in sorted(found.names)]
    for domain in found.domains:
        names.append(f"host == {_js(domain)} || dnsDomainIs(host, {_js('.' + domain)})")
    for glob in found.globs:
        if _PLAIN_GLOB.fullmatch(glob):
            names.append(f"shExpMatch(host, {_js(glob)})")
        else:
            names.append(f"{_glob_regex(glob)}.test(host)")
    if names:
        yield "name && (" + " ||\n            ".join(names) + ")"
    v4 = [f"isInNet(host, {_js(str(net.network_address))}, {_js(str(net.netmask))})"
          for net in found.networks if net.version == 4]
    if v4:
        yield "ip4 && (" + " ||\n            ".join(v4) + ")"
    v6 = [f"geproxyInNet6(ip6, {_ipv6_groups(net)}, {net.prefixlen})"
          for net in found.networks if isinstance(net, ipaddress.IPv6Network)]
    if v6:
        yield "ip6 && (" + " ||\n            ".join(v6) + ")"


_IPV6_HELPERS = r"""
// The eight 16-bit groups of an IPv6 address, or null when it is not one.
function geproxyIPv6(text) {
    var tail = text.match(/^(.*:)([0-9]+)\.([0-9]+)\.([0-9]+)\.([0-9]+)$/);
    if (tail) {
        for (var k = 2; k < 6; k++) {
            if (parseInt(tail[k], 10) > 255) return null;
        }
        text = tail[1] + (parseInt(tail[2], 10) * 256 + parseInt(tail[3], 10)).toString(16) +
            ":" + (parseInt(tail[4], 10) * 256 + parseInt(tail[5], 10)).toString(16);
    }
    var halves = text.split("::");
    if (halves.length > 2) return null;
    var head = halves[0] ? halves[0].split(":") : [];
    var rest = halves.length == 2 && halves[1] ? halves[1].split(":") : [];
    var missing = 8 - head.length - rest.length;
    if (halves.length == 2 ? missing < 1 : missing != 0) return null;
    var parts = head;
    for (var i = 0; i < missing; i++) parts.push("0");
    parts = parts.concat(rest);
    var groups = [];
    for (var j = 0; j < 8; j++) {
        if (!/^[0-9a-f]{1,4}$/.test(parts[j])) return null;
        groups.push(parseInt(parts[j], 16));
    }
    return groups;
}

// Whether the groups of an address are in the network of these groups and prefix length.
function geproxyInNet6(groups, network, prefix) {
    for (var i = 0; i < 8; i++) {
        var bits = Math.min(16, Math.max(0, prefix - 16 * i));
        var mask = bits ? (0xffff << (16 - bits)) & 0xffff : 0;
        if ((groups[i] & mask) != network[i]) return false;
    }
    return true;
}
"""

_PROLOGUE = """\
    host = host.toLowerCase();
    if (host.charAt(0) == "[") host = host.substring(1, host.length - 1);
    if (host.charAt(host.length - 1) == ".") host = host.substring(0, host.length - 1);
    var ip4 = /^[0-9]+\\.[0-9]+\\.[0-9]+\\.[0-9]+$/.test(host);
"""

_PROLOGUE_IPV6 = """\
    var ip6 = null;
    if (host.indexOf(":") >= 0) {
        ip6 = geproxyIPv6(host);
        if (ip6 && ip6[0] == 0 && ip6[1] == 0 && ip6[2] == 0 && ip6[3] == 0 &&
                ip6[4] == 0 && ip6[5] == 0xffff) {
            // IPv4-mapped: the IPv4 address it stands for, as HostPatterns reads it.
            host = (ip6[6] >> 8) + "." + (ip6[6] & 255) + "." + (ip6[7] >> 8) + "." +
                (ip6[7] & 255);
            ip4 = true;
            ip6 = null;
        }
    }
"""

_LOCAL = """\
    // direct_local: this machine and the local network's plain host names.
    if (name && (isPlainHostName(host) || host == "localhost" ||
            dnsDomainIs(host, ".localhost"))) return "DIRECT";
    if (ip4 && isInNet(host, "127.0.0.0", "255.0.0.0")) return "DIRECT";
    if (host == "::1") return "DIRECT";
"""


@dataclass(frozen=True)
class Script:
    """The PAC text but for the proxy's address, which ``render`` puts in."""

    head: str
    body: str

    @classmethod
    def build(cls, checks: Sequence[Check], direct_local: bool) -> "Script":
        # IP literals are parsed fully (IPv6, IPv4-mapped) only when a rule has a network.
        networks = any(check.hosts.networks for check in checks if check.hosts is not None)
        head = "// Proxy auto-config made by geproxy from its [pac] and [parents] sections.\n"
        body = [_PROLOGUE]
        if networks:
            head += _IPV6_HELPERS
            body.append(_PROLOGUE_IPV6)
        body.append('    var name = !ip4 && host.indexOf(":") < 0;\n')
        if direct_local:
            body.append(_LOCAL)
        answer = "proxy"
        for check in checks:
            answer = '"DIRECT"' if check.direct else "proxy"
            body.append(f"    // [parents] rules line {check.line}\n")
            if check.hosts is None:
                break  # all: the answer for every host left
            for condition in _conditions(check.hosts):
                body.append(f"    if ({condition}) return {answer};\n")
            answer = "proxy"
        body.append(f"    return {answer};\n}}\n")
        return cls(head, "".join(body))

    def render(self, proxy: str) -> str:
        return (f"{self.head}\nfunction FindProxyForURL(url, host) {{\n"
                f"    var proxy = {_js(proxy)};\n{self.body}")


# -- addresses ------------------------------------------------------------------------------


def _authority(host: str, port: int) -> str:
    try:
        address: Any = hosts.unmapped(ipaddress.ip_address(host.partition("%")[0]))
    except ValueError:
        return f"{host}:{port}"
    return hosts.authority(str(address), port)


def render_proxy(server_addr: tuple[str, int], proxies: Sequence[str], fallback_direct: bool,
                 tls: bool = False) -> str:
    """What FindProxyForURL returns for hosts that go through the proxy: ``proxies`` (PAC
    items, ``PROXY host:port`` or ``HTTPS host:port``), or else the address the client
    reached, as ``HTTPS`` when it reached a TLS listener (browsers then speak TLS to it)."""
    keyword = "HTTPS" if tls else "PROXY"
    items = list(proxies) or [f"{keyword} {_authority(server_addr[0], server_addr[1])}"]
    if fallback_direct:
        items.append("DIRECT")
    return "; ".join(items)


def parse_proxy(item: str) -> str:
    """``host:port``, ``[IPv6]:port``, either after ``https://`` for a TLS listener: the
    PAC item (``PROXY host:port``, ``HTTPS host:port``); raises ValueError."""
    keyword = "PROXY"
    if item.lower().startswith("https://"):
        keyword, item = "HTTPS", item[len("https://"):]
    host, sep, port = item.rpartition(":")
    if not sep or not (port.isascii() and port.isdigit()) or not 1 <= int(port) <= 65535:
        raise ValueError(f"not host:port (port 1-65535): {item!r}")
    if host.startswith("[") and host.endswith("]"):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            raise ValueError(f"not an IPv6 address: {host!r}") from None
    elif not _HOSTNAME.fullmatch(host):
        raise ValueError(f"not a host name or address (IPv6 goes in brackets): {item!r}")
    return f"{keyword} {host}:{int(port)}"


# -- the plugin -----------------------------------------------------------------------------


class PAC:
    name = SECTION

    def __init__(self) -> None:
        self.paths: frozenset[str] = frozenset({"/proxy.pac", "/wpad.dat"})
        self.max_age = 300
        self.fallback_direct = False
        self.proxies: tuple[str, ...] = ()
        self.script = Script.build((), True)
        #: server address -> the encoded PAC; bounded, and new at each configure.
        self._texts: LRUCache[tuple[str, int, bool], bytes] = LRUCache(maxsize=CACHE_SIZE)

    @hookimpl
    def add_options(self, registry: OptionRegistry) -> None:
        (
            registry.section(SECTION)
            .add("paths", "list", "/proxy.pac /wpad.dat",
                 "Paths on the proxy port that answer the PAC file; empty serves none.")
            .add("max_age", "duration", "5m",
                 "How long browsers may keep the PAC file (Cache-Control: max-age).",
                 minimum=0)
            .add("direct_local", "bool", "on",
                 "DIRECT for plain host names, localhost, 127.0.0.0/8 and ::1.")
            .add("fallback_direct", "bool", "off",
                 "Add DIRECT after the proxy, so browsers go direct when it is down.")
            .add("proxy", "list", "",
                 "host:port to name in the PAC (https://host:port for a TLS listener), "
                 "several for failover; empty: the address the client reached (set it "
                 "behind a load balancer or NAT).")
        )

    @hookimpl
    def configure(self, config: Config) -> None:
        section = config.section(SECTION)
        paths = frozenset(section["paths"])
        for path in paths:
            if not path.startswith("/") or "?" in path or "#" in path:
                raise ConfigError(f"not a path (/name, no query): {path!r}", path=config.path,
                                  section=SECTION, key="paths")
        try:
            proxies = tuple(parse_proxy(item) for item in section["proxy"])
        except ValueError as exc:
            raise ConfigError(str(exc), path=config.path, section=SECTION,
                              key="proxy") from None
        checks: tuple[Check, ...] = ()
        if PARENTS in config:
            rules = config.section(PARENTS).get("rules", ())
            if isinstance(rules, str):
                rules = rules.splitlines()
            checks = parse_parent_rules(list(rules))
        self.paths = paths
        self.max_age = int(section["max_age"])
        self.fallback_direct = section["fallback_direct"]
        self.proxies = proxies
        self.script = Script.build(checks, section["direct_local"])
        self._texts = LRUCache(maxsize=CACHE_SIZE)

    def text(self, server_addr: tuple[str, int], tls: bool = False) -> bytes:
        """The PAC for clients that reached the proxy at ``server_addr`` (over TLS: a
        ``tls://`` listener)."""
        key = (server_addr[0], server_addr[1], tls)
        text = self._texts.get(key)
        if text is None:
            proxy = render_proxy(server_addr, self.proxies, self.fallback_direct, tls)
            text = self._texts[key] = self.script.render(proxy).encode("ascii")
        return text

    def wants(self, ctx: Context, request: Request) -> bool:
        """Whether ``request`` asks this proxy for one of the PAC paths."""
        if request.path.partition("?")[0] not in self.paths:
            return False
        if not request.host:
            return True
        # Absolute-form: only the address and port the client reached, spelt as an IP.
        if request.is_connect or request.port != ctx.server_addr[1]:
            return False
        try:
            target = hosts.unmapped(ipaddress.ip_address(request.host))
            local = hosts.unmapped(ipaddress.ip_address(ctx.server_addr[0].partition("%")[0]))
        except ValueError:
            return False
        return target == local

    # A wrapper, so that every policy plugin has answered first (see the module docstring).
    @hookimpl(wrapper=True)
    def on_request(self, ctx: Context, request: Request
                   ) -> Generator[None, Optional[Response], Optional[Response]]:
        answer = yield
        if answer is not None or not self.wants(ctx, request):
            return answer
        if request.method not in ("GET", "HEAD"):
            headers = Headers([("Allow", ALLOW), ("Content-Type", "text/plain; charset=utf-8"),
                               ("Cache-Control", "no-store")])
            return Response(405, headers, b"405 Method Not Allowed\n")
        headers = Headers([("Content-Type", CONTENT_TYPE),
                           ("Cache-Control", f"max-age={self.max_age}")])
        return Response(200, headers, self.text(ctx.server_addr, ctx.tls is not None))
