"""One loaded configuration with its plugins, and the uses that keep it alive."""

from __future__ import annotations

import logging
from typing import Any

from ..config import Config
from ..errors import ConfigError
from ..policy.plugins import Hooks

__all__ = ["Generation", "unconfigure"]

log = logging.getLogger("geproxy.server")


class Generation:
    """One loaded configuration with its plugins: what a connection is served with from
    its start to its end, whatever reloads happen meanwhile."""

    def __init__(self, config: Config, pm: Any, number: int = 1) -> None:
        self.config = config
        self.pm = pm
        #: 1 for the configuration loaded at start, one more at each successful reload.
        self.number = number
        self.hooks = Hooks(pm)
        #: ``[geproxy]``'s options (``config.core``), read on every request.
        self.core = core = config.core
        self.via: str = config.via
        self.proxy_name = config.proxy_name
        #: The TLS listeners' context, read from the files at each load (None with no
        #: TLS listener): a reload picks up a renewed certificate.
        self.tls_context: Any = None
        self.proxy_protocol: str = core["proxy_protocol"]
        self.proxy_protocol_from = core["proxy_protocol_from"]
        try:
            if any(getattr(address, "tls", False) for address in core["listen"]):
                from ..net.tls import server_context  # imports ssl: only when TLS is on

                self.tls_context = server_context(config["tls"], config.path,
                                                  config["tls"]["http2"])
            if self.proxy_protocol != "off" and not self.proxy_protocol_from:
                raise ConfigError("proxy_protocol needs the balancers' addresses in "
                                  "proxy_protocol_from", path=config.path, section="geproxy",
                                  key="proxy_protocol_from")
        except ConfigError as exc:  # found after the load: placed at its line here
            raise config.locate(exc) from None
        #: Connections served with it; replaced by a reload, it is released at zero.
        self.users = 0
        self.retired = False
        self.released = False

    def unconfigure(self) -> None:
        if self.released:
            return
        self.released = True
        unconfigure(self.pm, self.config)


def unconfigure(pm: Any, config: Config) -> None:
    try:
        pm.hook.unconfigure(config=config)
    except Exception:
        log.exception("a plugin failed to release its resources")
