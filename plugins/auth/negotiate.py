"""Kerberos for ``[auth]``: SPNEGO ``Negotiate``, one authentication per connection.

(Being written: the interface the plugin uses is fixed here.)
"""

from __future__ import annotations

from typing import Any, Optional

from geproxy import Config, ConfigError, Context

SECTION = "auth"


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


class Negotiator:
    """Accepts Negotiate tokens; remembers each connection's user."""

    @classmethod
    def from_config(cls, config: Config, section: Any,
                    fold_case: bool) -> Optional["Negotiator"]:
        if not section["keytab"]:
            return None
        raise ConfigError("Kerberos is not built yet", path=config.path, section=SECTION,
                          key="keytab")

    def connection_user(self, ctx: Context) -> Optional[str]:
        """The user Negotiate authenticated this connection as (HTTP/1.1), or None."""
        raise NotImplementedError

    def authenticate(self, ctx: Context, token: str) -> Optional[str]:
        """The user a Negotiate token proves (and, on HTTP/1.1, the connection's from now
        on), or None; sets ``ctx.auth_result``."""
        raise NotImplementedError
