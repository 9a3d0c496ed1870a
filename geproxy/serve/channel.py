"""A master's line to one of its workers: JSON lines over a socketpair, calls both ways.

Either end may call the other (``call``: a request and its answer) or tell it something
(``tell``: no answer). Each request is served in a greenlet of its own, so a slow one (a
worker loading a configuration) does not hold up another (the admin listener asking for
figures). Both ends are processes of one geproxy, so the channel trusts what it reads; a
line over MAX_LINE is still refused, as a guard against a bug filling the master's memory.
"""

from __future__ import annotations

import itertools
import json
import logging
import socket
from typing import Any, Callable, Optional

import gevent
import gevent.event
import gevent.lock

__all__ = ["Channel", "ChannelClosed", "RemoteError"]

#: Named as log filters know it, wherever the module sits (docs/deployment.md).
log = logging.getLogger("geproxy.channel")

#: The longest line: a /tunnels answer of a worker with 100,000 tunnels fits.
MAX_LINE = 64 * 1024 * 1024

#: ``handler(op, args)``: what one end does when the other asks ``op`` with ``args``.
Handler = Callable[[str, dict[str, Any]], Any]


class ChannelClosed(Exception):
    """The other end is gone (its process ended), or did not answer in time."""


class RemoteError(Exception):
    """The other end's handler raised; the message is what it said, in one line."""


class Channel:
    """One end of a socketpair. ``handler(op, message)`` serves the other end's requests;
    ``on_close`` is called once when the other end is gone."""

    def __init__(self, sock: socket.socket, handler: Handler, spawn: Callable[..., Any],
                 on_close: Optional[Callable[[], None]] = None) -> None:
        self.sock = sock
        self.handler = handler
        self.spawn = spawn
        self.on_close = on_close
        self.closed = False
        self._ids = itertools.count(1)
        self._waiting: dict[int, gevent.event.AsyncResult] = {}
        self._lock = gevent.lock.Semaphore()
        self.reader = spawn(self._read)

    def call(self, op: str, timeout: float, **args: Any) -> Any:
        """Ask the other end and wait (``timeout`` seconds at most) for its answer; raises
        ChannelClosed, or RemoteError with what its handler raised."""
        ident = next(self._ids)
        waiter = self._waiting[ident] = gevent.event.AsyncResult()
        try:
            self._send({"call": ident, "op": op, "args": args})
            return waiter.get(timeout=timeout)
        except gevent.Timeout:
            raise ChannelClosed(f"no answer to {op} in {timeout:g}s") from None
        finally:
            self._waiting.pop(ident, None)

    def tell(self, op: str, **args: Any) -> None:
        """Tell the other end, expecting no answer; raises ChannelClosed when it is gone."""
        self._send({"op": op, "args": args})

    def close(self) -> None:
        """Close this end (the reader ends, waiting calls fail)."""
        if not self.closed:
            self.closed = True
            self.sock.close()
            self._fail_waiting()

    def _send(self, message: dict[str, Any]) -> None:
        line = json.dumps(message, separators=(",", ":")).encode() + b"\n"
        with self._lock:  # one line at a time: greenlets answer concurrently
            try:
                self.sock.sendall(line)
            except OSError as exc:
                raise ChannelClosed(f"sending {message.get('op', 'an answer')}: {exc}"
                                    ) from None

    def _read(self) -> None:
        buffer = b""
        try:
            while True:
                data = self.sock.recv(256 * 1024)
                if not data:
                    break
                buffer += data
                while b"\n" in buffer:
                    line, buffer = buffer.split(b"\n", 1)
                    self._dispatch(json.loads(line))
                if len(buffer) > MAX_LINE:
                    log.error("channel: a line over %d bytes; closing", MAX_LINE)
                    break
        except OSError:
            pass
        finally:
            self.closed = True
            self._fail_waiting()
            if self.on_close is not None:
                self.on_close()

    def _fail_waiting(self) -> None:
        for waiter in list(self._waiting.values()):
            if not waiter.ready():
                waiter.set_exception(ChannelClosed("the other end is gone"))

    def _dispatch(self, message: dict[str, Any]) -> None:
        if "re" in message:  # an answer to one of our calls
            waiter = self._waiting.get(message["re"])
            if waiter is None:
                return  # its caller gave up waiting
            if "error" in message:
                waiter.set_exception(RemoteError(message["error"]))
            else:
                waiter.set(message.get("result"))
            return
        self.spawn(self._serve, message)

    def _serve(self, message: dict[str, Any]) -> None:
        ident = message.get("call")
        try:
            answer: dict[str, Any] = {"result": self.handler(message["op"],
                                                             message.get("args", {}))}
        except Exception as exc:
            if not isinstance(exc, RemoteError):
                log.exception("channel: serving %s failed", message.get("op"))
            answer = {"error": str(exc) or type(exc).__name__}
        if ident is None:
            return
        answer["re"] = ident
        try:
            self._send(answer)
        except ChannelClosed:
            pass  # the caller's process is gone: nobody waits for this answer
