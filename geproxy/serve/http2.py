"""HTTP/2 from clients to the proxy (RFC 9113): many tunnels and requests on one connection.

A client that chose ``h2`` by ALPN on a TLS listener (``[tls] http2 = on``) speaks HTTP/2.
Each stream is one request, served by a greenlet of its own through the same hooks and
errors as a request on HTTP/1.1 (a CONNECT stream's greenlet lets go once its tunnel has
relayed for DETACH_AFTER, as an HTTP/1.1 tunnel's does):

- a CONNECT (RFC 9113 section 8.5) is a tunnel: "200" on the stream, then its DATA frames
  carry the tunnel's bytes; the client's END_STREAM is a half-close of the upstream, the
  upstream's FIN an END_STREAM; a reset of either side resets the other (CONNECT_ERROR);
- any other request for an ``http://`` target is forwarded as HTTP/1.1 upstream by the
  code that forwards HTTP/1.1 requests (``forward.py``), its answer turned into HEADERS
  and DATA frames.

Flow control is per stream, both ways. The proxy hands a stream's receive window back only
as its bytes go upstream, so a stream whose upstream is slow stops its client without
stopping the others (the connection's window is as large as all streams' windows
together); it reads from an upstream only as much as that stream's send window allows.
The h2 package does the framing and the state machine; this module does the connection's
I/O, h2stream.py serves each stream, h2tunnel.py relays a CONNECT stream's bytes.
"""

from __future__ import annotations

import socket
import time
from collections import deque
from typing import Any, Optional

import gevent
import gevent.event
import gevent.pool
import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings

from .client import ClientConnection
from .h2stream import H2Stream

__all__ = ["serve_h2", "STREAM_WINDOW"]

RECV_SIZE = 64 * 1024
#: The bound h2 itself enforces on open streams before the client acknowledged the
#: proxy's max_streams (see _H2Connection).
UNACKNOWLEDGED_STREAMS = 10_000
#: Bytes a client may send on one stream before the proxy has passed them upstream.
STREAM_WINDOW = 256 * 1024
#: Bytes queued for the client past which the proxy stops producing more for it (relays
#: stop reading their upstreams, the reader stops reading the client) until the writer has
#: sent them down to OUTGOING_LOW: a client that reads nothing costs no more than this,
#: whatever windows it grants or however many PINGs it sends.
OUTGOING_HIGH = 1024 * 1024
OUTGOING_LOW = 256 * 1024
#: Streams a client may reset (or have refused) per second on one connection, over
#: max_streams: more is the "rapid reset" attack, and the connection is closed.
RESETS_PER_SECOND = 200
_REFUSED = h2.errors.ErrorCodes.REFUSED_STREAM
_CALM = h2.errors.ErrorCodes.ENHANCE_YOUR_CALM


def serve_h2(conn: ClientConnection) -> None:
    """Serve ``conn`` (its TLS handshake done, ALPN h2) until the client or a stop ends it."""
    H2Connection(conn).serve()


class H2Connection:
    """One client connection speaking HTTP/2: its reader (this greenlet: frames in, events
    to streams), its writer greenlet (frames out, in order), its streams, and the bounds
    that keep one client from costing more than its share (streams, resets, queued bytes).
    """

    def __init__(self, conn: ClientConnection) -> None:
        self.conn = conn
        self.sock = conn.sock
        tls = conn.gen.config["tls"]
        self.max_streams: int = tls["max_streams"]
        config = h2.config.H2Configuration(client_side=False, header_encoding="latin-1")
        self.h2 = h2.connection.H2Connection(config=config)
        # Until the client acknowledges max_streams it may open more (legally: it has not
        # heard of the limit). h2 would take those as a connection error, and it could not
        # refuse one stream alone without losing its header block; so h2 enforces a wide
        # bound until the acknowledgement, and _request refuses what is over max_streams.
        self.h2.local_settings = h2.settings.Settings(client=False, initial_values={
            h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: UNACKNOWLEDGED_STREAMS,
            h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
            h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: conn.gen.config.core["max_header_size"],
        })
        self.streams: dict[int, H2Stream] = {}
        self.group = gevent.pool.Group()
        #: Bytes for the client, sent in order by the writer greenlet: a stream's greenlet
        #: never waits on the socket, so killing one never cuts a frame in half.
        self.outgoing: deque[bytes] = deque()
        self.queued = 0
        #: Set while ``queued`` is over OUTGOING_HIGH; cleared under OUTGOING_LOW.
        self.choked = False
        self._unchoked = gevent.event.Event()
        self._unchoked.set()
        #: Relays that stopped reading their upstream while choked.
        self.paused: set[Any] = set()
        #: Client resets in the current second: (second, count).
        self._resets = (0, 0)
        self._wake = gevent.event.Event()
        self._writer: Optional[gevent.Greenlet] = None
        self.closed = False
        self.goaway_sent = False
        #: The connection's greenlet, which reads; a stop ends it once no stream is left.
        self.reader: Optional[gevent.Greenlet] = None
        #: Since when nothing happened on the connection: the client's last byte, or the
        #: end of its last stream. idle_timeout counts from here.
        self.quiet_since = time.monotonic()

    # -- the connection's greenlet: reading ---------------------------------------------

    def serve(self) -> None:
        conn = self.conn
        core = conn.gen.config.core
        idle = core["idle_timeout"]
        if conn.refusal is not None:  # refused at connect: its one request is due soon
            idle = min(idle, core["header_timeout"])
        server = conn.server
        me = self.reader = gevent.getcurrent()
        self._writer = gevent.spawn(self._write_loop)
        try:
            self.h2.initiate_connection()
            self.h2.update_settings({
                h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: self.max_streams})
            # The connection's window holds every stream's: streams stall one by one.
            self.h2.increment_flow_control_window(self.max_streams * STREAM_WINDOW)
            self.flush()
            self.quiet_since = time.monotonic()
            while True:
                if self.choked:  # the client reads nothing: read nothing from it either
                    if not self._unchoked.wait(idle):
                        break
                    if self.closed:
                        break
                waiting = not self.streams
                if waiting:
                    server.waiting.add(me)  # a stop may end it at once
                    if server.stopping:
                        break
                try:
                    self.sock.settimeout(idle)
                    data = self.sock.recv(RECV_SIZE)
                except socket.timeout:
                    if not self.streams and time.monotonic() - self.quiet_since >= idle:
                        break  # idle: nothing open and nothing said
                    continue
                finally:
                    if waiting:
                        server.waiting.discard(me)
                if not data:
                    break
                self.quiet_since = time.monotonic()
                try:
                    events = self.h2.receive_data(data)
                except h2.exceptions.ProtocolError as exc:
                    conn.log.info("HTTP/2 protocol error: %s", exc)
                    self._goaway(getattr(exc, "error_code", h2.errors.ErrorCodes.PROTOCOL_ERROR))
                    break
                for event in events:
                    try:
                        self._event(event)
                    except h2.exceptions.StreamClosedError:
                        pass  # reset by the client later in the same read: nothing to do
                self.flush()
                if self.closed:
                    break
        except OSError as exc:  # the client reset, or a write to it failed
            conn.log.debug("HTTP/2 connection ended: %s", exc)
        finally:
            self.reader = None  # ending already: no stream's end may kill it again
            try:
                for stream in list(self.streams.values()):
                    stream.cut("client" if not server.stopping else "shutdown")
                self.group.join(timeout=5)  # the ends of detached tunnels write records
                self.group.kill(block=True, timeout=1)
                self._goaway(h2.errors.ErrorCodes.NO_ERROR)
                self.closed = True
                self._wake.set()
                self._writer.join(timeout=1)  # the last frames, if the client takes them
            finally:
                self.closed = True
                self._unchoked.set()
                self._writer.kill(block=False)  # cannot be cut short by a kill of ours

    def _event(self, event: Any) -> None:
        if isinstance(event, h2.events.RequestReceived):
            self._request(event)
        elif isinstance(event, h2.events.DataReceived):
            stream = self.streams.get(event.stream_id)
            if stream is None:  # its tunnel already ended: give the window back
                self.ack(event.flow_controlled_length, event.stream_id)
            else:
                stream.received(event.data, event.flow_controlled_length)
                if event.stream_ended:
                    stream.received(None, 0)
        elif isinstance(event, h2.events.StreamEnded):
            stream = self.streams.get(event.stream_id)
            if stream is not None:
                stream.received(None, 0)
        elif isinstance(event, h2.events.StreamReset):
            self._count_reset()
            stream = self.streams.get(event.stream_id)
            if stream is not None:
                stream.cut("client reset")
        elif isinstance(event, h2.events.WindowUpdated):
            if event.stream_id:
                stream = self.streams.get(event.stream_id)
                if stream is not None:
                    stream.window_opened()
            else:
                for stream in self.streams.values():
                    stream.window_opened()
        elif isinstance(event, h2.events.RemoteSettingsChanged):
            for stream in self.streams.values():
                stream.window_opened()
        elif isinstance(event, h2.events.ConnectionTerminated):
            # The client's GOAWAY. HTTP/2 would let its open streams finish, but the h2
            # state machine takes no frame after a GOAWAY, so they end here.
            self.closed = True
            for stream in list(self.streams.values()):
                stream.cut("client")

    def _request(self, event: Any) -> None:
        stream_id = event.stream_id
        conn = self.conn
        if conn.server.stopping or self.closed or len(self.streams) >= self.max_streams or (
                conn.refusal is not None and conn.ctx.requests):
            # A connection refused at connect answers its first stream only.
            self.h2.reset_stream(stream_id, _REFUSED)  # the client may try it again
            self._count_reset()
            return
        fields = [(k, v) for k, v in event.headers]
        stream = H2Stream(self, stream_id, fields, event.stream_ended)
        self.streams[stream_id] = stream
        conn.ctx.requests += 1
        self.group.spawn(stream.run)

    # -- writing ------------------------------------------------------------------------

    def flush(self) -> None:
        """Queue what the h2 state machine has for the client; never waits."""
        data = self.h2.data_to_send()
        if data:
            self.outgoing.append(data)
            self.queued += len(data)
            if self.queued > OUTGOING_HIGH and not self.choked:
                self.choked = True
                self._unchoked.clear()
            self._wake.set()

    def wait_unchoked(self, timeout: float) -> bool:
        """For a greenlet about to make more for the client: wait while it is choked."""
        return self._unchoked.wait(timeout)

    def _write_loop(self) -> None:
        try:
            while True:
                self._wake.wait()
                self._wake.clear()
                while self.outgoing:
                    data = b"".join(self.outgoing)
                    self.outgoing.clear()
                    self.sock.sendall(data)
                    self.queued -= len(data)
                    if self.choked and self.queued <= OUTGOING_LOW:
                        self._unchoke()
                if self.closed:
                    return
        except OSError as exc:  # the client is gone or stopped reading for idle_timeout
            self.conn.log.debug("HTTP/2 write failed: %s", exc)
            self.closed = True
            try:
                self.sock.shutdown(socket.SHUT_RDWR)  # the reader sees it and ends all
            except OSError:
                pass

    def _unchoke(self) -> None:
        self.choked = False
        self._unchoked.set()
        paused, self.paused = self.paused, set()
        for relay in paused:
            relay.window_opened()

    def _count_reset(self) -> None:
        second, count = self._resets
        now = int(time.monotonic())
        count = count + 1 if now == second else 1
        self._resets = (now, count)
        if count > RESETS_PER_SECOND + self.max_streams and not self.closed:
            self.conn.log.warning("HTTP/2: %d streams reset in a second; closing "
                                  "(ENHANCE_YOUR_CALM)", count)
            self._goaway(_CALM)
            self.closed = True

    def _goaway(self, code: int) -> None:
        """GOAWAY, once: the client opens no more streams."""
        if self.goaway_sent:
            return
        self.goaway_sent = True
        try:
            self.h2.close_connection(error_code=code)
            self.flush()
        except (h2.exceptions.ProtocolError, OSError):
            pass

    def ack(self, size: int, stream_id: int) -> None:
        """``size`` bytes of ``stream_id`` were passed on: the client may send as many more
        (on a closed stream, h2 gives back only the connection's share)."""
        if size:
            self.h2.acknowledge_received_data(size, stream_id)

    def ended(self, stream: "H2Stream") -> None:
        self.streams.pop(stream.stream_id, None)
        if not self.streams:  # idle from now, not from the client's last byte
            self.quiet_since = time.monotonic()
        left = stream.unacked
        if left and not self.closed:  # received, never passed on: back to the connection
            stream.unacked = 0
            self.ack(left, stream.stream_id)
            self.flush()
        if not self.streams and self.reader is not None and (
                self.conn.server.stopping or self.conn.refusal is not None):
            # Draining, or refused at connect and its one answer given: the last stream
            # is done, so is the connection (GOAWAY, close).
            self.reader.kill(block=False)
