"""Exceptions that carry their meaning: the status to answer with and the Proxy-Status error.

A request's Transaction (serve/transaction.py) turns any ProxyError into a generated answer
(the table in docs/configuration.md, "Answers the proxy makes itself") when nothing has been
sent to the client yet, and into a closed connection (or a reset stream) otherwise. The ``detail``
text goes to the log, never to the client: the body a client sees is the status's reason only.
What a client may read is only what was given as ``details=``, which becomes the ``details``
parameter of its Proxy-Status field (RFC 9209 section 2.1.5), sanitized; no error the core or
a built-in plugin raises has any, so that no refusal tells a client the policy behind it.
"""

from __future__ import annotations

import re
from typing import Iterable, Sequence

__all__ = [
    "ProxyError",
    "ClientError",
    "RequestLineTooLong",
    "HeadTooLarge",
    "HeaderTimeout",
    "Denied",
    "AuthenticationRequired",
    "BackendUnavailable",
    "HTTP11Required",
    "DNSError",
    "DNSTimeout",
    "DestinationProhibited",
    "ParentProhibited",
    "ConnectRefused",
    "DestinationUnreachable",
    "ParentRefused",
    "ConnectionTerminated",
    "ConnectTimeout",
    "LoopDetected",
    "TooManyConnections",
    "UpstreamError",
    "UpstreamTimeout",
    "ClientGone",
    "InternalError",
    "ConfigError",
    "ConfigErrors",
    "proxy_name",
]


_SF_TOKEN = re.compile(r"[A-Za-z*][!#$%&'*+.^_`|~0-9A-Za-z:/-]*")

#: The longest ``details`` text a client is sent, in characters before quoting: a line for a
#: person or a ticket number, not a page. Longer text is cut, ending in ``...``.
DETAILS_MAX = 256

_CONTROLS = re.compile(r"[\x00-\x1f\x7f]+")
_NOT_ASCII = re.compile(r"[^\x00-\x7f]")


def _sf_text(text: str) -> str:
    """``text`` made fit for an RFC 8941 sf-string, which holds printable ASCII only: each
    run of control characters (CR, LF and tab included) becomes one space, each character
    beyond ASCII a ``?`` (an sf-string has no escape for it, and a guess at an ASCII
    look-alike could change the meaning); surrounding spaces are dropped."""
    return _NOT_ASCII.sub("?", _CONTROLS.sub(" ", text)).strip(" ")


def _sf_string(text: str) -> str:
    """``text`` as an RFC 8941 sf-string: sanitized (``_sf_text``), ``"`` and ``\\``
    escaped, in double quotes. The result can go into a header field as it is: it holds no
    CR, LF or other control, whatever ``text`` held."""
    return '"' + _sf_text(text).replace("\\", "\\\\").replace('"', '\\"') + '"'


def _details(text: str | None) -> str | None:
    """What a ``details=`` argument is sent as (unquoted): sanitized, at most DETAILS_MAX
    characters; None when nothing printable is left."""
    if text is None:
        return None
    clean = _sf_text(text)
    if len(clean) > DETAILS_MAX:
        clean = clean[:DETAILS_MAX - 3].rstrip(" ") + "..."
    return clean or None


def proxy_name(via: str) -> str:
    """The proxy's name as the first item of Proxy-Status (an RFC 8941 token or string):
    the Via pseudonym, or ``geproxy`` when Via is off."""
    name = via or "geproxy"
    if _SF_TOKEN.fullmatch(name):
        return name
    return _sf_string(name)


class ProxyError(Exception):
    """Base of every error the proxy answers for itself.

    Subclasses set ``status`` (the HTTP status of the generated answer), ``error`` (the RFC 9209
    Proxy-Status error type) and ``close`` (whether the client connection must be closed after
    the answer because the framing of the rest of its stream is in doubt).
    """

    status = 500
    error = "proxy_internal_error"
    close = True
    #: An expected outcome (a client's mistake, a refusal, an unreachable upstream) is
    #: logged in one line at INFO; anything else is a fault of the proxy's, logged with its
    #: traceback.
    expected = False

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if "client_fault" in cls.__dict__:  # a subclass written for the earlier name
            cls.expected = bool(cls.__dict__["client_fault"])

    @property
    def client_fault(self) -> bool:
        """The earlier name of ``expected``, kept for plugins that read or set it."""
        return self.expected

    def __init__(self, detail: str = "", *, rcode: str | None = None,
                 details: str | None = None) -> None:
        super().__init__(detail or self.__class__.__name__)
        #: For the log (and ``geproxy explain``), never for the client.
        self.detail = detail
        #: The DNS rcode, for Proxy-Status (RFC 9209 section 2.3.2, ``dns_error``).
        self.rcode = rcode
        #: For the client: the ``details`` parameter of Proxy-Status (RFC 9209 section
        #: 2.1.5), as sent: sanitized (printable ASCII, controls made spaces, other
        #: characters ``?``), at most DETAILS_MAX characters. None (the default) sends none.
        self.details = _details(details)
        #: The body to send instead of the one-line text: (content type, bytes), set by a
        #: plugin that renders its own page (the ``acl`` plugin's ``deny_page``); None for
        #: the default. Its Content-Type replaces the default one.
        self.page: tuple[str, bytes] | None = None

    def fields(self) -> list[tuple[str, str]]:
        """Header fields the answer carries besides Content-Type, Proxy-Status and
        Cache-Control (a 407's ``Proxy-Authenticate``); none by default."""
        return []

    def proxy_status_params(self) -> str:
        """The parameters of this error's Proxy-Status field, the part after the proxy's
        name and ``; ``: ``error=<type>``, then ``rcode="..."`` and ``details="..."`` when
        set, each value an RFC 8941 sf-string (quoted, escaped, printable ASCII only)."""
        params = f"error={self.error}"
        if self.rcode:
            params += f"; rcode={_sf_string(self.rcode)}"
        if self.details:
            params += f"; details={_sf_string(self.details)}"
        return params


class ClientError(ProxyError):
    """Malformed request, bad CONNECT authority, unsupported framing: 400 and close."""

    status = 400
    error = "http_request_error"
    expected = True


class RequestLineTooLong(ClientError):
    """The request line is longer than the proxy reads (414)."""

    status = 414


class HeadTooLarge(ClientError):
    """The request head is larger than max_header_size (431)."""

    status = 431


class HeaderTimeout(ClientError):
    """The request head did not arrive within header_timeout."""

    status = 408


class Denied(ProxyError):
    """Refused by policy: 403. Plugins raise or return it; the body never names the rule.

    ``detail`` (the first argument) goes to the log, ``rule`` to the access record; the
    client sees neither. ``details`` is what the client may read: the ``details`` parameter
    of Proxy-Status (``geproxy; error=http_request_denied; details="..."``), say a ticket
    number; none by default.

    ``silent=True`` matters only to ``on_connect``: the connection is then closed at once,
    before any byte is read or sent (a firewall's drop), instead of answering its first
    request with this 403. A denial from any other hook is always answered."""

    status = 403
    error = "http_request_denied"
    close = False
    expected = True

    def __init__(self, detail: str = "", *, rule: str | None = None,
                 silent: bool = False, details: str | None = None) -> None:
        super().__init__(detail, details=details)
        #: The id of the rule that denied, for the access log.
        self.rule = rule
        #: From on_connect: close without a word rather than answer the first request.
        self.silent = silent


class AuthenticationRequired(Denied):
    """No user where the policy needs one: 407 with a ``Proxy-Authenticate`` field per way
    to authenticate (``challenges``, from ``ctx.challenges(request)``). The connection
    stays open so that the client can retry with credentials on it (unless a body
    followed)."""

    status = 407

    def __init__(self, detail: str = "", *, challenges: Sequence[str] = (),
                 rule: str | None = None, details: str | None = None) -> None:
        super().__init__(detail, rule=rule, details=details)
        #: The ``Proxy-Authenticate`` field values, in order.
        self.challenges = tuple(challenges)

    def fields(self) -> list[tuple[str, str]]:
        return [("Proxy-Authenticate", value) for value in self.challenges]


class BackendUnavailable(ProxyError):
    """A service the decision needs did not answer (every directory server down past
    ``stale_ttl``, an external ACL helper that failed or hung): 503, the connection kept.
    ``details`` names the kind of service for the client (``authentication backend
    unavailable``), never which server or why."""

    status = 503
    close = False
    expected = True


class HTTP11Required(ProxyError):
    """The request needs what only HTTP/1.1 can carry (connection-based authentication:
    Negotiate): on an HTTP/2 stream, a reset with ``HTTP_1_1_REQUIRED`` so that the client
    retries over HTTP/1.1 (RFC 9113 section 8.2.2 and 7); on HTTP/1.1, where it cannot
    apply, a 500 (a plugin's mistake)."""

    expected = True


class DNSError(ProxyError):
    """The name does not resolve (NXDOMAIN, no address, a server failure): 502."""

    status = 502
    error = "dns_error"
    close = False
    expected = True


class DNSTimeout(ProxyError):
    """No DNS answer within the resolver's timeout: 504."""

    status = 504
    error = "dns_timeout"
    close = False
    expected = True


class DestinationProhibited(ProxyError):
    """Every address of the destination is in a network the proxy may not connect to (the
    destination guard): a policy refusal of the client's request, so 403."""

    status = 403
    error = "destination_ip_prohibited"
    close = False
    expected = True


class ParentProhibited(ProxyError):
    """Every address of a parent proxy is prohibited by the destination guard: a fault of
    the proxy's configuration (the parent needs an exemption there), not of the client's
    request, which did not choose the parent. 502, as for any parent that cannot be used;
    not a client fault: the line that tells of it is a warning, naming the parent."""

    status = 502
    error = "proxy_configuration_error"
    close = False


class ConnectRefused(ProxyError):
    """The upstream refused the connection: 502."""

    status = 502
    error = "connection_refused"
    close = False
    expected = True


class ParentRefused(ConnectRefused):
    """A parent proxy answered, but not with 2xx (to our CONNECT, or 407 to a plain
    request): it is alive, it refused this request."""

    def __init__(self, detail: str = "", *, parent_status: int = 0,
                 details: str | None = None) -> None:
        super().__init__(detail, details=details)
        #: The status the parent answered with.
        self.parent_status = parent_status


class DestinationUnreachable(ConnectRefused):
    """No route to the destination network or host."""

    error = "destination_ip_unroutable"


class ConnectionTerminated(ProxyError):
    """The upstream reset or closed the connection before a complete answer."""

    status = 502
    error = "connection_terminated"
    expected = True


class ConnectTimeout(ProxyError):
    """No upstream connection within connect_timeout: 504."""

    status = 504
    error = "connection_timeout"
    close = False
    expected = True


class LoopDetected(ProxyError):
    """The request would come back to this proxy (Via names it, or it targets the proxy
    port with CONNECT): 502."""

    status = 502
    error = "proxy_loop_detected"
    close = False
    expected = True


class TooManyConnections(ProxyError):
    """max_connections reached: 503, then close."""

    status = 503
    error = "connection_limit_reached"
    expected = True


class UpstreamError(ProxyError):
    """The upstream's response was malformed: never reuse that connection."""

    status = 502
    error = "http_response_incomplete"
    expected = True


class UpstreamTimeout(ProxyError):
    """The upstream sent nothing for idle_timeout while a response was due."""

    status = 504
    error = "http_response_timeout"
    expected = True


class ClientGone(ProxyError):
    """The client closed, reset or stalled: nothing can be answered, the connection ends.
    Not an error of the proxy's: its record has no ``error``, its close reason is
    ``client``."""

    error = ""
    expected = True
    #: Who ended it, for the record's close reason.
    close_reason = "client"


class InternalError(ProxyError):
    """A bug, or a plugin that raised: fail closed."""


class ConfigError(Exception):
    """A configuration problem, reported in one line naming the file, its line, the section
    and the key: ``geproxy.ini:21: [acl] rules: <message>``.

    ``line``: for an option whose value has several lines (the ``lines`` kind, a list over
    continuation lines), the 1-based index of the offending one among the lines the plugin
    was given (the index in ``config.section(name)[key]``, plus 1); None for the key as a
    whole. The configuration layer turns it into the line of the file (``file_line``) when
    it reports the error; left None, the key's own line is reported (its section header's
    for an error with no key).
    """

    def __init__(
        self,
        message: str,
        *,
        path: str | None = None,
        section: str | None = None,
        key: str | None = None,
        line: int | None = None,
    ) -> None:
        self.message = message
        self.line = line
        self.path = path
        self.section = section
        self.key = key
        self.line = line
        #: The line of the file the error is at (1-based), once known: set by the
        #: configuration layer, which knows where each key stands.
        self.file_line: int | None = None
        #: Every error this exception reports: itself alone; several for ConfigErrors.
        self.errors: list[ConfigError] = [self]
        super().__init__(message)

    def __str__(self) -> str:
        where = []
        if self.path:
            where.append(self.path if self.file_line is None
                         else f"{self.path}:{self.file_line}")
        if self.section:
            where.append(f"[{self.section}]" + (f" {self.key}" if self.key else ""))
        if self.line is not None and self.file_line is None:
            where.append(f"line {self.line}")  # where in the value, for want of the file's
        return ": ".join(where + [self.message])

    def report(self, prefix: str = "geproxy: ") -> str:
        """Every error, one per line, each after ``prefix``: what the command line prints."""
        return "\n".join(prefix + ConfigError.__str__(error) for error in self.errors)


class ConfigErrors(ConfigError):
    """Several configuration problems at once: ``errors``, each a ConfigError (nested
    ConfigErrors are flattened), in the order given; ``str()`` is one error per line.

    ``geproxy check-config`` and a start report every error of a file through one of these;
    a plugin's ``configure`` may raise one to report several problems (one per bad line of
    a ``lines`` value, say). Its own ``message``, ``path``, ``section``, ``key`` and
    ``line`` are those of the first error, for code that reads one.
    """

    def __init__(self, errors: Iterable[ConfigError]) -> None:
        flat = [error for each in errors for error in each.errors]
        if not flat:
            raise ValueError("ConfigErrors needs at least one error")
        first = flat[0]
        super().__init__(first.message, path=first.path, section=first.section,
                         key=first.key, line=first.line)
        self.file_line = first.file_line
        self.errors = flat

    def __str__(self) -> str:
        return "\n".join(str(error) for error in self.errors)
