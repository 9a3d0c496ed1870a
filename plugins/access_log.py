"""``access_log``: one line per request or tunnel, to a file or standard output.

The file is ``[geproxy] access_log`` (``-`` for standard output, ``off`` for none), the line
``[geproxy] log_format``: ``geproxy`` (the default),

    time duration_ms client method target status error bytes_in bytes_out upstream user conn
    rule sni

with ``-`` for an empty field, ``squid`` (Squid's native line), ``combined`` (Apache/nginx)
or ``json`` (every field); see log_formats.py. A rotated file (moved away by logrotate) is
reopened by name, and on SIGUSR1 (``reopen_logs``).
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import sys
from typing import Optional

from geproxy import Config, ConfigError, Context, Record, hookimpl

from .log_formats import FORMATS


class AccessLog:
    name = "access_log"

    def __init__(self) -> None:
        self._logger: Optional[logging.Logger] = None
        self._format = FORMATS["geproxy"]

    @hookimpl
    def configure(self, config: Config) -> None:
        target = config.core["access_log"]
        self._format = FORMATS[config.core["log_format"]]
        if target.lower() == "off":
            self._logger = None
            return
        # A private logger, not registered globally: each server owns its own.
        logger = logging.Logger("geproxy.access")
        handler: logging.Handler
        if target == "-":
            handler = logging.StreamHandler(sys.stdout)
        else:
            # Opened on the first line, so check-config creates no file; checked now.
            if not _writable(target):
                raise ConfigError("cannot write there", path=config.path,
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
        if self._logger is None:
            return
        self._logger.info("%s", self._format(ctx, record))

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


def _writable(path: str) -> bool:
    if os.path.exists(path):
        return os.path.isfile(path) and os.access(path, os.W_OK)
    return os.access(os.path.dirname(os.path.abspath(path)), os.W_OK)
