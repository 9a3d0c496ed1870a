"""static_groups: the groups of each user, from the plugin's own section.

The example identity plugin of docs/plugins.md; tests/test_docs.py loads this file into a
running proxy. It gives ``[acl]`` ``group`` conditions their groups, as a directory would,
from a list written in the configuration:

    [geproxy]
    plugins = static_groups:StaticGroups

    [static_groups]
    groups =
        staff: alice bob
        contractors: carol

    [acl]
    rules =
        allow group staff
        deny all

It authenticates nobody: the user comes from the ``authenticate`` hook of another plugin
(``[auth]``), and this plugin is asked for that user's groups only when a rule needs them.
"""

from __future__ import annotations

from geproxy import Config, ConfigError, Context, OptionRegistry, hookimpl


class StaticGroups:
    #: The name it is registered under, and the name of its INI section.
    name = "static_groups"

    def __init__(self) -> None:
        # Set by configure(): each user's groups.
        self.groups: dict[str, frozenset[str]] = {}

    @hookimpl
    def add_options(self, registry: OptionRegistry) -> None:
        registry.section(self.name).add(
            "groups", "lines", "",
            "One 'group: user user ...' per line; users are named as authenticate names them.")

    @hookimpl
    def configure(self, config: Config) -> None:
        members: dict[str, set[str]] = {}
        for line in config.section(self.name)["groups"]:
            group, sep, users = line.partition(":")
            if not sep or not group.strip() or len(group.split()) != 1:
                raise ConfigError(f"not 'group: user user ...': {line!r}", path=config.path,
                                  section=self.name, key="groups")
            for user in users.split():
                members.setdefault(user, set()).add(group.strip())
        self.groups = {user: frozenset(groups) for user, groups in members.items()}

    @hookimpl
    def user_groups(self, ctx: Context, user: str) -> frozenset[str] | None:
        # None, not an error, for a user this plugin does not know: another may know them.
        return self.groups.get(user)
