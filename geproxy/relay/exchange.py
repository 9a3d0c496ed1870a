"""The two interfaces between serving a client and relaying for it.

``Exchange`` is the client side of one request, as forwarding (forward.py) needs it: an
HTTP/1.1 connection implements it by serializing (serve/http1.py), an HTTP/2 stream by
writing frames (serve/h2stream.py). ``Scope`` is what the request is decided and connected
with: its context, its generation's hooks and options, the upstream pool. A request's
Transaction (serve/transaction.py) is its scope.
"""

from __future__ import annotations

import logging
import socket
from typing import Any, Mapping, Protocol, Sequence

from ..models import Context, Headers, Record
from ..net.sockets import IdleWait
from ..net.upstream import UpstreamPool
from ..protocol.semantics import Framing

__all__ = ["Exchange", "Scope"]


class Exchange(Protocol):
    """The client side of one request: its body in, its answer out."""

    #: Whether any byte of the answer went to the client (an error can no longer be sent).
    answered: bool

    @property
    def has_body(self) -> bool:
        """Whether the request comes with a body (announced, or framed by the protocol)."""

    @property
    def body_done(self) -> bool:
        """Whether the request body was read to its end (True when there is none)."""

    def framing(self) -> Framing:
        """The framing field the body goes upstream with, asked before it is read."""

    def read_body(self) -> list[bytes]:
        """The next pieces of the request body (maybe none yet); ClientGone when the client
        ends before its body does."""

    def send_interim(self, status: int, fields: list[tuple[str, str]]) -> None:
        """An interim (1xx) answer, where the client's protocol passes them on."""

    def send_head(self, status: int, reason: str, headers: Headers, open_ended: bool,
                  keep: bool) -> bool:
        """The answer's head: ``headers`` carry no framing but a Content-Length; an
        ``open_ended`` body has none (its end ends it). ``keep``: whether the answer lets the
        connection go on as far as its sender knows. Returns whether it will, once the
        answer is whole. Sent with the first body piece (``send_body``)."""

    def send_body(self, pieces: Sequence[bytes], end: bool = False) -> None:
        """Body pieces (and the head, if not sent yet); ``end``: the answer is whole."""

    def abort(self) -> None:
        """The answer is cut short: make the client see the cut, not a shorter answer."""

    def upgrade(self, fields: list[tuple[str, str]], upstream: socket.socket,
                to_client: bytes, record: Record, idle_timeout: float) -> str:
        """Answer 101 with ``fields`` and relay both ways until both sides are done;
        returns the close reason."""


class Scope(Protocol):
    """What one request is decided and connected with."""

    ctx: Context
    log: "logging.LoggerAdapter[logging.Logger]"
    #: Its generation's hooks (policy.plugins.Hooks) and ``[geproxy]`` options.
    hooks: Any
    core: Mapping[str, Any]
    #: The proxy's name in Via fields, "" with none.
    via: str
    pool: UpstreamPool
    #: Bounds the first wait for an upstream's answer with one reused timer.
    idle_wait: IdleWait

    @property
    def stopping(self) -> bool:
        """The proxy is stopping: no connection is kept or pooled."""
