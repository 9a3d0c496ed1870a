"""Kerberos for ``[auth]``: SPNEGO ``Negotiate`` (RFC 4559), one authentication per
connection.

    [auth]
    keytab = /etc/geproxy/proxy.keytab
    principal = HTTP/proxy.corp.example

A client answers the 407's ``Proxy-Authenticate: Negotiate`` (or sends at once, as curl
does) ``Proxy-Authorization: Negotiate <base64 token>``: a SPNEGO (or bare Kerberos)
AP-REQ for the proxy's service principal, which GSSAPI accepts with the keys of the
keytab. The user is the client's principal, ``alice@CORP.EXAMPLE`` (``alice`` with
``strip_realm``), from the realms of ``kerberos_realms`` only.

Negotiate authenticates a connection (RFC 4559 section 6 says a server may do so, and
browsers expect it): on HTTP/1.1 the principal is kept in the connection's ``ctx.stash``,
and the next requests of the connection (a CONNECT tunnel's included) are its user without
a token. A token sent again on the connection (curl resends it with every request) is the
connection's, known by its digest: GSSAPI is not asked, as it would call it a replay. A
new token authenticates the connection anew, and one that fails leaves it unauthenticated.
The same token on another connection is a replay, and refused: the replay cache of the
Kerberos library (a file, ``$KRB5RCACHEDIR/krb5_<euid>.rcache2``, ``/var/tmp`` by
default) remembers every authenticator for the clock skew's time, and the workers of one
proxy share it. An HTTP/2 stream has no connection of its own to hold an identity: a
request that needs Negotiate there is answered ``HTTP_1_1_REQUIRED`` (``HTTP11Required``).

Nothing is acquired before the first Negotiate token of a worker: ``configure`` (the
master, ``check-config``, ``explain``) checks that python-gssapi imports, that the keytab
can be read and that the principal parses, and nothing more. The acceptor credentials
(read from the keytab through the credential store extension, so that no process-wide
``KRB5_KTNAME`` is needed) and the default realm, when it is needed, come on first use.
Every GSSAPI call runs in gevent's thread pool, never on the event loop: the library reads
files and may lock the replay cache.

The answer's mutual-authentication token (the AP-REP) is not sent back: no client of a
proxy needs it, and a CONNECT's 200 is the core's to write.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
import re
from dataclasses import dataclass
from typing import Any, Callable, Optional, TypeVar

import gevent
import gevent.lock

from geproxy import Config, ConfigError, Context, errors

from . import UNAVAILABLE
from .credentials import Unavailable

log = logging.getLogger(__name__)

SECTION = "auth"
#: Where a connection's identity is kept in ``ctx.stash``.
STASH = "auth.negotiate"
#: What to install when python-gssapi is missing.
INSTALL = ("install geproxy[kerberos] (python-gssapi; on Debian it builds with "
           "libkrb5-dev and gcc)")

T = TypeVar("T")


def add_options(section: Any) -> None:
    """Declare the Kerberos options of ``[auth]``."""
    (
        section
        .add("keytab", "path", "",
             "The proxy's Kerberos keytab; empty: no Negotiate. Needs geproxy[kerberos].")
        .add("principal", "str", "",
             "The proxy's service principal (HTTP/proxy.corp.example); empty: any in the "
             "keytab.")
        .add("strip_realm", "bool", "off",
             "on: alice@CORP.EXAMPLE is the user alice (only for the realms of "
             "kerberos_realms).")
        .add("kerberos_realms", "list", "",
             "The realms whose users are accepted; empty: the realm of the principal (or "
             "the default realm).")
    )


# -- principal names (no GSSAPI) -------------------------------------------------------------


def split_principal(text: str) -> tuple[list[str], Optional[str]]:
    """The components and the realm (None without ``@``) of a principal as Kerberos
    writes it (``HTTP/proxy.corp.example@CORP.EXAMPLE``; a backslash quotes the next
    character). ValueError for what is not one: empty, an empty component or realm, a
    second unquoted ``@``, a backslash at the end."""
    components, realm = [""], None
    current = components
    quoted = False
    for char in text:
        if quoted:
            current[-1] += "\\" + char
            quoted = False
        elif char == "\\":
            quoted = True
        elif char == "@":
            if realm is not None:
                raise ValueError("two unquoted '@'")
            realm, current = "", [""]
        elif char == "/" and realm is None:
            components.append("")
        else:
            current[-1] += char
    if quoted:
        raise ValueError("a backslash at the end")
    if realm is not None:
        realm = current[0]
        if not realm:
            raise ValueError("an empty realm")
    if not all(components):
        raise ValueError("an empty component")
    return components, realm


def user_name(principal: str, realms: frozenset[str], strip_realm: bool,
              fold_case: bool) -> Optional[str]:
    """The user a client principal (``alice@CORP.EXAMPLE``, as GSSAPI displays it) is, or
    None when its realm is not one of ``realms`` (compared exactly, as Kerberos does).
    ``fold_case`` lower-cases the name part; ``strip_realm`` leaves the realm out."""
    try:
        components, realm = split_principal(principal)
    except ValueError:
        return None
    if realm is None or realm not in realms:
        return None
    name = "/".join(components)
    if fold_case:
        name = name.lower()
    return name if strip_realm else f"{name}@{realm}"


def reason(exc: BaseException) -> str:
    """What GSSAPI says went wrong, without its boilerplate: the minor status (``Request
    is a replay``, ``Clock skew too great``) when it says something, else the major one
    (``An unsupported mechanism was requested``)."""
    text = str(exc)
    minor = re.search(r"Minor \(\d+\): (.+)$", text, re.S)
    if minor and minor.group(1).strip() not in ("", "Unknown error", "Success"):
        return minor.group(1).strip()
    major = re.search(r"Major \(\d+\): (.+?)(, Minor|$)", text, re.S)
    return (major.group(1) if major else text).strip()


# -- the acceptor -----------------------------------------------------------------------------


class Incomplete(Exception):
    """The token needs another leg (SPNEGO's mechanism negotiation, a mechanism other
    than Kerberos first): the proxy makes none, as a connection keeps no half context."""


@dataclass(frozen=True)
class Proof:
    """What a connection proved (in ``ctx.stash[STASH]``): the principal, and the digest
    of the token that proved it."""

    digest: bytes
    principal: str


def _in_thread(function: Callable[..., T], *args: Any) -> T:
    """Run a blocking GSSAPI call in gevent's thread pool: the loop goes on meanwhile."""
    return gevent.get_hub().threadpool.apply(function, args)


class Negotiator:
    """Accepts Negotiate tokens; remembers each HTTP/1.1 connection's user."""

    def __init__(self, keytab: str, principal: str = "", strip_realm: bool = False,
                 realms: frozenset[str] = frozenset(), fold_case: bool = True) -> None:
        self.keytab = keytab
        self.principal = principal
        self.strip_realm = strip_realm
        self.fold_case = fold_case
        #: The accepted realms; empty until first use when they are the default realm.
        self.realms = realms
        self._creds: Any = None
        self._lock = gevent.lock.Semaphore()

    @classmethod
    def from_config(cls, config: Config, section: Any,
                    fold_case: bool) -> Optional["Negotiator"]:
        keytab = section["keytab"]
        if not keytab:
            return None

        def refuse(key: str, message: str) -> ConfigError:
            return ConfigError(message, path=config.path, section=SECTION, key=key)

        try:
            import gssapi.raw  # noqa: F401  (only that it imports: nothing is acquired)
        except ImportError as exc:
            raise refuse("keytab", f"Negotiate needs python-gssapi, which does not "
                                   f"import ({exc}): {INSTALL}") from None
        try:
            with open(keytab, "rb"):
                pass  # readable by this user: the workers run as it
        except OSError as exc:
            raise refuse("keytab", f"cannot read {keytab}: {exc.strerror or exc}") from None
        principal = section["principal"]
        realm = None
        if principal:
            try:
                _, realm = split_principal(principal)
            except ValueError as exc:
                raise refuse("principal", f"not a Kerberos principal: {principal!r} "
                                          f"({exc})") from None
        realms = frozenset(section["kerberos_realms"])
        if not realms and realm:
            realms = frozenset([realm])
        return cls(keytab, principal, section["strip_realm"], realms, fold_case)

    # -- per connection ---------------------------------------------------------------

    def connection_user(self, ctx: Context) -> Optional[str]:
        """The user Negotiate authenticated this connection as (HTTP/1.1), or None."""
        proof = None if ctx.http2 else ctx.stash.get(STASH)
        if proof is None or not self.realms:
            return None
        return self._user(proof.principal)

    def authenticate(self, ctx: Context, token: str) -> Optional[str]:
        """The user a Negotiate token proves (and, on HTTP/1.1, the connection's from now
        on), or None; sets ``ctx.auth_result``."""
        if ctx.http2:
            raise errors.HTTP11Required("Negotiate authenticates connections: HTTP/1.1 only")
        try:
            raw = base64.b64decode(token, validate=True)
        except (binascii.Error, ValueError):
            raw = b""
        if not raw:
            log.info("[%s] auth: malformed Negotiate token", ctx.conn_id)
            ctx.auth_result = "failed"
            return None
        digest = hashlib.sha256(raw).digest()
        proof = ctx.stash.get(STASH)
        if proof is not None and proof.digest == digest and self.realms:
            # The token that authenticated this connection, sent again (curl does, with
            # every request): the connection's user. GSSAPI would call it a replay.
            user = self._user(proof.principal)  # None if a reload refused its realm
            ctx.auth_result = "connection" if user is not None else "failed"
            return user
        ctx.stash.pop(STASH, None)  # a new token: the connection is what it proves, or none
        try:
            principal = self._accept(raw)
        except Unavailable as exc:
            log.error("[%s] auth: Negotiate cannot be accepted: %s", ctx.conn_id, exc)
            ctx.auth_result = "unavailable"
            raise errors.BackendUnavailable(f"Kerberos: {exc}", details=UNAVAILABLE) from None
        except Incomplete:
            log.info("[%s] auth: Negotiate token refused: it needs another round (only "
                     "Kerberos in one round is accepted)", ctx.conn_id)
            ctx.auth_result = "failed"
            return None
        except _gss_error() as exc:
            log.info("[%s] auth: Negotiate token refused: %s", ctx.conn_id, reason(exc))
            ctx.auth_result = "failed"
            return None
        user = self._user(principal)
        if user is None:
            log.info("[%s] auth: Negotiate: %s is not of a realm of kerberos_realms (%s)",
                     ctx.conn_id, principal, " ".join(sorted(self.realms)))
            ctx.auth_result = "failed"
            return None
        ctx.auth_result = "ok"
        ctx.stash[STASH] = Proof(digest, principal)  # HTTP/1.1 here: the connection's
        return user

    def _user(self, principal: str) -> Optional[str]:
        return user_name(principal, self.realms, self.strip_realm, self.fold_case)

    # -- GSSAPI (in the thread pool) ----------------------------------------------------

    def _accept(self, token: bytes) -> str:
        """The client principal a complete token proves. Acquires the credentials (and
        the default realm, when the realms are it) on first use."""
        creds = self._credentials()
        return _in_thread(_accept_token, creds, token)

    def _credentials(self) -> Any:
        with self._lock:  # one acquisition, whatever the greenlets asking at once
            if self._creds is not None:
                return self._creds
            realm = None
            try:
                creds = _in_thread(_acquire, self.keytab, self.principal)
                if not self.realms:
                    realm = _in_thread(_default_realm)
            except _gss_error() as exc:
                whose = f" ({self.principal})" if self.principal else ""
                raise Unavailable(f"keytab {self.keytab}{whose}: {reason(exc)}") from None
            if not self.realms:
                if not realm:
                    raise Unavailable("the krb5 configuration names no default_realm: set "
                                      "kerberos_realms")
                self.realms = frozenset([realm])
            self._creds = creds
            return creds


def _gss_error() -> type[Exception]:
    """GSSAPI's exception class (an ``except`` clause evaluates it only when something
    was raised: by then ``from_config`` made sure python-gssapi imports)."""
    import gssapi.raw

    return gssapi.raw.GSSError  # type: ignore[no-any-return]


def _acquire(keytab: str, principal: str) -> Any:
    """Acceptor credentials from ``keytab`` (the credential store extension: no
    process-wide variable), for ``principal`` or, if empty, any principal it holds."""
    import gssapi.raw

    name = None
    if principal:
        name = gssapi.raw.import_name(principal.encode(), gssapi.raw.NameType.kerberos_principal)
    return gssapi.raw.acquire_cred_from({b"keytab": keytab.encode()}, name=name,
                                        usage="accept").creds


def _default_realm() -> str:
    """The default realm of the krb5 configuration: the realm a name without one gets."""
    import gssapi.raw

    name = gssapi.raw.import_name(b"geproxy", gssapi.raw.NameType.kerberos_principal)
    canonical = gssapi.raw.canonicalize_name(name, gssapi.raw.MechType.kerberos)
    return split_principal(gssapi.raw.display_name(canonical, name_type=False)
                           .name.decode())[1] or ""


def _accept_token(creds: Any, token: bytes) -> str:
    """The principal a token proves in one round; Incomplete when it needs more, a
    GSSError when GSSAPI refuses it (replay, expired ticket, wrong key, clock skew)."""
    import gssapi.raw

    result = gssapi.raw.accept_sec_context(token, acceptor_creds=creds)
    if result.more_steps:
        raise Incomplete()
    return gssapi.raw.display_name(result.initiator_name, name_type=False).name.decode()
