"""The requests of an access log, each with the outcome the log gives it.

Three of the formats of ``log_format`` carry what deciding a request again needs (client,
user, method, target, time, and enough of the outcome): ``json``, ``geproxy`` and ``squid``
(Squid's own logs too). ``combined`` does not: it cannot tell a refusal from an origin's 403.

What a logged outcome means (:class:`Logged` ``kind``):

- ``allowed``: the policy let the request through. A status below 400, or an error that
  happens after the policy decided: ``dns_error``, ``dns_timeout``, ``connection_refused``,
  ``connection_timeout``, ``connection_terminated``, ``destination_ip_unroutable``,
  ``proxy_loop_detected``, ``proxy_configuration_error``, ``http_response_*``, ``tls_*``, or
  any other answer of the origin (its 403 and 5xx included: they have no Proxy-Status error).
- ``refused``: the policy refused it: ``http_request_denied`` (403, 407, or a connection
  closed at connect), or an answer of 400 or more that a plugin made (no upstream address,
  no error: a plugin's own ``Response`` without Proxy-Status).
- ``guard``: ``destination_ip_prohibited``: the destination guard refused the addresses a
  DNS answer gave; the policy had let the request through. In the squid format a 403
  ``TCP_DENIED`` is ``denied``: the policy's or the guard's, the line does not say which.
- ``refused_at_connect``: refused by the client's address alone, with no request read (the
  ``[acl] refuse_at_connect = close`` kind); only ``on_connect`` can be asked again.
- ``skipped``, not a policy decision: a malformed request (400, 408, 414, 431,
  ``http_request_error``), or no request at all (the client sent nothing).
- ``undecidable``, an outcome that depends on what the log does not hold: a tunnel closed
  on its first bytes (``on_tunnel_data``: an error with a 2xx status), a connection limit
  (``connection_limit_reached``: the connections open then), a failure of the proxy
  (``proxy_internal_error``), no answer at all (status 0: the client went away first), or
  an error this module does not know.

A line that cannot be read raises :class:`BadLine`; the caller decides what to do with it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable, Optional

__all__ = ["Logged", "BadLine", "FORMATS", "sniff", "REASONS"]

ALLOWED = "allowed"
REFUSED = "refused"
GUARD = "guard"
DENIED = "denied"  # squid's TCP_DENIED/403: the policy's or the guard's
REFUSED_AT_CONNECT = "refused_at_connect"
SKIPPED = "skipped"
UNDECIDABLE = "undecidable"

#: Why a line is skipped or undecidable: the key counted, and the sentence that says it.
REASONS = {
    "malformed": "a malformed request (400, 408, 414, 431): not a policy decision",
    "no request": "no request was read (the client sent none): not a policy decision",
    "target": "the logged method and target do not parse as a request",
    "password": "the new configuration asks for a password (407) and the log has no user",
    "dns": "the destination guard decides on a DNS answer (destination_ip_prohibited)",
    "squid denied": "a squid-format TCP_DENIED/403 is the policy's or the destination "
                    "guard's (a DNS answer): the line does not say which",
    "tunnel data": "the tunnel was closed on its first bytes (on_tunnel_data), which the "
                   "log does not hold",
    "connection limit": "refused over a connection limit (connection_limit_reached), which "
                        "depends on the connections open then",
    "internal error": "the proxy failed (500 proxy_internal_error): no verdict was logged",
    "no answer": "no answer was logged (status 0: the client went away first)",
    "unknown error": "an error that says nothing of the policy's verdict",
    "request at connect": "refused at connect, before its request was read; the new "
                          "configuration lets the client connect, and its request is not "
                          "in the log",
}

#: Errors the proxy answers after the policy let the request through.
_AFTER_POLICY = frozenset({
    "dns_error", "dns_timeout", "connection_refused", "connection_timeout",
    "connection_terminated", "destination_ip_unroutable", "proxy_loop_detected",
    "proxy_configuration_error",
})
_AFTER_POLICY_PREFIXES = ("http_response_", "tls_", "dns_", "connection_")
#: Statuses of a head the proxy could not read as a request.
_MALFORMED = frozenset({400, 408, 414, 431})


class BadLine(ValueError):
    """A line that is not one of the format's: the message says what is wrong."""


@dataclass(frozen=True)
class Logged:
    """One logged request and the outcome the log gives it."""

    #: The line's number in its file, from 1.
    number: int
    #: When the request started (``time.time()``), None when the line does not say.
    time: Optional[float]
    client: str
    #: The authenticated user, None for none (``-`` or null in the log).
    user: Optional[str]
    #: ``-`` when no request was read.
    method: str
    target: str
    status: int
    #: One of ALLOWED, REFUSED, GUARD, DENIED, REFUSED_AT_CONNECT, SKIPPED, UNDECIDABLE.
    kind: str
    #: The rule id the log names (a refusal's), None when it names none.
    rule: Optional[str] = None
    #: For SKIPPED and UNDECIDABLE: the key of REASONS.
    reason: str = ""


def _user(value: Any) -> Optional[str]:
    return None if value in (None, "", "-") else str(value)


def _outcome(method: str, target: str, status: int, error: Optional[str],
             upstream: bool) -> tuple[str, str]:
    """The kind (and reason) of a logged outcome, from its Proxy-Status error; see the
    module's docstring. ``upstream``: whether an upstream address was connected."""
    if method == "-":
        if error == "http_request_denied":
            return REFUSED_AT_CONNECT, ""
        return SKIPPED, "malformed" if status in _MALFORMED else "no request"
    if status in _MALFORMED or error == "http_request_error":
        return SKIPPED, "malformed"
    if error == "http_request_denied":
        return (UNDECIDABLE, "tunnel data") if 200 <= status < 300 else (REFUSED, "")
    if error == "destination_ip_prohibited":
        return GUARD, ""
    if error == "connection_limit_reached":
        return UNDECIDABLE, "connection limit"
    if error == "proxy_internal_error":
        return UNDECIDABLE, "internal error"
    if error:
        if error in _AFTER_POLICY or error.startswith(_AFTER_POLICY_PREFIXES):
            return ALLOWED, ""
        return UNDECIDABLE, "unknown error"
    if status == 0:
        return UNDECIDABLE, "no answer"
    if status >= 400 and not upstream and not target.startswith("/"):
        # Nothing was connected and the proxy named no error: a plugin's own answer (a
        # request for the proxy itself, origin-form, is its pages' answer).
        return REFUSED, ""
    return ALLOWED, ""


def _number(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadLine(f"{what} is not a number: {value!r}")
    return value


def json_request(number: int, line: str) -> Logged:
    """A ``log_format = json`` line."""
    try:
        fields = json.loads(line)
    except ValueError as exc:
        raise BadLine(f"not JSON: {exc}") from None
    if not isinstance(fields, dict):
        raise BadLine("not a JSON object")
    missing = [name for name in ("client", "method", "target", "status") if name not in fields]
    if missing:
        raise BadLine(f"no {', '.join(missing)}")
    method, target, client = fields["method"], fields["target"], fields["client"]
    if not all(isinstance(value, str) and value for value in (method, target, client)):
        raise BadLine("client, method and target must be strings")
    status = _number(fields["status"], "status")
    started = fields.get("time")
    if started is not None and not isinstance(started, (int, float)):
        raise BadLine(f"time is not a number: {started!r}")
    error = fields.get("error")
    kind, reason = _outcome(method, target, status, error if isinstance(error, str) else None,
                            fields.get("upstream") is not None)
    rule = fields.get("rule")
    return Logged(number, None if started is None else float(started), client,
                  _user(fields.get("user")), method, target, status, kind,
                  str(rule) if rule else None, reason)


def _unescape(value: str) -> str:
    """A user name or rule id as the space-separated formats escape it: ``%XX`` for a
    space, a control or a character past ASCII up to U+00FF (one past U+00FF is left as
    written). Targets are not unescaped: a request target holds none of these, and its own
    ``%XX`` are the URL's."""
    if "%" not in value:
        return value
    out, i = [], 0
    while i < len(value):
        piece = value[i:i + 3]
        if piece[0] == "%" and len(piece) == 3:
            try:
                code = int(piece[1:], 16)
            except ValueError:
                code = -1
            if 0 <= code <= 0x20 or code >= 0x7F:
                out.append(chr(code))
                i += 3
                continue
        out.append(value[i])
        i += 1
    return "".join(out)


def geproxy_request(number: int, line: str) -> Logged:
    """A ``log_format = geproxy`` line: time duration_ms client method target status error
    bytes_in bytes_out upstream user conn rule sni."""
    fields = line.split()
    if len(fields) != 14:
        raise BadLine(f"{len(fields)} fields, the geproxy format has 14")
    started, _, client, method, target, status, error, _, _, upstream, user, _, rule, _ = \
        fields
    try:
        when, code = float(started), int(status)
    except ValueError:
        raise BadLine("the time or the status is not a number") from None
    kind, reason = _outcome(method, target, code, None if error == "-" else error,
                            upstream != "-")
    return Logged(number, when, client, _user(_unescape(user)), method, target, code, kind,
                  None if rule == "-" else _unescape(rule), reason)


def squid_request(number: int, line: str) -> Logged:
    """A line of Squid's native format (``log_format = squid``, or Squid's own):
    time duration client code/status bytes method URL user hierarchy/address type. The
    time is the end; the request started ``duration`` milliseconds before."""
    fields = line.split()
    if len(fields) != 10:
        raise BadLine(f"{len(fields)} fields, Squid's native format has 10")
    ended, duration, client, result, _, method, target, user, hierarchy, _ = fields
    code, sep, status = result.partition("/")
    try:
        when, code_status = float(ended) - int(duration) / 1000, int(status)
    except ValueError:
        raise BadLine("the time, the duration or the status is not a number") from None
    if not sep:
        raise BadLine(f"not a Squid result code/status: {result!r}")
    upstream = not hierarchy.startswith(("HIER_NONE", "NONE"))
    error: Optional[str] = None
    if code.startswith("TCP_DENIED"):
        reason = ""
        if method == "-":
            kind = REFUSED_AT_CONNECT
        elif 200 <= code_status < 300:  # an established tunnel, then closed by policy
            kind, reason = UNDECIDABLE, "tunnel data"
        else:
            kind = DENIED if code_status == 403 else REFUSED
        return Logged(number, when, client, _user(_unescape(user)), method, target,
                      code_status, kind, None, reason)
    if code_status == 503 and not upstream:
        error = "connection_limit_reached"
    elif code_status == 500 and not upstream:
        error = "proxy_internal_error"
    elif code_status >= 500 and not upstream:
        # A failure after the policy (DNS, connect, a parent): which one, the line does not
        # say, and it does not matter here.
        error = "connection_refused"
    kind, reason = _outcome(method, target, code_status, error, upstream)
    return Logged(number, when, client, _user(_unescape(user)), method, target, code_status,
                  kind, None, reason)


FORMATS: dict[str, Callable[[int, str], Logged]] = {
    "json": json_request,
    "geproxy": geproxy_request,
    "squid": squid_request,
}


def sniff(line: str) -> Optional[str]:
    """The format a line is in, by its shape; None when it is none of FORMATS'."""
    text = line.strip()
    if text.startswith("{"):
        return "json"
    fields = text.split()
    if len(fields) == 14:
        return "geproxy"
    if len(fields) == 10 and "/" in fields[3]:
        return "squid"
    return None
