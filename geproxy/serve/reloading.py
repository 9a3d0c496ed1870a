"""Reloads: what only a restart applies, how a refused one is said, and the recheck of open
tunnels against the new policy (``reload_tunnels = recheck``)."""

from __future__ import annotations

import logging
from typing import Any, Optional

from ..config import Config
from ..errors import ConfigError
from .generation import Generation

__all__ = ["recheck_tunnels", "restart_only_changes", "reload_failure", "observe_reload",
           "RESTART_ONLY"]

#: Named as log filters know it, wherever the module sits (docs/deployment.md).
log = logging.getLogger("geproxy.server")


#: ``[geproxy]`` options a reload cannot change: they shape the listeners and the pool.
RESTART_ONLY = ("listen", "admin_listen", "upstream_keepalive", "upstream_idle_timeout")


def restart_only_changes(old: Config, new: Config) -> list[str]:
    """What a reload from ``old`` to ``new`` changes that only a restart applies."""
    return [f"[geproxy] {key} changes only on restart" for key in RESTART_ONLY
            if new.core[key] != old.core[key]]


def reload_failure(exc: BaseException) -> str:
    """What refused a reload, in one line (every error of a ConfigErrors, after one another);
    a plugin's bug gets its traceback logged too."""
    if isinstance(exc, ConfigError):
        return "; ".join(str(error) for error in exc.errors)
    log.error("loading the configuration failed", exc_info=exc)
    return f"{type(exc).__name__}: {exc}"


def observe_reload(gen: Generation, error: Optional[str]) -> None:
    """``on_reload`` of every plugin of ``gen``; errors are logged, never raised."""
    gen.hooks.on_reload(gen.config, error)


def recheck_tunnels(server: Any, gen: Generation) -> None:
    """``reload_tunnels = recheck``: every open tunnel judged again by ``gen``; those it
    would refuse now are closed (close reason ``reload``)."""
    closed = checked = 0
    for conn in list(server.active.values()):
        if server.gen is not gen:
            return  # a later reload rechecks them instead
        record = conn.record
        if (record is None or record.method != "CONNECT" or record.status != 200
                or conn.gen is gen):
            continue  # not an established tunnel, or one the new policy let in
        checked += 1
        verdict = conn.recheck(gen, record)
        if verdict is not None and conn.record is record:
            conn.log.info("tunnel to %s closed by the reload: %s", record.target,
                          verdict)
            conn.close("reload")
            closed += 1
    log.info("reload: %d open tunnels rechecked, %d closed", checked, closed)
