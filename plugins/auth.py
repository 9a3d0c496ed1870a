"""``auth``: Basic proxy authentication against an Apache htpasswd file.

    [auth]
    htpasswd = /etc/geproxy/htpasswd
    realm = geproxy
    require = always
    user_case = insensitive

With ``htpasswd`` empty (the default) the plugin does nothing. Otherwise it is an identity
source: its ``authenticate`` hook names the user that a request's ``Proxy-Authorization:
Basic`` credentials prove, and its ``auth_challenge`` offers ``Basic realm="..."`` for the
407 answered to a request without a user. Who asks depends on ``require``:

- ``always`` (the default, fail-closed): every request that no rule denies needs valid
  credentials. The ``acl`` walk runs first: a ``deny`` it reaches without needing a user
  answers 403 with no 407; any request it lets through without credentials gets the 407 here
  (``on_request``, after the ``acl`` plugin's). An ``allow`` is never granted without a user.
- ``rules``: Squid's way: credentials are asked only when the ``acl`` walk reaches a rule with
  a ``user`` or ``group`` condition. Credentials sent although no rule needed them are checked
  (cached) only to name the user in the log: wrong ones are not refused, and the log then
  names no user.

The client may retry a 407 on the same connection (the core closes it only when the request
had a body). Requests addressed to the proxy itself (origin-form, ``GET /healthz``) are never
challenged: ``ctx.user`` is None for them. On a TLS listener with client certificates
(``[tls] client_cert``), a verified certificate authenticates: its name
(``ctx.tls.identity``) is the user, and no password is asked for.

User names compare case-insensitively by default (``user_case = insensitive``), as Squid's
``casesensitive off`` and Active Directory do: ``ALICE`` logs in as ``alice`` (the name as the
file writes it), and two users of the file may not differ by case alone. Passwords are always
case-sensitive. ``user_case = sensitive`` compares names exactly.

The file is what Apache's ``htpasswd`` writes: ``user:hash`` per line, blank lines and ``#``
lines skipped. Accepted hashes are bcrypt (``$2y$``, ``htpasswd -B``), apr1-MD5 (``$apr1$``,
``htpasswd -m``), SHA-256-crypt and SHA-512-crypt (``$5$``/``$6$``, ``htpasswd -2``/``-5``);
passlib verifies them. Any other line (``{SHA}``, DES crypt, plain text) stops the start with
its line number. The file is stat'ed at most once per ``check_interval`` and reloaded when it
changed; a reloaded file that cannot be read or parsed keeps the last good users (logged once).

Checking a password is slow by design (bcrypt: tens to hundreds of milliseconds), so:

- it runs in gevent's thread pool, never in the event loop, and at most half of the pool's
  threads hash at once, so that lookups of the system resolver always find a free thread;
- concurrent checks of the same credentials share one hashing;
- a good password is cached per user for ``cache_ttl`` (at most ``cache_size`` users) as an
  HMAC of the credentials under a key made at start, never the password itself, and compared
  with ``hmac.compare_digest``. A wrong one is cached too, in a small separate cache (1024
  entries, same TTL), so a client that repeats a wrong password costs one hashing per
  ``cache_ttl``; it is never taken for a good one. Both are valid only while the user's hash
  in the file is the one they were checked against: a reload drops the good entries of users
  whose hash changed or who were removed, and clears the wrong ones.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
import os
import re
import secrets
import time
from dataclasses import dataclass
from typing import Callable, Optional

import gevent
import gevent.event
import gevent.lock
from cachetools import TTLCache
from passlib.context import CryptContext

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

log = logging.getLogger(__name__)

SECTION = "auth"
#: The passlib schemes of the hashes Apache's htpasswd writes that are accepted.
SCHEMES = ("bcrypt", "apr_md5_crypt", "sha256_crypt", "sha512_crypt")
#: When credentials are needed: for every request let through, or only for rules naming users.
REQUIRE = ("always", "rules")
#: Wrong credentials remembered at most (never more than cache_size).
NEGATIVE_CACHE_SIZE = 1024
#: bcrypt uses the first 72 bytes of a password; Apache ignores the rest, so does this.
BCRYPT_MAX_BYTES = 72

#: Printable ASCII without the quote and the backslash: a realm needs no escaping.
_REALM = re.compile(r'[ !#-\[\]-~]+')
_HINT = "use bcrypt (htpasswd -B), apr1 (-m), SHA-256 (-2) or SHA-512 (-5)"


def _scheme_name(stored: str) -> str:
    """What an unsupported hash is, for the error message, without showing the hash."""
    if stored.startswith("{SHA}"):
        return "SHA-1 {SHA}"
    found = re.match(r"\$[0-9A-Za-z]+\$", stored)
    if found:
        return f"{found.group(0)} hashes"
    if len(stored) == 13:
        return "DES crypt or plain text"
    return "plain text or an unknown scheme"


def parse_htpasswd(data: bytes, context: CryptContext,
                   fold_case: bool = False) -> dict[str, str]:
    """The users of an htpasswd file and their hashes; ValueError naming the line of the
    first line that cannot be used. With ``fold_case``, two users may not differ by case
    alone (they would be one user)."""
    users: dict[str, str] = {}
    folded: set[str] = set()
    for number, raw in enumerate(data.split(b"\n"), 1):
        line = raw.strip()
        if not line or line.startswith(b"#"):
            continue
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError(f"line {number}: not UTF-8") from None
        user, sep, rest = text.partition(":")
        if not sep or not user:
            raise ValueError(f"line {number}: not user:hash")
        stored = rest.split(":", 1)[0].strip()
        scheme = context.identify(stored, required=False)
        if scheme is None:
            raise ValueError(f"line {number}: unsupported hash for user {user!r} "
                             f"({_scheme_name(stored)}): {_HINT}")
        try:
            context.handler(scheme).from_string(stored)
        except ValueError:
            raise ValueError(f"line {number}: malformed {scheme} hash for user {user!r}"
                             ) from None
        if user in users:
            raise ValueError(f"line {number}: user {user!r} is given twice")
        if fold_case and user.lower() in folded:
            raise ValueError(f"line {number}: user {user!r} differs from another only by "
                             "case, and user_case is insensitive")
        folded.add(user.lower())
        users[user] = stored
    return users


@dataclass(frozen=True)
class _Verified:
    """A good password, as an HMAC of the credentials, and the hash it was checked against."""

    digest: bytes
    stored: str


Stamp = tuple[int, int, int]


def _stamp(stat: os.stat_result) -> Stamp:
    # The inode catches a file replaced by rename, the size a rewrite within one mtime tick.
    return (stat.st_ino, stat.st_size, stat.st_mtime_ns)


class Auth:
    name = SECTION

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        #: The clock of the reload checks and of both caches (replaceable in tests).
        self.clock = clock
        self.path = ""
        self.realm = "geproxy"
        self.interval = 2.0
        self.proxy_name = "geproxy"
        self.users: dict[str, str] = {}
        self.require = "always"
        self.fold_case = True
        #: The users by their lower-case name, with user_case = insensitive.
        self._names: dict[str, str] = {}
        self._context = CryptContext(schemes=list(SCHEMES))
        self._key = secrets.token_bytes(32)
        self._stamp: Optional[Stamp] = None
        #: When the file was last checked; None: at the next request.
        self._checked: Optional[float] = None
        self._good: Optional[TTLCache[str, _Verified]] = None
        self._bad: Optional[TTLCache[bytes, str]] = None
        self._flights: dict[tuple[bytes, str], gevent.event.AsyncResult] = {}
        self._hashing: Optional[gevent.lock.Semaphore] = None

    @hookimpl
    def add_options(self, registry: OptionRegistry) -> None:
        (
            registry.section(SECTION)
            .add("htpasswd", "path", "",
                 "An Apache htpasswd file (bcrypt, apr1, SHA-256 or SHA-512 hashes); "
                 "empty: no authentication.")
            .add("realm", "str", "geproxy",
                 "The realm of the Proxy-Authenticate challenge, shown by browsers.")
            .add("cache_size", "int", "10000",
                 "Users whose good password is remembered; 0 remembers none.", minimum=0)
            .add("cache_ttl", "duration", "5m",
                 "How long a checked password is remembered; 0 checks every request.",
                 minimum=0)
            .add("check_interval", "duration", "2s",
                 "How often, at most, the file is checked for changes.", minimum=0)
            .add("require", "str", "always",
                 "always: every request no [acl] rule denies needs valid credentials; rules: "
                 "only requests whose [acl] walk reaches a user or group condition (Squid's "
                 "way).", choices=REQUIRE)
            .add("user_case", "str", "insensitive",
                 "insensitive: ALICE logs in as alice and matches user alice (Squid, Active "
                 "Directory); sensitive: names compare exactly. Passwords are always "
                 "case-sensitive.", choices=("insensitive", "sensitive"))
        )

    @hookimpl
    def configure(self, config: Config) -> None:
        section = config.section(SECTION)
        realm = section["realm"]
        if not _REALM.fullmatch(realm):
            raise ConfigError(
                f"not a realm: {realm!r} (printable ASCII, no quote or backslash, not empty)",
                path=config.path, section=SECTION, key="realm")
        self.realm = realm
        self.interval = section["check_interval"]
        self.proxy_name = config.proxy_name
        self.require = section["require"]
        self.fold_case = section["user_case"] == "insensitive"
        size, ttl = section["cache_size"], section["cache_ttl"]
        if size and ttl:
            timer = self._now
            self._good = TTLCache(maxsize=size, ttl=ttl, timer=timer)
            self._bad = TTLCache(maxsize=min(size, NEGATIVE_CACHE_SIZE), ttl=ttl, timer=timer)
        else:
            self._good = self._bad = None
        self.path = section["htpasswd"]
        self._set_users({})
        if not self.path:
            return
        try:
            self._stamp, data = self._read()
            self._set_users(parse_htpasswd(data, self._context, self.fold_case))
        except OSError as exc:
            raise ConfigError(f"cannot read {self.path}: {exc.strerror or exc}",
                              path=config.path,
                              section=SECTION, key="htpasswd") from None
        except ValueError as exc:
            raise ConfigError(f"{self.path}: {exc}", path=config.path, section=SECTION,
                              key="htpasswd") from None
        self._checked = None
        if not self.users:
            log.warning("%s: [auth] htpasswd %s has no user: every request through the proxy "
                        "is answered 407", config.path, self.path)

    def _now(self) -> float:
        return self.clock()

    # -- the file -------------------------------------------------------------------------

    def _read(self) -> tuple[Stamp, bytes]:
        with open(self.path, "rb") as handle:
            return _stamp(os.fstat(handle.fileno())), handle.read()

    def _refresh(self) -> None:
        now = self.clock()
        if self._checked is not None and now - self._checked < self.interval:
            return
        self._checked = now
        try:
            if _stamp(os.stat(self.path)) == self._stamp:
                return
            stamp, data = self._read()
        except OSError as exc:
            if self._stamp is not None:  # said once, not at every check
                log.warning("auth: keeping the last %d users: cannot read %s: %s",
                            len(self.users), self.path, exc.strerror or exc)
            self._stamp = None
            return
        self._stamp = stamp  # a file that does not parse is reported once, too
        try:
            users = parse_htpasswd(data, self._context, self.fold_case)
        except ValueError as exc:
            log.warning("auth: keeping the last %d users: %s: %s", len(self.users),
                        self.path, exc)
            return
        self._replace(users)

    def _set_users(self, users: dict[str, str]) -> None:
        self.users = users
        self._names = {user.lower(): user for user in users} if self.fold_case else {}

    def _replace(self, users: dict[str, str]) -> None:
        if self._good is not None:
            for user, entry in list(self._good.items()):
                if users.get(user) != entry.stored:
                    self._good.pop(user, None)
        if self._bad is not None:
            self._bad.clear()
        self._set_users(users)
        log.info("auth: %d users from %s", len(users), self.path)

    # -- requests -------------------------------------------------------------------------

    @hookimpl
    def authenticate(self, ctx: Context, request: Request) -> Optional[str]:
        """The user the request's Basic credentials prove (its name as the file writes
        it), or None. Requests to the proxy itself prove nobody: they are never
        challenged."""
        if not self.path or not request.host:
            return None
        self._refresh()
        return self.check_credentials(ctx, request.headers)

    @hookimpl
    def auth_challenge(self, ctx: Context, request: Request) -> Optional[str]:
        if not self.path:
            return None
        return f'Basic realm="{self.realm}"'

    # trylast: after the acl plugin's walk (plain), so that a request the rules deny
    # without needing a user gets its 403, not a 407.
    @hookimpl(trylast=True)
    def on_request(self, ctx: Context, request: Request) -> Optional[Response]:
        if not self.path or not request.host:
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
        """The 407 answer, as the core makes it from ``AuthenticationRequired`` (for tests
        and plugins that answer with this plugin's challenge)."""
        headers = Headers([
            ("Proxy-Authenticate", f'Basic realm="{self.realm}"'),
            ("Content-Type", "text/plain; charset=utf-8"),
            ("Proxy-Status", f"{self.proxy_name}; error=http_request_denied"),
            ("Cache-Control", "no-store"),
        ])
        return Response(407, headers, b"407 Proxy Authentication Required\n")

    def check_credentials(self, ctx: Context, headers: Headers) -> Optional[str]:
        """The user the request's Basic credentials prove, or None (logged)."""
        values = headers.get_all("Proxy-Authorization")
        if not values:
            log.debug("[%s] auth: no credentials", ctx.conn_id)
            return None
        if len(values) > 1:
            log.info("[%s] auth: %d Proxy-Authorization fields", ctx.conn_id, len(values))
            return None
        scheme, _, token = values[0].strip().partition(" ")
        if scheme.lower() != "basic":
            log.info("[%s] auth: not Basic credentials: %r", ctx.conn_id, scheme[:20])
            return None
        try:
            decoded = base64.b64decode(token.strip(), validate=True)
        except (binascii.Error, ValueError):
            log.info("[%s] auth: malformed Basic credentials", ctx.conn_id)
            return None
        name, sep, password = decoded.partition(b":")
        try:
            user = name.decode("utf-8")
        except UnicodeDecodeError:
            user = ""
        if self.fold_case:
            user = self._names.get(user.lower(), user)
        stored = self.users.get(user) if sep else None
        if stored is None:
            log.info("[%s] auth: unknown user %r", ctx.conn_id, user or name[:64])
            return None
        if not self.check(user, decoded, password, stored):
            log.info("[%s] auth: wrong password for %r", ctx.conn_id, user)
            return None
        return user

    def check(self, user: str, credentials: bytes, password: bytes, stored: str) -> bool:
        """Whether ``password`` matches ``stored``, from the caches when they know."""
        digest = hmac.new(self._key, credentials, hashlib.sha256).digest()
        good = self._good.get(user) if self._good is not None else None
        if (good is not None and good.stored == stored
                and hmac.compare_digest(good.digest, digest)):
            return True
        if self._bad is not None and self._bad.get(digest) == stored:
            return False
        ok = self._verify_once(digest, password, stored)
        if ok and self._good is not None:
            self._good[user] = _Verified(digest, stored)
        elif not ok and self._bad is not None:
            self._bad[digest] = stored
        return ok

    def _verify_once(self, digest: bytes, password: bytes, stored: str) -> bool:
        """One hashing for concurrent checks of the same credentials against one hash."""
        key = (digest, stored)
        joined = self._flights.get(key)
        if joined is not None:
            shared = joined.get()
            if shared is not None:
                return bool(shared)
            # The greenlet that was hashing was killed or failed: hash here.
        flight = gevent.event.AsyncResult()
        self._flights[key] = flight
        outcome: Optional[bool] = None
        try:
            outcome = self._verify_off_loop(password, stored)
        finally:
            if self._flights.get(key) is flight:
                del self._flights[key]
            flight.set(outcome)
        return bool(outcome)

    def _verify_off_loop(self, password: bytes, stored: str) -> bool:
        pool = gevent.get_hub().threadpool
        if self._hashing is None:
            self._hashing = gevent.lock.Semaphore(max(1, pool.maxsize // 2))
        with self._hashing:
            return bool(pool.apply(self.verify_hash, (password, stored)))

    def verify_hash(self, password: bytes, stored: str) -> bool:
        """passlib's verdict on ``password`` for ``stored``. Runs in a thread of gevent's
        pool: it must not touch the event loop, the caches or the log."""
        if stored.startswith("$2"):
            password = password[:BCRYPT_MAX_BYTES]
        try:
            return bool(self._context.verify(password, stored))
        except ValueError:  # a hash passlib cannot use after all: no password matches it
            return False
