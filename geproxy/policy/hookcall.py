"""Hook calls on the hot path: pluggy's semantics, without its cost per call.

A pluggy call (``pm.hook.on_connect(ctx=...)``) checks its keyword arguments, copies the
implementation list and runs the general ``_multicall`` loop, built for wrappers, before any
plugin runs; several such calls go with every request. ``HookCall`` calls a hook whose
implementations are all plain ones directly: in pluggy's order, positionally (an
implementation that takes fewer arguments than the spec, or another order, gets its own),
stopping at the first result for ``firstresult`` hooks, with exceptions going straight to
the caller as they do through pluggy. The plan is made again whenever the implementations
change (a plugin registered or unregistered later).

Everything else goes through pluggy itself: a hook with a wrapper among its implementations
(``wrapper=True`` or ``hookwrapper=True``, whose protocol is pluggy's to run), and every
hook of a plugin manager with call monitoring or tracing on (``add_hookcall_monitoring``,
``enable_tracing``), so that what they record stays complete.

This is the one module that reads pluggy's private names (``unobserved``): setup.py pins
the pluggy versions its tests passed on.
"""

from __future__ import annotations

import warnings
from typing import Any, Optional

import pluggy

__all__ = ["HookCall", "unobserved"]


# -- pluggy's private names, read here and nowhere else ------------------------------------
#
# pluggy has no public way to ask whether a manager's hook calls are observed: its
# ``add_hookcall_monitoring`` and ``enable_tracing`` replace the manager's private
# ``_inner_hookexec``, which is ``pluggy._callers._multicall`` while nobody observes. On a
# pluggy that moved either name, every call goes through pluggy (right, only slower), a
# RuntimeWarning says so, and tests/test_dispatch.py's
# test_pluggys_private_names_are_where_dispatch_reads_them fails.

_PLAIN_EXEC: Any
try:
    from pluggy._callers import _multicall as _PLAIN_EXEC
except ImportError:  # pragma: no cover - a pluggy outside the pinned range
    _PLAIN_EXEC = None


def unobserved(pm: pluggy.PluginManager) -> bool:
    """Whether ``pm`` runs hook calls with pluggy's plain loop (no call monitoring, no
    tracing), so that calling the implementations directly gives the same; False when this
    pluggy lacks the private names it is read from."""
    inner = getattr(pm, "_inner_hookexec", None)
    if _PLAIN_EXEC is None or inner is None:
        warnings.warn(f"pluggy {pluggy.__version__} moved _callers._multicall or "
                      "PluginManager._inner_hookexec: every hook call goes through pluggy "
                      "(slower); setup.py names the versions geproxy is tested with",
                      RuntimeWarning, stacklevel=2)
        return False
    return inner is _PLAIN_EXEC


class HookCall:
    """One hook of a plugin manager, called with the spec's arguments in the spec's order."""

    __slots__ = ("pm", "caller", "argnames", "firstresult", "_impls", "_plan", "_wrapped",
                 "_observers")

    def __init__(self, pm: pluggy.PluginManager, name: str) -> None:
        self.pm = pm
        self.caller = getattr(pm.hook, name)
        spec = self.caller.spec
        self.argnames: tuple[str, ...] = tuple(spec.argnames) if spec else ()
        self.firstresult = bool(spec and spec.opts.get("firstresult"))
        self._impls: Optional[list[Any]] = None
        #: (function, argument positions or None for all) in calling order; None when a
        #: wrapper is among them.
        self._plan: Optional[list[tuple[Any, Optional[tuple[int, ...]]]]] = None
        self._wrapped = False
        #: (plugin name, function, argument positions) of each implementation, for
        #: ``observers``.
        self._observers: list[tuple[str, Any, Optional[tuple[int, ...]]]] = []

    def _planned(self) -> bool:
        """Whether the plan fits the current implementations (made again if not); False
        when this call must go through pluggy."""
        inner = getattr(self.pm, "_inner_hookexec", None)
        if (inner is not _PLAIN_EXEC or inner is None) and not unobserved(self.pm):
            return False  # (the first test is the usual case, without a call)
        impls = self.caller.get_hookimpls()
        if impls != self._impls:
            self._make_plan(impls)
        return self._plan is not None

    def _make_plan(self, impls: list[Any]) -> None:
        self._impls = impls
        plan = []
        for impl in reversed(impls):  # pluggy calls the last registered first
            names = tuple(impl.argnames)
            pick = None if names == self.argnames else tuple(
                self.argnames.index(name) for name in names)
            plan.append((impl.function, pick))
        self._observers = [(impl.plugin_name, function, pick)
                           for impl, (function, pick) in zip(reversed(impls), plan, strict=True)]
        self._wrapped = any(impl.wrapper or impl.hookwrapper for impl in impls)
        self._plan = None if self._wrapped else plan

    def observers(self) -> list[tuple[str, Any, Optional[tuple[int, ...]]]]:
        """Each implementation as (plugin name, function, argument positions or None for
        all), in pluggy's order: for observer hooks, whose implementations are called one
        by one, each isolated from the others' failures (plugins.Hooks)."""
        impls = self.caller.get_hookimpls()
        if impls != self._impls:
            self._make_plan(impls)
        return self._observers

    def __call__(self, *args: Any) -> Any:
        # Once a wrapper was seen, pluggy runs every call: a wrapper going away later only
        # leaves this hook on the slower path, while a wrapper arriving must never be
        # missed, so a direct plan is checked on every call.
        if self._wrapped or not self._planned():
            return self.caller(**dict(zip(self.argnames, args, strict=True)))
        plan = self._plan
        assert plan is not None
        if self.firstresult:
            for function, pick in plan:
                res = function(*args) if pick is None else function(*[args[i] for i in pick])
                if res is not None:
                    return res
            return None
        results = []
        for function, pick in plan:
            res = function(*args) if pick is None else function(*[args[i] for i in pick])
            if res is not None:
                results.append(res)
        return results
