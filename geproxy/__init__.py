"""geproxy: a forward proxy for corporate egress, on gevent, with pluggy policy plugins.

The public API for plugin authors is what this module exports; plugins import nothing else
from geproxy (``geproxy.errors`` included, through ``from geproxy import errors``).
"""

from . import errors, hosts
from .config import Config, OptionRegistry, did_you_mean, parse_duration, parse_port_ranges
from .errors import ConfigError, ConfigErrors, Denied, DNSError, DNSTimeout, ProxyError
from .hosts import HostPatterns, NetworkSet, RouteRule
from .models import (
    Context,
    ExternalAnswer,
    Headers,
    Record,
    Request,
    Resolved,
    Response,
    Route,
    TLSInfo,
)
from .policy.plugins import DEFAULT_PLUGINS, hookimpl

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "hookimpl",
    "errors",
    "hosts",
    "Config",
    "OptionRegistry",
    "ConfigError",
    "ConfigErrors",
    "Context",
    "ExternalAnswer",
    "Denied",
    "DNSError",
    "DNSTimeout",
    "Headers",
    "HostPatterns",
    "NetworkSet",
    "RouteRule",
    "parse_port_ranges",
    "did_you_mean",
    "parse_duration",
    "ProxyError",
    "Record",
    "Request",
    "Resolved",
    "Response",
    "Route",
    "TLSInfo",
    "DEFAULT_PLUGINS",
]
