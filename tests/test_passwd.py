"""``geproxy passwd``: the htpasswd file written by geproxy itself, run as a real process.

Each test runs the command (``python -m geproxy passwd``) with the password on its standard
input, or on a pseudo-terminal for the prompt, and checks the file it leaves: what a proxy
with ``[auth] htpasswd`` makes of it (curl through it), its mode and owner, its atomic
replacement, and the names it refuses. All traffic stays on 127.0.0.1.
"""

from __future__ import annotations

import os
import pty
import resource
import select
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import pytest
from passlib.hash import apr_md5_crypt

from geproxy.testing import Origin, curl, wait_until

pytestmark = pytest.mark.timeout(60)

#: bcrypt's smallest cost: the tests hash many times (the default, 10, is tested once).
FAST = ("--cost", "4")


def passwd(*args: str, password: Optional[bytes] = b"pw\n", cwd: Optional[Path] = None,
           limit_file_size: Optional[int] = None) -> subprocess.CompletedProcess:
    """Run ``geproxy passwd ARGS`` with ``password`` as its standard input (not a terminal)."""
    def limit() -> None:
        if limit_file_size is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit_file_size, limit_file_size))

    return subprocess.run([sys.executable, "-m", "geproxy", "passwd", *args],
                          input=password, capture_output=True, timeout=30, cwd=cwd,
                          preexec_fn=limit if limit_file_size is not None else None)


def through(proxy_url: str, origin: Origin, user: str, password: str) -> bytes:
    """The status line curl gets for a GET through the proxy with these credentials."""
    out = curl("-i", "-x", proxy_url, "--proxy-user", f"{user}:{password}", origin.url("/"))
    return out.stdout.split(b"\r\n", 1)[0]


OK, CHALLENGED = b"HTTP/1.1 200 OK", b"HTTP/1.1 407 Proxy Authentication Required"


def test_a_file_it_writes_authenticates_curl_and_a_running_proxy_sees_each_change(
        proxy_factory, origin, tmp_path):
    users = tmp_path / "htpasswd"
    made = passwd("--file", str(users), "alice", password=b"first pw\n")
    assert made.returncode == 0, made.stderr
    assert made.stdout.decode() == f"{users}: created, with user 'alice'\n"
    alice = users.read_text()
    assert alice.startswith("alice:$2y$10$") and alice.endswith("\n")  # bcrypt, cost 10
    proxy = proxy_factory(f"[auth]\nhtpasswd = {users}\ncheck_interval = 0\n")
    assert through(proxy.url, origin, "alice", "first pw") == OK
    assert through(proxy.url, origin, "alice", "first") == CHALLENGED

    # Changed while the proxy runs, with no reload: the old password stops working.
    changed = passwd("--file", str(users), *FAST, "alice", password=b"second pw\r\n")
    assert changed.stdout.decode() == f"{users}: changed the password of user 'alice'\n"
    assert through(proxy.url, origin, "alice", "second pw") == OK
    assert through(proxy.url, origin, "alice", "first pw") == CHALLENGED

    added = passwd("--file", str(users), *FAST, "bob", password=b"bob pw\nnot read\n")
    assert added.stdout.decode() == f"{users}: added user 'bob'\n"
    assert through(proxy.url, origin, "bob", "bob pw") == OK
    assert through(proxy.url, origin, "alice", "second pw") == OK

    deleted = passwd("--file", str(users), "--delete", "bob", password=None)
    assert deleted.stdout.decode() == f"{users}: deleted user 'bob'\n"
    assert through(proxy.url, origin, "bob", "bob pw") == CHALLENGED
    assert [line.split(":")[0] for line in users.read_text().splitlines()] == ["alice"]


def test_every_worker_of_a_master_sees_a_change_without_a_reload(proxy_process, origin,
                                                                 tmp_path):
    """Each worker watches the file: a change reaches whichever the kernel picks."""
    users = tmp_path / "htpasswd"
    assert passwd("--file", str(users), *FAST, "alice", password=b"first\n").returncode == 0
    proxy = proxy_process(f"workers = 2\n[auth]\nhtpasswd = {users}\ncheck_interval = 0\n")
    assert wait_until(lambda: sum(") serves" in line for line in proxy.log) == 2)
    assert passwd("--file", str(users), *FAST, "alice", password=b"second\n").returncode == 0
    # New connections each, spread over both workers: none takes the old password.
    assert {through(proxy.url, origin, "alice", "second") for _ in range(8)} == {OK}
    assert {through(proxy.url, origin, "alice", "first") for _ in range(8)} == {CHALLENGED}


def test_the_other_lines_are_kept_byte_for_byte(proxy_factory, origin, tmp_path):
    users = tmp_path / "htpasswd"
    carol = f"carol:{apr_md5_crypt.hash('carol pw')}"  # as `htpasswd -m` writes it
    before = f"# the proxy's users\n{carol}\n\nalice:$2y$04${'x' * 53}\r\n# end".encode()
    users.write_bytes(before)
    assert passwd("--file", str(users), *FAST, "alice").returncode == 0
    old, after = before.split(b"\n"), users.read_bytes().split(b"\n")
    assert after[:3] == old[:3] and after[4:] == old[4:]
    assert after[3] != old[3]
    assert after[3].startswith(b"alice:$2y$04$") and after[3].endswith(b"\r")  # CRLF kept
    assert passwd("--file", str(users), *FAST, "dave").returncode == 0
    lines = users.read_bytes().split(b"\n")  # appended after a last line without its end
    assert lines[:5] == after and lines[5].startswith(b"dave:$2y$04$") and lines[6:] == [b""]
    proxy = proxy_factory(f"[auth]\nhtpasswd = {users}\n")
    for user, password in (("carol", "carol pw"), ("alice", "pw"), ("dave", "pw")):
        assert through(proxy.url, origin, user, password) == OK, user


def test_a_new_file_is_0640_and_an_old_one_keeps_its_mode_owner_and_group(tmp_path):
    users = tmp_path / "htpasswd"
    old_umask = os.umask(0)  # the mode is set, not left to the umask
    try:
        assert passwd("--file", str(users), *FAST, "alice").returncode == 0
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(users.stat().st_mode) == 0o640
    users.chmod(0o600)
    owner = (65534, 65534) if os.geteuid() == 0 else (os.getuid(), os.getgid())
    os.chown(users, *owner)  # as root: nobody's, so that the command must give it back
    assert passwd("--file", str(users), *FAST, "bob").returncode == 0
    after = users.stat()
    assert stat.S_IMODE(after.st_mode) == 0o600
    assert (after.st_uid, after.st_gid) == owner


def test_the_file_is_replaced_atomically_and_a_failed_write_leaves_it_whole(tmp_path):
    users = tmp_path / "htpasswd"
    for user in ("alice", "bob", "carol"):
        assert passwd("--file", str(users), *FAST, user).returncode == 0
    before, inode = users.read_bytes(), users.stat().st_ino
    assert passwd("--file", str(users), *FAST, "bob").returncode == 0
    assert users.stat().st_ino != inode  # a new file renamed over the old one
    assert sorted(os.listdir(tmp_path)) == ["htpasswd"]  # no temporary file left
    assert users.read_bytes() != before

    # A write that fails half-way (the file size limit, EFBIG) changes nothing.
    before, inode = users.read_bytes(), users.stat().st_ino
    failed = passwd("--file", str(users), *FAST, "dave", limit_file_size=len(before) // 2)
    assert failed.returncode == 1
    assert failed.stderr.decode() == f"geproxy passwd: cannot write {users}: File too large\n"
    assert (users.read_bytes(), users.stat().st_ino) == (before, inode)
    assert sorted(os.listdir(tmp_path)) == ["htpasswd"]


def test_a_symbolic_link_stays_one_and_its_target_is_replaced(tmp_path):
    (tmp_path / "real").mkdir()
    target, link = tmp_path / "real" / "htpasswd", tmp_path / "htpasswd"
    link.symlink_to(target)
    assert passwd("--file", str(link), *FAST, "alice").returncode == 0
    assert link.is_symlink() and target.read_text().startswith("alice:$2y$04$")


@pytest.mark.parametrize("user, problem", [
    ("", "it is empty"),
    ("a:b", "it contains ':'"),
    ("a\nb", "it contains a control character"),
    ("a\tb", "it contains a control character"),
    ("#alice", "it starts with '#'"),
    (" alice", "it starts with white space"),
    ("alice ", "it ends with white space"),
])
def test_a_name_the_file_cannot_hold_is_refused(tmp_path, user, problem):
    users = tmp_path / "htpasswd"
    out = passwd("--file", str(users), *FAST, user)
    assert out.returncode == 2
    assert out.stderr.decode().startswith(
        f"geproxy passwd: cannot use {user!r} as a user name: {problem}")
    assert out.stdout == b"" and not users.exists()


@pytest.mark.parametrize("given, problem", [
    (b"\n", "the password is empty: nothing changed"),
    (b"", "the password is empty: nothing changed"),
])
def test_an_empty_password_is_refused(tmp_path, given, problem):
    users = tmp_path / "htpasswd"
    out = passwd("--file", str(users), *FAST, "alice", password=given)
    assert (out.returncode, out.stderr.decode()) == (1, f"geproxy passwd: {problem}\n")
    assert not users.exists()


def test_deleting_a_user_who_is_not_there_changes_nothing(tmp_path):
    users = tmp_path / "htpasswd"
    assert passwd("--file", str(users), *FAST, "alice").returncode == 0
    before = users.read_bytes(), users.stat().st_ino
    out = passwd("--file", str(users), "--delete", "bob", password=None)
    assert out.returncode == 1
    assert out.stderr.decode() == f"geproxy passwd: no user 'bob' in {users}: nothing changed\n"
    assert (users.read_bytes(), users.stat().st_ino) == before


def test_only_the_first_72_bytes_count_as_for_the_proxy(proxy_factory, origin, tmp_path):
    users = tmp_path / "htpasswd"
    long = "p" * 72 + "-ignored"
    out = passwd("--file", str(users), *FAST, "alice", password=long.encode() + b"\n")
    assert out.returncode == 0
    assert "only the first 72 bytes of the password count" in out.stderr.decode()
    proxy = proxy_factory(f"[auth]\nhtpasswd = {users}\n")
    assert through(proxy.url, origin, "alice", long) == OK


def test_without_file_the_configuration_names_it_relative_to_its_directory(tmp_path):
    conf = tmp_path / "etc"
    conf.mkdir()
    (conf / "geproxy.ini").write_text("[geproxy]\nlisten = 127.0.0.1:0\n\n"
                                      "[auth]\nhtpasswd = users/htpasswd\n")
    (conf / "users").mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = passwd("--config", str(conf / "geproxy.ini"), *FAST, "alice", cwd=elsewhere)
    assert out.returncode == 0, out.stderr
    assert (conf / "users" / "htpasswd").read_text().startswith("alice:$2y$04$")
    assert os.listdir(elsewhere) == []


@pytest.mark.parametrize("ini, problem", [
    ("[geproxy]\nlisten = 127.0.0.1:0\n", "[auth] htpasswd is empty: set it, or name the "
                                          "htpasswd file with --file"),
    ("[geproxy]\ndisable = auth\n", "[auth] is disabled: name the htpasswd file with --file"),
])
def test_without_file_a_configuration_that_names_none_is_an_error(tmp_path, ini, problem):
    config = tmp_path / "geproxy.ini"
    config.write_text(ini)
    out = passwd("--config", str(config), *FAST, "alice", cwd=tmp_path)
    assert (out.returncode, out.stderr.decode()) == (1, f"geproxy passwd: {config}: {problem}\n")
    assert os.listdir(tmp_path) == ["geproxy.ini"]


class Terminal:
    """``geproxy passwd`` on a pseudo-terminal: what it shows, and what is typed at it."""

    def __init__(self, *args: str) -> None:
        self.master, slave = pty.openpty()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "geproxy", "passwd", *args],
            stdin=slave, stdout=slave, stderr=slave, start_new_session=True)
        os.close(slave)
        self.shown = b""

    def wait_for(self, text: bytes, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.shown:
            left = deadline - time.monotonic()
            assert left > 0, f"no {text!r} on the terminal; it shows {self.shown!r}"
            ready, _, _ = select.select([self.master], [], [], min(left, 1.0))
            if ready:
                try:
                    piece = os.read(self.master, 4096)
                except OSError:  # EIO: the command has exited and closed the terminal
                    piece = b""
                assert piece, f"the terminal closed before {text!r}; it showed {self.shown!r}"
                self.shown += piece

    def type(self, line: bytes) -> None:
        os.write(self.master, line + b"\n")

    def close(self) -> int:
        try:
            return self.process.wait(timeout=20)
        finally:
            os.close(self.master)


def _typed(users, first: bytes, second: bytes, said: bytes) -> tuple["Terminal", int]:
    """``geproxy passwd alice`` on a terminal, the two passwords typed at its two prompts,
    until it says ``said``; the terminal, and the exit status."""
    terminal = Terminal("--file", str(users), *FAST, "alice")
    try:
        terminal.wait_for(b"New password for alice: ")
        terminal.type(first)
        terminal.wait_for(b"Again, the new password for alice: ")
        terminal.type(second)
        terminal.wait_for(said)
    finally:
        status = terminal.close()
    return terminal, status


def test_on_a_terminal_the_password_is_asked_twice_and_not_shown(proxy_factory, origin,
                                                                  tmp_path):
    users = tmp_path / "htpasswd"
    terminal, status = _typed(users, b"typed secret", b"typed secret",
                              b"created, with user 'alice'")
    assert status == 0
    assert b"typed secret" not in terminal.shown  # not echoed
    proxy = proxy_factory(f"[auth]\nhtpasswd = {users}\n")
    assert through(proxy.url, origin, "alice", "typed secret") == OK


def test_on_a_terminal_two_different_passwords_change_nothing(tmp_path):
    users = tmp_path / "htpasswd"
    _, status = _typed(users, b"one", b"two", b"the two passwords differ: nothing changed")
    assert status == 1
    assert not users.exists()
