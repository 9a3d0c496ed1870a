"""``external``: Squid's external ACL helpers (``external_acl_type``), for the ``acl``
plugin's ``external NAME [ARG...]`` condition.

    [external]
    helpers =
        staff ttl=60: %LOGIN: /usr/lib/squid/ext_file_userip_acl -f /etc/squid/userip
        group_check children=3 concurrency=10: %LOGIN: /usr/local/bin/group-check
    [acl]
    rules =
        allow external group_check staff

Each line of ``helpers`` is ``NAME [KEY=VALUE ...]: FORMAT: COMMAND``: the helper's name as
conditions use it, per-helper options (``ttl``, ``negative_ttl``, ``children`` (or Squid's
``children-max``), ``concurrency``, ``timeout``, ``cache``), the FORMAT codes of each line it
is sent (protocol.py), and the program with its arguments (split as a shell would, never run
through one). The condition's arguments follow the fields on the line.

The helper's answer decides the condition: ``OK`` matches, ``ERR`` does not, ``BH`` (broken
helper), a process that dies or does not answer within ``timeout`` answer 503 with
``Proxy-Status: ...; details="external ACL helper unavailable"``. ``user=`` names the request's
user when it has none; ``group=`` adds groups a later ``group`` condition sees. ``OK`` is
remembered ``ttl``, ``ERR`` ``negative_ttl``, per helper and line; ``BH`` never.

``%LOGIN`` needs a user: a request without one is asked for credentials (``ctx.authenticate``)
and answered 407 when there is a way to give them (as Squid's ``%LOGIN`` does); with none on
offer the field is ``-``.

Processes (helpers.py) start on the first question in a worker: never at configure, in
``check-config``, ``explain`` or the master; ``unconfigure`` (reload, stop) kills them.

In ``geproxy explain`` (``ctx.offline``), no helper is started: a remembered answer is used,
and otherwise ``errors.BackendUnavailable`` says that explain runs no helper. The re-check
of open tunnels after a reload (``reload_tunnels = recheck``) is also only deciding, but in
the worker that holds the tunnel: a condition the tunnel's request met already keeps its
answer (the core asks once per request and condition), and a condition new to it is asked of
the helper as a new request would be (remembered answers first), so that no tunnel is closed
only because a helper was not asked; a helper that cannot answer then closes it (fail
closed).
"""

from __future__ import annotations

import logging
import re
import shlex
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import cachetools

from geproxy import (
    Config,
    ConfigError,
    Context,
    ExternalAnswer,
    OptionRegistry,
    Request,
    did_you_mean,
    errors,
    hookimpl,
    parse_duration,
)

from .helpers import DETAILS, Helpers, Unavailable
from .protocol import Answer, Format, parse_format, request_line

__all__ = ["External", "HelperSpec", "parse_helper"]

log = logging.getLogger(__name__)

SECTION = "external"
#: What explain says when no answer to a helper's question is remembered.
NOT_ASKED = "geproxy explain runs no external ACL helper, and no answer to this question " \
    "is remembered"

_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
#: Per-helper options: name -> kind.
_OPTIONS = {"ttl": "duration", "negative_ttl": "duration", "children": "int",
            "concurrency": "int", "timeout": "duration", "cache": "int"}
#: Squid's spellings of the same.
_ALIASES = {"children-max": "children", "negative-ttl": "negative_ttl",
            "cache_size": "cache"}


@dataclass(frozen=True)
class HelperSpec:
    """One line of ``helpers``, parsed."""

    name: str
    format: Format
    argv: tuple[str, ...]
    ttl: float
    negative_ttl: float
    children: int
    concurrency: int
    timeout: float
    cache: int


def parse_helper(text: str, defaults: dict[str, Any]) -> HelperSpec:
    """``NAME [KEY=VALUE ...]: FORMAT: COMMAND``; ValueError saying what is wrong."""
    head, sep, rest = text.partition(":")
    fmt, sep2, command = rest.partition(":")
    if not sep or not sep2:
        raise ValueError("a helper is NAME [KEY=VALUE ...]: FORMAT: COMMAND")
    words = head.split()
    if not words or not _NAME.fullmatch(words[0]):
        raise ValueError(f"not a helper name: {words[0] if words else ''!r}")
    options = dict(defaults)
    for word in words[1:]:
        key, eq, value = word.partition("=")
        key = _ALIASES.get(key, key)
        if not eq or key not in _OPTIONS:
            raise ValueError(f"unknown helper option {word!r}"
                             + did_you_mean(key, list(_OPTIONS) + list(_ALIASES))
                             + f" (options: {', '.join(_OPTIONS)})")
        try:
            parsed: Any = parse_duration(value) if _OPTIONS[key] == "duration" \
                else int(value)
        except ValueError:
            raise ValueError(f"{key}={value!r}: not a {_OPTIONS[key]}") from None
        if parsed < 0 or (key in ("children", "timeout") and parsed <= 0):
            raise ValueError(f"{key}={value!r}: out of range")
        options[key] = parsed
    try:
        argv = tuple(shlex.split(command))
    except ValueError as exc:
        raise ValueError(f"the command does not parse: {exc}") from None
    if not argv:
        raise ValueError("no command to run")
    return HelperSpec(words[0], parse_format(fmt), argv, **options)


class _Cache(cachetools.TLRUCache):  # type: ignore[type-arg]
    """line -> Answer, each for its own time to live (ttl for OK, negative_ttl for ERR)."""


class External:
    name = SECTION

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        #: The clock of the caches (tests put a fake clock here).
        self.clock = clock
        self.specs: dict[str, HelperSpec] = {}
        #: The running helpers of this worker, by name: made on first use.
        self.helpers: dict[str, Helpers] = {}
        self.caches: dict[str, _Cache] = {}
        self.queue_factor = 2

    @hookimpl
    def add_options(self, registry: OptionRegistry) -> None:
        (
            registry.section(SECTION)
            .add("helpers", "lines", "",
                 "External ACL helpers, one per line: NAME [KEY=VALUE ...]: FORMAT: COMMAND "
                 "(Squid's external_acl_type); [acl] rules use them as external NAME [ARG...].")
            .add("children", "int", "5",
                 "Processes per helper in each worker, at most (Squid's children-max).",
                 minimum=1)
            .add("concurrency", "int", "0",
                 "Questions in flight per process, with channel ids; 0: one at a time, no "
                 "channel id (Squid's concurrency).", minimum=0)
            .add("ttl", "duration", "1h",
                 "How long an OK answer is remembered; 0 remembers none.", minimum=0)
            .add("negative_ttl", "duration", "1h",
                 "How long an ERR answer is remembered; 0 remembers none.", minimum=0)
            .add("timeout", "duration", "10s",
                 "How long a question may wait for its answer; past it the request gets 503 "
                 "and the process is killed (the next question starts another).",
                 minimum=0.001)
            .add("cache_size", "int", "10000",
                 "Answers remembered per helper, at most (least recently used go first).",
                 minimum=0)
        )

    @hookimpl
    def configure(self, config: Config) -> None:
        section = config.section(SECTION)
        defaults = {"ttl": section["ttl"], "negative_ttl": section["negative_ttl"],
                    "children": section["children"], "concurrency": section["concurrency"],
                    "timeout": section["timeout"], "cache": section["cache_size"]}
        specs: dict[str, HelperSpec] = {}
        problems: list[ConfigError] = []
        for number, text in enumerate(section["helpers"], 1):
            try:
                spec = parse_helper(text, defaults)
                if spec.name in specs:
                    raise ValueError(f"the helper {spec.name!r} is given twice")
            except ValueError as exc:
                problems.append(ConfigError(f"{exc}: {text!r}", path=config.path,
                                            section=SECTION, key="helpers", line=number))
                continue
            specs[spec.name] = spec
        if problems:
            raise problems[0] if len(problems) == 1 else errors.ConfigErrors(problems)
        self.specs = specs
        self.caches = {name: _Cache(max(1, spec.cache), _expiry(spec),
                                    timer=lambda: self.clock()) for name, spec in specs.items()}
        # Nothing is started here: helpers start on their first question, in a worker.

    @hookimpl
    def unconfigure(self, config: Config) -> None:
        helpers, self.helpers = self.helpers, {}
        for running in helpers.values():
            running.stop()

    @hookimpl
    def external_acl(self, ctx: Context, request: Request, name: str,
                     arguments: Sequence[str]) -> Optional[ExternalAnswer]:
        spec = self.specs.get(name)
        if spec is None:
            return None
        user = ctx.user
        if spec.format.needs_login and user is None:
            user = ctx.authenticate(request) if request.host else ctx.user
            if user is None and request.host:
                challenges = ctx.challenges(request)
                if challenges:
                    raise errors.AuthenticationRequired(
                        f"external helper {name} needs a user (%LOGIN), and the request "
                        "proves none", challenges=challenges)
        line = request_line(spec.format.fields(ctx, request, user), arguments)
        cache = self.caches[name]
        answer: Optional[Answer] = cache.get(line)
        if answer is None and ctx.offline:
            raise errors.BackendUnavailable(f"external helper {name}: {NOT_ASKED}",
                                            details=DETAILS)
        if answer is None:
            answer = self._helpers(spec).ask(line)
            if answer.result == "BH":
                raise Unavailable(f"external helper {name} answered BH (broken helper)"
                                  + (f": {answer.message}" if answer.message else ""))
            if (spec.ttl if answer.match else spec.negative_ttl) > 0 and spec.cache:
                cache[line] = answer
        return ExternalAnswer(answer.match, user=answer.user, groups=answer.groups,
                              message=answer.message or answer.log)

    def _helpers(self, spec: HelperSpec) -> Helpers:
        running = self.helpers.get(spec.name)
        if running is None:
            running = self.helpers[spec.name] = Helpers(
                spec.name, spec.argv, spec.children, spec.concurrency, spec.timeout,
                queue=spec.children * max(1, spec.concurrency) * self.queue_factor,
                clock=self.clock)
        return running


def _expiry(spec: HelperSpec) -> Callable[[str, Answer, float], float]:
    def until(line: str, answer: Answer, now: float) -> float:
        return now + (spec.ttl if answer.match else spec.negative_ttl)
    return until
