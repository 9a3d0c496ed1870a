"""``file:`` lists: the values of a condition read from a file, one per line.

Blank lines and lines starting with ``#`` are skipped; every other line, without the white
space around it, is one value, taken as it is (no quotes needed: a regular expression may
hold spaces and commas). The file is built into the condition's matcher (a ``HostPatterns``
for ``dst``, a ``NetworkSet`` for ``src`` ...) in gevent's thread pool, so that a large list
never holds the event loop for long, and swapped in whole.

While the proxy runs, the file is stat'ed at most once per ``check_interval`` (from a
request that uses it) and, when it changed, read and built again in the background; the
requests meanwhile use the list they had. A file that cannot be read or built keeps the last
good list, and the reason is logged once. At start (and at a reload) a file that cannot be
read or built is a configuration error, as any bad value.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any, Callable, Iterable, Iterator, Optional

import gevent

from .conditions import Kind, fold

__all__ = ["ListFile", "Values", "values_of"]

log = logging.getLogger("geproxy_plugins.acl")

Stamp = tuple[int, int, int]


def _stamp(stat: os.stat_result) -> Stamp:
    return (stat.st_ino, stat.st_size, stat.st_mtime_ns)


class Values:
    """The values of a list file's lines (bytes, UTF-8), one at a time, so that a large
    list is never held twice (as lines and as values); ``line`` is the number of the line
    of the value given last, ``count`` how many were given."""

    def __init__(self, lines: Iterable[bytes]) -> None:
        self.lines = lines
        self.line = 0
        self.count = 0

    def __iter__(self) -> Iterator[str]:
        for number, raw in enumerate(self.lines, 1):
            self.line = number
            try:
                text = raw.decode("utf-8").strip()
            except UnicodeDecodeError:
                raise ValueError(f"line {number}: not UTF-8") from None
            if text and not text.startswith("#"):
                self.count += 1
                yield text


def values_of(kind: Kind, fold_case: bool) -> Callable[[Iterable[bytes]], tuple[Any, int]]:
    """How a list file of ``kind`` is built from its lines: its values, into the kind's
    matcher. ``dst`` and ``src`` lists are streamed into their matcher; the others (short
    by nature) are read whole first. A value the kind refuses is named with its line."""

    def build(lines: Iterable[bytes]) -> tuple[Any, int]:
        values = Values(lines)
        try:
            if kind.streams:  # dst and src: nothing to fold
                return kind.build(values), values.count
            listed = fold(kind, list(values), fold_case)
            return kind.build(listed), len(listed)
        except ValueError as exc:
            if str(exc).startswith("line "):
                raise
            raise ValueError(f"line {values.line}: {exc}") from None

    return build


def _off_loop(function: Callable[..., Any], *args: Any) -> Any:
    """Run ``function`` in gevent's thread pool: the loop goes on serving meanwhile."""
    return gevent.get_hub().threadpool.apply(function, args)


class ListFile:
    """One file read into a matcher (a ``file:`` list of one kind of condition, shared by
    every rule that names it; ``group_file``). ``build`` turns the file's lines (an
    iterable of bytes, read as it goes) into the matcher and a count of values; it runs in
    a thread and raises ValueError naming the line or the value. ``label`` tells two uses
    of one file apart (the kind of condition)."""

    def __init__(self, label: str, path: str,
                 build: Callable[[Iterable[bytes]], tuple[Any, int]],
                 interval: float, on_change: Callable[[], None],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.label = label
        self.path = path
        self.build = build
        self.interval = interval
        self.clock = clock
        #: Told after each swap (the plugin forgets the plans built with the old list).
        self.on_change = on_change
        self.matcher: Any = None
        self.count = 0
        self.stamp: Optional[Stamp] = None
        self._checked = clock()
        self._loading: Optional[gevent.Greenlet] = None

    def __repr__(self) -> str:
        return f"file:{self.path}"

    def _read_and_build(self) -> tuple[Stamp, Any, int]:
        with open(self.path, "rb") as handle:
            stamp = _stamp(os.fstat(handle.fileno()))
            matcher, count = self.build(handle)
        return stamp, matcher, count

    def load(self) -> None:
        """Read and build now (at start, at a reload); OSError or ValueError when the file
        cannot be used."""
        self.stamp, self.matcher, self.count = _off_loop(self._read_and_build)
        self._checked = self.clock()

    def adopt(self, other: "ListFile") -> bool:
        """Take ``other``'s list (the same file, loaded by the configuration before a
        reload) when the file has not changed since: no second build of a large list."""
        try:
            stamp = _stamp(os.stat(self.path))
        except OSError:
            return False
        if other.matcher is None or other.stamp != stamp or other.label != self.label:
            return False
        self.stamp, self.matcher, self.count = stamp, other.matcher, other.count
        return True

    def refresh(self) -> None:
        """From a request: at most once per interval, look whether the file changed and,
        if so, rebuild it in the background."""
        now = self.clock()
        if now - self._checked < self.interval or self._loading is not None:
            return
        self._checked = now
        try:
            if _stamp(os.stat(self.path)) == self.stamp:
                return
        except OSError as exc:
            self._keep(exc.strerror or str(exc))
            return
        self._loading = gevent.spawn(self._reload)

    def _reload(self) -> None:
        try:
            stamp, matcher, count = _off_loop(self._read_and_build)
        except OSError as exc:
            self._keep(exc.strerror or str(exc))
            return
        except ValueError as exc:
            self._keep(str(exc))
            try:  # the same bad file is not built again at each check
                self.stamp = _stamp(os.stat(self.path))
            except OSError:
                pass
            return
        finally:
            self._loading = None
        self.stamp, self.matcher, self.count = stamp, matcher, count
        log.info("acl: %d values from %s", count, self.path)
        self.on_change()

    def _keep(self, reason: str) -> None:
        if self.stamp is not None:  # said once per problem, not at every check
            log.warning("acl: keeping the last %d values of %s: %s", self.count, self.path,
                        reason)
        self.stamp = None
