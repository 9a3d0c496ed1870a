"""INI configuration: declared once, typed, validated at start.

Every option lives in a section: ``[geproxy]`` for the core, one section per plugin, declared
through the ``add_options`` hook. Values are parsed once, here; nothing is parsed per request.
Every error names the file, the section and the key, in one line.
"""

from __future__ import annotations

import configparser
import difflib
import ipaddress
import os
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional, Sequence

from .errors import ConfigError, proxy_name

__all__ = [
    "Config",
    "OptionRegistry",
    "Option",
    "did_you_mean",
    "parse_duration",
    "parse_size",
    "parse_bool",
    "parse_list",
    "parse_listen",
    "parse_address",
    "ListenAddress",
    "read_ini",
    "core_options",
]

_DURATION = re.compile(r"([0-9]+(?:\.[0-9]+)?)\s*(ms|s|m|h|d)?")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}
_SIZE = re.compile(r"([0-9]+)\s*(B|KiB|MiB|GiB|K|M|G|KB|MB|GB)?", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "b": 1, "k": 1024, "kib": 1024, "kb": 1024, "m": 1024**2, "mib": 1024**2,
               "mb": 1024**2, "g": 1024**3, "gib": 1024**3, "gb": 1024**3}


def parse_duration(text: str) -> float:
    """``250ms``, ``3s``, ``5m``, ``1h``, ``2d`` or a plain number of seconds."""
    match = _DURATION.fullmatch(text.strip())
    if not match:
        raise ValueError(f"not a duration: {text!r} (use e.g. 250ms, 3s, 5m, 1h)")
    return float(match.group(1)) * _DURATION_UNITS[match.group(2)]


def parse_size(text: str) -> int:
    """``64KiB``, ``1MiB``, ``512`` (bytes); K, M and G are binary multiples too."""
    match = _SIZE.fullmatch(text.strip())
    if not match:
        raise ValueError(f"not a size: {text!r} (use e.g. 512, 64KiB, 1MiB)")
    return int(match.group(1)) * _SIZE_UNITS[(match.group(2) or "").lower()]


def parse_bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("on", "yes", "true", "1"):
        return True
    if value in ("off", "no", "false", "0"):
        return False
    raise ValueError(f"not a boolean: {text!r} (use on or off)")


def parse_list(text: str) -> list[str]:
    """Items separated by white space, commas or new lines."""
    return [item for item in re.split(r"[\s,]+", text.strip()) if item]


def did_you_mean(word: str, names: Iterable[str],
                 aliases: Optional[Mapping[str, str]] = None) -> str:
    """A hint for a misspelt name: ``"; did you mean 'x'?"``, or "" when nothing is close.
    ``aliases`` maps names edit distance cannot find (another product's, Squid's
    ``dstdomain``) to ours; they are looked up first, case-insensitively."""
    if aliases:
        alias = aliases.get(word.lower())
        if alias is not None:
            return f"; did you mean {alias!r}?"
    close = difflib.get_close_matches(word, list(names), n=1, cutoff=0.75)
    return f"; did you mean {close[0]!r}?" if close else ""


def parse_lines(text: str) -> list[str]:
    """One item per non-empty line (continuation lines of an INI value). Comments are gone
    already: ``read_ini`` removes them from every value alike."""
    lines = (line.strip() for line in text.splitlines())
    return [line for line in lines if line]


#: What ``logfile`` values name instead of a file.
STDOUT, OFF = "-", "off"


def parse_logfile(text: str) -> str:
    """A log's destination: ``-`` (standard output), ``off`` (any case: none), or a file
    path (made absolute by ``build_config``, as every file an option names)."""
    value = text.strip()
    return OFF if value.lower() == OFF else value


class ListenAddress(tuple):  # type: ignore[type-arg]
    """``(host, port)`` of a listener, and whether it speaks TLS (``tls://host:port``)."""

    tls: bool

    def __new__(cls, host: str, port: int, tls: bool = False) -> "ListenAddress":
        self = super().__new__(cls, (host, port))
        self.tls = tls
        return self

    def __eq__(self, other: object) -> bool:
        return tuple.__eq__(self, other) and getattr(other, "tls", False) == self.tls

    def __ne__(self, other: object) -> bool:
        return not self == other

    def __hash__(self) -> int:
        return hash((tuple(self), self.tls))

    def __repr__(self) -> str:
        return f"ListenAddress({self[0]!r}, {self[1]!r}, tls={self.tls!r})"


def parse_listen(text: str) -> list[ListenAddress]:
    """Listen addresses: ``127.0.0.1:3128``, ``[::1]:3128``, ``:3128`` (all IPv4),
    ``[::]:3128`` (all IPv6), ``localhost:3128`` (127.0.0.1), several; ``tls://`` before
    one makes it a TLS listener (an HTTPS proxy, configured in ``[tls]``)."""
    out = []
    for item in parse_list(text):
        scheme, sep, rest = item.partition("://")
        if not sep:
            scheme, rest = "tcp", item
        if scheme not in ("tcp", "tls"):
            raise ValueError(f"not tcp:// or tls://: {item!r}")
        host, sep, port = rest.rpartition(":")
        if not sep or not (port.isascii() and port.isdigit()) or not 0 <= int(port) <= 65535:
            raise ValueError(f"not host:port: {item!r}")
        bracketed = host.startswith("[") and host.endswith("]")
        if bracketed:
            host = host[1:-1]
        host = {"": "0.0.0.0", "localhost": "127.0.0.1"}.get(host, host)
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            raise ValueError(f"not an IP address: {host!r}") from None
        if (address.version == 6) != bracketed:
            raise ValueError(f"IPv6 addresses go in brackets, IPv4 ones not: {item!r}")
        out.append(ListenAddress(str(address), int(port), scheme == "tls"))
    if not out:
        raise ValueError("at least one address is needed")
    return out


def parse_address(text: str) -> Optional[tuple[str, int]]:
    """One plain listen address (as for ``listen``), or None for an empty value: off."""
    if not text.strip():
        return None
    found = parse_listen(text)
    if len(found) > 1:
        raise ValueError(f"one address only, not {len(found)}: {text.strip()!r}")
    if found[0].tls:
        raise ValueError(f"no tls:// here: {text.strip()!r}")
    return (found[0][0], found[0][1])


_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


def parse_token(text: str) -> str:
    """An HTTP token (RFC 9110 5.6.2): a name that can stand in a header unquoted."""
    value = text.strip()
    if not _TOKEN.fullmatch(value):
        raise ValueError(f"not a token (letters, digits, -._~ and the like): {text!r}")
    return value


def parse_networks(text: str) -> list[Any]:
    """IP networks (CIDRs) and addresses, as ``ipaddress`` network objects."""
    out = []
    for item in parse_list(text):
        try:
            out.append(ipaddress.ip_network(item, strict=True))
        except ValueError as exc:
            raise ValueError(f"not a network: {item!r} ({exc})") from None
    return out


_PORT_RANGE = re.compile(r"([0-9]{1,5})(?:-([0-9]{1,5}))?")


def parse_port_ranges(items: Sequence[str]) -> tuple[tuple[int, int], ...]:
    """``443``, ``8000-8999``: (first, last) port pairs, 1 to 65535; ValueError naming the
    bad item. The ``ports`` kind, and ACL rules' ``port`` conditions; public, as
    ``geproxy.parse_port_ranges``, for plugins whose options name ports."""
    out = []
    for item in items:
        match = _PORT_RANGE.fullmatch(item)
        first = int(match.group(1)) if match else 0
        last = int(match.group(2) or first) if match else 0
        if not 1 <= first <= last <= 65535:
            raise ValueError(f"not a port or a port range (1-65535): {item!r}")
        out.append((first, last))
    return tuple(out)


def parse_workers(text: str) -> int:
    """A number of processes, or ``auto`` for one per CPU."""
    value = text.strip().lower()
    if value == "auto":
        return os.cpu_count() or 1
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"not a number of workers: {text!r} (use 1, 2 ... or auto)")
    return int(value)


def _parse_int(text: str) -> int:
    return int(text.strip())


def _parse_str(text: str) -> str:
    return text.strip()


_KINDS: dict[str, Callable[[str], Any]] = {
    "str": _parse_str,
    "path": _parse_str,
    "logfile": parse_logfile,
    "token": parse_token,
    "int": _parse_int,
    "float": lambda text: float(text.strip()),
    "bool": parse_bool,
    "duration": parse_duration,
    "size": parse_size,
    "list": parse_list,
    "lines": parse_lines,
    "listen": parse_listen,
    "address": parse_address,
    "networks": parse_networks,
    "ports": lambda text: parse_port_ranges(parse_list(text)),
    "workers": parse_workers,
}


@dataclass(frozen=True)
class Option:
    """One option of a section: its kind, default, help and bounds; ``parse`` reads a
    value as the INI file writes it."""

    section: str
    key: str
    kind: str
    default: str
    help: str
    minimum: Optional[float] = None
    choices: tuple[str, ...] = ()

    def parse(self, text: str) -> Any:
        value = _KINDS[self.kind](text)
        if self.minimum is not None and value < self.minimum:
            raise ValueError(f"must be at least {self.minimum:g}")
        if self.choices and value not in self.choices:
            raise ValueError(f"must be one of {', '.join(self.choices)}, not {value!r}")
        return value


class _SectionOptions:
    """The options of one section, as ``OptionRegistry.section(name)`` hands them to
    plugins for ``add``."""

    def __init__(self, registry: "OptionRegistry", name: str) -> None:
        self._registry = registry
        self.name = name

    def add(self, key: str, kind: str, default: str, help: str, *,
            minimum: Optional[float] = None,
            choices: Sequence[str] = ()) -> "_SectionOptions":
        """Declare ``key`` of this section; ``default`` is written as in the INI file.
        ``minimum`` bounds a number; ``choices`` lists the only values a ``str`` may take."""
        if kind not in _KINDS:
            raise ValueError(f"unknown option kind {kind!r}")
        option = Option(self.name, key, kind, default, help, minimum, tuple(choices))
        option.parse(default)  # a default that does not parse is a bug in the plugin
        self._registry.options.setdefault(self.name, {})[key] = option
        return self


class OptionRegistry:
    """Collects the options every plugin declares in ``add_options``."""

    def __init__(self) -> None:
        self.options: dict[str, dict[str, Option]] = {}

    def section(self, name: str) -> _SectionOptions:
        return _SectionOptions(self, name)

    def __iter__(self) -> Iterator[Option]:
        for section in self.options.values():
            yield from section.values()


class Config:
    """The validated configuration: ``config.section("geproxy")["listen"]``.

    ``stash`` is the state plugins keep across reloads, keyed by the plugin's own name (as
    ``ctx.stash`` is per connection): one dict, handed from each configuration of a server
    to the one a reload makes. What must outlive a reload lives there (the metrics plugin's
    counters, say); a ``configure`` that may still fail must not change what it finds.
    """

    def __init__(self, path: str, values: dict[str, dict[str, Any]],
                 stash: Optional[dict[str, Any]] = None) -> None:
        self.path = path
        #: The directory of the file, absolute: what relative file names are taken from.
        self.directory = config_directory(path)
        self._values = values
        self.stash: dict[str, Any] = {} if stash is None else stash

    def resolve_path(self, name: str) -> str:
        """A file name written in this configuration, made absolute against its directory
        (an absolute name unchanged, an empty one empty). Options of kind ``path`` and
        ``logfile`` arrive resolved already; this is for file names inside other values."""
        return resolve_path(self.directory, name)

    def section(self, name: str) -> Mapping[str, Any]:
        return self._values[name]

    def __getitem__(self, name: str) -> Mapping[str, Any]:
        return self._values[name]

    def __contains__(self, name: object) -> bool:
        return name in self._values

    @property
    def core(self) -> Mapping[str, Any]:
        return self._values["geproxy"]

    @property
    def via(self) -> str:
        """The proxy's name in Via fields (``[geproxy] via``); "" when it is ``off``."""
        value: str = self.core["via"].strip()
        return "" if value.lower() == "off" else value

    @property
    def proxy_name(self) -> str:
        """The proxy's name in Proxy-Status fields: ``via``, or ``geproxy`` without one."""
        return proxy_name(self.via)


def read_text(path: str) -> str:
    """The INI file's text; a one-line ConfigError when it cannot be read."""
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.read()
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or exc
        raise ConfigError(f"cannot read: {reason}", path=path) from None


#: Written in a value, a ``#`` that would otherwise start a comment.
COMMENT_ESCAPE = "\\#"


def read_ini(path: str, text: Optional[str] = None) -> configparser.ConfigParser:
    """Parse the INI file (interpolation off), or ``text`` read from it earlier (what a
    master hands its workers); any problem is a one-line ConfigError.

    Comments: a line whose first non-blank character is ``#`` or ``;``, and, in every line
    of every value alike, a ``#`` at its start or after white space, to the end of the
    line, unless it is inside a double-quoted word (``strip_comment``); ``\\#`` in a value
    stands for a ``#`` itself.
    No other character is special, so the values plugins get are final text."""
    parser = configparser.ConfigParser(interpolation=None, default_section="__no_defaults__")
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    if text is None:
        text = read_text(path)
    try:
        parser.read_string(text, source=path)
    except configparser.Error as exc:
        message = " ".join(str(exc).split())
        raise ConfigError(f"not a valid INI file: {message}", path=path) from None
    for section in parser.sections():
        for key, value in parser.items(section):
            bare = "\n".join(strip_comment(line) for line in value.split("\n"))
            if COMMENT_ESCAPE in bare:
                bare = bare.replace(COMMENT_ESCAPE, "#")
            if bare != value:
                parser.set(section, key, bare)
    return parser


def strip_comment(line: str) -> str:
    """One line of a value without its inline comment: from a ``#`` at the line's start or
    after white space, outside a double-quoted word (one that starts with a quote, as the
    acl rules write values holding spaces or ``#``), to the end of the line."""
    if "#" not in line:
        return line
    quoted = False
    previous = " "
    i = 0
    while i < len(line):
        char = line[i]
        if quoted:
            if char == "\\" and i + 1 < len(line):
                i += 2
                previous = "x"
                continue
            if char == '"':
                quoted = False
        elif char == '"' and previous.isspace():
            quoted = True
        elif char == "#" and previous.isspace() and line[i - 1:i] != "\\":
            return line[:i].rstrip()
        previous = char
        i += 1
    return line


def config_directory(path: str) -> str:
    """The absolute directory of the configuration file ``path``, as named (a symbolic link
    to the file is not followed): relative file names in it are taken from there."""
    return os.path.dirname(os.path.abspath(path))


def resolve_path(directory: str, name: str) -> str:
    """``name`` made absolute against ``directory``: an absolute name unchanged, an empty
    one (no file) empty. Never normalised: ``..`` is left for the kernel to follow, through
    symbolic links, as it would have been from that directory."""
    if not name or os.path.isabs(name):
        return name
    return os.path.join(directory, name)


def _resolve_logfile(directory: str, value: str) -> str:
    return value if value in (STDOUT, OFF) else resolve_path(directory, value)


#: The kinds whose values name files, and how each is made absolute: every option of these
#: kinds is resolved against the configuration file's directory before any plugin sees it.
_FILE_KINDS: dict[str, Callable[[str, str], str]] = {
    "path": resolve_path,
    "logfile": _resolve_logfile,
}


def build_config(
    path: str,
    parser: configparser.ConfigParser,
    registry: OptionRegistry,
    ignored_sections: frozenset[str] = frozenset(),
    stash: Optional[dict[str, Any]] = None,
) -> Config:
    """Validate every section and key of ``parser`` against ``registry``."""
    values: dict[str, dict[str, Any]] = {}
    for section in parser.sections():
        if section in ignored_sections:
            continue
        if section not in registry.options:
            raise ConfigError("unknown section (no plugin declares it)", path=path,
                              section=section)
        for key in parser[section]:
            if key not in registry.options[section]:
                raise ConfigError("unknown option", path=path, section=section, key=key)
    directory = config_directory(path)
    for section, options in registry.options.items():
        out = values.setdefault(section, {})
        for key, option in options.items():
            text = parser.get(section, key, fallback=option.default)
            try:
                value = option.parse(text)
            except ValueError as exc:
                raise ConfigError(str(exc), path=path, section=section, key=key) from None
            resolve = _FILE_KINDS.get(option.kind)
            out[key] = value if resolve is None else resolve(directory, value)
    return Config(path, values, stash)


def core_options(registry: OptionRegistry) -> None:
    """The ``[geproxy]`` section: the core's own options."""
    (
        registry.section("geproxy")
        .add("listen", "listen", "127.0.0.1:3128",
             "Addresses to accept proxy clients on: host:port, [IPv6]:port, several; "
             "tls://host:port for a TLS listener (an HTTPS proxy, see [tls]).")
        .add("plugins", "list", "", "Extra plugin modules to load: module or module:attr.")
        .add("disable", "list", "", "Built-in plugins to leave out, by name.")
        .add("workers", "workers", "1",
             "Processes serving the listen addresses (SO_REUSEPORT): a number, or auto for "
             "one per CPU. 1 runs in one process with no master.")
        .add("max_connections", "int", "10000",
             "Client connections served at once; more are answered 503.", minimum=1)
        .add("header_timeout", "duration", "10s",
             "Time for a client to send a whole request head.", minimum=0.001)
        .add("connect_timeout", "duration", "10s",
             "Time to connect to an upstream, all its addresses together (Happy Eyeballs); "
             "name resolution is not counted.",
             minimum=0.001)
        .add("idle_timeout", "duration", "5m",
             "A tunnel, or a wait for an upstream or client, with no byte moving for this "
             "long is closed.", minimum=0.001)
        .add("max_tunnel_lifetime", "duration", "0",
             "A tunnel open this long is closed, however busy; 0 for no limit.", minimum=0)
        .add("graceful_timeout", "duration", "30s",
             "On SIGTERM or SIGINT, time open requests and tunnels get to finish.", minimum=0)
        .add("reload_tunnels", "str", "keep",
             "What a reload does to open tunnels: keep lets them run to their end; recheck "
             "judges each again by the new policy (its recorded user, the address it is "
             "connected to) and closes those it would now refuse.",
             choices=("keep", "recheck"))
        .add("max_header_size", "size", "64KiB",
             "Largest request or response head accepted.", minimum=1024)
        .add("via", "token", "geproxy",
             "Pseudonym in the Via header added to forwarded messages, and how loops are "
             "recognised; off to add none.")
        .add("forwarded_for", "str", "off",
             "X-Forwarded-For and Forwarded: off passes the client's own unchanged and adds "
             "none, on adds the client address, delete removes them.",
             choices=("off", "on", "delete"))
        .add("access_log", "logfile", "-",
             "Where the access log goes: a file path, - for standard output, off for none.")
        .add("log_format", "str", "geproxy",
             "The access-log line: geproxy, squid (Squid's native), combined (Apache/nginx) "
             "or json.", choices=("geproxy", "squid", "combined", "json"))
        .add("proxy_protocol", "str", "off",
             "PROXY protocol header expected before each connection's bytes (from a load "
             "balancer): off, v1, v2 or any.", choices=("off", "v1", "v2", "any"))
        .add("proxy_protocol_from", "networks", "",
             "Senders allowed to send the PROXY header; connections from anywhere else are "
             "closed. Required when proxy_protocol is on.")
        .add("upstream_keepalive", "int", "32",
             "Idle upstream connections kept per host:port for reuse; 0 disables reuse.",
             minimum=0)
        .add("upstream_idle_timeout", "duration", "60s",
             "An idle pooled upstream connection is closed after this long.", minimum=0.001)
        .add("local_paths", "list", "/healthz",
             "Admin pages the proxy port answers too, for origin-form requests: any of "
             "/healthz /readyz /metrics.")
        .add("docroot", "path", "",
             "A directory whose files the proxy port serves to origin-form GET and HEAD "
             "requests (index.html for a directory); empty for none.")
        .add("admin_listen", "address", "",
             "Address of the admin listener (/healthz, /readyz, /metrics, /tunnels): one "
             "host:port; empty for none. Anyone who reaches it can close tunnels.")
    )
    (
        registry.section("tls")
        .add("certificate", "path", "",
             "The TLS listeners' certificate chain (PEM: the certificate, then any "
             "intermediates). Needed when a listen address is tls://; reloaded on SIGHUP.")
        .add("key", "path", "",
             "The certificate's private key (PEM); empty when it is in the certificate file.")
        .add("min_version", "str", "TLSv1.2", "Oldest TLS version a client may use.",
             choices=("TLSv1.2", "TLSv1.3"))
        .add("ciphers", "str", "",
             "OpenSSL cipher list for TLS 1.2; empty for OpenSSL's defaults.")
        .add("handshake_timeout", "duration", "10s",
             "Time a client gets for the whole TLS handshake; a failed or late one is logged "
             "in one line and counted, and the connection closed.", minimum=0.001)
        .add("client_cert", "str", "off",
             "Client certificates: off (none asked for), optional (verified when sent) or "
             "required (no handshake without one). A verified one names the user.",
             choices=("off", "optional", "required"))
        .add("client_ca", "path", "",
             "CA certificates (PEM) that client certificates must chain to; needed unless "
             "client_cert is off.")
        .add("identity_from", "str", "cn",
             "Which name of a client certificate is the user: cn (the subject's common "
             "name), san_uri or san_dns (the first URI or DNS subject alternative name).",
             choices=("cn", "san_uri", "san_dns"))
        .add("http2", "bool", "off",
             "Offer HTTP/2 (ALPN h2) on TLS listeners: many CONNECT tunnels on one "
             "connection, each an HTTP/2 stream with its own flow control.")
        .add("max_streams", "int", "100",
             "Streams (tunnels or requests) one HTTP/2 connection may have open at once.",
             minimum=1)
    )
