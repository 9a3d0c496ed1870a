"""``access_log``: one line per request or tunnel, to a file or standard output.

The file is ``[geproxy] access_log`` (``-`` for standard output, ``off`` for none), the line
``[geproxy] log_format``: ``geproxy`` (the default),

    time duration_ms client method target status error bytes_in bytes_out upstream user conn
    rule sni

with ``-`` for an empty field, ``squid`` (Squid's native line), ``combined`` (Apache/nginx)
or ``json`` (every field); see log_formats.py. A rotated file (moved away by logrotate) is
reopened by name, and on SIGUSR1 (``reopen_logs``).

The plugin's own ``[access_log]`` section leaves out the lines nobody reads: ``skip_paths``,
requests for the proxy itself (origin-form, ``GET /healthz``) whose path is listed, such as a
load balancer's health checks; ``skip_src``, every line of the clients in these networks,
refused connections included, as Squid's ``access_log ... !acl`` does. The program log still
has its line for each denial and failure.
"""

from __future__ import annotations

import ipaddress
import logging
import logging.handlers
import os
import sys
from typing import Any, Optional

from geproxy import Config, ConfigError, Context, OptionRegistry, Record, hookimpl, hosts

from .log_formats import FORMATS

SECTION = "access_log"


class AccessLog:
    name = "access_log"

    def __init__(self) -> None:
        self._logger: Optional[logging.Logger] = None
        self._format = FORMATS["geproxy"]
        #: Paths of origin-form requests (for the proxy itself) that are not logged.
        self._skip_paths: frozenset[str] = frozenset()
        #: Client networks whose requests and connections are not logged.
        self._skip_src: tuple[Any, ...] = ()

    @hookimpl
    def add_options(self, registry: OptionRegistry) -> None:
        (
            registry.section(SECTION)
            .add("skip_paths", "list", "",
                 "Requests for the proxy itself (origin-form: GET /healthz) whose path, "
                 "without its query, is one of these are not logged: health checks.")
            .add("skip_src", "networks", "",
                 "Nothing from clients in these networks is logged, refused connections "
                 "included: monitors, load balancers.")
        )

    @hookimpl
    def configure(self, config: Config) -> None:
        section = config.section(SECTION)
        for path in section["skip_paths"]:
            if not path.startswith("/") or "?" in path:
                raise ConfigError(f"not a path: {path!r} (write /healthz, without a query)",
                                  path=config.path, section=SECTION, key="skip_paths")
        target = config.core["access_log"]
        self._format = FORMATS[config.core["log_format"]]
        self._skip_paths = frozenset(section["skip_paths"])
        self._skip_src = tuple(section["skip_src"])
        if target == "off":  # the logfile kind: "off" (any case written), "-" or a path
            self._logger = None
            return
        # A private logger, not registered globally: each server owns its own.
        logger = logging.Logger("geproxy.access")
        handler: logging.Handler
        if target == "-":
            handler = logging.StreamHandler(sys.stdout)
        else:
            # Opened on the first line, so check-config creates no file; checked now. The
            # path is absolute: the config layer resolved it against the file's directory.
            reason = cannot_write(target)
            if reason is not None:
                raise ConfigError(f"cannot write {target}: {reason}", path=config.path,
                                  section="geproxy", key="access_log")
            handler = logging.handlers.WatchedFileHandler(target, encoding="utf-8", delay=True)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        self._logger = logger

    @hookimpl
    def unconfigure(self) -> None:
        if self._logger is not None:
            for handler in self._logger.handlers:
                handler.close()
            self._logger = None

    @hookimpl
    def on_close(self, ctx: Context, record: Record) -> None:
        if self._logger is None or self._skipped(ctx, record):
            return
        self._logger.info("%s", self._format(ctx, record))

    def _skipped(self, ctx: Context, record: Record) -> bool:
        """Whether ``skip_paths`` or ``skip_src`` leaves this line out. Only an origin-form
        request is for the proxy by its form alone: a forwarded request for
        ``http://example.com/healthz`` is always logged."""
        request = record.request
        if self._skip_paths and request is not None and not request.host and (
                request.path.partition("?")[0] in self._skip_paths):
            return True
        if self._skip_src:
            client = hosts.unmapped(ipaddress.ip_address(ctx.client_ip))
            return any(client in network for network in self._skip_src)
        return False

    @hookimpl
    def reopen_logs(self) -> None:
        if self._logger is not None:
            for handler in self._logger.handlers:
                if isinstance(handler, logging.handlers.WatchedFileHandler):
                    handler.acquire()
                    try:
                        handler.close()  # reopened by name on the next line (delay)
                    finally:
                        handler.release()


def cannot_write(path: str) -> Optional[str]:
    """Why the access log could not be appended to at ``path``, in a few words; None when
    it can. Nothing is created or opened: the file exists and is writable, or its directory
    exists and may take a new file. A symbolic link is judged by what it points to, which
    the first line creates if it is missing."""
    real = os.path.realpath(path)
    if os.path.isdir(real):
        return "is a directory"
    if os.path.exists(real):
        if not os.path.isfile(real):
            return "not a regular file (- is standard output)"
        return None if os.access(real, os.W_OK) else _denied(real, "")
    directory = os.path.dirname(real)
    try:
        os.stat(directory)
    except FileNotFoundError:
        return f"no such directory {directory}"
    except OSError as exc:  # a part of the path is a file, or may not be searched
        return f"directory {directory}: {(exc.strerror or str(exc)).lower()}"
    if not os.path.isdir(directory):
        return f"{directory} is not a directory"
    if not os.access(directory, os.W_OK | os.X_OK):
        return _denied(directory, f" on directory {directory}")
    return None


def _denied(path: str, where: str) -> str:
    """What a failed write-access check means: a read-only file system, or permissions."""
    try:
        if os.statvfs(path).f_flag & os.ST_RDONLY:
            return f"read-only file system{where}"
    except OSError:
        pass
    return f"permission denied{where}"
