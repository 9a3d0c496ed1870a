"""``access_log``: one line per request or tunnel, to a file or standard output.

The file is ``[geproxy] access_log`` (``-`` for standard output, ``off`` for none). The line:

    time duration_ms client method target status error bytes_in bytes_out upstream user conn
    rule sni

with ``-`` for an empty field; time is the start, in seconds since the epoch with
milliseconds. A rotated file (moved away by logrotate) is reopened by name.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import sys
from typing import Optional

from geproxy import Config, ConfigError, Context, Record, hookimpl


class AccessLog:
    name = "access_log"

    def __init__(self) -> None:
        self._logger: Optional[logging.Logger] = None

    @hookimpl
    def configure(self, config: Config) -> None:
        target = config.core["access_log"]
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
        upstream = record.upstream_addr
        self._logger.info(
            "%.3f %d %s %s %s %d %s %d %d %s %s %s %s %s",
            record.started,
            record.duration * 1000,
            ctx.client_addr[0],
            record.method,
            record.target,
            record.status,
            record.error or "-",
            record.bytes_in,
            record.bytes_out,
            f"{upstream[0]}:{upstream[1]}" if upstream else "-",
            ctx.user or "-",
            ctx.conn_id,
            record.rule or "-",
            record.sni or "-",
        )


def _writable(path: str) -> bool:
    if os.path.exists(path):
        return os.path.isfile(path) and os.access(path, os.W_OK)
    return os.access(os.path.dirname(os.path.abspath(path)), os.W_OK)
