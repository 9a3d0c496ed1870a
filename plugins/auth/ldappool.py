"""Connections to the directory's servers: a small pool per worker, with failover.

A ``Pool`` holds at most ``size`` ldap3 connections (SYNC strategy: ldap3 is pure Python,
so once gevent has patched the socket module its calls wait on gevent sockets, never block
the loop). Nothing is opened before the first operation: a pool made in ``check-config``,
``explain`` or the master never connects.

``Pool.run(work)`` hands ``work`` a ``Link`` (a connection and what it is bound as) and
returns what it returns:

- an idle link is reused, unless a server configured before its own is no longer skipped
  (failback); a fault on a reused link (the server closed it while idle) costs one more
  try on a fresh link, not the server;
- a fresh link goes to the servers in their configured order, skipping a server that failed
  within ``SKIP`` seconds (a flapping first server does not make every request wait for its
  timeout); a server that fails is marked and the next one is tried;
- when every server is skipped or fails, ``Unavailable`` (the caller may serve from cache);
- each step (connect with StartTLS and the service bind, then the work) is bounded by the
  timeout, by ldap3's own socket timeouts and by a ``gevent.Timeout`` around it;
- a link whose work raised anything is closed, never pooled again: its state is unknown.

A link bound as a user (after a password check) is rebound as the service account before
it searches (``Link.as_service``), and without a service account it is not reused for
searches at all: a search never runs with a user's rights.
"""

from __future__ import annotations

import logging
import math
import ssl
from dataclasses import dataclass
from typing import Any, Callable, Optional, TypeVar, Union

import gevent
import gevent.lock
import gevent.queue
import ldap3  # type: ignore[import-untyped]  # no type information
from ldap3.core import exceptions as ldap_errors  # type: ignore[import-untyped]

from .credentials import Unavailable

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Seconds a server that failed is skipped (when another one is left to try).
SKIP = 10.0
#: Result codes that say the server cannot answer now: busy, unavailable (RFC 4511).
DOWN_CODES = {51: "busy", 52: "unavailable"}
#: What a link is bound as, besides a user's DN.
ANONYMOUS, SERVICE = "", "\0service"


class Down(Exception):
    """A server cannot answer (connect refused, timeout, TLS failure, busy or unavailable):
    the next one is tried."""


class _TimedOut(Exception):
    pass


@dataclass
class Endpoint:
    """One directory server, from one ``ldap_url``."""

    url: str
    host: str
    port: int
    tls: bool
    #: The clock's time before which it is skipped.
    skip_until: float = 0.0


@dataclass
class Settings:
    timeout: float
    starttls: bool
    ca_file: str
    #: The service account (DN, password); None: anonymous searches.
    service: Optional[tuple[str, str]]


def result_name(connection: Any) -> str:
    """``invalidCredentials (49)``: the last result, for logs."""
    result = connection.result or {}
    return f"{result.get('description', '?')} ({result.get('result', '?')})"


class Link:
    """One open connection to ``endpoint`` and what it is bound as (``bound``: ANONYMOUS,
    SERVICE or a user's DN)."""

    def __init__(self, endpoint: Endpoint, connection: Any, settings: Settings) -> None:
        self.endpoint = endpoint
        self.connection = connection
        self.settings = settings
        self.bound = ANONYMOUS

    def bind(self, dn: str, password: Union[str, bytes]) -> bool:
        """A simple bind as ``dn``: whether it succeeded. Raises ``Down`` when the server
        answers busy or unavailable. Leaves the link bound as ``dn`` (or as nobody after a
        refusal)."""
        self.bound = dn
        done = self.connection.rebind(user=dn, password=password,
                                      authentication=ldap3.SIMPLE, read_server_info=False)
        code = (self.connection.result or {}).get("result")
        if code in DOWN_CODES:
            raise Down(f"bind answered {result_name(self.connection)}")
        return bool(done)

    def as_service(self) -> None:
        """Bound as the service account (when there is one) before a search; raises
        ``Unavailable`` when the directory refuses the account (a configuration fault no
        other server will mend)."""
        service = self.settings.service
        if service is None or self.bound == SERVICE:
            return
        if not self.bind(*service):
            raise Unavailable(f"{self.endpoint.url}: the bind of ldap_bind_user "
                              f"{service[0]!r} was refused: {result_name(self.connection)}")
        self.bound = SERVICE

    def close(self) -> None:
        """Unbound and closed; the socket is closed even when the unbind cannot be sent
        (a server that stopped answering mid-operation)."""
        try:
            self.connection.unbind()
        except (ldap_errors.LDAPException, OSError):
            pass
        finally:
            sock = getattr(self.connection, "socket", None)
            if sock is not None:
                sock.close()


class Pool:
    """See the module's docstring."""

    def __init__(self, endpoints: list[Endpoint], size: int, settings: Settings,
                 clock: Callable[[], float]) -> None:
        self.endpoints = endpoints
        self.size = size
        self.settings = settings
        self.clock = clock
        self.closed = False
        # Made on the first operation, in the worker that runs it.
        self._idle: Optional[gevent.queue.Queue[Link]] = None
        self._slots: Optional[gevent.lock.BoundedSemaphore] = None

    def run(self, work: Callable[[Link], T], searches: bool = False) -> T:
        """``work(link)``'s result, on the first server that can answer; ``searches``:
        the work searches (a link bound as a user is then rebound, or not reused)."""
        if self.closed:
            raise Unavailable("the directory's pool is closed")
        if self._idle is None or self._slots is None:
            self._idle = gevent.queue.Queue()
            self._slots = gevent.lock.BoundedSemaphore(self.size)
        if not self._slots.acquire(timeout=self.settings.timeout):
            raise Unavailable(f"all {self.size} directory connections stayed busy for "
                              f"{self.settings.timeout:g}s")
        try:
            return self._run(work, searches)
        finally:
            self._slots.release()

    def _run(self, work: Callable[[Link], T], searches: bool) -> T:
        assert self._idle is not None
        link = self._reusable(searches)
        if link is not None:
            try:
                return self._work(link, work)
            except Down as exc:
                # Closed while idle, most likely: a fresh link decides about the server.
                log.debug("ldap: %s: a pooled connection failed: %s", link.endpoint.url, exc)
        failures: list[str] = []
        now = self.clock()
        candidates = [e for e in self.endpoints if e.skip_until <= now]
        for endpoint in candidates:
            try:
                link = self._timed(self._open, endpoint)
            except Down as exc:
                self._failed(endpoint, f"connect: {exc}", failures)
                continue
            try:
                return self._work(link, work)
            except Down as exc:
                self._failed(endpoint, str(exc), failures)
        skipped = [e.url for e in self.endpoints if e not in candidates]
        if skipped:
            failures.append(f"skipped for failing within {SKIP:g}s: {' '.join(skipped)}")
        raise Unavailable("; ".join(failures))

    def _reusable(self, searches: bool) -> Optional[Link]:
        assert self._idle is not None
        while True:
            try:
                link = self._idle.get_nowait()
            except gevent.queue.Empty:
                return None
            if searches and link.settings.service is None and link.bound != ANONYMOUS:
                link.close()  # bound as a user, and no account to rebind as
                continue
            if self._preferred_over(link.endpoint):
                link.close()  # a server before it is back: fail back to it
                continue
            return link

    def _preferred_over(self, endpoint: Endpoint) -> bool:
        """Whether a server configured before ``endpoint`` is no longer skipped."""
        now = self.clock()
        for candidate in self.endpoints:
            if candidate is endpoint:
                return False
            if candidate.skip_until <= now:
                return True
        return False

    def _work(self, link: Link, work: Callable[[Link], T]) -> T:
        """``work(link)``, bounded; the link goes back to the pool only after it succeeded."""
        try:
            result = self._timed(work, link)
        except BaseException:
            link.close()
            raise
        if self.closed:
            link.close()
        else:
            assert self._idle is not None
            self._idle.put(link)
        return result

    def _failed(self, endpoint: Endpoint, reason: str, failures: list[str]) -> None:
        endpoint.skip_until = self.clock() + SKIP
        log.info("ldap: %s cannot answer: %s (skipped for %gs)", endpoint.url, reason, SKIP)
        failures.append(f"{endpoint.url}: {reason}")

    def _timed(self, call: Callable[[Any], T], argument: Any) -> T:
        """``call(argument)`` within the timeout; communication faults raised as ``Down``."""
        timeout = self.settings.timeout
        try:
            with gevent.Timeout(timeout, _TimedOut):
                return call(argument)
        except _TimedOut:
            raise Down(f"no answer within {timeout:g}s") from None
        except ldap_errors.LDAPResponseTimeoutError:
            raise Down(f"no answer within {timeout:g}s") from None
        except (ldap_errors.LDAPCommunicationError, ldap_errors.LDAPStartTLSError,
                ldap_errors.LDAPCertificateError, ldap_errors.LDAPBindError,
                ssl.SSLError, OSError) as exc:
            raise Down(_reason(exc)) from None

    def _open(self, endpoint: Endpoint) -> Link:
        settings = self.settings
        tls = None
        if endpoint.tls or settings.starttls:
            # ldap3 checks the certificate's names against the host after the handshake.
            tls = ldap3.Tls(validate=ssl.CERT_REQUIRED, ca_certs_file=settings.ca_file or None)
        server = ldap3.Server(endpoint.host, port=endpoint.port, use_ssl=endpoint.tls,
                              tls=tls, get_info=ldap3.NONE,
                              connect_timeout=settings.timeout)
        connection = ldap3.Connection(
            server, client_strategy=ldap3.SYNC, auto_bind=ldap3.AUTO_BIND_NONE,
            # Whole seconds (ldap3 packs it into SO_RCVTIMEO); the gevent.Timeout around
            # each step holds it to the exact figure.
            receive_timeout=max(1, math.ceil(settings.timeout)), raise_exceptions=False,
            read_only=True, auto_referrals=False)
        link = Link(endpoint, connection, settings)
        try:
            connection.open(read_server_info=False)
            if settings.starttls and not endpoint.tls:
                if not connection.start_tls(read_server_info=False):
                    raise Down(f"StartTLS refused: {result_name(connection)}")
        except BaseException:
            link.close()
            raise
        return link

    def close(self) -> None:
        """Every idle connection closed; those in use are closed when they come back."""
        self.closed = True
        while self._idle is not None:
            try:
                self._idle.get_nowait().close()
            except gevent.queue.Empty:
                break


def _reason(exc: BaseException) -> str:
    """A fault in a few words, with no payload."""
    text = str(exc).strip() or type(exc).__name__
    return text[:200]
