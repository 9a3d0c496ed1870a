"""``access_log``: one line per request or tunnel, to a file or standard output.

The file is ``[geproxy] access_log`` (``-`` for standard output, ``off`` for none), the line
``[geproxy] log_format``: ``geproxy`` (the default),

    time duration_ms client method target status error bytes_in bytes_out upstream user conn
    rule sni

with ``-`` for an empty field, ``squid`` (Squid's native line), ``combined`` (Apache/nginx)
or ``json`` (every field); see log_formats.py. A rotated file (moved away by logrotate) is
reopened by name within a second, and at once on SIGUSR1 (``reopen_logs``).

Each line is written by itself, with no ``logging`` machinery: one ``os.write`` of the whole
line on a descriptor opened with O_APPEND, so that the workers' lines in the shared file
never mix within a line and none is lost, nothing is held in a buffer, and a stop loses
nothing; standard output is written and flushed per line, for a log collector that reads it
live. Whether the file was moved away is asked (an ``os.stat`` of its name against the open
file's) at most once a second, not per line: the lines of that second go to the moved file,
still open in its new place, as logrotate expects of a program it does not signal. A write
that fails (a full disk) loses its line, never fails the request, and is told once in the
program log until a line is written again.

The plugin's own ``[access_log]`` section leaves out the lines nobody reads: ``skip_paths``,
requests for the proxy itself (origin-form, ``GET /healthz``) whose path is listed, such as a
load balancer's health checks; ``skip_src``, every line of the clients in these networks,
refused connections included, as Squid's ``access_log ... !acl`` does. The program log still
has its line for each denial and failure.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
import sys
import time
from typing import Any, Optional, TextIO

from geproxy import Config, ConfigError, Context, OptionRegistry, Record, hookimpl, hosts

from .log_formats import FORMATS

SECTION = "access_log"
#: How often, at most, a file's name is checked for a rotation, in seconds.
CHECK_EVERY = 1.0

log = logging.getLogger("geproxy")


class FileSink:
    """The access log file at ``path``, opened when the first line comes (so that
    ``check-config`` creates nothing), in the process that writes it (a worker, after the
    fork), appended to by one ``os.write`` per line."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd: Optional[int] = None
        #: (st_dev, st_ino) of the open file: another at ``path`` means it was moved away.
        self._identity: tuple[int, int] = (0, 0)
        #: When (time.monotonic) the name is checked next: 0 for the next line.
        self._check_at = 0.0
        #: The errors told in the program log since the last line written: each once.
        self._told: set[str] = set()

    def write(self, line: str) -> None:
        data = (line + "\n").encode("utf-8", "backslashreplace")
        if time.monotonic() >= self._check_at:
            self._check()
        fd = self._fd
        if fd is None:
            return  # not open: told once, tried again within a second
        try:
            # O_APPEND: the kernel seeks to the end and writes at once, so another
            # process's line never lands inside this one. A short write (the disk became
            # full) is finished, or fails on the next call.
            written = os.write(fd, data)
            while written < len(data):
                if written == 0:  # never for a regular file: no endless loop either way
                    raise OSError(errno.EIO, "nothing could be written")
                data = data[written:]
                written = os.write(fd, data)
        except OSError as exc:
            self._failed("cannot write", exc)
            if exc.errno == errno.EBADF:
                self._fd, self._check_at = None, 0.0  # closed under us: open it again
            return
        if self._told:
            log.info("access log %s: written again", self.path)
            self._told.clear()

    def _check(self) -> None:
        """Open the file if it is not; reopen it if its name is another file's now."""
        self._check_at = time.monotonic() + CHECK_EVERY
        if self._fd is not None:
            try:
                found = os.stat(self.path)
            except OSError:
                found = None  # removed: a new file by that name, as logrotate expects
            if found is not None and (found.st_dev, found.st_ino) == self._identity:
                return
            self.close()
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC,
                         0o666)
        except OSError as exc:
            self._failed("cannot open", exc)
            return
        opened = os.fstat(fd)
        self._fd, self._identity = fd, (opened.st_dev, opened.st_ino)

    def _failed(self, what: str, exc: OSError) -> None:
        kind = f"{what}: {exc.strerror or exc}"
        if kind not in self._told:
            self._told.add(kind)
            log.warning("access log %s: %s; its lines are lost until it can be written",
                        self.path, kind)

    def reopen(self) -> None:
        """Let the file go: the next line opens ``path`` again (SIGUSR1)."""
        self.close()
        self._check_at = 0.0

    def close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass  # nothing of ours is lost: every line was written by os.write


class StreamSink:
    """Standard output (``access_log = -``): each line written and flushed at once, for a
    container's log collector that reads it live."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self._told: set[str] = set()

    def write(self, line: str) -> None:
        try:
            self.stream.write(line + "\n")
            self.stream.flush()
        except (OSError, ValueError) as exc:  # ValueError: the stream was closed
            kind = str(exc)
            if kind not in self._told:
                self._told.add(kind)
                log.warning("access log on standard output: %s; its lines are lost", kind)

    def reopen(self) -> None:
        pass

    def close(self) -> None:
        pass


class AccessLog:
    name = "access_log"

    def __init__(self) -> None:
        self._sink: Optional[FileSink | StreamSink] = None
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
            self._sink = None
        elif target == "-":
            self._sink = StreamSink(sys.stdout)
        else:
            # Opened on the first line, so check-config creates no file; checked now. The
            # path is absolute: the config layer resolved it against the file's directory.
            reason = cannot_write(target)
            if reason is not None:
                raise ConfigError(f"cannot write {target}: {reason}", path=config.path,
                                  section="geproxy", key="access_log")
            self._sink = FileSink(target)

    @hookimpl
    def unconfigure(self) -> None:
        if self._sink is not None:
            self._sink.close()
            self._sink = None

    @hookimpl
    def on_close(self, ctx: Context, record: Record) -> None:
        sink = self._sink
        if sink is None or ((self._skip_paths or self._skip_src)
                            and self._skipped(ctx, record)):
            return
        sink.write(self._format(ctx, record))

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
        if self._sink is not None:
            self._sink.reopen()


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
