"""The LDAP directory of ``[auth]``: Basic passwords checked by a bind, and users' groups.

Squid's ``basic_ldap_auth`` and ``ext_ldap_group_acl`` in one place:

- a password is checked by a simple bind as the user: directly, with ``ldap_bind_dn``
  naming the user's entry (``uid={user},ou=people,dc=corp,dc=example``), or by a search
  first (``ldap_base`` and ``ldap_filter``, as the service account ``ldap_bind_user`` or
  anonymously) that must find exactly one entry, then a bind as that entry;
- a user's groups come from a group search (``ldap_group_base``, ``ldap_group_filter``,
  their names in ``ldap_group_attribute``) or from the user's ``ldap_member_of`` attribute
  (each DN's first RDN value); nested groups are not followed (on Active Directory the
  filter ``(member:1.2.840.113556.1.4.1941:={dn})`` has the server follow them).

A user name is attacker input: it reaches a DN escaped per RFC 4514 and a filter escaped
per RFC 4515, so ``*``, ``(``, ``)``, ``\\`` and NUL are only ever characters of a name.
Names the directory could not hold (empty, over ``MAX_NAME`` characters, control
characters) or would match as another name (leading, trailing or doubled spaces, format
characters: RFC 4518 ignores them) are refused before anything is asked.

Everything is validated by ``Directory.from_config`` without a connection; the pool
(ldappool.py) connects on the first check, in the worker that makes it. Checked passwords
are cached by the plugin's ``CredentialCache``; groups are cached here, per user, for
``cache_ttl`` and, when no server answers, up to ``stale_ttl`` longer.
"""

from __future__ import annotations

import logging
import re
import unicodedata
import urllib.parse
from dataclasses import dataclass
from typing import Any, Callable, Hashable, Optional

import ldap3  # type: ignore[import-untyped]  # no type information
from cachetools import TTLCache
from ldap3.core import exceptions as ldap_errors  # type: ignore[import-untyped]
from ldap3.utils.dn import escape_rdn, parse_dn  # type: ignore[import-untyped]

from geproxy import Config, ConfigError

from .credentials import SingleFlight, Unavailable
from .ldappool import Down, Endpoint, Link, Pool, Settings, result_name

log = logging.getLogger(__name__)

SECTION = "auth"
#: The longest user name sent to the directory.
MAX_NAME = 256
#: Names no directory entry has: control characters (NUL included).
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
#: Unicode categories a directory's string preparation drops or folds into a space.
_IGNORED = ("Cc", "Cf", "Zs", "Zl", "Zp")
#: Faults of a request a user name produced (a DN or filter ldap3 will not encode): the
#: answer is "no such user", not "server down".
_USER_FAULTS = (ldap_errors.LDAPInvalidDnError, ldap_errors.LDAPInvalidFilterError,
                ldap_errors.LDAPInvalidValueError)


def add_options(section: Any) -> None:
    """Declare the ``ldap_*`` options of ``[auth]``."""
    (
        section
        .add("ldap_url", "list", "",
             "LDAP servers, tried in order (failover): ldap://host:port or ldaps://host:port; "
             "empty: no directory.")
        .add("ldap_bind_dn", "str", "",
             "Direct bind: the user's DN, {user} standing for the name (RFC 4514 escaped), "
             "e.g. uid={user},ou=people,dc=corp,dc=example; empty: search then bind.")
        .add("ldap_base", "str", "",
             "Search then bind: where users are searched for (the whole subtree).")
        .add("ldap_filter", "str", "(uid={user})",
             "Search then bind: the filter that finds the user, {user} standing for the "
             "name (RFC 4515 escaped); exactly one entry must match.")
        .add("ldap_bind_user", "str", "",
             "The service account's DN for searches; empty: anonymous searches.")
        .add("ldap_bind_password_file", "path", "",
             "A file holding the service account's password (its first line).")
        .add("ldap_starttls", "bool", "off",
             "Upgrade ldap:// connections with StartTLS before any bind.")
        .add("ldap_ca_file", "path", "",
             "CA certificates (PEM) that verify the directory's certificate for ldaps:// "
             "and StartTLS; empty: the system's.")
        .add("ldap_timeout", "duration", "5s",
             "Each directory operation (connect, bind, search) at most this long; then the "
             "next server.", minimum=0.001)
        .add("ldap_pool_size", "int", "4",
             "Directory connections kept open per worker.", minimum=1)
        .add("ldap_group_base", "str", "",
             "Where groups are searched for; empty (with ldap_member_of empty): no groups "
             "from the directory.")
        .add("ldap_group_filter", "str", "(&(objectClass=groupOfNames)(member={dn}))",
             "The filter that finds a user's groups: {dn} the user's entry, {user} the name.")
        .add("ldap_group_attribute", "str", "cn",
             "The attribute of a group entry that is its name.")
        .add("ldap_member_of", "str", "",
             "An attribute of the user's entry listing its groups' DNs (memberOf), read "
             "instead of a group search; empty: none.")
    )


def escape_filter(value: str) -> str:
    """``value`` as an RFC 4515 assertion value: ``*``, ``(``, ``)``, ``\\`` and NUL (and
    every other byte but printable ASCII) written ``\\XX``. Spaces too: ldap3 strips
    them from the ends of a value it parses."""
    return "".join(chr(b) if 0x20 < b < 0x7f and b not in b"*()\\" else f"\\{b:02x}"
                   for b in value.encode("utf-8", "surrogatepass"))


def unescape_dn_value(value: str) -> str:
    """An RFC 4514 attribute value as the text it stands for (``\\,`` -> ``,``,
    ``\\c3\\a9`` -> ``é``)."""
    raw = bytearray()
    index = 0
    while index < len(value):
        char = value[index]
        pair = value[index + 1:index + 3]
        if char == "\\" and re.fullmatch(r"[0-9a-fA-F]{2}", pair):
            raw.append(int(pair, 16))
            index += 3
        elif char == "\\" and index + 1 < len(value):
            raw.extend(value[index + 1].encode())
            index += 2
        else:
            raw.extend(char.encode())
            index += 1
    return raw.decode("utf-8", "replace")


def _fill(template: str, **values: str) -> str:
    """``template`` with each ``{name}`` replaced (no other brace is touched: DNs and
    filters may hold braces of their own)."""
    for name, value in values.items():
        template = template.replace("{" + name + "}", value)
    return template


@dataclass(frozen=True)
class _Groups:
    names: frozenset[str]
    #: When the directory said so (the clock's time).
    at: float


class Directory:
    """A ``PasswordSource`` over an LDAP directory, and the groups of its users."""

    name = "ldap"

    def __init__(self, pool: Pool, *, fold_case: bool, bind_dn: str, base: str,
                 filter: str, group_base: str, group_filter: str, group_attribute: str,
                 member_of: str, cache_size: int, cache_ttl: float, stale_ttl: float,
                 clock: Callable[[], float]) -> None:
        self.pool = pool
        self.fold_case = fold_case
        self.bind_dn = bind_dn
        self.base = base
        self.filter = filter
        self.group_base = group_base
        self.group_filter = group_filter
        self.group_attribute = group_attribute
        self.member_of = member_of
        self.cache_ttl = cache_ttl
        self.clock = clock
        keep = cache_ttl + stale_ttl
        self._groups: Optional[TTLCache[str, _Groups]] = (
            TTLCache(maxsize=cache_size, ttl=keep, timer=clock)
            if cache_size and keep else None)
        self._flights = SingleFlight()
        #: Users' DNs found by searches (they change seldom), so that a groups lookup
        #: after a password check searches no more.
        self._dns: Optional[TTLCache[str, str]] = (
            TTLCache(maxsize=cache_size, ttl=keep, timer=clock)
            if cache_size and keep and not bind_dn else None)

    @property
    def has_groups(self) -> bool:
        return bool(self.group_base or self.member_of)

    @classmethod
    def from_config(cls, config: Config, section: Any, fold_case: bool,
                    clock: Callable[[], float]) -> Optional["Directory"]:
        """The directory ``[auth]`` names, or None without ``ldap_url``. Validates every
        option and reads the password file; connects nowhere."""
        urls = section["ldap_url"]
        if not urls:
            return None

        def fault(key: str, message: str) -> ConfigError:
            return ConfigError(message, path=config.path, section=SECTION, key=key)

        endpoints = []
        for url in urls:
            try:
                endpoints.append(parse_url(url))
            except ValueError as exc:
                raise fault("ldap_url", str(exc)) from None
        bind_dn, base, user_filter = (section["ldap_bind_dn"], section["ldap_base"],
                                      section["ldap_filter"])
        if bind_dn:
            if "{user}" not in bind_dn:
                raise fault("ldap_bind_dn", f"{bind_dn!r} has no {{user}}: it would name "
                            "the same entry for every user")
            _check_dn(bind_dn.replace("{user}", "x"), fault, "ldap_bind_dn")
        else:
            if not base:
                raise fault("ldap_base", "needed when ldap_bind_dn is empty (search then "
                            "bind): where are users searched for?")
            if "{user}" not in user_filter:
                raise fault("ldap_filter", f"{user_filter!r} has no {{user}}: it would "
                            "find the same entries for every user")
            _check_filter(_fill(user_filter, user="x"), fault, "ldap_filter")
        for key in ("ldap_base", "ldap_group_base", "ldap_bind_user"):
            if section[key]:
                _check_dn(section[key], fault, key)
        group_filter = section["ldap_group_filter"]
        if section["ldap_group_base"]:
            if "{dn}" not in group_filter and "{user}" not in group_filter:
                raise fault("ldap_group_filter", f"{group_filter!r} has neither {{dn}} nor "
                            "{user}: it would find the same groups for every user")
            _check_filter(_fill(group_filter, dn="x", user="x"), fault, "ldap_group_filter")
        for key in ("ldap_group_attribute", "ldap_member_of"):
            if section[key] and not re.fullmatch(r"[A-Za-z][A-Za-z0-9-]*|[0-9.]+",
                                                 section[key]):
                raise fault(key, f"not an attribute name: {section[key]!r}")
        service = None
        bind_user, password_file = section["ldap_bind_user"], section["ldap_bind_password_file"]
        if bind_user:
            if not password_file:
                raise fault("ldap_bind_password_file", "needed with ldap_bind_user")
            try:
                with open(password_file, encoding="utf-8") as handle:
                    password = handle.readline().rstrip("\r\n")
            except (OSError, UnicodeDecodeError) as exc:
                raise fault("ldap_bind_password_file",
                            f"cannot read {password_file}: "
                            f"{getattr(exc, 'strerror', None) or exc}") from None
            if not password:
                raise fault("ldap_bind_password_file", f"{password_file}: the first line "
                            "is empty (an empty password binds anonymously)")
            service = (bind_user, password)
        elif password_file:
            raise fault("ldap_bind_user", "ldap_bind_password_file is set: whose password "
                        "is it? name the account in ldap_bind_user")
        ca_file = section["ldap_ca_file"]
        if ca_file:
            try:
                with open(ca_file, "rb") as pem:
                    if b"-----BEGIN CERTIFICATE-----" not in pem.read():
                        raise fault("ldap_ca_file", f"{ca_file}: no PEM certificate in it")
            except OSError as exc:
                raise fault("ldap_ca_file",
                            f"cannot read {ca_file}: {exc.strerror or exc}") from None
        settings = Settings(timeout=section["ldap_timeout"], starttls=section["ldap_starttls"],
                            ca_file=ca_file, service=service)
        if settings.starttls and all(endpoint.tls for endpoint in endpoints):
            log.warning("%s: [auth] ldap_starttls = on, and every ldap_url is ldaps://: "
                        "StartTLS is not used", config.path)
        pool = Pool(endpoints, section["ldap_pool_size"], settings, clock)
        return cls(pool, fold_case=fold_case, bind_dn=bind_dn, base=base, filter=user_filter,
                   group_base=section["ldap_group_base"], group_filter=group_filter,
                   group_attribute=section["ldap_group_attribute"],
                   member_of=section["ldap_member_of"], cache_size=section["cache_size"],
                   cache_ttl=section["cache_ttl"], stale_ttl=section["stale_ttl"],
                   clock=clock)

    # -- PasswordSource ---------------------------------------------------------------------

    def canonical(self, user: str) -> Optional[str]:
        """None for a name no entry may be known by: empty, too long, with control or
        format characters, or with spaces the directory's matching rules would ignore
        (RFC 4518: `` alice`` binds as ``alice``, and would evade a rule naming ``alice``)."""
        if (not user or len(user) > MAX_NAME or _CONTROL.search(user)
                or user != " ".join(user.split(" ")).strip() or "  " in user
                or any(unicodedata.category(char) in _IGNORED and char != " "
                       for char in user)):
            return None
        return user.lower() if self.fold_case else user

    def stamp(self, user: str) -> Hashable:
        return None  # what the directory holds is known only by asking it

    def verify(self, user: str, password: bytes) -> bool:
        if not password or self.canonical(user) is None:
            return False
        def check(link: Link) -> bool:
            dn = self._user_dn(link, user)
            if dn is None:
                log.info("ldap: %s: no single entry for %r", link.endpoint.url, user)
                return False
            try:
                if link.bind(dn, password):
                    return True
            except _USER_FAULTS:
                pass
            log.info("ldap: %s: bind as %r refused: %s", link.endpoint.url, dn,
                     result_name(link.connection))
            return False

        return self.pool.run(check, searches=not self.bind_dn)

    # -- groups -----------------------------------------------------------------------------

    def groups(self, user: str) -> frozenset[str]:
        """The names of ``user``'s groups (empty for a user the directory does not have);
        ``Unavailable`` when no server answers and none are remembered."""
        name = self.canonical(user)
        if name is None:
            return frozenset()
        known = self._groups.get(name) if self._groups is not None else None
        if known is not None and self.clock() - known.at < self.cache_ttl:
            return known.names
        try:
            # One lookup for concurrent lookups of a user (a page's requests when the
            # entry has just expired).
            names = self._flights.run(name, lambda: self.pool.run(
                lambda link: self._lookup_groups(link, name), searches=True))
        except Unavailable:
            if known is not None:
                log.warning("ldap: the groups of %r taken from the cache: no server answers",
                            name)
                return known.names
            raise
        if self._groups is not None:
            self._groups[name] = _Groups(names, self.clock())
        return names

    def _lookup_groups(self, link: Link, user: str) -> frozenset[str]:
        dn = self._user_dn(link, user)
        if dn is None:
            return frozenset()
        names: set[str] = set()
        if self.member_of:
            link.as_service()
            for entry in self._search(link, dn, "(objectClass=*)", [self.member_of],
                                      ldap3.BASE):
                for value in entry[1].get(self.member_of, ()):
                    try:
                        names.add(unescape_dn_value(parse_dn(value)[0][1]))
                    except (ldap_errors.LDAPException, IndexError):
                        log.info("ldap: %r: not a DN in %s: %r", user, self.member_of,
                                 value[:100])
        if self.group_base:
            link.as_service()
            query = _fill(self.group_filter, dn=escape_filter(dn), user=escape_filter(user))
            for _, attributes in self._search(link, self.group_base, query,
                                              [self.group_attribute], ldap3.SUBTREE):
                names.update(attributes.get(self.group_attribute, ()))
        return frozenset(names)

    # -- the directory ----------------------------------------------------------------------

    def _user_dn(self, link: Link, user: str) -> Optional[str]:
        """The DN of ``user``'s entry: from ``ldap_bind_dn``, or by a search that finds
        exactly one entry (None otherwise)."""
        if self.bind_dn:
            return _fill(self.bind_dn, user=escape_rdn(user))
        known = self._dns.get(user) if self._dns is not None else None
        if known is not None:
            return known
        link.as_service()
        query = _fill(self.filter, user=escape_filter(user))
        try:
            found = self._search(link, self.base, query, [], ldap3.SUBTREE, limit=2)
        except _USER_FAULTS:
            return None
        if len(found) != 1:
            return None
        dn = found[0][0]
        if self._dns is not None:
            self._dns[user] = dn
        return dn

    def _search(self, link: Link, base: str, query: str, attributes: list[str], scope: str,
                limit: int = 0) -> list[tuple[str, dict[str, list[str]]]]:
        """The entries found: (DN, {attribute: values}). A result past ``limit`` entries
        counts as one entry too many; a missing base as none."""
        connection = link.connection
        connection.search(base, query, search_scope=scope,
                          attributes=attributes or [ldap3.NO_ATTRIBUTES], size_limit=limit,
                          time_limit=max(1, int(link.settings.timeout + 0.999)))
        code = (connection.result or {}).get("result")
        if code in (51, 52):
            raise Down(f"search answered {result_name(connection)}")
        if code == 4:  # sizeLimitExceeded
            return [("", {})] * (limit + 1)
        if code not in (0, 32):
            log.info("ldap: %s: search of %r under %r: %s", link.endpoint.url, query, base,
                     result_name(connection))
            return []
        found = []
        for item in connection.response or ():
            if item.get("type") != "searchResEntry":
                continue
            raw = item.get("raw_attributes") or {}
            values = {key: [v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v)
                            for v in vals]
                      for key, vals in raw.items()}
            # Attribute names compare case-insensitively: keep them as configured.
            wanted = {name.lower(): name for name in attributes}
            found.append((item["dn"], {wanted.get(key.lower(), key): vals
                                       for key, vals in values.items()}))
        return found

    def close(self) -> None:
        self.pool.close()


def parse_url(url: str) -> Endpoint:
    """``ldap://host[:port][/]`` or ``ldaps://...`` as an ``Endpoint``; ValueError says
    what is wrong."""
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"not an LDAP URL: {url!r}: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme not in ("ldap", "ldaps"):
        raise ValueError(f"not an LDAP URL: {url!r} (ldap://host:port or ldaps://host:port)")
    if not parts.hostname:
        raise ValueError(f"{url!r} names no host")
    if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username:
        raise ValueError(f"{url!r}: only a scheme, a host and a port (the base and the "
                         "filter are options of their own)")
    tls = scheme == "ldaps"
    return Endpoint(url=f"{scheme}://{parts.netloc}", host=parts.hostname,
                    port=port or (636 if tls else 389), tls=tls)


def _check_dn(dn: str, fault: Callable[[str, str], ConfigError], key: str) -> None:
    try:
        parse_dn(dn)
    except ldap_errors.LDAPException as exc:
        raise fault(key, f"not a DN: {dn!r}: {exc}") from None


def _check_filter(text: str, fault: Callable[[str, str], ConfigError], key: str) -> None:
    from ldap3.operation.search import parse_filter  # type: ignore[import-untyped]

    try:
        parse_filter(text, None, auto_escape=False, auto_encode=True, validator=None,
                     check_names=False)
    except ldap_errors.LDAPException as exc:
        raise fault(key, f"not an LDAP filter: {text!r}: {exc}") from None
