"""deny_ports: refuse CONNECT tunnels to ports outside an allowed set.

The example plugin of docs/plugins.md; tests/test_docs.py loads this file into a running proxy.
It does what these two lines of a squid.conf do:

    acl SSL_ports port 443
    http_access deny CONNECT !SSL_ports

Load it and give it its ports:

    [geproxy]
    plugins = deny_ports:DenyPorts

    [deny_ports]
    allowed = 443 8443 9000-9100

A CONNECT to any other port is answered 403 with ``Proxy-Status: geproxy;
error=http_request_denied`` before anything is resolved or connected. Plain-HTTP requests are
left to other plugins.
"""

from __future__ import annotations

import re

from geproxy import (
    Config,
    ConfigError,
    Context,
    Denied,
    OptionRegistry,
    Request,
    Response,
    hookimpl,
)

_PORTS = re.compile(r"([0-9]{1,5})(?:-([0-9]{1,5}))?")


class DenyPorts:
    #: The name it is registered under, and the name of its INI section.
    name = "deny_ports"

    def __init__(self) -> None:
        # Set by configure(); each proxy gets its own instance, so nothing lives at module level.
        self.allowed: list[tuple[int, int]] = []

    @hookimpl
    def add_options(self, registry: OptionRegistry) -> None:
        registry.section(self.name).add(
            "allowed", "list", "443",
            "Ports CONNECT may reach: single ports or ranges such as 9000-9100.")

    @hookimpl
    def configure(self, config: Config) -> None:
        allowed = []
        for item in config.section(self.name)["allowed"]:
            match = _PORTS.fullmatch(item)
            first = int(match.group(1)) if match else 0
            last = int(match.group(2) or first) if match else 0
            if not 1 <= first <= last <= 65535:
                raise ConfigError(f"not a port or a port range: {item!r}", path=config.path,
                                  section=self.name, key="allowed")
            allowed.append((first, last))
        self.allowed = allowed

    @hookimpl
    def on_request(self, ctx: Context, request: Request) -> Response | None:
        if not request.is_connect:
            return None  # no opinion: plain HTTP is for other plugins to judge
        if any(first <= request.port <= last for first, last in self.allowed):
            return None  # still "no opinion", not "allow": another plugin may deny
        raise Denied(f"CONNECT to port {request.port} is outside [deny_ports] allowed",
                     rule="deny_ports")
