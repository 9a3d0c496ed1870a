"""The htpasswd source of ``[auth]``: Apache's ``user:hash`` file, re-read when it changes.

Accepted hashes are bcrypt (``$2y$``, ``htpasswd -B``), apr1-MD5 (``$apr1$``, ``-m``),
SHA-256-crypt and SHA-512-crypt (``$5$``/``$6$``, ``-2``/``-5``), verified by passlib in
gevent's thread pool (bcrypt takes tens to hundreds of milliseconds), with at most half of
the pool's threads hashing at once so that lookups of the system resolver always find a free
thread. Any other line (``{SHA}``, DES crypt, plain text) stops the start with its line
number. The file is stat'ed at most once per ``check_interval``; a reloaded file that cannot
be read or parsed keeps the last good users (logged once).
"""

from __future__ import annotations

import logging
import os
import re
from typing import Callable, Hashable, Optional

import gevent
import gevent.lock
from passlib.context import CryptContext

log = logging.getLogger("geproxy_plugins.auth")

#: The passlib schemes of the hashes Apache's htpasswd writes that are accepted.
SCHEMES = ("bcrypt", "apr_md5_crypt", "sha256_crypt", "sha512_crypt")
#: bcrypt uses the first 72 bytes of a password; Apache ignores the rest, so does this.
BCRYPT_MAX_BYTES = 72

_HINT = "use bcrypt (htpasswd -B), apr1 (-m), SHA-256 (-2) or SHA-512 (-5)"

Stamp = tuple[int, int, int]


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


def _stamp(stat: os.stat_result) -> Stamp:
    # The inode catches a file replaced by rename, the size a rewrite within one mtime tick.
    return (stat.st_ino, stat.st_size, stat.st_mtime_ns)


class HtpasswdFile:
    """A ``PasswordSource`` (credentials.py) over an htpasswd file."""

    name = "htpasswd"

    def __init__(self, path: str, *, fold_case: bool, interval: float,
                 clock: Callable[[], float]) -> None:
        self.path = path
        self.fold_case = fold_case
        self.interval = interval
        self.clock = clock
        self.users: dict[str, str] = {}
        #: The users by their lower-case name, with user_case = insensitive.
        self._names: dict[str, str] = {}
        self.context = CryptContext(schemes=list(SCHEMES))
        self._stamp: Optional[Stamp] = None
        #: When the file was last checked; None: at the next request.
        self._checked: Optional[float] = None
        self._hashing: Optional[gevent.lock.Semaphore] = None
        #: Called after the users changed (the cache forgets its wrong passwords).
        self.changed: Callable[[], None] = lambda: None

    def load(self) -> None:
        """Read the file at configure: OSError or ValueError (with the line) stops it."""
        self._stamp, data = self._read()
        self._set_users(parse_htpasswd(data, self.context, self.fold_case))
        self._checked = None

    # -- PasswordSource -------------------------------------------------------------------

    def canonical(self, user: str) -> Optional[str]:
        if self.fold_case:
            user = self._names.get(user.lower(), user)
        return user if user in self.users else None

    def stamp(self, user: str) -> Hashable:
        return self.users.get(user)

    def verify(self, user: str, password: bytes) -> bool:
        stored = self.users.get(user)
        if stored is None:
            return False
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
            return bool(self.context.verify(password, stored))
        except ValueError:  # a hash passlib cannot use after all: no password matches it
            return False

    # -- the file -------------------------------------------------------------------------

    def _read(self) -> tuple[Stamp, bytes]:
        with open(self.path, "rb") as handle:
            return _stamp(os.fstat(handle.fileno())), handle.read()

    def refresh(self) -> None:
        """Re-read the file if it changed, at most once per ``interval``."""
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
            users = parse_htpasswd(data, self.context, self.fold_case)
        except ValueError as exc:
            log.warning("auth: keeping the last %d users: %s: %s", len(self.users),
                        self.path, exc)
            return
        self._set_users(users)
        self.changed()
        log.info("auth: %d users from %s", len(users), self.path)

    def _set_users(self, users: dict[str, str]) -> None:
        self.users = users
        self._names = {user.lower(): user for user in users} if self.fold_case else {}
