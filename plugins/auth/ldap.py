"""The LDAP directory of ``[auth]``: Basic passwords checked by a bind, and users' groups.

(Being written: the interface the plugin uses is fixed here.)
"""

from __future__ import annotations

from typing import Any, Callable, Hashable, Optional

from geproxy import Config, ConfigError

SECTION = "auth"


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
             "Search then bind: where users are searched for.")
        .add("ldap_filter", "str", "(uid={user})",
             "Search then bind: the filter that finds the user, {user} standing for the "
             "name (RFC 4515 escaped).")
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


class Directory:
    """A ``PasswordSource`` over an LDAP directory, and the groups of its users."""

    name = "ldap"
    has_groups = False

    @classmethod
    def from_config(cls, config: Config, section: Any, fold_case: bool,
                    clock: Callable[[], float]) -> Optional["Directory"]:
        if not section["ldap_url"]:
            return None
        raise ConfigError("LDAP is not built yet", path=config.path, section=SECTION,
                          key="ldap_url")

    def canonical(self, user: str) -> Optional[str]:
        raise NotImplementedError

    def stamp(self, user: str) -> Hashable:
        return None

    def verify(self, user: str, password: bytes) -> bool:
        raise NotImplementedError

    def groups(self, user: str) -> frozenset[str]:
        raise NotImplementedError

    def close(self) -> None:
        pass
