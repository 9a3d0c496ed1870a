"""The ``geproxy`` command: run the proxy, check a configuration, explain a decision, or
manage the users of the htpasswd file.

gevent's monkey patching happens first, before anything else is imported, so that every
socket, DNS lookup and sleep in geproxy and its plugins is cooperative.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Callable, Optional, Sequence

DEFAULT_CONFIG = "/etc/geproxy/geproxy.ini"


def _parser() -> argparse.ArgumentParser:
    from . import __version__
    from .passwd import DEFAULT_COST, MAX_COST, MIN_COST

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-c", "--config", default=argparse.SUPPRESS, metavar="PATH",
                        help=f"the INI file (default {DEFAULT_CONFIG})")
    common.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS,
                        help="more logging: -v for debug")
    common.add_argument("--log-level", default=argparse.SUPPRESS,
                        choices=["debug", "info", "warning", "error"],
                        help="log level (default info)")
    parser = argparse.ArgumentParser(
        prog="geproxy", parents=[common],
        description="A forward proxy for corporate egress: CONNECT tunnels and plain HTTP.")
    parser.add_argument("--version", action="version", version=f"geproxy {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.add_parser("run", parents=[common], help="run the proxy (the default)")
    sub.add_parser("check-config", parents=[common],
                   help="validate the configuration and exit 0 (valid) or 1 (invalid)")
    explain = sub.add_parser(
        "explain", parents=[common],
        usage="%(prog)s [options] METHOD TARGET\n"
              "       %(prog)s [options] --replay LOG\n"
              "       %(prog)s [options] --cases FILE",
        help="dry-run the policy for one request: every plugin's verdict, no connection; "
             "exit 0 if it would be allowed, 1 if refused. With --replay, an access log "
             "decided again (exit 1 if a verdict changed); with --cases, policy tests",
        description="Dry-run the policy for one request (METHOD TARGET), for every request "
                    "of an access log (--replay: the changed verdicts, exit 1 if any), or "
                    "for a file of cases (--cases: exit 1 at the first mismatch). Exit 2 "
                    "for a bad configuration or unreadable input.")
    explain.add_argument("method", nargs="?", metavar="METHOD", help="CONNECT, GET, ...")
    explain.add_argument("target", nargs="?", metavar="TARGET",
                         help="host:port for CONNECT, http://host/path otherwise")
    batch = explain.add_mutually_exclusive_group()
    batch.add_argument("--replay", metavar="LOG",
                       help="decide every request of this access log (json, geproxy or "
                            "squid format; - for standard input, .gz read as gzip) under "
                            "the configuration, without resolving or connecting, and print "
                            "the requests whose verdict changes")
    batch.add_argument("--cases", metavar="FILE",
                       help="policy tests: lines 'CLIENT USER METHOD TARGET -> EXPECT "
                            "[rule ID]'; stop at the first mismatch")
    explain.add_argument("--log-format", choices=["json", "geproxy", "squid"], default=None,
                         help="the format of the --replay log (default: told by its first "
                              "line)")
    explain.add_argument("--top", type=_count(1), default=10, metavar="N",
                         help="rules and hosts the --replay summary lists (default 10)")
    explain.add_argument("--max-bad-lines", type=_count(0), default=10, metavar="N",
                         help="unreadable --replay lines reported and counted before the "
                              "replay stops with exit 2 (default 10)")
    explain.add_argument("--from", dest="client", default="127.0.0.1", metavar="IP",
                         help="the client address (default 127.0.0.1)")
    explain.add_argument("--user", default=None, metavar="NAME",
                         help="the client as this authenticated user (no password is checked); "
                              "without it, a proxy with [auth] answers 407")
    explain.add_argument("--group", action="append", default=None, metavar="NAME",
                         dest="groups",
                         help="the user is in this group (repeat for several; no directory "
                              "is asked); without it, only groups held in memory ([acl] "
                              "group_file) are seen")
    explain.add_argument("--no-resolve", action="store_true", help="skip name resolution")
    passwd = sub.add_parser(
        "passwd", parents=[common],
        help="add a user to the htpasswd file of [auth], change a password, or delete a user",
        description="Add USER to the htpasswd file of [auth] or change USER's password "
                    "(bcrypt): the password is asked twice on a terminal, otherwise read as "
                    "one line of standard input. The file is replaced atomically, keeping its "
                    "mode, owner and group (a new file: 0640). Exit 0 when done, 1 when "
                    "nothing could be changed, 2 for a wrong command line or user name.")
    passwd.add_argument("user", metavar="USER",
                        help="the user name, as clients send it in Proxy-Authorization")
    passwd.add_argument("--file", default=None, metavar="PATH",
                        help="the htpasswd file, created if missing (default: the file "
                             "[auth] htpasswd of the configuration names)")
    passwd.add_argument("--delete", action="store_true", help="delete the user")
    passwd.add_argument("--cost", type=_bcrypt_cost, default=DEFAULT_COST, metavar="N",
                        help=f"bcrypt's cost, {MIN_COST} to {MAX_COST} (default {DEFAULT_COST})")
    return parser


def _count(least: int) -> Callable[[str], int]:
    """An argparse type: a whole number of at least ``least``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = least - 1
        if value < least:
            raise argparse.ArgumentTypeError(f"not a whole number from {least} up: {text!r}")
        return value

    return parse


def _bcrypt_cost(text: str) -> int:
    from .passwd import MAX_COST, MIN_COST

    try:
        cost = int(text)
    except ValueError:
        cost = 0
    if not MIN_COST <= cost <= MAX_COST:
        raise argparse.ArgumentTypeError(f"not a cost from {MIN_COST} to {MAX_COST}: {text!r}")
    return cost


def _passwd(args: argparse.Namespace, config_path: str) -> int:
    from .passwd import PasswdError, htpasswd_path, passwd

    try:
        path = args.file or htpasswd_path(config_path)
        done = passwd(path, args.user, delete=args.delete, cost=args.cost)
    except PasswdError as exc:
        print(f"geproxy passwd: {exc}", file=sys.stderr)
        return exc.status
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    print(done)
    return 0


def _explain_usage(args: argparse.Namespace) -> Optional[str]:
    """What is wrong with an explain command line, or None."""
    batch = "--replay" if args.replay else "--cases" if args.cases else None
    if batch is None:
        if args.target is None:
            return "METHOD and TARGET are required (or --replay LOG, or --cases FILE)"
        if args.groups is not None and args.user is None:
            return "--group needs --user: groups are a user's"
        return None
    if args.method is not None:
        return f"{batch} takes no METHOD or TARGET"
    if args.user is not None or args.client != "127.0.0.1" or args.groups is not None:
        return f"{batch} takes the client and user of each request from its file"
    return None


def _explain(args: argparse.Namespace, config_path: str) -> int:
    from .errors import ConfigError

    wrong = _explain_usage(args)
    if wrong:
        print(f"geproxy explain: {wrong}", file=sys.stderr)
        return 2
    try:
        if args.replay:
            from .explain.replay import replay

            return replay(config_path, args.replay, log_format=args.log_format,
                          top=args.top, max_bad=args.max_bad_lines)
        if args.cases:
            from .explain.cases import run_cases

            return run_cases(config_path, args.cases)
        from .explain import explain

        return explain(config_path, args.method, args.target, args.client, args.user,
                       resolve=not args.no_resolve, groups=args.groups)
    except ConfigError as exc:
        print(exc.report(), file=sys.stderr)
        return 2


def main(argv: Optional[Sequence[str]] = None) -> int:
    from gevent import monkey

    monkey.patch_all()

    args = _parser().parse_args(argv)
    config_path = getattr(args, "config", DEFAULT_CONFIG)
    level = getattr(args, "log_level", None) or (
        "debug" if getattr(args, "verbose", 0) else "info")
    from .serve.log import FORMAT

    logging.basicConfig(level=level.upper(), stream=sys.stderr, format=FORMAT)

    if args.command == "passwd":
        return _passwd(args, config_path)

    from .errors import ConfigError
    from .serve.server import create_server

    if args.command == "explain":
        return _explain(args, config_path)
    if args.command != "check-config":
        from .serve.workers import run

        return run(config_path)
    try:
        create_server(config_path)
    except ConfigError as exc:
        print(exc.report(), file=sys.stderr)
        return 1
    print(f"{config_path}: ok")
    return 0
