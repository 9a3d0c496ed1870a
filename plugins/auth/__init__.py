"""``auth``: proxy authentication: Basic against an htpasswd file or an LDAP directory,
Kerberos (SPNEGO ``Negotiate``) with a keytab, and the directory's groups.

    [auth]
    htpasswd = /etc/geproxy/htpasswd
    ldap_url = ldap://dc1.corp.example ldap://dc2.corp.example
    keytab = /etc/geproxy/proxy.keytab
    require = always

With no source configured (the default) the plugin does nothing. Otherwise it is an
identity source: its ``authenticate`` hook names the user a request's
``Proxy-Authorization`` proves, its ``auth_challenge`` offers ``Negotiate`` (with a keytab)
and ``Basic realm="..."`` (with an htpasswd file or a directory) for the 407 answered to a
request without a user, and its ``user_groups`` names the directory's groups of a user.
Who asks depends on ``require``:

- ``always`` (the default, fail-closed): every request that no rule denies needs valid
  credentials. The ``acl`` walk runs first: a ``deny`` it reaches without needing a user
  answers 403 with no 407; any request it lets through without credentials gets the 407 here
  (``on_request``, after the ``acl`` plugin's). An ``allow`` is never granted without a user.
- ``rules``: Squid's way: credentials are asked only when the ``acl`` walk reaches a rule with
  a ``user`` or ``group`` condition. Credentials sent although no rule needed them are checked
  (cached) only to name the user in the log: wrong ones are not refused, and the log then
  names no user.

Basic credentials are checked by the htpasswd file for the users it has, and by the
directory for every other user (so local service accounts can live beside the directory).
Every check goes through one cache (credentials.py): ``cache_ttl``, ``negative_ttl``,
``max_failures`` and ``stale_ttl`` apply to both sources alike. Empty passwords are refused
without asking anyone (a directory takes a bind with an empty password as anonymous).

Negotiate authenticates a connection, not a request (negotiate.py): the next requests of a
kept-alive HTTP/1.1 connection, and its CONNECT tunnel, are the connection's user without a
new token. A request on such a connection that carries Basic credentials of another user
names two users and is refused (400), as a client certificate with ``Proxy-Authorization``
is. On HTTP/2, where nothing holds for a connection, a request that needs Negotiate gets the
stream reset with ``HTTP_1_1_REQUIRED``: browsers retry it over HTTP/1.1.

The client may retry a 407 on the same connection (the core closes it only when the request
had a body). Requests addressed to the proxy itself (origin-form, ``GET /healthz``) are never
challenged: ``ctx.user`` is None for them. On a TLS listener with client certificates
(``[tls] client_cert``), a verified certificate authenticates: its name
(``ctx.tls.identity``) is the user, and no password is asked for.

User names compare case-insensitively by default (``user_case = insensitive``), as Squid's
``casesensitive off`` and Active Directory do: ``ALICE`` logs in as ``alice`` (the name as the
file writes it; lower case for the directory), and two users of the file may not differ by
case alone. Passwords are always case-sensitive. ``user_case = sensitive`` compares names
exactly.

Nothing connects before it is needed: directory connections, Kerberos credentials (and the
replay cache) are made on the first request that needs them, in a worker; ``check-config``,
``explain`` and the master only read the configuration and check that the files exist.
"""

from __future__ import annotations

import base64
import binascii
import logging
import re
import time
from typing import Any, Callable, Iterable, Optional

from geproxy import (
    Config,
    ConfigError,
    Context,
    Headers,
    OptionRegistry,
    Request,
    Response,
    errors,
    hookimpl,
)

from .credentials import CredentialCache, PasswordSource, Unavailable, Verdict
from .htpasswd import HtpasswdFile

log = logging.getLogger(__name__)

SECTION = "auth"
#: When credentials are needed: for every request let through, or only for rules naming users.
REQUIRE = ("always", "rules")
#: What a client reads in Proxy-Status when no directory answers.
UNAVAILABLE = "authentication backend unavailable"

#: Printable ASCII without the quote and the backslash: a realm needs no escaping.
_REALM = re.compile(r'[ !#-\[\]-~]+')


class Auth:
    name = SECTION

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        #: The clock of the reload checks and of the caches (replaceable in tests).
        self.clock = clock
        self.realm = "geproxy"
        self.proxy_name = "geproxy"
        self.require = "always"
        self.fold_case = True
        self.htpasswd: Optional[HtpasswdFile] = None
        #: The LDAP directory (ldap.py): a Basic source and the groups; None without one.
        self.directory: Any = None
        #: Kerberos (negotiate.py): None without a keytab.
        self.negotiator: Any = None
        self.cache: Optional[CredentialCache] = None

    @property
    def active(self) -> bool:
        return bool(self.htpasswd or self.directory or self.negotiator)

    @hookimpl
    def add_options(self, registry: OptionRegistry) -> None:
        section = registry.section(SECTION)
        (
            section
            .add("htpasswd", "path", "",
                 "An Apache htpasswd file (bcrypt, apr1, SHA-256 or SHA-512 hashes); "
                 "empty: none. Its users are checked here, any other against ldap_url.")
            .add("realm", "str", "geproxy",
                 "The realm of the Basic challenge, shown by browsers.")
            .add("cache_size", "int", "10000",
                 "Users whose good password is remembered; 0 remembers none.", minimum=0)
            .add("cache_ttl", "duration", "5m",
                 "How long a good password (and a directory user's groups) is remembered; "
                 "0 checks every request.", minimum=0)
            .add("negative_ttl", "duration", "1m",
                 "How long a wrong password is remembered (it is not checked again "
                 "meanwhile); 0 remembers none.", minimum=0)
            .add("max_failures", "int", "10",
                 "Wrong passwords per user within negative_ttl after which the user's "
                 "other passwords are refused unchecked until the window passes (a guesser "
                 "cannot hammer the directory); 0: no limit.", minimum=0)
            .add("stale_ttl", "duration", "15m",
                 "When no directory server answers: how long past cache_ttl a remembered "
                 "good password (and groups) still holds; then 503.", minimum=0)
            .add("check_interval", "duration", "2s",
                 "How often, at most, the htpasswd file is checked for changes.", minimum=0)
            .add("require", "str", "always",
                 "always: every request no [acl] rule denies needs valid credentials; rules: "
                 "only requests whose [acl] walk reaches a user or group condition (Squid's "
                 "way).", choices=REQUIRE)
            .add("user_case", "str", "insensitive",
                 "insensitive: ALICE logs in as alice and matches user alice (Squid, Active "
                 "Directory); sensitive: names compare exactly. Passwords are always "
                 "case-sensitive.", choices=("insensitive", "sensitive"))
        )
        from . import ldap, negotiate
        ldap.add_options(section)
        negotiate.add_options(section)

    @hookimpl
    def configure(self, config: Config) -> None:
        section = config.section(SECTION)
        realm = section["realm"]
        if not _REALM.fullmatch(realm):
            raise ConfigError(
                f"not a realm: {realm!r} (printable ASCII, no quote or backslash, not empty)",
                path=config.path, section=SECTION, key="realm")
        self.realm = realm
        self.proxy_name = config.proxy_name
        self.require = section["require"]
        self.fold_case = section["user_case"] == "insensitive"
        self.cache = CredentialCache(
            size=section["cache_size"], ttl=section["cache_ttl"],
            negative_ttl=section["negative_ttl"], stale_ttl=section["stale_ttl"],
            max_failures=section["max_failures"], clock=self._now)
        self.htpasswd = None
        path = section["htpasswd"]
        if path:
            source = HtpasswdFile(path, fold_case=self.fold_case,
                                  interval=section["check_interval"], clock=self._now)
            try:
                source.load()
            except OSError as exc:
                raise ConfigError(f"cannot read {path}: {exc.strerror or exc}",
                                  path=config.path, section=SECTION,
                                  key="htpasswd") from None
            except ValueError as exc:
                raise ConfigError(f"{path}: {exc}", path=config.path, section=SECTION,
                                  key="htpasswd") from None
            source.changed = self.cache.forget_failures
            self.htpasswd = source
            if not source.users and not section["ldap_url"]:
                log.warning("%s: [auth] htpasswd %s has no user: every request through the "
                            "proxy is answered 407", config.path, path)
        from . import ldap, negotiate
        self.directory = ldap.Directory.from_config(config, section, self.fold_case,
                                                    self._now)
        self.negotiator = negotiate.Negotiator.from_config(config, section, self.fold_case)

    @hookimpl
    def unconfigure(self, config: Config) -> None:
        if self.directory is not None:
            self.directory.close()

    def _now(self) -> float:
        return self.clock()

    # -- requests -------------------------------------------------------------------------

    @hookimpl
    def authenticate(self, ctx: Context, request: Request) -> Optional[str]:
        """The user the request's credentials prove (its name as the source writes it),
        or None. Requests to the proxy itself prove nobody: they are never challenged."""
        if not self.active or not request.host:
            return None
        return self.check_credentials(ctx, request.headers)

    @hookimpl
    def auth_challenge(self, ctx: Context, request: Request) -> Optional[list[str]]:
        if not self.active:
            return None
        offers = []
        if self.negotiator is not None:
            if ctx.http2:
                # Negotiate cannot work per stream: the client is sent to HTTP/1.1, where
                # it is offered, with Basic, on the connection it will open.
                raise errors.HTTP11Required(
                    f"{request.method} {request.target}: Negotiate needs HTTP/1.1")
            offers.append("Negotiate")
        if self.htpasswd is not None or self.directory is not None:
            offers.append(f'Basic realm="{self.realm}"')
        return offers

    @hookimpl
    def user_groups(self, ctx: Context, user: str) -> Optional[Iterable[str]]:
        """The directory's groups of ``user`` (a Kerberos principal is looked up by its
        name without the realm). No directory server answering and nothing remembered:
        503."""
        if self.directory is None or not self.directory.has_groups or ctx.offline:
            return None  # offline: geproxy explain asks no directory
        try:
            return self.directory.groups(user.partition("@")[0])
        except Unavailable as exc:
            raise errors.BackendUnavailable(
                f"groups of {user!r}: {exc}", details=UNAVAILABLE) from None

    # trylast: after the acl plugin's walk (plain), so that a request the rules deny
    # without needing a user gets its 403, not a 407.
    @hookimpl(trylast=True)
    def on_request(self, ctx: Context, request: Request) -> Optional[Response]:
        if not self.active or not request.host:
            return None
        if self.require == "rules":
            # Not needed by any rule the walk reached: a user named only for the log. A
            # request without credentials is not made to prove anything.
            if ctx.decide_only or "proxy-authorization" in request.headers:
                ctx.authenticate(request)
            return None
        if ctx.authenticate(request) is None:
            raise errors.AuthenticationRequired(
                f"{request.method} {request.target} from {ctx.client_addr[0]}: [auth] "
                "require = always, and the request proves no user",
                challenges=ctx.challenges(request))
        return None

    def challenge(self) -> Response:
        """The 407 answer of Basic, as the core makes it from ``AuthenticationRequired``
        (for tests and plugins that answer with this plugin's challenge)."""
        headers = Headers([
            ("Proxy-Authenticate", f'Basic realm="{self.realm}"'),
            ("Content-Type", "text/plain; charset=utf-8"),
            ("Proxy-Status", f"{self.proxy_name}; error=http_request_denied"),
            ("Cache-Control", "no-store"),
        ])
        return Response(407, headers, b"407 Proxy Authentication Required\n")

    def check_credentials(self, ctx: Context, headers: Headers) -> Optional[str]:
        """The user the request's credentials prove, or None (logged)."""
        values = headers.get_all("Proxy-Authorization")
        connection = self.negotiator.connection_user(ctx) if self.negotiator else None
        if not values:
            if connection is not None:
                ctx.auth_scheme, ctx.auth_result = "negotiate", "connection"
                return connection
            log.debug("[%s] auth: no credentials", ctx.conn_id)
            return None
        if len(values) > 1:
            log.info("[%s] auth: %d Proxy-Authorization fields", ctx.conn_id, len(values))
            return None
        scheme, _, token = values[0].strip().partition(" ")
        scheme = scheme.lower()
        if scheme == "negotiate" and self.negotiator is not None:
            ctx.auth_scheme = "negotiate"
            return self.negotiator.authenticate(ctx, token.strip())
        if scheme != "basic":
            log.info("[%s] auth: not credentials of a scheme on offer: %r", ctx.conn_id,
                     scheme[:20])
            return None
        ctx.auth_scheme = "basic"
        return self._basic(ctx, token, connection)

    def _basic(self, ctx: Context, token: str, connection: Optional[str]) -> Optional[str]:
        try:
            decoded = base64.b64decode(token.strip(), validate=True)
        except (binascii.Error, ValueError):
            log.info("[%s] auth: malformed Basic credentials", ctx.conn_id)
            ctx.auth_result = "failed"
            return None
        name, sep, password = decoded.partition(b":")
        try:
            claimed = name.decode("utf-8")
        except UnicodeDecodeError:
            claimed = ""
        source, user = self._source_of(claimed)
        if connection is not None and user != connection:
            raise errors.ClientError(
                f"Basic credentials of {claimed[:64]!r} on a connection Negotiate "
                f"authenticated as {connection!r}")
        if source is None or user is None or not sep or not claimed:
            log.info("[%s] auth: unknown user %r", ctx.conn_id, claimed or name[:64])
            ctx.auth_result = "failed"
            return None
        if not password:
            log.info("[%s] auth: empty password for %r", ctx.conn_id, user)
            ctx.auth_result = "failed"
            return None
        assert self.cache is not None  # configured
        try:
            verdict: Verdict = self.cache.check(source, user, password)
        except Unavailable as exc:
            ctx.auth_result = "unavailable"
            raise errors.BackendUnavailable(
                f"{user!r}: no {source.name} server answered: {exc}",
                details=UNAVAILABLE) from None
        ctx.auth_result = verdict.result
        if verdict.user is None:
            log.info("[%s] auth: wrong password for %r (%s, %s)", ctx.conn_id, user,
                     source.name, verdict.result)
        elif verdict.result == "stale":
            log.warning("[%s] auth: %r taken from the cache: no %s server answers",
                        ctx.conn_id, user, source.name)
        return verdict.user

    def _source_of(self, claimed: str) -> tuple[Optional[PasswordSource], Optional[str]]:
        """Where the user's password is checked, and the user's name there."""
        if self.htpasswd is not None:
            self.htpasswd.refresh()
            user = self.htpasswd.canonical(claimed)
            if user is not None:
                return self.htpasswd, user
        if self.directory is not None:
            return self.directory, self.directory.canonical(claimed)
        return None, None
