"""What hooks see: the connection Context, the immutable Request, a Response, and the Record.

Plugins never see sockets, greenlets or parser state; these few objects are the whole API.
Header names and values are ``str`` decoded as latin-1, so any byte the wire carried survives
a round trip.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Optional, Protocol, Sequence, Tuple

from .errors import BackendUnavailable
from .hosts import authority

__all__ = ["Headers", "Request", "Response", "Context", "Record", "Route", "Resolved", "TLSInfo"]

HeaderList = Iterable[Tuple[str, str]]


class Headers:
    """An ordered, case-insensitive multi-map of header fields.

    A Request's headers are frozen (``frozen=True``); a Response's may be edited by
    ``on_response`` plugins. Look-ups go through an index by lower-case name, built on first
    use and dropped on any change.
    """

    __slots__ = ("_items", "_frozen", "_index")

    def __init__(self, items: HeaderList = (), *, frozen: bool = False) -> None:
        self._items: list[tuple[str, str]] = list(items)
        self._frozen = frozen
        self._index: Optional[dict[str, list[str]]] = None

    def _lookup(self) -> dict[str, list[str]]:
        index = self._index
        if index is None:
            index = {}
            for key, value in self._items:
                _indexed(index, key, value)
            self._index = index
        return index

    def get(self, name: str, default: Optional[str] = None) -> Optional[str]:
        """The first value of ``name``, or ``default``."""
        values = self._lookup().get(name.lower())
        return values[0] if values else default

    def get_all(self, name: str) -> list[str]:
        return list(self._lookup().get(name.lower(), ()))

    def tokens(self, name: str) -> list[str]:
        """The comma-separated tokens of every ``name`` field, lower-cased and stripped."""
        values = self._lookup().get(name.lower())
        if not values:
            return []
        out: list[str] = []
        for value in values:
            out.extend(t.strip() for t in value.lower().split(",") if t.strip())
        return out

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._lookup()

    def __iter__(self) -> Iterator[tuple[str, str]]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return f"Headers({self._items!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Headers) and self._items == other._items

    def add(self, name: str, value: str) -> None:
        if self._frozen:
            raise TypeError("these headers are read-only")
        self._items.append((name, value))
        if self._index is not None:  # kept in step rather than built again
            _indexed(self._index, name, value)

    def set(self, name: str, value: str) -> None:
        """Replace every ``name`` field with one field holding ``value``."""
        self.remove(name)
        self.add(name, value)

    def remove(self, *names: str) -> None:
        """Remove every field of each of ``names`` (one pass, however many are named)."""
        if self._frozen:
            raise TypeError("these headers are read-only")
        index = self._lookup()
        present = {lower for lower in map(str.lower, names) if lower in index}
        if present:
            for lower in present:
                del index[lower]
            self._items = [(k, v) for k, v in self._items if k.lower() not in present]

    def copy(self, *, frozen: bool = False) -> "Headers":
        return Headers(self._items, frozen=frozen)


def _indexed(index: dict[str, list[str]], name: str, value: str) -> None:
    """Add a field to a Headers index (its values by lower-case name)."""
    lower = name.lower()
    found = index.get(lower)
    if found is None:
        index[lower] = [value]
    else:
        found.append(value)


@dataclass(frozen=True)
class Request:
    """One request head as the client sent it. Immutable: plugins read it, never change it.

    ``host`` and ``port`` are the destination (from the CONNECT authority or the absolute-form
    target); ``path`` is the origin-form target that would be sent upstream. For an
    origin-form request (addressed to the proxy itself) ``host`` is empty.
    """

    method: str
    target: str
    version: str
    headers: Headers
    scheme: str = ""
    host: str = ""
    port: int = 0
    path: str = ""

    @property
    def is_connect(self) -> bool:
        return self.method == "CONNECT"

    @property
    def authority(self) -> str:
        """``host:port`` with IPv6 literals in brackets, as a CONNECT target spells it."""
        return authority(self.host, self.port)


@dataclass
class Response:
    """A response head (and, for answers made by the proxy or a plugin, a small body).

    Returned from ``on_request`` it is sent to the client as is, with Content-Length set from
    ``body``. Passed to ``on_response`` it is the upstream's head, whose headers may be edited.
    """

    status: int
    headers: Headers = field(default_factory=Headers)
    body: bytes = b""
    reason: str = ""
    version: str = "HTTP/1.1"


class Resolved(list):  # type: ignore[type-arg]
    """What a resolver returns: socket addresses in the order to try, plus the TTL (seconds)
    the answer may be cached for, None when the resolver cannot tell (the system resolver).

    A plain list of addresses is accepted from ``resolve`` too; it counts as ``ttl=None``.
    """

    def __init__(self, addresses: Iterable[tuple[Any, ...]] = (),
                 ttl: Optional[float] = None) -> None:
        super().__init__(addresses)
        self.ttl = ttl

    def __repr__(self) -> str:
        return f"Resolved({list.__repr__(self)}, ttl={self.ttl!r})"


@dataclass(frozen=True)
class Route:
    """Where ``route`` sends a request: a parent proxy, with optional Basic credentials."""

    host: str
    port: int
    username: str = ""
    password: str = ""

    @property
    def authority(self) -> str:
        """``host:port`` of the parent, IPv6 literals in brackets; never its credentials."""
        return authority(self.host, self.port)


@dataclass(frozen=True)
class TLSInfo:
    """The TLS session of a client connection to a TLS listener (``ctx.tls``)."""

    #: "TLSv1.3", "TLSv1.2".
    version: str
    cipher: str
    #: The protocol agreed by ALPN ("h2", "http/1.1"), None when the client offered none.
    alpn: Optional[str] = None
    #: The server name (SNI) the client asked for, None when it sent none.
    server_name: Optional[str] = None
    #: The verified client certificate's subject ("CN=svc-a,O=Example"); None without one.
    client_subject: Optional[str] = None
    #: The user the certificate names (``[tls] identity_from``); None without a certificate,
    #: or when the certificate has no such name.
    identity: Optional[str] = None


@dataclass
class Context:
    """Per connection. Lives from accept to close; plugins must not keep it after on_close.

    ``stash`` is free for plugins, keyed by the plugin's own name.
    """

    client_addr: tuple[str, int]
    server_addr: tuple[str, int]
    config: Any
    #: The connection's id, unique among its server's (``c42``; ``w1c42`` in worker 1), or
    #: a stream's (``c42-3``); ``-`` for a context made outside a server (a test,
    #: ``geproxy explain``).
    conn_id: str = "-"
    user: Optional[str] = None
    stash: dict[str, Any] = field(default_factory=dict)
    started: float = field(default_factory=time.time)
    requests: int = 0
    #: The TLS session, on a TLS listener once the handshake is done; None on a plain one.
    tls: Optional[TLSInfo] = None
    #: True while a request is only being decided, not served: ``geproxy explain``, and the
    #: re-check of open tunnels after a reload. ``ctx.user`` then holds an identity already
    #: established (or given with ``--user``), or None: plugins that authenticate take it as
    #: it is, check no credentials, and answer their challenge only when it is None; plugins
    #: that count or log requests leave the request out.
    decide_only: bool = False
    #: True in ``geproxy explain`` (a process that serves nobody): no backend may be asked
    #: (a directory, an external helper, a KDC). Plugins answer from what they hold in
    #: memory or not at all; the groups a decision needs come from ``explain --group``.
    offline: bool = False
    #: What a DNS cache made of the current request's last lookup: "hit" (answered without
    #: asking the resolvers, a cached failure included), "miss" (the resolvers were asked)
    #: or "stale" (a stale answer, the resolvers having failed); None when no cache took part
    #: (no lookup: an IP literal, a reused upstream connection; no cache plugin; a request
    #: only decided). Set by the cache in ``resolve`` (the built-in ``dnscache``), read by
    #: observers in ``on_close``; the core sets it back to None once ``on_close`` has run,
    #: so each request of a keep-alive connection starts without one.
    dns_cache: Optional[str] = None
    #: The time (``time.time()``) a decision is made for when it is not now: a request
    #: replayed from a log (``geproxy explain --replay``) is decided at its logged time.
    #: None, the default, means now; time-dependent policy reads ``ctx.decision_time()``.
    at: Optional[float] = None
    #: How the current request's credentials were checked, set by the plugin that checked
    #: them (in ``authenticate``) for observers in ``on_close`` (the ``metrics`` plugin
    #: counts them): the scheme ("basic", "negotiate", "certificate") and the result:
    #: "ok" (checked now), "cached" (a remembered verdict), "stale" (remembered past
    #: ``cache_ttl`` while no backend answers), "connection" (the connection's
    #: Negotiate identity, reused), "failed" (wrong or unknown, checked now or
    #: remembered), "throttled" (refused unchecked: too many failures), "unavailable"
    #: (no backend answered). Both None when no credentials were checked; the core sets
    #: them back to None once ``on_close`` has run.
    auth_scheme: Optional[str] = None
    auth_result: Optional[str] = None
    #: Set by the core: what ``authenticate``, ``groups`` and ``challenges`` ask (the hooks
    #: of the same names); None outside a server, where nobody is authenticated.
    identity: Optional["IdentitySource"] = field(default=None, repr=False, compare=False)
    #: The request ``authenticate`` was last asked about, and the groups found per user.
    _asked: Optional["Request"] = field(default=None, repr=False, compare=False)
    _groups: dict[str, frozenset[str]] = field(default_factory=dict, repr=False,
                                               compare=False)
    _external_for: Optional["Request"] = field(default=None, repr=False, compare=False)
    _external: dict[tuple[Any, ...], bool] = field(default_factory=dict, repr=False,
                                                  compare=False)

    @property
    def client_ip(self) -> str:
        return self.client_addr[0]

    @property
    def http2(self) -> bool:
        """Whether the request came on an HTTP/2 stream (its context a copy of the
        connection's): what holds for a connection (Negotiate) cannot hold for it."""
        return self.tls is not None and self.tls.alpn == "h2"

    def decision_time(self) -> float:
        """When the current decision is made for: ``at``, or now."""
        return time.time() if self.at is None else self.at

    def authenticate(self, request: "Request") -> Optional[str]:
        """The user this request's credentials prove, or None: ``ctx.user``, once the
        ``authenticate`` hook has been asked about ``request`` (at most once per request,
        whoever asks first). Policy plugins call it when a decision needs a user, so that a
        request no rule needs a user for is decided without credentials.

        A user set before the request (a verified client certificate) is the answer, and so
        is ``ctx.user`` as it is when only deciding (``decide_only``: no credentials are
        read)."""
        if self._asked is request or self.decide_only or self.identity is None:
            return self.user
        self._asked = request
        if self.user is None:
            self.user = self.identity.authenticate(self, request)
        return self.user

    def challenges(self, request: "Request") -> list[str]:
        """The ``Proxy-Authenticate`` values a 407 to ``request`` offers (the
        ``auth_challenge`` hook), in the order of the plugins; empty when no plugin
        authenticates."""
        if self.identity is None:
            return []
        return self.identity.challenges(self, request)

    def groups(self, user: str) -> frozenset[str]:
        """The groups ``user`` is in, from every plugin that knows (the ``user_groups``
        hook), asked once per connection and user."""
        found = self._groups.get(user)
        if found is None:
            found = frozenset() if self.identity is None else self.identity.groups(self, user)
            self._groups[user] = found
        return found

    def external(self, request: "Request", name: str,
                 arguments: Sequence[str] = ()) -> bool:
        """Whether the external check ``name`` holds for ``request`` (the ``external_acl``
        hook), asked at most once per request, name and arguments. A ``user=`` it names
        becomes ``ctx.user`` when there is none; its ``group=`` names join the user's
        groups. No plugin with a checker of that name: ``errors.BackendUnavailable``
        (fail closed). Only deciding (``decide_only``), the check is made all the same,
        since no credential is involved; in ``geproxy explain`` (``offline``) the plugin
        answers from what it remembers, or raises ``BackendUnavailable``."""
        key = (id(request), name, tuple(arguments))
        remembered = self._external.get(key)
        if remembered is not None and self._external_for is request:
            return remembered
        if self._external_for is not request:
            self._external_for = request
            self._external.clear()
        answer = None if self.identity is None else self.identity.external(
            self, request, name, tuple(arguments))
        if answer is None:
            raise BackendUnavailable(f"no plugin answers the external check {name!r}",
                                     details="external ACL helper unavailable")
        if answer.user is not None and self.user is None:
            self.user = answer.user
        user = answer.user or self.user
        if answer.groups and user is not None:
            self._groups[user] = self.groups(user) | answer.groups
        self._external[key] = answer.match
        return answer.match


@dataclass(frozen=True)
class ExternalAnswer:
    """What an external check (the ``external_acl`` hook: Squid's ``external_acl_type``
    helpers) answered about a request."""

    #: The condition holds (``OK``), or not (``ERR``).
    match: bool
    #: The user the checker names (``user=``): the request's user when it has none yet.
    user: Optional[str] = None
    #: Groups the checker names for the user (``group=``): ``group`` conditions see them.
    groups: frozenset[str] = frozenset()
    #: A text for the log (``message=``, ``log=``).
    message: Optional[str] = None


class IdentitySource(Protocol):
    """What ``Context`` asks about identities: the core implements it with the hooks."""

    def external(self, ctx: Context, request: "Request", name: str,
                 arguments: Sequence[str]) -> Optional[ExternalAnswer]: ...

    def authenticate(self, ctx: Context, request: "Request") -> Optional[str]: ...

    def challenges(self, ctx: Context, request: "Request") -> list[str]: ...

    def groups(self, ctx: Context, user: str) -> frozenset[str]: ...


@dataclass
class Record:
    """What happened to one request or tunnel, handed to ``on_close`` observers.

    Durations are in seconds (None when the step did not happen); byte counts are what
    crossed the client socket: ``bytes_in`` from the client, ``bytes_out`` to it.
    """

    ctx: Context
    method: str = "-"
    target: str = "-"
    version: str = "-"
    status: int = 0
    error: Optional[str] = None
    upstream_addr: Optional[tuple[str, int]] = None
    bytes_in: int = 0
    bytes_out: int = 0
    started: float = field(default_factory=time.time)
    duration: float = 0.0
    dns_time: Optional[float] = None
    connect_time: Optional[float] = None
    #: From the start until the first byte of the answer went to the client.
    first_byte_time: Optional[float] = None
    close_reason: str = ""
    rule: Optional[str] = None
    #: The server name a TLS client asked for inside a tunnel, when a plugin read it.
    sni: Optional[str] = None
    #: The request, once its head was read (None for a refused connection or a bad head).
    request: Optional["Request"] = None
    #: The parent proxy of the upstream connection (``upstream_addr`` is then the parent's),
    #: or of the last attempt when none could be made; None when direct, or never tried.
    route: Optional[Route] = None
    #: How many of the routes the ``route`` hook offered were tried, in their order (the
    #: field ``route`` is the last one): 1 when the first worked, more after a failover, 0
    #: when a pooled connection served the request or none was needed.
    routes_tried: int = 0
    #: The Content-Type field of the final answer's head sent to the client (the origin's, as
    #: ``on_response`` left it, or that of an answer the proxy or a plugin made); None when it
    #: had none (an established tunnel, a 204 without one, nothing sent).
    content_type: Optional[str] = None
    #: How much of ``bytes_in`` and ``bytes_out`` ``on_progress`` has been told of.
    progress_in: int = 0
    progress_out: int = 0

    def finish(self) -> None:
        self.duration = time.time() - self.started
