"""The processes of one external ACL helper, in one worker: started on first use, fed one
line per question, restarted when they die, killed when they hang.

Invariants:

- A process is started only by ``Helpers.ask`` (a request in a worker), never at configure.
- At most ``children`` processes, each with at most ``slots`` questions in flight
  (``concurrency``, or 1 when it is 0: then no channel id, answers in order). Questions beyond
  that wait for a slot; at most ``queue`` of them wait, the next is refused (503). A waiter
  gives up after the longest its turn can take when every process runs to its timeout.
- Every question waits at most ``timeout`` for its answer; past it the process is killed
  by its PID (a helper that hangs on one question is not trusted with the next), its other
  questions fail with it, and the next question starts a fresh process.
- Starts are counted per minute: past ``MAX_STARTS_PER_MINUTE`` a helper that keeps dying
  is not started again until the minute passes (logged as an error): questions fail (503)
  rather than fork a crashing program in a loop. A restart after a death waits a little
  (``RESTART_DELAY``, doubling with each recent death).
"""

from __future__ import annotations

import collections
import itertools
import logging
import os
import signal
import time
from typing import Callable, Optional, Sequence

import gevent
import gevent.event
import gevent.lock
from gevent import subprocess

from geproxy import errors

from .protocol import Answer, parse_answer

__all__ = ["Helpers", "Unavailable"]

log = logging.getLogger(__name__)

DETAILS = "external ACL helper unavailable"
MAX_STARTS_PER_MINUTE = 30
RESTART_DELAY = 0.05
MAX_RESTART_DELAY = 2.0
#: The longest line a helper may answer (a longer one kills the process).
MAX_LINE = 64 * 1024


class Unavailable(errors.BackendUnavailable):
    """The helper could not answer: 503."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail, details=DETAILS)


class _Process:
    """One running helper program and the questions in flight on it."""

    def __init__(self, name: str, argv: Sequence[str], channels: bool) -> None:
        self.name = name
        self.channels = channels
        self.popen = subprocess.Popen(list(argv), stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      close_fds=True)
        self.pid = self.popen.pid
        self.alive = True
        self._ids = itertools.count()
        #: channel id -> waiting answer (channels), or the answers in order (no channels).
        self.pending: dict[int, gevent.event.AsyncResult] = {}
        self.order: collections.deque[gevent.event.AsyncResult] = collections.deque()
        self._lock = gevent.lock.RLock()  # one writer at a time on stdin
        self._reaper: Optional[gevent.Greenlet] = None
        self._reader = gevent.spawn(self._read)
        self._errors = gevent.spawn(self._log_stderr)
        log.info("external helper %s: started process %d", name, self.pid)

    @property
    def in_flight(self) -> int:
        return len(self.pending) if self.channels else len(self.order)

    def send(self, line: str) -> gevent.event.AsyncResult:
        result = gevent.event.AsyncResult()
        with self._lock:
            if not self.alive:
                raise Unavailable(f"external helper {self.name}: process {self.pid} died")
            if self.channels:
                channel = next(self._ids)
                self.pending[channel] = result
                data = f"{channel} {line}\n"
            else:
                self.order.append(result)
                data = f"{line}\n"
            try:
                assert self.popen.stdin is not None
                self.popen.stdin.write(data.encode("utf-8"))
                self.popen.stdin.flush()
            except OSError as exc:
                self.die(f"cannot write to it: {exc}")
        return result

    def _read(self) -> None:
        stdout = self.popen.stdout
        assert stdout is not None
        reason = "it closed its output (exited)"
        try:
            while self.alive:
                raw = stdout.readline(MAX_LINE + 1)
                if not raw:
                    break
                if len(raw) > MAX_LINE:
                    reason = "an answer over 64 KiB"
                    break
                try:
                    answer = parse_answer(raw.decode("utf-8", "replace"), self.channels)
                except ValueError as exc:
                    reason = f"a line that is no answer: {exc}"
                    break
                waiting = self._take(answer)
                if waiting is None:
                    reason = f"an answer to no question (channel {answer.channel})"
                    break
                waiting.set(answer)
        except OSError as exc:
            reason = f"reading its output failed: {exc}"
        self.die(reason)

    def _take(self, answer: Answer) -> Optional[gevent.event.AsyncResult]:
        if self.channels:
            return self.pending.pop(answer.channel, None)  # type: ignore[arg-type]
        return self.order.popleft() if self.order else None

    def _log_stderr(self) -> None:
        stderr = self.popen.stderr
        assert stderr is not None
        try:
            for raw in iter(lambda: stderr.readline(MAX_LINE), b""):
                log.warning("external helper %s[%d]: %s", self.name, self.pid,
                            raw.decode("utf-8", "replace").rstrip())
        except OSError:
            pass  # the pipe closed with the process

    def die(self, reason: str, level: int = logging.ERROR) -> None:
        """Kill the process (by its PID) and fail every question in flight on it."""
        if not self.alive:
            return
        self.alive = False
        log.log(level, "external helper %s: process %d stopped: %s", self.name, self.pid, reason)
        self._kill()
        failed = Unavailable(f"external helper {self.name}: process {self.pid} {reason}")
        for waiting in [*self.pending.values(), *self.order]:
            waiting.set_exception(failed)
        self.pending.clear()
        self.order.clear()

    def _kill(self) -> None:
        try:
            if self.popen.poll() is None:
                os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            if self.popen.stdin is not None:
                self.popen.stdin.close()
        except OSError:
            pass
        self._reaper = gevent.spawn(self._reap)

    def _reap(self) -> None:
        """Wait for the process, let its readers end, close their pipes."""
        try:
            self.popen.wait(timeout=5)
        except subprocess.TimeoutExpired:
            log.error("external helper %s: process %d did not exit", self.name, self.pid)
        readers = [g for g in (self._reader, self._errors) if g is not gevent.getcurrent()]
        gevent.joinall(readers, timeout=1)
        gevent.killall(readers, timeout=1)
        for pipe in (self.popen.stdout, self.popen.stderr):
            if pipe is not None:
                pipe.close()

    def stop(self) -> None:
        """Kill the process and wait until it is reaped and its pipes are closed."""
        self.die("stopped (reload or stop)", logging.INFO)
        if self._reaper is not None:
            self._reaper.join(timeout=6)


class Helpers:
    """The processes of one helper (``NAME: FORMAT: COMMAND``) in this worker."""

    def __init__(self, name: str, argv: Sequence[str], children: int, concurrency: int,
                 timeout: float, queue: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.name = name
        self.argv = tuple(argv)
        self.children = children
        self.channels = concurrency > 0
        self.slots = max(1, concurrency)
        self.timeout = timeout
        self.queue = queue
        self.clock = clock
        self.processes: list[_Process] = []
        self._free = gevent.lock.BoundedSemaphore(children * self.slots)
        self._waiting = 0
        self._starts: collections.deque[float] = collections.deque()
        self._deaths = 0
        self._closed = False

    @property
    def waiting(self) -> int:
        """Questions waiting for a free process now."""
        return self._waiting

    @property
    def pids(self) -> list[int]:
        """The PIDs of the processes running now."""
        return [p.pid for p in self.processes if p.alive]

    def ask(self, line: str) -> Answer:
        """The helper's answer to ``line``; Unavailable when none comes in time."""
        if self._closed:
            raise Unavailable(f"external helper {self.name}: stopped")
        if not self._free.acquire(blocking=False):
            if self._waiting >= self.queue:
                raise Unavailable(f"external helper {self.name}: {self._waiting} questions "
                                  "wait already (every process busy)")
            self._waiting += 1
            try:
                # Every question in flight ends within timeout (answered or killed), and at
                # most queue wait: a waiter's turn comes within this, unless processes
                # cannot start at all.
                patience = self.timeout * (1 + self.queue / (self.children * self.slots))
                if not self._free.acquire(timeout=patience):
                    raise Unavailable(f"external helper {self.name}: no process free "
                                      f"within {patience:g}s")
            finally:
                self._waiting -= 1
        try:
            process = self._process()
            waiting = process.send(line)
            try:
                answer: Answer = waiting.get(timeout=self.timeout)
            except gevent.Timeout:
                process.die(f"no answer within {self.timeout:g}s (killed)")
                raise Unavailable(f"external helper {self.name}: no answer within "
                                  f"{self.timeout:g}s") from None
            self._deaths = 0  # a process answered: the next restart need not wait
            return answer
        finally:
            self._free.release()

    def _process(self) -> _Process:
        """A live process with a free slot; started when every live one is full."""
        alive = [p for p in self.processes if p.alive]
        self._deaths += len(self.processes) - len(alive)
        self.processes = alive
        for process in self.processes:
            if process.in_flight < self.slots:
                return process
        return self._start()

    def _start(self) -> _Process:
        now = self.clock()
        while self._starts and self._starts[0] < now - 60:
            self._starts.popleft()
        if self._deaths and len(self._starts) >= MAX_STARTS_PER_MINUTE:
            log.error("external helper %s: started %d times within a minute; not starting "
                      "it again before the minute passes: %s", self.name, len(self._starts),
                      " ".join(self.argv))
            raise Unavailable(f"external helper {self.name}: restarted too often")
        if self._deaths:
            # A program that keeps dying is not forked in a tight loop.
            gevent.sleep(min(MAX_RESTART_DELAY, RESTART_DELAY * 2 ** min(self._deaths, 6)))
        self._starts.append(now)
        try:
            process = _Process(self.name, self.argv, self.channels)
        except OSError as exc:
            self._deaths += 1
            log.error("external helper %s: cannot start %s: %s", self.name, self.argv[0],
                      exc)
            raise Unavailable(f"external helper {self.name}: cannot start it") from None
        self.processes.append(process)
        return process

    def stop(self) -> None:
        """Kill every process by its PID; further questions fail."""
        self._closed = True
        for process in self.processes:
            process.stop()
        self.processes = []
