"""``geproxy passwd``: add a user to the ``auth`` plugin's htpasswd file, change a user's
password, or delete a user, without Apache's ``htpasswd`` (Debian's apache2-utils).

Invariants:

- The file is replaced, never written in place: the new content goes to a temporary file in
  the same directory, which is flushed to disk, given the old file's mode, owner and group
  (mode 0640 and the caller's owner and group for a new file), then renamed over the old one.
  A reader, such as a running proxy that reloads the file when it changes, sees the old file
  or the new one, never a part of either; a failure leaves the old file as it was.
- Every line but the user's own (other users, comments, blank lines, hashes of any scheme) is
  kept byte for byte.
- The hash is bcrypt (``$2y$``, as ``htpasswd -B`` writes it), of the password's bytes: what a
  client sends in its Basic credentials.
- A user name is refused unless the auth plugin reads it back as it was written.
"""

from __future__ import annotations

import contextlib
import getpass
import os
import stat
import sys
import tempfile
from typing import BinaryIO, Optional

from passlib.hash import bcrypt

from .errors import ConfigError

__all__ = ["PasswdError", "DEFAULT_COST", "check_user", "htpasswd_path", "passwd"]

#: bcrypt's cost, log2 of its rounds: tens of milliseconds of one core. The proxy hashes once
#: per user and ``[auth] cache_ttl``, in its thread pool; Apache's ``htpasswd -B`` uses 5.
DEFAULT_COST = 10
MIN_COST, MAX_COST = 4, 31
#: bcrypt uses the first 72 bytes of a password; the auth plugin ignores the rest, as Apache.
BCRYPT_MAX_BYTES = 72
NEW_FILE_MODE = 0o640
#: A password read from standard input is one line, at most this long.
MAX_INPUT_LINE = 64 * 1024


class PasswdError(Exception):
    """A refusal, in one line, with the command's exit status: 2 when the command line is
    wrong (a user name the file cannot hold), 1 for anything else."""

    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.status = status


def check_user(user: str) -> None:
    """Refuse (PasswdError, status 2) a name that an htpasswd line cannot hold as it is."""
    problem = None
    if not user:
        problem = "it is empty"
    elif ":" in user:
        problem = "it contains ':', which ends the user name on an htpasswd line"
    elif any(ord(char) < 0x20 or ord(char) == 0x7F for char in user):
        problem = "it contains a control character (a newline would end the line)"
    elif user.startswith("#"):
        problem = "it starts with '#', which makes the line a comment"
    elif user != user.lstrip():
        problem = "it starts with white space, which is lost when the line is read"
    elif user != user.rstrip():
        problem = "it ends with white space, a mistake that no one would see"
    else:
        try:
            user.encode("utf-8")
        except UnicodeEncodeError:
            problem = "it is not valid UTF-8"
    if problem is not None:
        raise PasswdError(f"cannot use {user!r} as a user name: {problem}", status=2)


def htpasswd_path(config_path: str) -> str:
    """The file ``[auth] htpasswd`` of the configuration names, relative to its directory.

    The configuration is validated (sections and keys) but no plugin is configured: the
    file it names may not exist yet.
    """
    from .policy.plugins import load

    try:
        _, config = load(config_path, configure=False)
    except ConfigError as exc:
        raise PasswdError(f"{exc}; name the htpasswd file with --file, or the configuration "
                          "with --config") from None
    if "auth" not in config:
        raise PasswdError(f"{config_path}: [auth] is disabled: name the htpasswd file with "
                          "--file")
    value = config.section("auth")["htpasswd"]
    if not value:
        raise PasswdError(f"{config_path}: [auth] htpasswd is empty: set it, or name the "
                          "htpasswd file with --file")
    return str(value)  # already beside the configuration: path options arrive absolute


def hash_password(password: bytes, cost: int = DEFAULT_COST) -> str:
    """The bcrypt hash of the first 72 bytes of ``password``, as ``htpasswd -B`` writes it."""
    return str(bcrypt.using(ident="2y", rounds=cost).hash(password[:BCRYPT_MAX_BYTES]))


def read_password(user: str, stdin: BinaryIO, interactive: bool) -> bytes:
    """The new password: asked twice, not echoed, on a terminal; otherwise the first line of
    ``stdin`` without its line end."""
    if interactive:
        try:
            first = getpass.getpass(f"New password for {user}: ")
            second = getpass.getpass(f"Again, the new password for {user}: ")
        except EOFError:
            raise PasswdError("no password given") from None
        if first != second:
            raise PasswdError("the two passwords differ: nothing changed")
        password = first.encode("utf-8", "surrogateescape")
    else:
        line = stdin.readline(MAX_INPUT_LINE)
        password = line[:-1] if line.endswith(b"\n") else line
        if password.endswith(b"\r"):
            password = password[:-1]
    if not password:
        raise PasswdError("the password is empty: nothing changed")
    return password


def _line_user(line: bytes) -> Optional[bytes]:
    """The user a line is about, read as the auth plugin reads it; None for blank lines,
    comments and lines without a ':'."""
    text = line.strip()
    if not text or text.startswith(b"#"):
        return None
    user, sep, _ = text.partition(b":")
    return user if sep else None


def edit(data: bytes, user: str, entry: Optional[bytes]) -> tuple[bytes, bool]:
    """``data`` with ``user``'s line replaced by ``entry`` (or removed, when ``entry`` is
    None; appended when the user has none), and whether the user had a line. A user given
    twice, which the proxy refuses, keeps only the first line."""
    name = user.encode("utf-8")
    lines = data.split(b"\n")
    out: list[bytes] = []
    found = False
    for line in lines:
        if _line_user(line) != name:
            out.append(line)
            continue
        if not found and entry is not None:
            out.append(entry + (b"\r" if line.endswith(b"\r") else b""))
        found = True
    if not found and entry is not None:
        if out[-1]:  # a last line without its line end
            out.append(b"")
        out[-1:] = [entry, b""]
    return b"\n".join(out), found


def _read(path: str) -> Optional[bytes]:
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise PasswdError(f"cannot read {path}: {exc.strerror or exc}") from None


def _keep_owner(fd: int, old: os.stat_result, path: str) -> None:
    now = os.fstat(fd)
    if (now.st_uid, now.st_gid) == (old.st_uid, old.st_gid):
        return
    try:
        os.fchown(fd, old.st_uid, old.st_gid)
    except PermissionError:
        raise PasswdError(f"cannot give the new {path} the owner and group of the old one "
                          f"({old.st_uid}:{old.st_gid}): run this as root or as its "
                          "owner") from None


def replace_file(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (see the module's docstring)."""
    directory = os.path.dirname(path) or "."
    try:
        old: Optional[os.stat_result] = os.stat(path)
    except FileNotFoundError:
        old = None
    try:
        fd, temp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp",
                                    dir=directory)
    except OSError as exc:
        raise PasswdError(f"cannot write in {directory}: {exc.strerror or exc}") from None
    try:
        with open(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            if old is not None:
                _keep_owner(fd, old, path)
            os.fchmod(fd, stat.S_IMODE(old.st_mode) if old is not None else NEW_FILE_MODE)
            os.fsync(fd)
        os.replace(temp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        if isinstance(exc, OSError):
            raise PasswdError(f"cannot write {path}: {exc.strerror or exc}") from None
        raise
    _sync_directory(directory)


def _sync_directory(directory: str) -> None:
    """Make the rename durable: the directory's entry is on disk too."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def passwd(path: str, user: str, *, delete: bool = False, cost: int = DEFAULT_COST,
           stdin: Optional[BinaryIO] = None, interactive: Optional[bool] = None) -> str:
    """Add or update ``user`` in the htpasswd file ``path`` with a password read from a
    prompt or ``stdin`` (or delete the user); what was done, in one line."""
    check_user(user)
    target = os.path.realpath(path)  # a symbolic link stays one: its target is replaced
    data = _read(target)
    if delete:
        if data is None:
            raise PasswdError(f"{path} does not exist: no user to delete")
        new, found = edit(data, user, None)
        if not found:
            raise PasswdError(f"no user {user!r} in {path}: nothing changed")
        replace_file(target, new)
        return f"{path}: deleted user {user!r}"
    if stdin is None:
        stdin = sys.stdin.buffer
    if interactive is None:
        interactive = sys.stdin.isatty()
    password = read_password(user, stdin, interactive)
    if len(password) > BCRYPT_MAX_BYTES:
        print(f"geproxy passwd: only the first {BCRYPT_MAX_BYTES} bytes of the password count "
              "(bcrypt)", file=sys.stderr)
    entry = f"{user}:{hash_password(password, cost)}".encode("utf-8")
    new, found = edit(data or b"", user, entry)
    replace_file(target, new)
    if data is None:
        return f"{path}: created, with user {user!r}"
    return f"{path}: {'changed the password of' if found else 'added'} user {user!r}"
