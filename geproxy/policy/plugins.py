"""The plugin manager factory and the typed façade the core calls hooks through.

Plugins come from three places, in this order: the built-ins of DEFAULT_PLUGINS, the
``plugins =`` line of the configuration, and the ``geproxy`` entry-point group of installed
distributions. ``disable =`` blocks plugins by name before any is registered. Every manager is
built fresh for one server (or one reload): nothing is registered at import time.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import logging
from typing import Any, Iterable, Optional, Sequence

import pluggy

from ..config import (
    Config,
    OptionRegistry,
    build_config,
    core_options,
    did_you_mean,
    parse_list,
    read_ini,
    read_text,
)
from ..errors import (
    ConfigError,
    ConnectRefused,
    Denied,
    DestinationProhibited,
    DNSError,
    ProxyError,
)
from ..inifile import IniLines, located
from ..models import Context, ExternalAnswer, Record, Request, Resolved, Response, Route
from ..net.dns import literal_address
from . import hookspecs
from .hookcall import HookCall

__all__ = ["DEFAULT_PLUGINS", "hookimpl", "get_plugin_manager", "load", "Hooks", "exposition"]

#: Named as log filters know it, wherever the module sits (docs/deployment.md).
log = logging.getLogger("geproxy.plugins")

hookimpl = pluggy.HookimplMarker(hookspecs.PROJECT)

#: The built-in plugins: (name, "module:attr"). Registered exactly like third-party plugins.
DEFAULT_PLUGINS: tuple[tuple[str, str], ...] = (
    ("system_resolver", "geproxy_plugins.system_resolver:SystemResolver"),
    ("resolver", "geproxy_plugins.resolver:Resolver"),
    ("dnscache", "geproxy_plugins.dnscache:DNSCache"),
    ("auth", "geproxy_plugins.auth:Auth"),
    ("acl", "geproxy_plugins.acl:ACL"),
    ("external", "geproxy_plugins.external:External"),
    ("parent", "geproxy_plugins.parent:Parent"),
    ("pac", "geproxy_plugins.pac:PAC"),
    ("sni", "geproxy_plugins.sni:SNI"),
    ("destinations", "geproxy_plugins.destinations:Destinations"),
    ("metrics", "geproxy_plugins.metrics:Metrics"),
    ("access_log", "geproxy_plugins.access_log:AccessLog"),
)


#: Built-in plugins whose section is not named as the plugin.
SECTIONS = {"parent": "parents"}


class _CoreOptions:
    """Declares the ``[geproxy]`` section, like any plugin declares its own."""

    @hookimpl
    def add_options(self, registry: OptionRegistry) -> None:
        core_options(registry)


def load_object(spec: str) -> Any:
    """Import ``module`` or ``module:attr``; a class is instantiated with no arguments."""
    module_name, _, attr = spec.partition(":")
    obj: Any = importlib.import_module(module_name)
    for part in filter(None, attr.split(".")):
        obj = getattr(obj, part)
    return obj() if isinstance(obj, type) else obj


def get_plugin_manager(
    extra: Sequence[str] = (),
    disable: Iterable[str] = (),
    objects: Sequence[Any] = (),
    entry_points: bool = True,
) -> pluggy.PluginManager:
    """A new plugin manager: built-ins, then ``extra`` specs, plugin ``objects`` (tests and
    embedding), then the ``geproxy`` entry points; ``disable`` names are blocked first."""
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    for name in disable:
        pm.set_blocked(name)
    pm.register(_CoreOptions(), name="geproxy")
    for name, spec in DEFAULT_PLUGINS:
        if not pm.is_blocked(name):
            pm.register(load_object(spec), name=name)
    for spec in extra:
        obj = load_object(spec)
        pm.register(obj, name=getattr(obj, "name", None) or spec)
    for obj in objects:
        pm.register(obj, name=getattr(obj, "name", None))
    if entry_points:
        for entry_point in importlib.metadata.entry_points(group=hookspecs.PROJECT):
            if pm.is_blocked(entry_point.name) or pm.has_plugin(entry_point.name):
                continue
            obj = entry_point.load()
            pm.register(obj() if isinstance(obj, type) else obj, name=entry_point.name)
    return pm


def load(
    path: str, objects: Sequence[Any] = (), entry_points: bool = True,
    text: Optional[str] = None, stash: Optional[dict[str, Any]] = None,
    configure: bool = True,
) -> tuple[pluggy.PluginManager, Config]:
    """Read ``path`` (or parse ``text``, read from it earlier), build its plugin manager,
    validate every section, configure plugins. ``stash``: the running configuration's
    ``Config.stash``, which a reload hands on. ``configure=False`` stops after the
    validation of sections, keys and values: no plugin is configured, so none reads the
    files the configuration names.

    Raises ConfigError for any problem: every problem found, each in one line naming the
    file and its line, the section and the key (a ConfigErrors when there are several).
    They are found in two rounds. First the file itself: unknown names in ``disable``,
    plugins that may not be loaded, unknown sections and keys, values that do not parse.
    Then every plugin's ``configure`` (``configure_all``), each run whatever the others
    raised; when the first round found errors, the values that did not parse are handed to
    it as their defaults (no plugin ever sees a value that failed to parse), so that its
    errors are reported too, and the file is refused. A plugin that cannot be imported
    stops the first round at once: the sections it would have declared are not known.
    """
    if text is None:
        text = read_text(path)
    parser = read_ini(path, text)
    lines = IniLines.scan(text)
    section = parser["geproxy"] if parser.has_section("geproxy") else {}
    extra = parse_list(section.get("plugins", ""))
    disable = parse_list(section.get("disable", ""))
    known = {name for name, _ in DEFAULT_PLUGINS}
    known.update(ep.name for ep in importlib.metadata.entry_points(group=hookspecs.PROJECT))
    errors = [ConfigError(f"no built-in or installed plugin named {name!r}"
                          + did_you_mean(name, known), path=path, section="geproxy",
                          key="disable")
              for name in disable if name not in known]
    try:
        pm = get_plugin_manager(extra, disable, objects, entry_points)
    except Exception as exc:  # whatever a plugin's import raises is a configuration problem
        log.debug("loading plugins failed", exc_info=True)
        # One line: pluggy's duplicate-name message goes on to dump every plugin.
        first = (str(exc).splitlines() or [""])[0]
        errors.append(ConfigError(f"cannot load plugin: {type(exc).__name__}: {first}",
                                  path=path, section="geproxy", key="plugins"))
        raise located(errors, path, lines) or errors[-1] from None
    for caller in (pm.hook.on_close, pm.hook.on_disconnect, pm.hook.on_tls_handshake,
                   pm.hook.on_progress, pm.hook.reopen_logs, pm.hook.on_reload,
                   pm.hook.on_worker_exit):
        errors.extend(ConfigError(f"plugin {impl.plugin_name!r}: {caller.name} may not be a "
                                  "wrapper", path=path, section="geproxy", key="plugins")
                      for impl in caller.get_hookimpls() if impl.wrapper or impl.hookwrapper)
    registry = OptionRegistry()
    pm.hook.add_options.call_historic(kwargs={"registry": registry})
    ignored = frozenset(SECTIONS.get(name, name) for name in disable)
    for name in sorted(ignored):
        if parser.has_section(name):
            log.warning("%s: [%s] is ignored: its plugin is disabled", path, name)
    if not configure:
        return pm, build_config(path, parser, registry, ignored, stash, lines, errors)
    found: list[ConfigError] = []
    config = build_config(path, parser, registry, ignored, stash, lines, errors, found)
    if found:
        # The values that did not parse stand at their defaults: configure every plugin
        # all the same, to report what their configure finds too (a bad rule beside a bad
        # duration), then refuse the whole file. Its stash is a throwaway: nothing of this
        # configuration is kept.
        config.stash = {}
        try:
            configure_all(pm, config)
        except ConfigError as exc:
            found.extend(exc.errors)
        finally:
            _release(pm, config)
        raise located(found, path, lines) or found[0]
    try:
        configure_all(pm, config)
    except BaseException:
        _release(pm, config)  # the plugins configured before the failure
        raise
    check_parents(pm, config)
    return pm, config


def _release(pm: pluggy.PluginManager, config: Config) -> None:
    """``unconfigure`` for the plugins of a refused configuration, some of which may not have
    been configured: what they opened is closed now, not when the garbage is collected."""
    try:
        pm.hook.unconfigure(config=config)
    except Exception:
        log.exception("a plugin failed to release its resources")


def configure_all(pm: pluggy.PluginManager, config: Config) -> None:
    """Call every plugin's ``configure`` with ``config`` (pluggy's historic call: a plugin
    registered later is configured too), and when one raises ConfigError, every plugin
    after it as well, each whatever the others raised: their ConfigErrors are raised
    together, each at its line of the file (a plugin's ``line=`` index mapped through the
    value's lines). Anything else a plugin raises (a bug) goes to the caller at once.

    pluggy's call stops at the first exception; the plugins it did not reach are then
    called directly, in its order, as the isolated hooks are (``Hooks._observe``). They are
    found by the frame of the implementation the error came through; when it cannot be
    told (an implementation behind a decorator), or a ``configure`` wrapper is among them
    (pluggy's to run), the first error is the only one reported.
    """
    try:
        pm.hook.configure.call_historic(kwargs={"config": config})
        return
    except ConfigError as exc:
        errors = [exc]
    order = HookCall(pm, "configure").observers()
    plain = not any(impl.wrapper or impl.hookwrapper
                    for impl in pm.hook.configure.get_hookimpls())
    raised = _raised_in(errors[0], [function for _, function, _ in order]) if plain else None
    if raised is not None:
        args = (config,)
        for _, function, pick in order[raised + 1:]:
            try:
                function(*args) if pick is None else function(*[args[i] for i in pick])
            except ConfigError as exc:
                errors.append(exc)
    raise located(errors, config.path, config.lines) or errors[0]


def _raised_in(exc: BaseException, functions: Sequence[Any]) -> Optional[int]:
    """The index in ``functions`` of the one ``exc`` was raised through (the outermost
    frame of its traceback that runs one of them), or None. Where two of them share their
    code (two instances of one class), the later one is taken: what follows it may go
    unreported, but no plugin is ever configured twice."""
    codes = {getattr(function, "__code__", None): index
             for index, function in enumerate(functions)}
    tb = exc.__traceback__
    while tb is not None:
        index = codes.get(tb.tb_frame.f_code)
        if index is not None:
            return index
        tb = tb.tb_next
    return None


def check_parents(pm: pluggy.PluginManager, config: Config) -> None:
    """Warn about each parent proxy (``parent_proxies``) given as an IP literal that the
    ``resolve`` hook refuses: the destination guard prohibits its address, so every request
    routed through it would fail with 502. Names are not looked up (see the hookspec)."""
    listen = config.core["listen"]
    ctx = Context(client_addr=("0.0.0.0", 0), conn_id="check", config=config,
                  server_addr=(listen[0][0], listen[0][1]) if listen else ("0.0.0.0", 0),
                  decide_only=True)
    hooks = Hooks(pm)
    for routes in pm.hook.parent_proxies():
        for route in routes or ():
            if literal_address(route.host, route.port) is None:
                continue
            try:
                hooks.resolve(ctx, route.host, route.port)
            except DestinationProhibited as exc:
                log.warning("%s: parent proxy %s is prohibited by the destination guard: "
                            "every request routed through it will fail with 502 (%s)",
                            config.path, route.authority, exc.detail)
            except ProxyError as exc:  # not this check's business: the run will tell
                log.debug("%s: parent proxy %s: %s", config.path, route.authority, exc)


def exposition(pm: pluggy.PluginManager,
               processes: dict[int, int]) -> Optional[tuple[bytes, str]]:
    """The text and content type of the ``metrics`` plugin's ``exposition()``, or None when
    it is not loaded: with ``flush_metrics``, the one place the core looks a plugin up by
    name. ``processes``: the
    pid of each serving process by worker number, whose figures it reads from /proc."""
    plugin = pm.get_plugin("metrics")
    method = getattr(plugin, "exposition", None)
    if method is None:
        return None
    return method(processes)  # type: ignore[no-any-return]


def flush_metrics(pm: pluggy.PluginManager) -> None:
    """Have the ``metrics`` plugin move the counts it holds in plain integers into its
    figures (its ``flush()``), when it is loaded: a worker's part of the master's /metrics.
    Found by name, as ``exposition`` finds it."""
    method = getattr(pm.get_plugin("metrics"), "flush", None)
    if method is not None:
        method()


def plugin_names(pm: pluggy.PluginManager) -> list[str]:
    # A blocked (disabled) name is listed with None as its plugin: it is not loaded.
    return [name for name, plugin in pm.list_name_plugin()
            if name != "geproxy" and plugin is not None]


class Hooks:
    """The typed façade of the hook relay: what the core calls, and nothing else."""

    def __init__(self, pm: pluggy.PluginManager) -> None:
        self.pm = pm
        self._hook = pm.hook
        # Hooks of every connection or request, called without pluggy's per-call cost
        # (dispatch.py). Not on_request and resolve: built-in plugins wrap those, and a
        # hook with a wrapper is pluggy's to run anyway; rare hooks go through pluggy too.
        self._on_connect = HookCall(pm, "on_connect")
        self._route = HookCall(pm, "route")
        self._on_response = HookCall(pm, "on_response")
        self._on_close = HookCall(pm, "on_close")
        self._on_disconnect = HookCall(pm, "on_disconnect")
        self._on_tls_handshake = HookCall(pm, "on_tls_handshake")
        self._on_progress = HookCall(pm, "on_progress")
        self._reopen_logs = HookCall(pm, "reopen_logs")
        self._on_reload = HookCall(pm, "on_reload")
        self._on_worker_exit = HookCall(pm, "on_worker_exit")

    def on_connect(self, ctx: Context) -> Optional[Denied]:
        return self._on_connect(ctx)

    def on_request(self, ctx: Context, request: Request) -> Optional[Response]:
        return self._hook.on_request(ctx=ctx, request=request)

    # The identity hooks, as Context asks them (models.IdentitySource).

    def authenticate(self, ctx: Context, request: Request) -> Optional[str]:
        user = self._hook.authenticate(ctx=ctx, request=request)
        return None if user is None else str(user)

    def challenges(self, ctx: Context, request: Request) -> list[str]:
        offers: list[str] = []
        for value in self._hook.auth_challenge(ctx=ctx, request=request):
            if isinstance(value, str):
                value = [value]
            offers.extend(item for item in value or () if item)
        return offers

    def groups(self, ctx: Context, user: str) -> frozenset[str]:
        found: set[str] = set()
        for names in self._hook.user_groups(ctx=ctx, user=user):
            if names is not None:
                found.update(str(name) for name in names)
        return frozenset(found)

    def external(self, ctx: Context, request: Request, name: str,
                 arguments: Sequence[str]) -> Optional[ExternalAnswer]:
        answer = self._hook.external_acl(ctx=ctx, request=request, name=name,
                                         arguments=list(arguments))
        return answer if isinstance(answer, ExternalAnswer) else None

    def route(self, ctx: Context, request: Request) -> list[Optional[Route]]:
        """The routes to try in order: ``[None]`` means direct."""
        answer = self._route(ctx, request)
        if answer is None or isinstance(answer, Route):
            return [answer]
        routes = list(answer)
        if not routes:
            raise ConnectRefused("no route: every parent proxy is down")
        return routes

    def route_failed(self, ctx: Context, request: Request, route: Route,
                     error: ProxyError) -> None:
        self._hook.route_failed(ctx=ctx, request=request, route=route, error=error)

    def resolve(self, ctx: Context, host: str, port: int) -> Resolved:
        addresses = self._hook.resolve(ctx=ctx, host=host, port=port)
        if not addresses:
            raise DNSError(f"no address for {host}")
        return addresses if isinstance(addresses, Resolved) else Resolved(addresses)

    @functools.cached_property
    def inspects_tunnels(self) -> bool:
        """Whether any plugin wants tunnel data; one configured off sets its
        ``inspects_tunnels`` attribute to False, and tunnels then pay nothing for it. Asked
        once per plugin manager: plugins decide in ``configure``, before any connection."""
        return any(getattr(impl.plugin, "inspects_tunnels", True)
                   for impl in self._hook.on_tunnel_data.get_hookimpls())

    def on_tunnel_data(self, ctx: Context, request: Request, record: Record,
                       data: bytes) -> Optional[Denied]:
        return self._hook.on_tunnel_data(ctx=ctx, request=request, record=record, data=data)

    def on_response(self, ctx: Context, request: Request, response: Response) -> None:
        self._on_response(ctx, request, response)

    def on_close(self, ctx: Context, record: Record) -> None:
        self._observe(self._on_close, (ctx, record), ctx)
        # The request's: the next one on the connection has its own.
        ctx.dns_cache = ctx.auth_scheme = ctx.auth_result = None

    def on_progress(self, ctx: Context, record: Record, bytes_in: int,
                    bytes_out: int) -> None:
        self._observe(self._on_progress, (ctx, record, bytes_in, bytes_out), ctx)

    def on_disconnect(self, ctx: Context) -> None:
        self._observe(self._on_disconnect, (ctx,), ctx)

    def on_tls_handshake(self, ctx: Context, error: Optional[str]) -> None:
        self._observe(self._on_tls_handshake, (ctx, error), ctx)

    def reopen_logs(self) -> None:
        self._observe(self._reopen_logs, (), None)

    def on_reload(self, config: Config, error: Optional[str]) -> None:
        self._observe(self._on_reload, (config, error), None)

    def prepare_workers(self, config: Config, workers: int, directory: str) -> None:
        self._hook.prepare_workers(config=config, workers=workers, directory=directory)

    def on_worker_exit(self, config: Config, worker: int, pid: int) -> None:
        self._observe(self._on_worker_exit, (config, worker, pid), None)

    @staticmethod
    def _observe(call: HookCall, args: tuple[Any, ...], ctx: Optional[Context]) -> None:
        # Observers are isolated: one that raises must not keep the others from their call.
        where = f"[{ctx.conn_id}] " if ctx is not None else ""
        for name, function, pick in call.observers():
            try:
                function(*args) if pick is None else function(*[args[i] for i in pick])
            except ProxyError:
                log.warning("%s%s of %s raised a ProxyError", where, call.caller.name, name)
            except Exception:
                log.exception("%s%s of %s failed", where, call.caller.name, name)
