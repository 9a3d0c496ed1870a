"""``geproxy explain``: a dry run of the policy for one request, without connecting.

The request goes through on_connect, on_request, route and resolve as the proxy would run
them, and every plugin's own answer is printed, so an operator sees which plugin decided and
why. For the decisions, each implementation is asked in pluggy's order and the first answer
wins, exactly as in the proxy; the plugins after it are still asked (and marked) so their
opinion shows too. Nothing is connected; with ``--no-resolve`` nothing is resolved either.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, TextIO

from . import http11
from .errors import ProxyError, proxy_name
from .models import Context, Request, Response
from .plugins import Hooks, load

__all__ = ["explain"]


def _request(method: str, target: str) -> Request:
    """Build the Request the proxy would see, through its own parser (same validation)."""
    host = target if method == "CONNECT" else target.partition("://")[2].partition("/")[0]
    head = f"{method} {target} HTTP/1.1\r\nHost: {host or 'proxy'}\r\n\r\n"
    parser = http11.RequestHeadParser(64 * 1024)
    request = parser.feed(head.encode("latin-1"))
    assert request is not None  # a complete head always parses or raises
    return request


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


class _Explainer:
    def __init__(self, hooks: Hooks, out: TextIO) -> None:
        self.hooks = hooks
        self.out = out

    def say(self, label: str, text: str) -> None:
        self.out.write(f"{label:<12}{text}".rstrip() + "\n")

    def decide(self, hook_name: str, kwargs: dict[str, Any]) -> Any:
        """Ask every implementation in order; the first answer (or raise) decides."""
        caller = getattr(self.hooks.pm.hook, hook_name)
        impls = list(reversed(caller.get_hookimpls()))
        self.say(hook_name, "" if impls else "(no plugin implements it)")
        decided: Any = None
        done = False
        for impl in impls:
            if impl.wrapper or impl.hookwrapper:
                self.out.write(f"  {impl.plugin_name:<22}(wrapper: observes)\n")
                continue
            try:
                answer = impl.function(*[kwargs[name] for name in impl.argnames])
            except ProxyError as exc:
                answer = exc
            mark = "" if done or answer is None else "  <- decides"
            self.out.write(f"  {impl.plugin_name:<22}{_describe(answer)}{mark}\n")
            if not done and answer is not None:
                decided, done = answer, True
        return decided

    def run(self, ctx: Context, request: Request, resolve: bool,
            is_local: Callable[[Request], bool]) -> Optional[ProxyError]:
        """The verdict: None if the request would go upstream (or be answered locally)."""
        verdict = self.decide("on_connect", {"ctx": ctx})
        if verdict is not None:
            return verdict if isinstance(verdict, ProxyError) else ProxyError("on_connect")
        answer = self.decide("on_request", {"ctx": ctx, "request": request})
        if isinstance(answer, ProxyError):
            return answer
        if isinstance(answer, Response):
            self.say("answer", f"{answer.status} from a plugin")
            return None
        if is_local(request):
            self.say("answer", "answered by the proxy itself (local request)")
            return None
        routes = self.hooks.route(ctx, request)
        route = routes[0]
        host, port = (route.host, route.port) if route else (request.host, request.port)
        self.say("route", " then ".join(f"parent proxy {r.host}:{r.port}" if r else "direct"
                                        for r in routes))
        if resolve:
            addresses = self.hooks.resolve(ctx, host, port)
            ttl = getattr(addresses, "ttl", None)
            listed = ", ".join(_address(a) for a in addresses)
            self.say("resolve", listed + (f"  (ttl {ttl:g}s)" if ttl is not None else ""))
        else:
            self.say("resolve", "skipped (--no-resolve)")
        return None


def _address(address: tuple[Any, ...]) -> str:
    return f"[{address[0]}]:{address[1]}" if ":" in address[0] else f"{address[0]}:{address[1]}"


def explain(config_path: str, method: str, target: str, client: str = "127.0.0.1",
            user: Optional[str] = None, resolve: bool = True,
            out: Optional[TextIO] = None) -> int:
    """Print the dry run to ``out``; 0 when the request would be allowed, 1 when refused.

    Raises ConfigError for a bad configuration; a malformed request is reported as the
    proxy would answer it (400), with exit status 1.
    """
    import sys

    out = out or sys.stdout
    pm, config = load(config_path)
    hooks = Hooks(pm)
    listen = config.core["listen"][0]
    ctx = Context(client_addr=(client, 0), server_addr=listen, config=config, user=user)
    writer = _Explainer(hooks, out)
    writer.say("request", f"{method} {target} from {client}"
               + (f" as {user}" if user else ""))
    verdict: Optional[ProxyError]
    try:
        request = _request(method, target)
        verdict = writer.run(ctx, request, resolve, lambda r: _is_local(r, listen))
    except ProxyError as exc:
        verdict = exc
    for name, value in sorted(ctx.stash.items()):
        if not name.startswith("_"):  # a leading underscore: a plugin's private mark
            writer.say("stash", f"{name}: {value}")
    if verdict is not None:
        writer.say("answer", f"{verdict.status} {http11.reason_phrase(verdict.status)}; "
                             f"Proxy-Status: {proxy_name(_via(config))}; "
                             f"{verdict.proxy_status_params()}")
        writer.say("verdict", "refused")
        return 1
    if request.is_connect:
        writer.say("answer", "200 Connection Established, then a tunnel")
    elif request.host:
        writer.say("answer", "forwarded upstream")
    writer.say("verdict", "allowed")
    return 0


def _via(config: Any) -> str:
    via: str = config.core["via"]
    return "" if via.lower() == "off" else via


def _is_local(request: Request, listen: tuple[str, int]) -> bool:
    return not request.host or (request.port == listen[1] and request.host in (listen[0],
                                                                              "localhost"))
