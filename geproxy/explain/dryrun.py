"""``geproxy explain``: a dry run of the policy for one request, without connecting.

The request goes through on_connect, on_request, route and resolve as the proxy would run
them, with ``ctx.decide_only`` set (``--user`` is an identity already established: no
credentials are checked, nothing is counted), and the run ends with what the client would get.

Each decision is the proxy's own call of the hook, wrappers included: the first answer wins,
an error raised or returned, or a ``Response`` (a 407, the PAC file), which is sent to the
client as it is. Beside it, every implementation's own opinion is printed, in pluggy's order:
plain implementations are each called directly (those after the first answer too), and a
wrapper's part is found by calling the hook without it: it shows when it changes the answer.

Verdict: ``allowed`` (exit 0) when the request would be tunnelled, forwarded upstream, or
answered with a status below 400; ``refused`` (exit 1) for an error or any answer of 400 or
more (a 407 included). Nothing is connected; with ``--no-resolve`` nothing is resolved either.

:class:`Decider` makes the same decisions without printing, many of them under one loaded
configuration: what ``--replay`` and ``--cases`` ask (replay.py, cases.py). Only the proxy's
own call of each hook is made there, so each plugin is asked once per hook and request.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence, TextIO

from cachetools import LRUCache

from ..errors import ClientError, InternalError, LoopDetected, ProxyError
from ..hosts import authority
from ..models import Context, ExternalAnswer, Request, Response, Route
from ..policy.plugins import Hooks, exposition, load
from ..protocol import http11
from ..serve.local import addressed_to_proxy, call_wsgi, local_app
from ..serve.static import docroot_file

__all__ = ["explain", "Answer", "Decision", "Decider"]

log = logging.getLogger(__name__)

#: Where the ``acl`` plugin leaves its verdict on a request (an object with ``allow`` and
#: ``rule``): the rule that let an allowed request through. Read only when it is there: the
#: plugin may be disabled, and another policy plugin names no rule for what it lets through.
ACL_VERDICT = "acl.request"
#: Parsed requests a Decider keeps, by method and target.
REQUEST_CACHE = 4096


@dataclass(frozen=True)
class Answer:
    """What the client would get."""

    #: The status sent, None when it is the origin's (forwarded upstream).
    status: Optional[int]
    #: The ``answer`` line.
    text: str
    #: The error the proxy answers with, None for any other answer.
    error: Optional[ProxyError] = None

    @property
    def allowed(self) -> bool:
        return self.error is None and (self.status is None or self.status < 400)


@dataclass(frozen=True)
class Decision:
    """One request decided without printing (:meth:`Decider.decide`)."""

    answer: Answer
    #: The id of the rule that decided: a refusal's ``rule`` (Denied, a 407 included), or
    #: for an allowed request the rule of the ``acl`` verdict; None when no plugin names one.
    rule: Optional[str]
    #: The destination host of the request ("" for a request to the proxy itself, or one
    #: whose target does not parse).
    host: str = ""


def _request(method: str, target: str) -> Request:
    """Build the Request the proxy would see, through its own parser (same validation)."""
    host = target if method == "CONNECT" else target.partition("://")[2].partition("/")[0]
    head = f"{method} {target} HTTP/1.1\r\nHost: {host or 'proxy'}\r\n\r\n"
    try:
        data = head.encode("latin-1")
    except UnicodeEncodeError:
        raise ClientError(f"not a request target: {target!r}") from None
    parser = http11.RequestHeadParser(64 * 1024)
    request = parser.feed(data)
    assert request is not None  # a complete head always parses or raises
    return request


def _outcome(call: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """What a hook call comes to: its answer, or the ProxyError it raised. Anything else
    raised is what the proxy fails closed on (500): an InternalError here."""
    try:
        return call(*args, **kwargs)
    except ProxyError as exc:
        return exc
    except Exception as exc:
        log.debug("a plugin raised", exc_info=True)
        return InternalError(f"{type(exc).__name__}: {exc}")


def _key(outcome: Any) -> Any:
    """What makes two outcomes the same answer to the client."""
    if isinstance(outcome, ProxyError):
        return (type(outcome), outcome.status, outcome.error, getattr(outcome, "rule", None),
                outcome.details)
    if isinstance(outcome, Response):
        return (Response, outcome.status)
    return outcome


def _describe(value: Any) -> str:
    if value is None:
        return "no opinion"
    if isinstance(value, ProxyError):
        return _verdict(value)
    if isinstance(value, Response):
        return f"answers {value.status}"
    return repr(value)


def _verdict(exc: ProxyError) -> str:
    rule = getattr(exc, "rule", None)
    text = f"{exc.status} {exc.error}"
    if rule:
        text += f" (rule {rule})"
    if exc.detail:
        text += f": {exc.detail}"
    return text


def _is_wrapper(impl: Any) -> bool:
    return bool(impl.wrapper or impl.hookwrapper)


class _DryServer:
    """The server as the proxy port's local app sees it in a dry run (local.AdminTarget):
    running, nothing in flight. Only the status of its answers matters here."""

    stopping = False

    def __init__(self, pm: Any) -> None:
        self.pm = pm

    def tunnels(self) -> list[dict[str, Any]]:
        return []

    def close_connection(self, conn_id: str) -> bool:
        return False

    def metrics_exposition(self) -> Optional[tuple[bytes, str]]:
        return exposition(self.pm, {})  # as the server finds it, figures aside

    def stats(self) -> dict[str, Any]:
        return {}


class _Explainer:
    """One dry run of ``geproxy explain``: the hooks called in the order the proxy calls
    them, each step written to ``out``; with ``out`` None, only the proxy's own calls are
    made and nothing is written (a quiet run, for :class:`Decider`)."""

    def __init__(self, hooks: Hooks, config: Any, out: Optional[TextIO]) -> None:
        self.hooks = hooks
        self.config = config
        self.out = out

    def say(self, label: str, text: str) -> None:
        if self.out is not None:
            self.out.write(f"{label:<12}{text}".rstrip() + "\n")

    def decide(self, hook_name: str, kwargs: dict[str, Any],
               call: Callable[[], Any]) -> tuple[Any, Optional[str]]:
        """Run ``call``, the proxy's own call of a firstresult hook, and print every
        implementation's opinion; returns the outcome and the plugin that decided it (None
        in a quiet run, which asks no plugin for its own opinion)."""
        out = self.out
        if out is None:
            return _outcome(call), None
        pm = self.hooks.pm
        impls = list(reversed(getattr(pm.hook, hook_name).get_hookimpls()))
        ctx: Context = kwargs["ctx"]
        stash, user = dict(ctx.stash), ctx.user

        def afresh() -> None:
            # Every call starts from the same ctx, so the last one, the proxy's own, leaves
            # in it what the proxy's would, and nothing from plugins only asked for opinions.
            ctx.stash.clear()
            ctx.stash.update(stash)
            ctx.user = user

        opinions: dict[Any, Any] = {}
        for impl in impls:
            afresh()
            if _is_wrapper(impl):
                without = pm.subset_hook_caller(hook_name, remove_plugins=[impl.plugin])
                opinions[impl] = _outcome(without, **kwargs)
            else:
                opinions[impl] = _outcome(impl.function,
                                          *[kwargs[name] for name in impl.argnames])
        afresh()
        decided = _outcome(call)
        changed = [impl for impl in impls
                   if _is_wrapper(impl) and _key(opinions[impl]) != _key(decided)]
        # The outermost wrapper that changes the answer has the last word; else the first
        # plain implementation that answered (when anyone did).
        answered = [impl for impl in impls if not _is_wrapper(impl)
                    and opinions[impl] is not None and decided is not None]
        decider = (changed or answered or [None])[0]
        self.say(hook_name, "" if impls else "(no plugin implements it)")
        for impl in impls:
            if not _is_wrapper(impl):
                text = _describe(opinions[impl])
            elif impl not in changed:
                text = "(wrapper) no change"
            elif impl is decider:
                text = "(wrapper) " + _describe(decided)
            else:
                text = "(wrapper) changes what the others answer"
            mark = "  <- decides" if impl is decider else ""
            out.write(f"  {impl.plugin_name:<22}{text}{mark}\n")
        return decided, None if decider is None else decider.plugin_name

    def run(self, ctx: Context, request: Request, resolve: bool) -> Answer:
        """Where the request ends, as in the proxy's connection: the first answer decides."""
        verdict, _ = self.decide("on_connect", {"ctx": ctx},
                                 lambda: self.hooks.on_connect(ctx))
        if verdict is not None:
            if getattr(verdict, "silent", False):  # [acl] refuse_at_connect = close
                return Answer(0, "none: the connection is closed before any byte is read "
                                 f"({_verdict(verdict)})", verdict)
            return _error(verdict if isinstance(verdict, ProxyError)
                          else InternalError(f"on_connect returned {verdict!r}"), self.config)
        answer, by = self.decide("on_request", {"ctx": ctx, "request": request},
                                 lambda: self.hooks.on_request(ctx, request))
        if isinstance(answer, ProxyError):
            return _error(answer, self.config)
        if isinstance(answer, Response):
            return _plugin_answer(answer, by)
        if answer is not None:
            return _error(InternalError(f"on_request returned {answer!r}"), self.config)
        core = self.config.core
        if addressed_to_proxy(request, core["listen"], ctx.server_addr[0]):
            return self.local(ctx, request)
        route = self.route(ctx, request, resolve)
        via = f" through parent proxy {route.host}:{route.port}" if route else ""
        if request.is_connect:
            return Answer(200, f"200 Connection Established, then a tunnel{via}")
        return Answer(None, f"forwarded upstream{via}: the status is the origin's")

    def local(self, ctx: Context, request: Request) -> Answer:
        """The proxy's own answer to a request addressed to it."""
        if request.is_connect:
            raise LoopDetected("CONNECT to the proxy itself")
        core = self.config.core
        if docroot_file(core["docroot"], core["local_paths"], request.method, request.path):
            return Answer(200, "200 OK, a file of docroot, from the proxy itself")
        app = local_app(_DryServer(self.hooks.pm), core["local_paths"])
        response = call_wsgi(app, ctx, request)
        return Answer(response.status, f"{response.status} {response.reason}, from the proxy "
                                       f"itself")

    def route(self, ctx: Context, request: Request, resolve: bool) -> Optional[Route]:
        """The route the request would take: the first whose address resolves (the proxy
        then connects; a parent that fails there is not known here)."""
        routes = self.hooks.route(ctx, request)
        self.say("route", " then ".join(f"parent proxy {r.host}:{r.port}" if r else "direct"
                                        for r in routes))
        if not resolve:
            self.say("resolve", "skipped (--no-resolve)")
            return routes[0]
        failure: Optional[ProxyError] = None
        for route in routes:
            host, port = (route.host, route.port) if route else (request.host, request.port)
            try:
                addresses = self.hooks.resolve(ctx, host, port)
            except ProxyError as exc:
                if route is None:
                    raise
                # As the proxy does: this parent failed, the next route is tried.
                self.say("resolve", f"parent proxy {host}:{port}: {_verdict(exc)}")
                failure = exc
                continue
            ttl = getattr(addresses, "ttl", None)
            listed = ", ".join(authority(a[0], a[1]) for a in addresses)
            self.say("resolve", listed + (f"  (ttl {ttl:g}s)" if ttl is not None else ""))
            return route
        assert failure is not None  # routes is never empty
        raise failure


def _error(exc: ProxyError, config: Any) -> Answer:
    return Answer(exc.status, f"{exc.status} {http11.reason_phrase(exc.status)}; "
                              f"Proxy-Status: {config.proxy_name}; "
                              f"{exc.proxy_status_params()}", exc)


def _plugin_answer(response: Response, plugin: Optional[str]) -> Answer:
    reason = response.reason or http11.reason_phrase(response.status)
    text = f"{response.status} {reason}, from the {plugin or 'a'} plugin"
    status_field = response.headers.get("proxy-status")
    if status_field:
        text += f"; Proxy-Status: {status_field}"
    return Answer(response.status, text)


def _decide(writer: _Explainer, ctx: Context, request: Callable[[], Request],
            resolve: bool) -> Answer:
    """The answer to one request (built by ``request``, whose parse errors are answered as
    the proxy answers them), as the proxy would make it; a plugin's bug fails closed."""
    try:
        return writer.run(ctx, request(), resolve)
    except ProxyError as exc:
        return _error(exc, writer.config)
    except Exception as exc:  # a plugin's bug in route or resolve: the proxy fails closed
        log.exception("explain: a plugin failed")
        return _error(InternalError(f"{type(exc).__name__}: {exc}"), writer.config)


def explain(config_path: str, method: str, target: str, client: str = "127.0.0.1",
            user: Optional[str] = None, resolve: bool = True,
            out: Optional[TextIO] = None, groups: Optional[Sequence[str]] = None) -> int:
    """Print the dry run to ``out``; 0 when the request would be allowed, 1 when refused.

    ``user`` is taken as an authenticated user (no credentials are checked), ``groups`` as
    the user's groups (no lookup); without ``groups``, only groups held in memory are
    seen, and the report says that no directory was asked. Raises ConfigError for a bad
    configuration; a malformed request is reported as the proxy would answer it (400), with
    exit status 1.
    """
    import sys

    out = out or sys.stdout
    decider = Decider(config_path)
    ctx = decider.context(client, user, None, groups)
    writer = _Explainer(decider.hooks, decider.config, out)
    writer.say("request", f"{method} {target} from {client}"
               + (f" as {user}" if user else "")
               + (f" in {', '.join(sorted(set(groups))) or 'no group'}"
                  if groups is not None else ""))
    answer = _decide(writer, ctx, lambda: _request(method, target), resolve)
    identity = ctx.identity
    if isinstance(identity, _Identity) and identity.looked_up:
        writer.say("groups", f"of {identity.looked_up[0]}: only [acl] group_file and other "
                   "groups held in memory; no directory was asked (give them with --group)")
    for name, value in sorted(ctx.stash.items()):
        if not name.startswith("_"):  # a leading underscore: a plugin's private mark
            writer.say("stash", f"{name}: {value}")
    writer.say("answer", answer.text)
    writer.say("verdict", "allowed" if answer.allowed else "refused")
    return 0 if answer.allowed else 1


class Decider:
    """Decisions without printing, any number of them under one configuration, loaded once
    (its plugin manager and plugins serve every decision, as a running proxy's do).

    Each decision is the dry run of ``geproxy explain`` with ``--no-resolve``: on_connect,
    on_request and route, as the proxy calls them, for a new connection from ``client`` to
    the first listener, with ``ctx.decide_only`` set, ``ctx.user`` the identity given (taken
    as established, no credentials are checked) and ``ctx.at`` the time decided for (None:
    now). Nothing is resolved or connected. Raises ConfigError for a bad configuration.
    """

    def __init__(self, config_path: str) -> None:
        pm, config = load(config_path)
        self.config = config
        self.hooks = Hooks(pm)
        self._listen = config.core["listen"][0]
        self._writer = _Explainer(self.hooks, config, None)
        # Requests are immutable: a log asks for the same few targets again and again.
        self._requests: LRUCache[tuple[str, str], Request] = LRUCache(maxsize=REQUEST_CACHE)

    def context(self, client: str, user: Optional[str], at: Optional[float],
                groups: Optional[Sequence[str]] = None) -> Context:
        """The context of a new connection, as a decision sees it: ``offline`` (no
        directory, helper or KDC is asked). ``groups``, when given, are the user's groups,
        in place of any lookup."""
        ctx = Context(client_addr=(client, 0), server_addr=self._listen, config=self.config,
                      user=user, decide_only=True, offline=True, at=at)
        ctx.identity = _Identity(self.hooks, groups)
        return ctx

    def _request(self, method: str, target: str) -> Request:
        key = (method, target)
        request = self._requests.get(key)
        if request is None:
            request = self._requests[key] = _request(method, target)
        return request

    def decide(self, method: str, target: str, client: str = "127.0.0.1",
               user: Optional[str] = None, at: Optional[float] = None) -> Decision:
        """The answer to one request, and the rule that decided it."""
        try:
            request = self._request(method, target)
        except ProxyError as exc:  # a head the proxy answers 400
            return Decision(_error(exc, self.config), None)
        ctx = self.context(client, user, at)
        answer = _decide(self._writer, ctx, lambda: request, False)
        return Decision(answer, _rule(answer, ctx), request.host)

    def decide_connect(self, client: str, at: Optional[float] = None) -> Optional[Decision]:
        """The refusal of a client by its address alone (on_connect), or None when it may
        connect (its requests are then decided each on its own)."""
        ctx = self.context(client, None, at)
        verdict = _outcome(self.hooks.on_connect, ctx)
        if verdict is None:
            return None
        error = verdict if isinstance(verdict, ProxyError) else InternalError(
            f"on_connect returned {verdict!r}")
        answer = _error(error, self.config)
        return Decision(answer, _rule(answer, ctx))


class _Identity:
    """The identity hooks as a dry run asks them: the groups given with ``--group`` replace
    any lookup; without them, the plugins that hold groups in memory (``[acl] group_file``)
    answer and the ones that would ask a directory do not (``ctx.offline``), which is
    noted (``looked_up``) for the report."""

    def __init__(self, hooks: Hooks, groups: Optional[Sequence[str]]) -> None:
        self.hooks = hooks
        self.given = None if groups is None else frozenset(groups)
        #: The users whose groups a decision needed and that no ``--group`` gave.
        self.looked_up: list[str] = []

    def authenticate(self, ctx: Context, request: Request) -> Optional[str]:
        return self.hooks.authenticate(ctx, request)

    def challenges(self, ctx: Context, request: Request) -> list[str]:
        return self.hooks.challenges(ctx, request)

    def groups(self, ctx: Context, user: str) -> frozenset[str]:
        if self.given is not None:
            return self.given
        self.looked_up.append(user)
        return self.hooks.groups(ctx, user)

    def external(self, ctx: Context, request: Request, name: str,
                 arguments: Sequence[str]) -> Optional[ExternalAnswer]:
        return self.hooks.external(ctx, request, name, arguments)


def _rule(answer: Answer, ctx: Context) -> Optional[str]:
    """The rule that decided: the refusal's, or for an allowed request the ``acl`` verdict's
    when it allowed too (in report mode it may say deny while the request goes on)."""
    if answer.error is not None:
        rule = getattr(answer.error, "rule", None)
        return None if rule is None else str(rule)
    verdict = ctx.stash.get(ACL_VERDICT)
    if answer.allowed and getattr(verdict, "allow", False) is True:
        rule = getattr(verdict, "rule", None)
        return None if rule is None else str(rule)
    return None
