"""``workers = N``: a master process and N workers sharing the listen ports.

The master reserves each listen port (bound with SO_REUSEPORT, never listening, so port 0
becomes one concrete port), forks the workers, and supervises them: a worker that dies is
started again, and SIGTERM, SIGINT, SIGHUP and SIGUSR1 are passed on to every worker. Each
worker binds the same ports with SO_REUSEPORT and the kernel spreads new connections among
them; worker 0 also runs the admin listener. The master serves no connection itself.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import sys
import tempfile
import time
from typing import Any

import gevent

from .config import ListenAddress
from .server import ProxyServer, _fmt, _listener, create_server

__all__ = ["Master", "serve", "run"]

#: prometheus_client's multiprocess directory (see the metrics plugin).
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

log = logging.getLogger(__name__)

#: A worker that dies sooner than this after its start is restarted only after a pause,
#: so a worker that cannot start does not spin the master.
RESTART_PAUSE = 1.0


class Master:
    def __init__(self, server: ProxyServer, count: int) -> None:
        self.template = server  # validated at start; each worker builds its own
        self.path = server.config.path
        self.count = count
        self.workers: dict[int, int] = {}  # pid -> worker index
        self.started: dict[int, float] = {}  # worker index -> when it started
        self.stopping = False
        self.addresses: list[ListenAddress] = []
        self._reserved: list[object] = []
        self._signals: list[Any] = []  # the master's handlers, which a worker drops
        self.metrics_dir = ""

    def run(self) -> int:
        # Counters that every worker adds to, summed on /metrics (prometheus_client's
        # multiprocess mode, which the metrics plugin turns on when this is set).
        self.metrics_dir = tempfile.mkdtemp(prefix="geproxy-metrics-")
        os.environ[MULTIPROC_ENV] = self.metrics_dir
        try:
            return self._supervise()
        finally:
            shutil.rmtree(self.metrics_dir, ignore_errors=True)

    def _supervise(self) -> int:
        for address in self.template.config.core["listen"]:
            reserved = _listener(address[0], address[1], reuse_port=True, listen=False)
            self._reserved.append(reserved)
            bound = reserved.getsockname()  # type: ignore[attr-defined]
            self.addresses.append(ListenAddress(bound[0], bound[1], address.tls))
        log.info("master %d: %d workers on %s", os.getpid(), self.count,
                 ", ".join(_fmt(a) for a in self.addresses))
        for index in range(self.count):
            self._spawn(index)
        for signum in (signal.SIGTERM, signal.SIGINT):
            self._signals.append(gevent.signal_handler(signum, self._stop))
        for signum in (signal.SIGHUP, signal.SIGUSR1):
            self._signals.append(gevent.signal_handler(signum, self._pass_on, signum))
        while self.workers:  # until the last worker is gone, after a stop
            self._reap()
            gevent.sleep(0.1)
        log.info("master %d: stopped", os.getpid())
        return 0

    def _spawn(self, index: int) -> None:
        pid = gevent.fork()
        if pid == 0:  # the worker
            # Until its handlers are in place, a reload or log reopening passed on by the
            # master must not end it (their default action); it reads the file anyway.
            signal.signal(signal.SIGHUP, signal.SIG_IGN)
            signal.signal(signal.SIGUSR1, signal.SIG_IGN)
            for handler in self._signals:  # a worker restarted later inherited them
                handler.cancel()
            code = 1
            try:
                code = self._work(index)
            finally:
                os._exit(code)
        self.workers[pid] = index
        self.started[index] = time.monotonic()
        log.info("worker %d started, pid %d", index, pid)

    def _work(self, index: int) -> int:
        for reserved in self._reserved:
            reserved.close()  # type: ignore[attr-defined]
        try:
            server = create_server(self.path)
        except Exception as exc:  # the file changed since the master read it
            print(f"geproxy: worker {index}: {exc}", file=sys.stderr)
            return 2
        return serve(server, addresses=self.addresses, admin=index == 0, reuse_port=True)

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            index = self.workers.pop(pid, None)
            if index is None:
                continue
            from prometheus_client import multiprocess

            multiprocess.mark_process_dead(pid, self.metrics_dir)  # its live gauges go
            if self.stopping:
                log.info("worker %d (pid %d) stopped", index, pid)
                continue
            log.warning("worker %d (pid %d) died with status %d; starting it again",
                        index, pid, status)
            if time.monotonic() - self.started.get(index, 0) < RESTART_PAUSE:
                gevent.sleep(RESTART_PAUSE)
            self._spawn(index)

    def _stop(self) -> None:
        self.stopping = True
        self._pass_on(signal.SIGTERM)

    def _pass_on(self, signum: int) -> None:
        for pid in list(self.workers):
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass


def serve(server: ProxyServer, **start: Any) -> int:
    """Run one server until SIGTERM or SIGINT has drained it; SIGHUP reloads, SIGUSR1
    reopens logs. Returns the exit status: 0, or 2 when a listen address cannot be bound."""
    for signum in (signal.SIGTERM, signal.SIGINT):
        gevent.signal_handler(signum, lambda: gevent.spawn(server.stop))
    gevent.signal_handler(signal.SIGUSR1, server.reopen_logs)
    gevent.signal_handler(signal.SIGHUP, lambda: gevent.spawn(server.reload))
    try:
        server.serve_forever(**start)
    except OSError as exc:
        print(f"geproxy: cannot listen: {exc.strerror or exc}", file=sys.stderr)
        return 2
    return 0


def run(server: ProxyServer) -> int:
    """``workers = 1``: this process serves; more: a master and its workers."""
    count = server.config.core["workers"]
    if count <= 1:
        return serve(server)
    return Master(server, count).run()
