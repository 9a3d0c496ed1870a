"""The hooks of geproxy: the plugin author's manual.

Every decision about who may go where is made by a plugin through these hooks; the core only
carries bytes. Implement a hook with ``@geproxy.hookimpl`` on a function of the same name in a
module or class registered as a plugin (see docs/plugins.md).

Conventions shared by every hook:

- In the hooks that decide (first result: ``on_connect``, ``on_request``, ``route``,
  ``resolve``, ``on_tunnel_data``), returning ``None`` (or nothing) means "no opinion": the
  next plugin is asked, and when every one says ``None`` the core's default applies (let the
  client in, go on with the request, connect directly, let the tunnel go on; ``resolve``
  answers 502). Any other value decides and ends the call. None of them means "allow
  regardless": a plugin that runs first cannot overrule a later plugin's denial, it can only
  stay silent. The other hooks' return values are ignored (``parent_proxies``' are
  collected).
- Hooks run in the connection's greenlet. They may block only on gevent-cooperative I/O (a
  gevent socket, ``gevent.sleep``, a threadpool call); a CPU-heavy or OS-blocking call stalls
  every connection of the process.
- A policy hook that raises fails closed: the client gets 500 (or the connection is closed)
  and the traceback is logged. To refuse on purpose, raise or return ``geproxy.errors.Denied``
  (or another ``ProxyError``), which carries its status and Proxy-Status error.
- ``ctx`` (:class:`geproxy.Context`) is per connection: use ``ctx.stash[<plugin name>]`` for
  per-connection state, and never keep ``ctx`` after ``on_close``.
- ``request`` (:class:`geproxy.Request`) is immutable: its headers cannot be changed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterable, Optional, Sequence

import pluggy

if TYPE_CHECKING:
    from ..config import Config, OptionRegistry
    from ..errors import Denied, ProxyError
    from ..models import Context, ExternalAnswer, Record, Request, Response, Route

PROJECT = "geproxy"

hookspec = pluggy.HookspecMarker(PROJECT)


@hookspec(historic=True)
def add_options(registry: "OptionRegistry") -> None:
    """Declare the INI options of this plugin's section.

    Called once per plugin, as soon as it is registered (historic: plugins registered later
    are called too), before the configuration file is read.

    :param registry: call ``registry.section("name").add(key, kind, default, help)`` for each
        key. ``kind`` is one of ``str token int float bool duration size list lines
        path logfile listen address networks ports workers``; an option that names a file is
        a ``path`` (or a ``logfile``), which ``configure`` gets absolute. Options declared
        here are validated at start, with the file, section and key in every error.

    Must not read files or open sockets; return value ignored.
    """


@hookspec(historic=True)
def configure(config: "Config") -> None:
    """Build the plugin's state from the validated configuration.

    Called once per plugin manager, after every plugin's ``add_options``: at start, at each
    reload (SIGHUP, with fresh plugin instances), and by ``geproxy check-config`` and
    ``geproxy explain`` (so it must not act on the world beyond checking it can).

    :param config: ``config.section("name")`` is a mapping of the section's typed values
        (defaults filled in); ``config.path`` is the file it came from. A ``path`` value is
        absolute, a relative one taken from that file's directory; ``config.resolve_path``
        does the same for a file named inside another value.

    Raise ``geproxy.errors.ConfigError`` (with ``section`` and ``key``, and ``line``, the
    1-based index of the offending line of a value of several lines) for a value that is
    well-typed but unusable, such as a file that does not exist, or ``ConfigErrors`` for
    several at once: the start stops with one line per error, each at its line of the file.
    Every plugin's ``configure`` is called, whatever another one raised, so that all the
    errors are reported together; it is not called at all when a value failed to parse.
    Must not start long-lived greenlets that outlive the server.
    """


@hookspec
def unconfigure(config: "Config") -> None:
    """Release what ``configure`` built: close files, stop greenlets.

    Called once per plugin instance: when the server has stopped (after its last
    connection ended), or, for instances a reload (SIGHUP) replaced, when the last connection
    they served has ended; also when the test kit stops a proxy, and when a configuration is
    refused (a plugin's ``configure`` raised, or a value did not parse): then for instances
    whose ``configure`` did not run or did not finish too. Errors are logged.

    Must not expect any further hook call on this plugin instance.
    """


@hookspec
def prepare_workers(config: "Config", workers: int, directory: str) -> None:
    """Prepare what the worker processes of a master share, before the first is forked.

    Called once, in the master of ``workers = N`` (N above 1), after ``configure`` of the
    configuration loaded at start and before any worker is forked: each worker inherits
    what it prepared, by the fork. Never called without workers, nor at a reload (a reload
    that changes ``workers`` forks more workers from the same master, or stops some).

    :param config: the configuration loaded at start (``config.stash`` outlives reloads).
    :param workers: the number of workers the master starts.
    :param directory: an empty directory of this master's alone (mode 0700), removed with
        all it holds when the master exits: for files the processes share (the built-in
        ``metrics`` keeps prometheus_client's multiprocess files there).

    Raise ``geproxy.errors.ConfigError`` to stop the start (exit status 2). Return value
    ignored. Must not fork, start greenlets or open sockets.
    """


@hookspec
def on_worker_exit(config: "Config", worker: int, pid: int) -> None:
    """Observe the end of a worker process: let go of what it held in shared state.

    Called in the master, once per worker process that ended, whatever ended it (a crash,
    a stop, a reload that lowered ``workers``), once the master has reaped it: before a
    successor with the same number (and another pid) is forked. Never called without
    workers. Every implementation is called even if another raises; errors are logged.
    Implementations may not be wrappers.

    :param config: the configuration in force.
    :param worker: the worker's number, from 0.
    :param pid: its process id, which the system may now give to another process.

    Must not block for long.
    """


@hookspec
def on_disconnect(ctx: "Context") -> None:
    """Observe the end of a client connection: per-client counters, open-connection gauges.

    Called once per connection whose ``on_connect`` ran (refused ones included), after its
    last request's ``on_close``, when the socket is closed. Every implementation is called
    even if another raises; errors are logged. Implementations may not be wrappers.

    Must not block, and must not keep ``ctx``.
    """


@hookspec
def on_tls_handshake(ctx: "Context", error: Optional[str]) -> None:
    """Observe a client's TLS handshake on a TLS listener: handshake counters, audit.

    Called once per connection to a TLS listener, when its handshake ended: ``ctx.tls`` is
    set on success. A connection ``on_connect`` refused has its handshake too (its 403 goes
    over it), unless the denial was silent. Every implementation is called even if
    another raises; errors are logged. Implementations may not be wrappers.

    :param error: None when the handshake completed; else what ended it: ``timeout``
        (``[tls] handshake_timeout``), ``eof`` (the client closed), ``client_certificate``
        (missing or not from ``client_ca``), ``server_certificate`` (the client refused the
        proxy's certificate), ``protocol`` (no common version, cipher or
        ALPN protocol), ``plain_http`` (a plain HTTP request sent to the TLS port) or
        ``error``. A failed handshake gets no ``on_close`` (but a connection refused at
        connect gets its refusal's record, status 0); ``on_disconnect`` follows.

    Must not block, and must not keep ``ctx``.
    """


@hookspec
def reopen_logs() -> None:
    """Reopen log files: the operator moved them away (SIGUSR1, after a log rotation).

    Called in the server's process whenever it receives SIGUSR1. Every implementation is
    called even if another raises; errors are logged. Implementations may not be wrappers.

    Must not block for long; close and reopen, nothing else.
    """


@hookspec
def on_reload(config: "Config", error: Optional[str]) -> None:
    """Observe a reload (SIGHUP): reload counters, an audit trail of configuration changes.

    Called once per reload, in the process that decides it (the master, when there are
    workers; never once per worker): on the plugins of the new configuration with ``error``
    None when it was put in force; on the plugins of the running configuration with what
    refused it (one line) when it was not, the running configuration then staying. Not
    called for the configuration loaded at start. Every implementation is called even if
    another raises; errors are logged. Implementations may not be wrappers.

    :param config: the configuration put in force, or the one that stays.

    Must not block for long.
    """


@hookspec(firstresult=True)
def on_connect(ctx: "Context") -> Optional["Denied"]:
    """Decide on an accepted client connection before any byte is read from it.

    Called once per accepted connection, after the PROXY protocol header (when configured),
    so ``ctx.client_addr`` is the real client, and before the TLS handshake of a TLS
    listener.

    :returns: ``None`` to allow (no opinion), or a ``Denied`` to refuse; raising it does the
        same. A refused connection is told so: its TLS handshake is completed (on a TLS
        listener), its first request head is read (bounded by ``header_timeout`` and
        ``max_header_size``) and answered with the denial's status, 403 with
        ``Proxy-Status: ...; error=http_request_denied`` (on HTTP/2, the first stream; any
        other is refused with ``REFUSED_STREAM``), and the connection is closed. No other
        hook sees that request: no ``on_request``, ``route`` or ``resolve``. Its
        ``on_close`` record carries the request's method and target, status 403, the
        error and ``rule`` of the denial, close reason ``denied``; a client that sends no
        head (it closes, or is silent for ``header_timeout``) gets a record with status 0.
        ``Denied(..., silent=True)`` asks for a firewall's drop instead: the connection is
        closed at once, before any handshake, with no byte read or sent (record status 0,
        close reason ``denied``). Another ``ProxyError`` refuses the same way, answered with
        its own status; any other non-``None`` value is a ``Denied``.

    With ``ctx.decide_only`` set (``geproxy explain``) no connection was accepted: decide as
    for any other, and count or log nothing (no open connection, no per-client count).

    Must not read from or write to the client: there is no socket in ``ctx``, on purpose.
    """


@hookspec(firstresult=True)
def on_request(ctx: "Context", request: "Request") -> Optional["Response"]:
    """Decide on a request head: CONNECT, absolute-form, and origin-form alike.

    Called once per request (every request of a keep-alive connection), after the head was
    read and validated, before anything is resolved or connected.

    :param request: the immutable head: ``method``, ``target``, ``host``, ``port``,
        ``path``, ``headers``. For CONNECT, ``host`` and ``port`` are the tunnel's target.
    :returns: ``None`` to let the request go on, or a ``Response`` to answer with it instead
        (403, 407, a local page ...). Raising a ``ProxyError`` answers with its status.

    With ``ctx.decide_only`` set, the request is only being decided, not served
    (``geproxy explain``; the re-check of open tunnels after a reload), and the hook may be
    called more than once for it. Answer exactly as for a request being served, with these
    differences: ``ctx.user`` is an identity already established (or given with
    ``--user``), or None. A plugin that authenticates takes it as it is: it reads and checks
    no credentials and does not reset ``ctx.user``; with a user set the request is
    authenticated, and with None it answers its challenge (a 407) exactly as to a client
    that sent no credentials. A plugin that counts or logs requests leaves this one out:
    ``on_close`` will not follow.

    Must not mutate ``request``, nor read credentials to set ``ctx.user``: a policy that needs
    the user asks ``ctx.authenticate(request)``, and identity plugins answer through the
    ``authenticate`` hook.
    """


@hookspec(firstresult=True)
def authenticate(ctx: "Context", request: "Request") -> Optional[str]:
    """Name the user a request's credentials prove.

    Called at most once per request, and only when a decision needs a user: a policy plugin
    asks ``ctx.authenticate(request)`` (the ``acl`` plugin when its walk reaches a rule with
    a ``user`` or ``group`` condition; the ``auth`` plugin to enforce ``require = always``,
    and to name a user it was not asked for in the log). Not called while only deciding
    (``ctx.decide_only``: ``ctx.user`` is the identity given) nor when a verified client
    certificate named the user already.

    :param request: the head; credentials are in its ``Proxy-Authorization`` field (or
        whatever the plugin reads).
    :returns: the user name, or ``None`` when this plugin's credentials are absent or
        wrong: the next plugin is asked. The first name decides and becomes ``ctx.user``.

    Must not answer or refuse here: whoever needs the user decides what its absence means
    (a 407 with ``ctx.challenges(request)``, or nothing). Checking a password may block
    only cooperatively (gevent's thread pool for hashing).
    """


@hookspec
def auth_challenge(ctx: "Context", request: "Request") -> Optional[str | Sequence[str]]:
    """Offer ways to authenticate, for the 407 answered to a request without a user.

    Called when a 407 is answered (``ctx.challenges(request)``), once per plugin.

    :returns: a ``Proxy-Authenticate`` field value (``Basic realm="geproxy"``) or a list
        of them (``["Negotiate", 'Basic realm="geproxy"']``, the preferred first), or
        ``None`` when this plugin authenticates nobody (not configured). Every value is
        sent, each in its own field, in the order of the plugins.

    Must not raise for a request it cannot authenticate: return ``None``. It may raise
    ``errors.HTTP11Required`` when the only way it offers cannot work on the request's
    protocol (Negotiate on an HTTP/2 stream: ``ctx.http2``): the stream is then reset with
    ``HTTP_1_1_REQUIRED`` instead of a 407, and the client retries over HTTP/1.1.
    """


@hookspec
def user_groups(ctx: "Context", user: str) -> Optional[Iterable[str]]:
    """Name the groups an authenticated user is in.

    Called only when a decision needs them (the ``acl`` plugin's ``group`` condition), at
    most once per connection and user: ``ctx.groups(user)`` caches the union of every
    plugin's answer for the connection.

    :param user: the authenticated user (``ctx.user``), as the ``authenticate`` hook named
        it.
    :returns: the group names this plugin knows for ``user`` (any iterable of str), or
        ``None`` for none.

    May block only cooperatively (a directory lookup on a gevent socket); must not
    raise for a user it does not know: return ``None``. When the groups cannot be known
    (no directory server answers and nothing is remembered), raise
    ``errors.BackendUnavailable``: the request is answered 503, never decided without them.
    """


@hookspec(firstresult=True)
def external_acl(ctx: "Context", request: "Request", name: str,
                 arguments: Sequence[str]) -> Optional["ExternalAnswer"]:
    """Answer an ``external NAME ARG...`` condition of a policy (the ``acl`` plugin's):
    Squid's ``external_acl_type``, a check made by something outside the proxy.

    Called when a rule's walk reaches the condition, through ``ctx.external(request, name,
    arguments)``, at most once per request, condition and arguments (the ``external``
    plugin's helpers remember answers for their own ``ttl`` across requests).

    :param name: the checker's name, as the condition gives it.
    :param arguments: the condition's words after the name (a group to test, say).
    :returns: an ``ExternalAnswer`` (``match``, and optionally the ``user`` and ``groups``
        the checker names), or ``None`` when this plugin has no checker of that name.

    Raises ``errors.BackendUnavailable`` when the checker cannot answer (a helper that
    failed, hung or answered ``BH``): the request is refused with 503, never let through.
    May block only cooperatively (a helper's pipe, through gevent); must not start
    anything when ``ctx.offline`` (``geproxy explain``): answer from what is remembered, or
    raise ``BackendUnavailable``.
    """


@hookspec(firstresult=True)
def route(ctx: "Context", request: "Request") -> Any:
    """Choose how to reach the request's destination.

    Called once per CONNECT or plain request, after ``on_request`` allowed it and before
    an upstream connection is taken from the pool or opened: pooled connections are kept
    per route, so a request only reuses one that went the same way.

    :returns: ``None`` to connect directly, a ``Route`` naming a parent proxy (host, port,
        optional Basic credentials) to go through, or a list of routes to try in order (a
        ``None`` in it means "direct"): when connecting through one fails, ``route_failed``
        is called and the next is tried; when all fail the client gets the last failure.
        CONNECT is asked of the parent, and plain requests are sent to it in absolute-form.

    Must not connect anywhere itself; the core resolves and connects to what it returns.
    """


@hookspec
def parent_proxies() -> Optional[Sequence["Route"]]:
    """Name the parent proxies this plugin's ``route`` may choose, for the checks at load.

    Called once per plugin manager, after every plugin's ``configure``: at start, at each
    reload, and by ``geproxy check-config`` and ``geproxy explain``. The core asks
    ``resolve`` about each parent given as an IP literal (answered without a lookup, so the
    destination guard sees it) and logs a warning for one whose address is prohibited:
    every request through it would fail with 502. A parent given by name is not looked up
    here (the answer could differ at run time, and a check must work offline); it is
    checked on each connect, as any destination is.

    :returns: the ``Route`` objects ``route`` may return (their credentials are never
        logged), or ``None`` when it routes through none.

    Must not resolve, connect or block: return what ``configure`` parsed.
    """


@hookspec
def route_failed(ctx: "Context", request: "Request", route: "Route",
                 error: "ProxyError") -> None:
    """Learn that a parent proxy chosen by ``route`` could not be used.

    Called once per failed attempt through a parent: it could not be resolved or connected
    to in time, it closed, it answered CONNECT with anything but 2xx, or the destination
    guard prohibits its address (``errors.ParentProhibited``: a configuration fault, not an
    outage). The core then tries the next route of the list ``route`` returned.

    :param error: the ProxyError the attempt ended with (its ``error`` is the Proxy-Status
        type, its ``detail`` says what happened).

    Return value ignored. Must not block: mark the parent down and return.
    """


@hookspec(firstresult=True)
def resolve(ctx: "Context", host: str, port: int) -> Optional[Sequence[tuple[Any, ...]]]:
    """Turn a host name (or IP literal) into the socket addresses to connect to.

    Called once per new upstream connection (for the parent's host when ``route`` chose
    one; not when a pooled connection is reused), with the host exactly as validated from the
    target (lower-case, no trailing dot; IPv6 literals without brackets).

    :returns: a list of socket addresses as ``socket.getaddrinfo`` gives them: ``(ip, port)``
        for IPv4 and ``(ip, port, flowinfo, scope_id)`` for IPv6, in the order to try (the
        core interleaves families for Happy Eyeballs). ``None`` passes to the next resolver;
        the built-in ``system_resolver`` runs last. An empty list, or raising
        ``geproxy.errors.DNSError``, answers 502; ``DNSTimeout`` answers 504.

    Caches, timeouts and the destination guard are ``wrapper=True`` implementations around
    this hook. Must not block except cooperatively (gevent sockets, the gevent resolver).
    """


@hookspec(firstresult=True)
def on_tunnel_data(ctx: "Context", request: "Request", record: "Record",
                   data: bytes) -> Optional["Denied"]:
    """Look at the first bytes a client sends into a CONNECT tunnel, before they go on.

    Called once per tunnel, with the first piece of data from the client as it arrived
    (at most 64 KiB; a TLS ClientHello usually, which may be cut short by the segment
    boundary), while bytes from the upstream already flow to the client (servers that speak
    first are not held up). Only called when some plugin implements it and does not set its
    ``inspects_tunnels`` attribute to False (a plugin configured off does, so tunnels pay
    nothing for it).

    :param record: the tunnel's record: a plugin may fill ``record.sni`` for the log.
    :returns: ``None`` to let the tunnel go on, or a ``Denied`` (returned or raised) to close
        both sides at once; the record then carries its error and rule.

    Must not change ``data`` (bytes pass unchanged) or wait for more of it.
    """


@hookspec
def on_response(ctx: "Context", request: "Request", response: "Response") -> None:
    """Look at, and edit, a plain-HTTP response head before it goes to the client.

    Called once per upstream response (not for CONNECT tunnels, not for 1xx interim
    responses), after hop-by-hop fields were removed and Via added.

    :param response: ``status`` and ``headers`` may be changed in place (add, set, remove);
        framing fields are the core's and are set after this hook.

    Return value ignored. Must not read the body: bodies are streamed, never held.
    """


@hookspec
def on_progress(ctx: "Context", record: "Record", bytes_in: int, bytes_out: int) -> None:
    """Observe bytes as they flow: traffic counters that must not wait for the end of a
    long download or tunnel to move.

    Called for each request or tunnel in flight that moved bytes since its last call, about
    once a second, and once more just before its ``on_close`` with whatever moved since (if
    anything): the sums of its calls' ``bytes_in`` and ``bytes_out`` are the record's. Runs
    in a greenlet of its own, for every request in flight in turn. Every implementation is
    called even if another raises; errors are logged. Implementations may not be wrappers.

    :param record: the request or tunnel so far (``record.method`` tells a tunnel).
    :param bytes_in: bytes received from the client since the last call.
    :param bytes_out: bytes sent to the client since the last call.

    Must not block, and must not keep ``ctx`` or ``record``.
    """


@hookspec
def on_close(ctx: "Context", record: "Record") -> None:
    """Observe a finished request or tunnel: access logs, metrics, audit.

    Called once per request or tunnel, including those refused or failed, after its last
    byte. Every implementation is called even if another raises; errors are logged, never
    passed to the client. For that isolation, implementations may not be wrappers.

    Must not block for long (it runs before the connection's next request) and must not
    keep ``record.ctx``.
    """
