"""``workers = N``: a master process and N workers that act as one proxy.

The master loads and validates the configuration itself and forks every worker from that
loaded state, so a worker runs exactly what the master holds (the files the configuration
names as they were when it was loaded), never the file on disk as it is now. The master
binds every address before the first fork: on each listen address one listening socket per
worker, shared among them only by SO_REUSEPORT (the kernel spreads new connections), after
a plain bind has shown that no other process serves the address; and the admin listener,
which it serves itself. A worker that dies leaves its sockets open in the master, so the
connections queued there wait for its successor instead of being reset.

Supervision: a worker that fails before it serves stops the start (exit 2). One that dies
later is started again after a pause that grows with each death; MAX_DEATHS deaths within
DEATH_WINDOW seconds stop the master (exit 1), leaving the restart policy to the service
manager. A reload (SIGHUP) is all or nothing: the master reads the file and loads it, every
worker loads the same text (``prepare``), and only when all could does each put it in force
(``commit``); otherwise none does (``abort``). A reload that changes ``workers`` starts or
stops workers to match. SIGTERM and SIGINT stop every worker gracefully; SIGUSR1 reopens
the log files in every process.

The admin listener answers for all: ``/tunnels``, ``/debug/stats`` and ``POST
/tunnels/ID/close`` ask the workers over their channels (channel.py); ``/metrics`` is the
``metrics`` plugin's exposition in the master, the sum of every worker's figures. The master
serves no proxy connection.

What the workers share beyond their sockets is the plugins' to prepare: the master calls
``prepare_workers`` before the first fork, with a directory of its own that it removes when
it exits, and ``on_worker_exit`` for each worker process it reaped (the ``metrics`` plugin
keeps its shared figures so).
"""

from __future__ import annotations

import collections
import logging
import os
import re
import shutil
import signal
import socket
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable, NoReturn, Optional

import gevent
import gevent.pool

from ..config import ListenAddress, read_text
from ..errors import ConfigError
from ..policy.plugins import exposition, flush_metrics
from .channel import Channel, ChannelClosed, RemoteError
from .generation import Generation
from .listeners import describe_address, listening_socket
from .local import admin_app
from .log import name_process
from .reloading import observe_reload, reload_failure, restart_only_changes
from .server import ProxyServer, create_server
from .stats import combine_stats

__all__ = ["Master", "serve", "run", "describe_status"]

#: Named as log filters know it, wherever the module sits (docs/deployment.md).
log = logging.getLogger("geproxy.workers")

#: Deaths of workers within DEATH_WINDOW seconds that stop the master: a crash loop.
MAX_DEATHS = 5
DEATH_WINDOW = 60.0
#: The pause before a dead worker is started again: FIRST_PAUSE, doubled for each other
#: death within DEATH_WINDOW.
FIRST_PAUSE = 0.5
#: Seconds the workers get to start serving at start; a worker's answer to the master.
START_TIMEOUT = 30.0
ASK_TIMEOUT = 5.0
#: Seconds each worker gets to flush its metrics before the master sums them for /metrics:
#: less than ASK_TIMEOUT, so that a worker asking the master for /metrics (its proxy port's
#: ``local_paths``) gets the sum before it stops waiting, whichever worker is slow.
FLUSH_TIMEOUT = 2.0
#: Seconds every worker gets to load a configuration on reload.
PREPARE_TIMEOUT = 60.0
#: How often the master looks for ended workers and due restarts.
TICK = 0.05


def describe_status(status: int) -> str:
    """How a process ended, from its wait status, in words: ``killed by SIGKILL``,
    ``exited with status 2``."""
    if os.WIFSIGNALED(status):
        number = os.WTERMSIG(status)
        try:
            name = signal.Signals(number).name
        except ValueError:
            name = f"signal {number}"
        return f"killed by {name}"
    if os.WIFEXITED(status):
        return f"exited with status {os.WEXITSTATUS(status)}"
    return f"ended (wait status {status})"


def restart_pause(deaths: int) -> float:
    """The pause before a restart, given the deaths within DEATH_WINDOW (this one too)."""
    return FIRST_PAUSE * 2 ** max(deaths - 1, 0)


@dataclass
class _Worker:
    """A worker process as its master knows it: its number, pid and channel."""

    index: int
    pid: int
    channel: Channel
    #: It said it serves (its listeners are open).
    ready: bool = False
    #: Asked to stop (the master stops, or a reload lowered ``workers``): not restarted.
    leaving: bool = False


class Master:
    """Forks, supervises and reloads ``count`` workers from the loaded ``server`` (which
    it never starts), and answers the admin listener for them all."""

    def __init__(self, server: ProxyServer, count: int) -> None:
        #: The configuration in force, loaded here: every worker is forked from it.
        self.server = server
        self.count = count
        self.workers: dict[int, _Worker] = {}
        #: Each worker's listening sockets, by worker number, bound and kept by the master.
        self.listeners: dict[int, list[tuple[socket.socket, ListenAddress]]] = {}
        self.addresses: list[ListenAddress] = []
        #: When a dead worker is due to be started again, by worker number.
        self.due: dict[int, float] = {}
        self.deaths: collections.deque[float] = collections.deque()
        #: Until every worker of the start serves: a worker that fails stops the start.
        self.starting = True
        #: The workers that served at least once (every one does, once the start is over).
        self.served: set[int] = set()
        self.stopping = False
        self.reloading = False
        self.reload_again = False
        self.exit_code = 0
        #: Every greenlet of the master (channel readers, admin requests, reloads): killed
        #: first thing in a forked worker, where they have nothing to do.
        self.tasks = gevent.pool.Group()
        self._signals: list[Any] = []
        self.admin: Optional[Any] = None

    # -- start and supervision ------------------------------------------------------------

    def run(self) -> int:
        """Prepare, bind, fork and supervise until stopped; the exit status."""
        shared = tempfile.mkdtemp(prefix="geproxy-workers-")
        try:
            try:
                self.server.gen.hooks.prepare_workers(self.server.config, self.count, shared)
            except ConfigError as exc:
                print(exc.report(), file=sys.stderr)
                return 2
            return self._run()
        finally:  # never in a worker, which ends with os._exit
            shutil.rmtree(shared, ignore_errors=True)

    def _run(self) -> int:
        for signum in (signal.SIGTERM, signal.SIGINT):
            self._signals.append(gevent.signal_handler(signum, self.stop))
        self._signals.append(gevent.signal_handler(signal.SIGHUP, self._sighup))
        self._signals.append(gevent.signal_handler(signal.SIGUSR1, self._reopen_logs))
        try:
            self._bind_all()
            self._start_admin()
        except OSError as exc:
            print(f"geproxy: cannot listen: {exc.strerror or exc}", file=sys.stderr)
            self._close_listeners()
            return 2
        log.info("master %d: %d workers on %s", os.getpid(), self.count,
                 ", ".join(describe_address(a) for a in self.addresses))
        for index in range(self.count):
            if not self.stopping:  # a SIGTERM already: no worker to start, none to stop
                self._spawn(index)
        try:
            self._supervise()
        finally:
            if self.admin is not None:
                self.admin.stop(timeout=1)
            self._close_listeners()
            self.server.gen.unconfigure()
        log.info("master %d: stopped", os.getpid())
        return self.exit_code

    def _supervise(self) -> None:
        started = time.monotonic()
        while True:
            self._reap()
            if self.stopping:
                if not self.workers:
                    return
            else:
                if self.starting and time.monotonic() - started > START_TIMEOUT:
                    log.error("the workers did not all start serving within %gs; stopping",
                              START_TIMEOUT)
                    self.exit_code = 2
                    self.stop()
                elif not self.reloading:  # a fork during a reload could miss its commit
                    now = time.monotonic()
                    for index, when in sorted(self.due.items()):
                        if when <= now:
                            del self.due[index]
                            self._spawn(index)
            gevent.sleep(TICK)

    def _bind_all(self) -> None:
        for address in self.server.config.core["listen"]:
            host, port = address
            if port:
                # A plain bind fails on an address any process serves, with SO_REUSEPORT or
                # not: so no second geproxy joins the group of this one's sockets.
                listening_socket(host, port).close()
            first = listening_socket(host, port, reuse_port=True)
            bound = ListenAddress(host, first.getsockname()[1],
                                  getattr(address, "tls", False))
            self.addresses.append(bound)
            self.listeners.setdefault(0, []).append((first, bound))
        for index in range(1, self.count):
            self._bind(index)

    def _bind(self, index: int) -> None:
        """Worker ``index``'s sockets, on the addresses bound for worker 0."""
        socks: list[tuple[socket.socket, ListenAddress]] = []
        try:
            for address in self.addresses:
                socks.append((listening_socket(address[0], address[1], reuse_port=True), address))
        except OSError:
            for sock, _ in socks:
                sock.close()
            raise
        self.listeners[index] = socks

    def _close_listeners(self, index: Optional[int] = None) -> None:
        for number in ([index] if index is not None else list(self.listeners)):
            for sock, _ in self.listeners.pop(number, []):
                sock.close()

    def _start_admin(self) -> None:
        address = self.server.config.core["admin_listen"]
        if address is None:
            return
        self.admin = _admin_server(listening_socket(*address), admin_app(_WorkersView(self)),
                                   self.tasks.spawn)
        self.admin.start()
        log.info("admin listener on %s", describe_address(self.admin.address))

    def _spawn(self, index: int) -> None:
        """Fork worker ``index``. Only the main greenlet forks: in the child, it goes on as
        the worker, and every other greenlet of the master is killed."""
        ours, theirs = socket.socketpair()
        pid = gevent.fork()
        if pid == 0:
            ours.close()
            _become_worker(self, index, theirs)
        theirs.close()
        # Its end is told by waitpid (_reap), not by its channel's.
        channel = Channel(ours, self._serve_worker, self.tasks.spawn)
        self.workers[index] = _Worker(index, pid, channel)
        log.info("worker %d started, pid %d", index, pid)

    def _serve_worker(self, op: str, message: dict[str, Any]) -> Any:
        """What a worker asks or tells its master."""
        if op == "ready":
            worker = self.workers.get(message["worker"])
            if worker is not None:
                worker.ready = True
                log.info("worker %d (pid %d) serves", worker.index, worker.pid)
                self.served.add(worker.index)
                if self.starting and len(self.served) >= self.count:
                    self.starting = False  # every worker of the start served
            return None
        if op == "metrics":
            found = _WorkersView(self).metrics_exposition()
            return None if found is None else [found[0].decode(), found[1]]
        raise RemoteError(f"unknown request {op!r}")

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            worker = next((w for w in self.workers.values() if w.pid == pid), None)
            if worker is None:
                continue
            self._ended(worker, describe_status(status))

    def _ended(self, worker: _Worker, how: str) -> None:
        del self.workers[worker.index]
        worker.channel.close()
        self.server.gen.hooks.on_worker_exit(self.server.config, worker.index, worker.pid)
        if self.stopping or worker.leaving:
            log.info("worker %d (pid %d) %s", worker.index, worker.pid, how)
            return
        if self.starting and not worker.ready:
            log.error("worker %d (pid %d) %s before it served; stopping", worker.index,
                      worker.pid, how)
            self.exit_code = 2
            self.stop()
            return
        now = time.monotonic()
        self.deaths.append(now)
        while self.deaths and self.deaths[0] < now - DEATH_WINDOW:
            self.deaths.popleft()
        if len(self.deaths) >= MAX_DEATHS:
            log.error("worker %d (pid %d) %s: %d deaths within %gs; stopping", worker.index,
                      worker.pid, how, len(self.deaths), DEATH_WINDOW)
            self.exit_code = 1
            self.stop()
            return
        pause = restart_pause(len(self.deaths))
        log.warning("worker %d (pid %d) %s; starting it again in %gs", worker.index,
                    worker.pid, how, pause)
        self.due[worker.index] = now + pause

    def stop(self) -> None:
        """SIGTERM, SIGINT: every worker stops gracefully; none is started again."""
        if self.stopping:
            return
        self.stopping = True
        self.due.clear()
        log.info("master %d: stopping %d workers", os.getpid(), len(self.workers))
        self._signal_all(signal.SIGTERM)

    def _signal_all(self, signum: int) -> None:
        for worker in list(self.workers.values()):
            try:
                os.kill(worker.pid, signum)
            except ProcessLookupError:
                pass

    def _reopen_logs(self) -> None:
        self.server.reopen_logs()  # the master's copies: a rotated file is let go
        self._signal_all(signal.SIGUSR1)

    # -- reload ---------------------------------------------------------------------------

    def _sighup(self) -> None:
        if self.stopping:
            return
        if self.reloading:
            self.reload_again = True  # the file may have changed since this reload read it
            return
        self.reloading = True
        self.tasks.spawn(self._reloads)

    def _reloads(self) -> None:
        try:
            while True:
                self.reload()
                if not self.reload_again or self.stopping:
                    return
                self.reload_again = False
        finally:
            self.reloading = False

    def reload(self) -> bool:
        """Read and load the file; put it in force in every worker and here, or nowhere."""
        server = self.server
        try:
            text = read_text(server.config.path)
            new = server.prepare(text)
        except Exception as exc:
            server.refused(reload_failure(exc))
            return False
        count = new.config.core["workers"]
        added = range(self.count, count)
        try:
            for index in added:
                self._bind(index)
        except OSError as exc:
            for index in added:
                self._close_listeners(index)
            new.unconfigure()
            server.refused(f"cannot listen for worker {index}: {exc.strerror or exc}")
            return False
        failure = self._prepare_all(text)
        if failure is not None:
            for index in added:
                self._close_listeners(index)
            new.unconfigure()
            server.refused(failure)
            return False
        for line in restart_only_changes(server.config, new.config):
            log.warning("reload: %s", line)
        self._ask_all("commit", ASK_TIMEOUT)
        server.install(new)
        self._resize(count)
        observe_reload(new, None)
        return True

    def _prepare_all(self, text: str) -> Optional[str]:
        """Every worker loads ``text``; None when all could, else what failed (then none
        keeps it). A worker that did not answer in time, or ended meanwhile, fails it too:
        one that would go on loading could not be told to commit."""
        answers = self._ask_all("prepare", PREPARE_TIMEOUT, text=text)
        failed = [(index, str(answer)) for index, answer in answers.items()
                  if answer is not None]
        if not failed:
            return None
        self._ask_all("abort", ASK_TIMEOUT)
        index, error = failed[0]
        return f"worker {index}: {error}"

    def _ask_all(self, op: str, timeout: float, **args: Any) -> dict[int, Any]:
        """Ask every worker that is not leaving, at once; each answer by worker number (an
        exception for a worker that failed, or is gone)."""
        asked = [w for w in self.workers.values() if not w.leaving]
        calls = {w.index: self.tasks.spawn(self._ask, w, op, timeout, args) for w in asked}
        gevent.joinall(list(calls.values()))
        return {index: call.value for index, call in calls.items()}

    @staticmethod
    def _ask(worker: _Worker, op: str, timeout: float, args: dict[str, Any]) -> Any:
        try:
            return worker.channel.call(op, timeout, **args)
        except (ChannelClosed, RemoteError) as exc:
            return exc

    def _resize(self, count: int) -> None:
        """A reload changed ``workers``: start the new ones, stop the ones past ``count``."""
        if count == self.count:
            return
        log.info("reload: workers %d -> %d", self.count, count)
        for index in range(self.count, count):
            self.due[index] = time.monotonic()
        for index in range(count, self.count):
            self.due.pop(index, None)
            # No new connection for it: its sockets leave the group at once here, and in
            # the worker as soon as it stops.
            self._close_listeners(index)
            worker = self.workers.get(index)
            if worker is None:
                continue
            worker.leaving = True
            try:
                os.kill(worker.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        self.count = count

def _admin_server(sock: socket.socket, app: Any, spawn: Callable[..., Any]) -> Any:
    """The master's admin listener: a WSGI server that keeps its clients' sockets, so that
    a forked worker closes its copies first thing, and no greenlet of the master ever
    writes to them from the worker."""
    import gevent.pywsgi  # imports ssl: not at module import, before monkey-patching

    class AdminServer(gevent.pywsgi.WSGIServer):
        clients: set[socket.socket] = set()

        def handle(self, sock: socket.socket, address: Any) -> None:
            self.clients.add(sock)
            try:
                super().handle(sock, address)
            finally:
                self.clients.discard(sock)

    return AdminServer(sock, app, log=None, spawn=spawn,
                       error_log=logging.getLogger("geproxy.admin"))


def _become_worker(master: "Master", index: int, sock: socket.socket) -> NoReturn:
    """The forked child of ``master``: it lets go of all that is the master's (its
    signal handlers, the admin listener and its clients, the other workers' channels and
    sockets, its greenlets), then serves as worker ``index`` until it exits."""
    code = 1
    try:
        signal.signal(signal.SIGHUP, signal.SIG_IGN)  # until the worker's handlers
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)
        for handler in master._signals:
            handler.cancel()
        # The master's sockets first: its greenlets, killed next, run their last lines
        # here, and whatever they write then goes nowhere.
        if master.admin is not None:
            # Not close(): a handler's file objects keep the descriptor open. Each one
            # is pointed at a socket connected to nothing, where a write fails.
            dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            for client in list(master.admin.clients):
                os.dup2(dead.fileno(), client.fileno())
            dead.close()
            master.admin.close()
        for worker in master.workers.values():
            worker.channel.sock.close()
        master.tasks.kill(block=True, timeout=2)
        for number in list(master.listeners):
            if number != index:
                master._close_listeners(number)
        code = work(master.server, index, master.listeners[index], sock)
    except BaseException:
        traceback.print_exc()
    finally:
        os._exit(code)


class _WorkersView:
    """What the master's admin listener shows (local.AdminTarget): every worker asked, its
    answers put together, so that /tunnels, /debug/stats and /metrics read as one proxy's."""

    def __init__(self, master: "Master") -> None:
        self.master = master

    @property
    def stopping(self) -> bool:
        """/readyz: 503 once the master stops."""
        return self.master.stopping

    def tunnels(self) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = []
        for index, answer in sorted(self.master._ask_all("tunnels", ASK_TIMEOUT).items()):
            if isinstance(answer, Exception):
                log.warning("/tunnels: worker %d did not answer: %s", index, answer)
                continue
            found.extend(answer)
        return found

    def close_connection(self, conn_id: str) -> bool:
        match = re.match(r"w([0-9]+)c", conn_id)
        worker = self.master.workers.get(int(match.group(1))) if match else None
        if worker is None:
            return False
        try:
            return bool(worker.channel.call("close", ASK_TIMEOUT, id=conn_id))
        except (ChannelClosed, RemoteError) as exc:
            log.warning("closing %s: worker %d did not answer: %s", conn_id, worker.index,
                        exc)
            return False

    def stats(self) -> dict[str, Any]:
        figures = []
        for index, answer in sorted(self.master._ask_all("stats", ASK_TIMEOUT).items()):
            if isinstance(answer, Exception):
                log.warning("/debug/stats: worker %d did not answer: %s", index, answer)
                continue
            figures.append(answer)
        return combine_stats(figures, pid=os.getpid(), generation=self.master.server.gen.number,
                             stopping=self.master.stopping)

    def metrics_exposition(self) -> Optional[tuple[bytes, str]]:
        """The sum of every worker's figures, each one's counts flushed into its files
        first (a worker counts in plain integers between two flushes). A worker that does
        not answer in time shows with what it last flushed (at most a second old). A
        worker that asked for this itself (_MasterLink) answers too: its channel serves
        each request in a greenlet of its own."""
        answers = self.master._ask_all("flush_metrics", FLUSH_TIMEOUT)
        for index, answer in sorted(answers.items()):
            if isinstance(answer, Exception):
                log.warning("/metrics: worker %d did not flush its figures: %s", index,
                            answer)
        workers = self.master.workers.values()
        return exposition(self.master.server.pm, {w.index: w.pid for w in workers})


# -- a worker -------------------------------------------------------------------------------


class _WorkerOps:
    """What a worker does for its master."""

    def __init__(self, server: ProxyServer) -> None:
        self.server = server
        self.pending: Optional[Generation] = None

    def __call__(self, op: str, message: dict[str, Any]) -> Any:
        server = self.server
        if op == "tunnels":
            return server.tunnels()
        if op == "stats":
            return server.process_stats()
        if op == "close":
            return server.close_connection(message["id"])
        if op == "prepare":
            self._drop_pending()
            try:
                self.pending = server.prepare(message["text"])
            except Exception as exc:
                raise RemoteError(reload_failure(exc)) from None
            return None
        if op == "commit":
            if self.pending is None:
                raise RemoteError("nothing prepared")
            new, self.pending = self.pending, None
            server.install(new)
            return None
        if op == "abort":
            self._drop_pending()
            return None
        if op == "flush_metrics":
            # Its figures are the server's, whichever configuration counted into them.
            flush_metrics(server.pm)
            return None
        raise RemoteError(f"unknown request {op!r}")

    def _drop_pending(self) -> None:
        if self.pending is not None:
            self.pending.unconfigure()
            self.pending = None


class _MasterLink:
    """A worker's way to what only its master knows (ProxyServer.coordinator)."""

    def __init__(self, channel: Channel) -> None:
        self.channel = channel

    def metrics_exposition(self) -> Optional[tuple[bytes, str]]:
        # The master asks this worker to flush too while this greenlet waits: the channel
        # serves that request in a greenlet of its own (no deadlock).
        try:
            found = self.channel.call("metrics", ASK_TIMEOUT)
        except (ChannelClosed, RemoteError) as exc:
            log.warning("metrics: the master did not answer: %s", exc)
            return None
        return None if found is None else (found[0].encode(), found[1])


def work(server: ProxyServer, index: int,
         listeners: list[tuple[socket.socket, ListenAddress]], sock: socket.socket) -> int:
    """Serve as worker ``index`` on ``listeners`` until stopped; ``sock``: the line to the
    master, which stops this worker when it breaks (the master is gone)."""
    server.worker = index
    server.conn_prefix = f"w{index}"
    name_process(f"worker {index}")
    channel = Channel(sock, _WorkerOps(server), gevent.spawn,
                      on_close=lambda: gevent.spawn(server.stop))
    server.coordinator = _MasterLink(channel)
    for signum in (signal.SIGTERM, signal.SIGINT):
        gevent.signal_handler(signum, lambda: gevent.spawn(server.stop))
    gevent.signal_handler(signal.SIGUSR1, server.reopen_logs)
    gevent.signal_handler(signal.SIGHUP, lambda: log.warning(
        "SIGHUP ignored: the master (pid %d) reloads every worker at once", os.getppid()))
    try:
        server.start(listeners=listeners, admin=False)
    except OSError as exc:
        print(f"geproxy: worker {index}: cannot listen: {exc.strerror or exc}",
              file=sys.stderr)
        return 2
    try:
        channel.tell("ready", worker=index)
    except ChannelClosed:
        server.stop(timeout=0)
    server.wait()
    channel.close()
    return 0


# -- one process, or a master ---------------------------------------------------------------


def serve(server: ProxyServer) -> int:
    """Run one server until SIGTERM or SIGINT has drained it; SIGHUP reloads, SIGUSR1
    reopens logs. Returns the exit status: 0, or 2 when a listen address cannot be bound."""
    for signum in (signal.SIGTERM, signal.SIGINT):
        gevent.signal_handler(signum, lambda: gevent.spawn(server.stop))
    gevent.signal_handler(signal.SIGUSR1, server.reopen_logs)
    gevent.signal_handler(signal.SIGHUP, lambda: gevent.spawn(server.reload))
    try:
        server.serve_forever()
    except OSError as exc:
        print(f"geproxy: cannot listen: {exc.strerror or exc}", file=sys.stderr)
        return 2
    return 0


def run(path: str, load: Callable[..., ProxyServer] = create_server) -> int:
    """Run the proxy of the file at ``path``: this process serves (``workers = 1``), or a
    master and its workers do. Returns the exit status (2 for a bad configuration)."""
    try:
        text = read_text(path)
    except ConfigError as exc:
        print(exc.report(), file=sys.stderr)
        return 2
    try:
        server = load(path, text=text)
    except ConfigError as exc:
        print(exc.report(), file=sys.stderr)
        return 2
    count = server.config.core["workers"]
    if count <= 1:
        return serve(server)
    name_process("master")
    return Master(server, count).run()
