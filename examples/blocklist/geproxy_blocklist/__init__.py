"""``blocklist``: refuse requests to destinations listed in a file, reloaded when it changes.

The file has one entry per line: ``example.com`` (that name only), ``.example.com`` (the
domain and every name below it), or an IP literal; ``#`` starts a comment. The plugin looks
at the file's modification time at most once per ``check_interval`` and reloads it when it
changed, so an operator's edit takes effect without a restart. A file that cannot be read at
start stops the start; one that becomes unreadable later keeps the last good list (logged).

    [blocklist]
    file = /etc/geproxy/blocklist.txt
    check_interval = 2s
"""

from __future__ import annotations

import logging
import os
import time
from typing import Callable, Optional

from geproxy import Config, ConfigError, Context, Denied, OptionRegistry, Request, hookimpl

log = logging.getLogger(__name__)


class Blocklist:
    name = "blocklist"

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.path = ""
        self.interval = 2.0
        self.names: frozenset[str] = frozenset()
        self.domains: tuple[str, ...] = ()
        self._stamp: Optional[int] = None
        self._checked = 0.0

    @hookimpl
    def add_options(self, registry: OptionRegistry) -> None:
        (registry.section("blocklist")
         .add("file", "path", "", "The list of refused destinations; empty: refuse none.")
         .add("check_interval", "duration", "2s",
              "How often, at most, the file is checked for changes.", minimum=0))

    @hookimpl
    def configure(self, config: Config) -> None:
        section = config.section("blocklist")
        self.path, self.interval = section["file"], section["check_interval"]
        if self.path:
            try:
                self._load()
            except OSError as exc:
                raise ConfigError(f"cannot read: {exc.strerror}", path=config.path,
                                  section="blocklist", key="file") from None

    def _load(self) -> None:
        stamp = os.stat(self.path).st_mtime_ns
        with open(self.path, encoding="utf-8") as handle:
            entries = [line.split("#", 1)[0].strip().lower().rstrip(".") for line in handle]
        entries = [entry for entry in entries if entry]
        self.names = frozenset(e for e in entries if not e.startswith("."))
        self.domains = tuple(e for e in entries if e.startswith("."))
        self._stamp = stamp
        log.info("blocklist: %d entries from %s", len(entries), self.path)

    def _refresh(self) -> None:
        now = self.clock()
        if not self.path or now - self._checked < self.interval:
            return
        self._checked = now
        try:
            if os.stat(self.path).st_mtime_ns != self._stamp:
                self._load()
        except OSError as exc:
            log.warning("blocklist: keeping the last list: %s", exc)

    def blocked(self, host: str) -> bool:
        return host in self.names or any(
            host == domain[1:] or host.endswith(domain) for domain in self.domains)

    @hookimpl
    def on_request(self, ctx: Context, request: Request) -> None:
        self._refresh()
        if request.host and self.blocked(request.host):
            raise Denied(f"{request.host} is on the blocklist", rule="blocklist")
