"""Suggestions for a name the configuration does not know: the closest known one, or, for
a directive of Squid's that no spelling is close to, geproxy's equivalent.

Every hint is ``"; did you mean 'NAME'?"`` (or ""), to end the error's message with.
"""

from __future__ import annotations

import difflib
from typing import Iterable, Mapping, Optional

__all__ = ["did_you_mean", "SQUID_NAMES", "option_hint", "section_hint"]


def did_you_mean(word: str, names: Iterable[str],
                 aliases: Optional[Mapping[str, str]] = None) -> str:
    """A hint for a misspelt name: ``"; did you mean 'x'?"``, or "" when nothing is close.
    ``aliases`` maps names edit distance cannot find (another product's, Squid's
    ``dstdomain``) to ours; they are looked up first, case-insensitively."""
    if aliases:
        alias = aliases.get(word.lower())
        if alias is not None:
            return f"; did you mean {alias!r}?"
    close = difflib.get_close_matches(word, list(names), n=1, cutoff=0.75)
    return f"; did you mean {close[0]!r}?" if close else ""


#: Squid's directives (squid.conf) that geproxy has an equivalent of under another name,
#: as ``(section, key)``: what an admin who knows Squid may write. Names that are the same
#: in both (``workers``, ``connect_timeout``, ``via``, ``access_log`` ...) are not here: a
#: key set in the wrong section is found by its name (``option_hint``). Each equivalent
#: is in docs/configuration.md's tables; tests/test_config_diagnostics.py checks that each
#: names an option of a built-in plugin.
SQUID_NAMES: dict[str, tuple[str, str]] = {
    "http_port": ("geproxy", "listen"),
    "https_port": ("geproxy", "listen"),
    "request_start_timeout": ("geproxy", "header_timeout"),
    "request_timeout": ("geproxy", "header_timeout"),
    "read_timeout": ("geproxy", "idle_timeout"),
    "client_idle_pconn_timeout": ("geproxy", "idle_timeout"),
    "client_lifetime": ("geproxy", "max_tunnel_lifetime"),
    "shutdown_lifetime": ("geproxy", "graceful_timeout"),
    "request_header_max_size": ("geproxy", "max_header_size"),
    "reply_header_max_size": ("geproxy", "max_header_size"),
    "visible_hostname": ("geproxy", "via"),
    "logformat": ("geproxy", "log_format"),
    "proxy_protocol_access": ("geproxy", "proxy_protocol_from"),
    "server_persistent_connections": ("geproxy", "upstream_keepalive"),
    "server_idle_pconn_timeout": ("geproxy", "upstream_idle_timeout"),
    "pconn_timeout": ("geproxy", "upstream_idle_timeout"),
    "dns_nameservers": ("resolver", "nameservers"),
    "hosts_file": ("resolver", "nameservers"),
    "dns_v4_first": ("resolver", "ipv6"),
    "dns_timeout": ("resolver", "timeout"),
    "ipcache_size": ("dnscache", "max_entries"),
    "positive_dns_ttl": ("dnscache", "max_ttl"),
    "negative_dns_ttl": ("dnscache", "negative_ttl"),
    "auth_param": ("auth", "htpasswd"),
    "acl": ("acl", "rules"),
    "http_access": ("acl", "rules"),
    "external_acl_type": ("external", "helpers"),
    "client_ip_max_connections": ("acl", "max_connections_per_client"),
    "cache_peer": ("parents", "parents"),
    "never_direct": ("parents", "rules"),
    "always_direct": ("parents", "rules"),
}


def option_hint(section: str, key: str, options: Mapping[str, Iterable[str]]) -> str:
    """The hint for ``key``, unknown in ``section``: the closest key of that section, else
    the equivalent of a Squid directive (``'[geproxy] listen'`` for ``http_port``), else
    the same key in another section (``'[resolver] nameservers'``); ``options`` maps each
    known section to its keys. Only names in ``options`` are suggested."""
    known = {name: set(keys) for name, keys in options.items()}
    hint = did_you_mean(key, known.get(section, ()))
    if hint:
        return hint
    aliases = {squid: f"[{where}] {name}" for squid, (where, name) in SQUID_NAMES.items()
               if name in known.get(where, ())}
    hint = did_you_mean(key, (), aliases)
    if hint:
        return hint
    other = next((where for where, keys in known.items() if where != section and key in keys),
                 None)
    return "" if other is None else f"; did you mean '[{other}] {key}'?"


def section_hint(section: str, sections: Iterable[str]) -> str:
    """The hint for an unknown ``[section]``: the closest known section (``'[parents]'``
    for ``[parent]``), else the section of a Squid directive's equivalent (``[cache_peer]``:
    ``'[parents]'``); only ``sections`` are suggested."""
    known = set(sections)
    aliases = {f"[{squid}]": f"[{where}]" for squid, (where, _) in SQUID_NAMES.items()
               if where in known}
    return did_you_mean(f"[{section}]", [f"[{name}]" for name in sorted(known)], aliases)
