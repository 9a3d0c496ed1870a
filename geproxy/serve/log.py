"""Logging helpers: every line about a connection carries its id."""

from __future__ import annotations

import logging
from typing import Any, MutableMapping

from ..models import Context

__all__ = ["ConnLogger", "FORMAT", "name_process"]

#: The program log's lines (standard error), as ``geproxy`` sets them up.
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def name_process(name: str) -> None:
    """From now on every line of this process names it (``master``, ``worker 1``), after
    the level: the workers of a master write to one standard error."""
    formatter = logging.Formatter(FORMAT.replace("%(name)s", f"{name} %(name)s"))
    for handler in logging.getLogger().handlers:
        handler.setFormatter(formatter)


class ConnLogger(logging.LoggerAdapter):  # type: ignore[type-arg]
    """Prefixes each message with ``[conn id client]`` and puts ``conn_id`` on the record."""

    def __init__(self, logger: logging.Logger, ctx: Context) -> None:
        super().__init__(logger, {"conn_id": ctx.conn_id})
        self.ctx = ctx

    def process(self, msg: Any, kwargs: MutableMapping[str, Any]) -> tuple[Any, Any]:
        kwargs.setdefault("extra", {}).update(self.extra or {})
        return f"[{self.ctx.conn_id} {self.ctx.client_addr[0]}] {msg}", kwargs
