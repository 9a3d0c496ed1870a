"""An HTTP/2 client for tests of the proxy's h2 side, built on the h2 package (not on
geproxy's code): CONNECT tunnels and requests as streams of one TLS connection.

    client = H2Client(proxy.tls_address, ca_file)
    stream = client.connect("origin.test:443")      # a tunnel: send(), recv(), end()
    status, headers, body = client.request("GET", "http://origin.test/")
"""

from __future__ import annotations

import socket
import ssl
from collections import deque
from typing import Any, Optional

import gevent
import gevent.event
import gevent.lock
import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings

__all__ = ["H2Client", "H2ClientStream"]


class H2ClientStream:
    """One stream: the answer's head, and the DATA that came, given back to the proxy's
    window only as ``recv`` takes it (so a test can leave a stream unread)."""

    def __init__(self, client: "H2Client", stream_id: int) -> None:
        self.client = client
        self.stream_id = stream_id
        self.headers: Optional[list[tuple[str, str]]] = None
        #: The interim (1xx) answers that came before the final head, each its fields.
        self.interim: list[list[tuple[str, str]]] = []
        #: The trailer fields, if the answer ended with some.
        self.trailers: Optional[list[tuple[str, str]]] = None
        self.data: deque[bytes] = deque()
        self.ended = False
        #: The error code of a RST_STREAM (from the proxy, or the connection's end).
        self.reset: Optional[int] = None
        self.changed = gevent.event.Event()

    @property
    def status(self) -> Optional[int]:
        if self.headers is None:
            return None
        return int(dict(self.headers)[":status"])

    def wait_interim_or_head(self, timeout: float = 10) -> Optional[int]:
        """The status of the first interim (1xx) answer or of the final head, whichever
        comes first; None when neither came within ``timeout`` (a client that expects
        100-continue waits that long, then sends its body anyway); ConnectionResetError at
        a reset before either."""
        with gevent.Timeout(timeout, False):
            while not self.interim and self.headers is None and self.reset is None:
                self._wait()
        if self.interim:
            return int(dict(self.interim[0])[":status"])
        if self.headers is not None:
            return self.status
        if self.reset is not None:
            raise ConnectionResetError(f"stream {self.stream_id} reset: {self.reset}")
        return None

    def wait_head(self, timeout: float = 10) -> int:
        with gevent.Timeout(timeout, AssertionError("no answer head in time")):
            while self.headers is None and self.reset is None:
                self._wait()
        if self.headers is None:
            raise ConnectionResetError(f"stream {self.stream_id} reset: {self.reset}")
        return self.status  # type: ignore[return-value]

    def _wait(self) -> None:
        self.changed.clear()
        if self.client.error is not None:
            raise self.client.error
        self.changed.wait()

    def wait_for(self, marker: bytes, timeout: float = 10) -> None:
        """Wait until the DATA received and not read yet contains ``marker``;
        AssertionError if the stream ended or was reset first."""
        with gevent.Timeout(timeout, AssertionError(f"{marker!r} did not come in time")):
            while marker not in b"".join(self.data):
                assert not self.ended and self.reset is None, (
                    f"stream {self.stream_id} ended before {marker!r} came")
                self._wait()

    def recv(self, timeout: float = 10) -> bytes:
        """The next DATA bytes; b"" at END_STREAM; ConnectionResetError at a reset."""
        with gevent.Timeout(timeout, AssertionError("no DATA in time")):
            while not self.data and not self.ended and self.reset is None:
                self._wait()
        if self.data:
            piece = self.data.popleft()
            self.client.ack(self.stream_id, len(piece))
            return piece
        if self.ended:  # a whole answer; a RST_STREAM(NO_ERROR) after it changes nothing
            return b""
        raise ConnectionResetError(f"stream {self.stream_id} reset: {self.reset}")

    def read_all(self, timeout: float = 30) -> bytes:
        out: list[bytes] = []
        with gevent.Timeout(timeout, AssertionError("stream not ended in time")):
            while True:
                piece = self.recv(timeout)
                if not piece:
                    return b"".join(out)
                out.append(piece)

    def send(self, data: bytes, end: bool = False, timeout: float = 30) -> None:
        self.client.send_data(self.stream_id, data, end, timeout)

    def end(self) -> None:
        self.client.send_data(self.stream_id, b"", True, 10)

    def cancel(self) -> None:
        self.client.reset_stream(self.stream_id)


class H2Client:
    """One TLS connection to the proxy, ALPN h2; a greenlet reads and dispatches."""

    def __init__(self, address: tuple[str, int], ca_file: str,
                 cert_file: Optional[str] = None, window: int = 65535,
                 timeout: float = 10, validate: bool = True) -> None:
        """``validate=False``: the client's h2 state lets it send fields HTTP/2 forbids
        (connection-specific ones, upper case names), to test how the proxy refuses them."""
        context = ssl.create_default_context(cafile=ca_file)
        context.set_alpn_protocols(["h2"])
        if cert_file is not None:
            context.load_cert_chain(cert_file)
        raw = socket.create_connection(address, timeout=timeout)
        self.sock = context.wrap_socket(raw, server_hostname=address[0])
        if self.sock.selected_alpn_protocol() != "h2":
            self.sock.close()
            raise AssertionError("the proxy did not agree to h2")
        self.sock.settimeout(None)
        config = h2.config.H2Configuration(client_side=True, header_encoding="utf-8",
                                           validate_outbound_headers=validate,
                                           normalize_outbound_headers=validate)
        self.conn = h2.connection.H2Connection(config=config)
        self.conn.local_settings = h2.settings.Settings(client=True, initial_values={
            h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: window,
            h2.settings.SettingCodes.ENABLE_PUSH: 0,
        })
        self.conn.initiate_connection()
        # As browsers and Go do: the connection's window is wide, the streams' windows are
        # what holds each stream back, so one unread stream cannot starve the others.
        self.conn.increment_flow_control_window(2**30)
        self._sending = gevent.lock.Semaphore()
        self.streams: dict[int, H2ClientStream] = {}
        self.window_open = gevent.event.Event()
        self.settings_acked = gevent.event.Event()
        self.remote_settings = gevent.event.Event()
        self.error: Optional[BaseException] = None
        #: The GOAWAY received, if any: (error code, last stream id).
        self.goaway: Optional[tuple[int, int]] = None
        self.flush()
        self.reader = gevent.spawn(self._read)

    def flush(self) -> None:
        with self._sending:  # one sender at a time, frames in the order made
            data = self.conn.data_to_send()
            if data:
                self.sock.sendall(data)

    @property
    def max_concurrent_streams(self) -> int:
        self.remote_settings.wait(10)
        return self.conn.remote_settings.max_concurrent_streams

    def _read(self) -> None:
        try:
            while True:
                data = self.sock.recv(65536)
                if not data:
                    raise ConnectionResetError("the proxy closed the connection")
                for event in self.conn.receive_data(data):
                    self._event(event)
                self.flush()
        except BaseException as exc:  # noqa: B036 - the reader ends; waiters learn why
            self.error = exc if not isinstance(exc, gevent.GreenletExit) else (
                ConnectionResetError("client closed"))
            for stream in self.streams.values():
                if not stream.ended and stream.reset is None:
                    stream.reset = -1
                stream.changed.set()
            self.window_open.set()
            if isinstance(exc, gevent.GreenletExit):
                raise

    def _event(self, event: Any) -> None:
        stream = self.streams.get(getattr(event, "stream_id", 0) or 0)
        if isinstance(event, h2.events.ResponseReceived) and stream is not None:
            stream.headers = [(str(k), str(v)) for k, v in event.headers]
        elif isinstance(event, h2.events.InformationalResponseReceived) and stream is not None:
            stream.interim.append([(str(k), str(v)) for k, v in event.headers])
        elif isinstance(event, h2.events.TrailersReceived) and stream is not None:
            stream.trailers = [(str(k), str(v)) for k, v in event.headers]
        elif isinstance(event, h2.events.DataReceived) and stream is not None:
            if event.data:
                stream.data.append(event.data)
            padding = event.flow_controlled_length - len(event.data)
            if padding:
                self.conn.acknowledge_received_data(padding, event.stream_id)
        elif isinstance(event, h2.events.StreamEnded) and stream is not None:
            stream.ended = True
        elif isinstance(event, h2.events.StreamReset) and stream is not None:
            stream.reset = event.error_code
            self.window_open.set()  # a sender waiting for this stream's window stops
        elif isinstance(event, h2.events.WindowUpdated):
            self.window_open.set()
        elif isinstance(event, h2.events.SettingsAcknowledged):
            self.settings_acked.set()
        elif isinstance(event, h2.events.RemoteSettingsChanged):
            self.remote_settings.set()
            self.window_open.set()
        elif isinstance(event, h2.events.ConnectionTerminated):
            self.goaway = (int(event.error_code or 0), int(event.last_stream_id or 0))
        if stream is not None:
            stream.changed.set()

    def ack(self, stream_id: int, size: int) -> None:
        try:
            self.conn.acknowledge_received_data(size, stream_id)
            self.flush()
        except (h2.exceptions.StreamClosedError, OSError):
            pass

    # -- streams ------------------------------------------------------------------------

    def open(self, fields: list[tuple[str, str]], end: bool = False) -> H2ClientStream:
        stream_id = self.conn.get_next_available_stream_id()
        stream = H2ClientStream(self, stream_id)
        self.streams[stream_id] = stream
        self.conn.send_headers(stream_id, fields, end_stream=end)
        self.flush()
        return stream

    def connect(self, authority: str, extra: Optional[list[tuple[str, str]]] = None
                ) -> H2ClientStream:
        """A CONNECT stream (RFC 9113 section 8.5); its answer is not awaited."""
        return self.open([(":method", "CONNECT"), (":authority", authority)] + (extra or []))

    def request(self, method: str, url: str, body: Optional[bytes] = None,
                headers: Optional[list[tuple[str, str]]] = None, timeout: float = 30
                ) -> tuple[int, dict[str, str], bytes]:
        """A whole request for an http:// URL: (status, fields, body)."""
        scheme, _, rest = url.partition("://")
        authority, slash, path = rest.partition("/")
        fields = [(":method", method), (":scheme", scheme), (":authority", authority),
                  (":path", slash + path)] + (headers or [])
        stream = self.open(fields, end=body is None)
        if body is not None:
            stream.send(body, end=True, timeout=timeout)
        status = stream.wait_head(timeout)
        data = stream.read_all(timeout)
        return status, dict(stream.headers or []), data

    def send_data(self, stream_id: int, data: bytes, end: bool, timeout: float) -> None:
        """Send within the proxy's windows, waiting for them to open (bounded)."""
        view = memoryview(data)
        with gevent.Timeout(timeout, AssertionError("the proxy's window stayed shut")):
            while True:
                if self.error is not None:
                    raise self.error
                stream = self.streams.get(stream_id)
                if stream is not None and stream.reset is not None:
                    # As h2 says of a send on a closed stream (its window is left as it was).
                    raise h2.exceptions.StreamClosedError(stream_id)
                window = self.conn.local_flow_control_window(stream_id)
                size = min(window, len(view), self.conn.max_outbound_frame_size)
                if view and size <= 0:
                    self.window_open.clear()
                    self.window_open.wait()
                    continue
                last = end and size == len(view)
                self.conn.send_data(stream_id, view[:size].tobytes(), end_stream=last)
                self.flush()
                view = view[size:]
                if not view:
                    if end and not last:
                        self.conn.end_stream(stream_id)
                        self.flush()
                    return

    def send_raw(self, data: bytes) -> None:
        """Bytes past the client's own h2 state (a frame it would refuse to send)."""
        with self._sending:
            self.sock.sendall(data)

    def reset_stream(self, stream_id: int) -> None:
        self.conn.reset_stream(stream_id, h2.errors.ErrorCodes.CANCEL)
        self.flush()

    def close(self) -> None:
        try:
            self.conn.close_connection()
            self.flush()
        except (h2.exceptions.ProtocolError, OSError):
            pass
        self.reader.kill(block=True)
        self.sock.close()
