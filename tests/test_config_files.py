"""File names in the configuration are taken from the configuration file's directory.

A service's working directory is rarely its configuration's (systemd runs it in ``/``), so
``htpasswd = users`` must mean the ``users`` beside the file, whatever directory the process
was started in: for ``check-config``, ``explain``, a start, a master and its workers. Every
process here runs with its working directory elsewhere; all traffic stays on 127.0.0.1.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from geproxy.policy.plugins import load
from geproxy.testing import Origin, ProxyProcess, curl, wait_for_lines

pytestmark = pytest.mark.timeout(60)

PASSWORD = "alice-pw"


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}


def _conf(tmp_path: Path, tls_ca: Any, extra: str = "") -> Path:
    """``conf/geproxy.ini`` naming, relatively, ``users``, ``tls/proxy.pem``, ``www`` and
    ``logs/access.log``, all beside it; ``elsewhere`` is the working directory of the test."""
    from passlib.hash import bcrypt

    conf = tmp_path / "conf"
    for directory in ("tls", "www", "logs"):
        (conf / directory).mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    (conf / "users").write_text(f"alice:{bcrypt.using(ident='2y', rounds=4).hash(PASSWORD)}\n")
    tls_ca.issue_cert("127.0.0.1", "localhost").private_key_and_cert_chain_pem.write_to_path(
        str(conf / "tls" / "proxy.pem"))
    (conf / "www" / "index.html").write_text("the pages beside the configuration\n")
    (conf / "geproxy.ini").write_text(
        "[geproxy]\n"
        "listen = 127.0.0.1:0 tls://127.0.0.1:0\n"
        "docroot = www\n"
        "access_log = logs/access.log\n"
        f"{extra}"
        "[tls]\n"
        "certificate = tls/proxy.pem\n"
        "[auth]\n"
        "htpasswd = users\n"
        "[acl]\n"
        "connect_ports = 1-65535\n"
        "[destinations]\n"
        "allow = 127.0.0.0/8 ::1\n")
    return conf


def _run(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "geproxy", *args], capture_output=True,
                          text=True, timeout=30, env=_env(), cwd=tmp_path / "elsewhere")


@pytest.mark.parametrize("named", ["absolute", "relative"])
def test_check_config_finds_the_files_beside_the_configuration(tmp_path: Path, tls_ca: Any,
                                                               named: str) -> None:
    """Run from another directory, with the file named absolutely or relatively to it:
    the htpasswd file, the certificate, the docroot and the log's directory are found."""
    conf = _conf(tmp_path, tls_ca)
    path = str(conf / "geproxy.ini") if named == "absolute" else "../conf/geproxy.ini"
    result = _run(tmp_path, "check-config", "--config", path)
    assert (result.returncode, result.stdout, result.stderr) == (0, f"{path}: ok\n", "")


def test_explain_finds_the_files_beside_the_configuration(tmp_path: Path, tls_ca: Any) -> None:
    conf = _conf(tmp_path, tls_ca)
    result = _run(tmp_path, "explain", "--config", str(conf / "geproxy.ini"), "--user",
                  "alice", "--no-resolve", "CONNECT", "127.0.0.1:443")
    assert result.returncode == 0, result.stderr
    assert "cannot" not in result.stderr


def test_the_plugins_get_absolute_paths(tmp_path: Path, tls_ca: Any,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """What ``configure`` sees: relative names joined to the file's directory, an absolute
    one unchanged, an empty one empty, ``-`` and ``off`` kept; ``Config.resolve_path`` does
    the same for names inside other values."""
    conf = _conf(tmp_path, tls_ca)
    monkeypatch.chdir(tmp_path / "elsewhere")
    _, config = load("../conf/geproxy.ini", entry_points=False)
    assert config.directory == str(conf)
    assert config.core["docroot"] == str(conf / "www")
    assert config.core["access_log"] == str(conf / "logs" / "access.log")
    assert config["tls"]["certificate"] == str(conf / "tls" / "proxy.pem")
    assert (config["tls"]["key"], config["tls"]["client_ca"]) == ("", "")
    assert config["auth"]["htpasswd"] == str(conf / "users")
    assert config.resolve_path("lists/blocked.txt") == str(conf / "lists" / "blocked.txt")
    assert config.resolve_path("/etc/geproxy/blocked.txt") == "/etc/geproxy/blocked.txt"
    assert config.resolve_path("") == ""

    absolute = tmp_path / "abs"
    absolute.mkdir()
    (absolute / "users").write_text((conf / "users").read_text())
    text = (conf / "geproxy.ini").read_text()
    (conf / "other.ini").write_text(
        text.replace("htpasswd = users", f"htpasswd = {absolute}/users")
            .replace("access_log = logs/access.log", "access_log = OFF"))
    _, config = load(str(conf / "other.ini"), entry_points=False)
    assert config["auth"]["htpasswd"] == f"{absolute}/users"
    assert config.core["access_log"] == "off"
    (conf / "other.ini").write_text(text.replace("access_log = logs/access.log",
                                                 "access_log = -"))
    _, config = load(str(conf / "other.ini"), entry_points=False)
    assert config.core["access_log"] == "-"


@pytest.mark.parametrize("old, new, error", [
    ("htpasswd = users", "htpasswd = nobody",
     "[auth] htpasswd: cannot read {conf}/nobody: No such file or directory"),
    ("certificate = tls/proxy.pem", "certificate = tls/none.pem",
     "[tls] certificate: cannot read {conf}/tls/none.pem: No such file or directory"),
    ("certificate = tls/proxy.pem", "certificate = tls/proxy.pem\nkey = tls/none.key",
     "[tls] key: cannot read {conf}/tls/none.key: No such file or directory"),
    ("certificate = tls/proxy.pem", "certificate = tls/proxy.pem\nclient_cert = optional\n"
                                    "client_ca = tls/none-ca.pem",
     "[tls] client_ca: cannot load {conf}/tls/none-ca.pem: No such file or directory"),
    ("docroot = www", "docroot = pages", "[geproxy] docroot: not a directory: {conf}/pages"),
    ("access_log = logs/access.log", "access_log = nologs/access.log",
     "[geproxy] access_log: cannot write {conf}/nologs/access.log: no such directory "
     "{real}/nologs"),
], ids=["htpasswd", "certificate", "key", "client_ca", "docroot", "access_log"])
def test_an_error_names_the_resolved_path(tmp_path: Path, tls_ca: Any, old: str, new: str,
                                          error: str) -> None:
    conf = _conf(tmp_path, tls_ca)
    path = conf / "geproxy.ini"
    path.write_text(path.read_text().replace(old, new))
    result = _run(tmp_path, "check-config", "--config", "../conf/geproxy.ini")
    expected = error.format(conf=conf, real=os.path.realpath(conf))
    key = new.splitlines()[-1].partition(" =")[0]
    line = 1 + next(number for number, text in enumerate(path.read_text().splitlines())
                    if text.startswith(f"{key} ="))
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr == f"geproxy: ../conf/geproxy.ini:{line}: {expected}\n"


def _access_log_lines(path: Path, count: int, limit: float = 10.0) -> list[str]:
    return wait_for_lines(path, count, limit)


def test_a_master_and_its_workers_find_the_files_beside_the_configuration(
        tmp_path: Path, tls_ca: Any, ca_file: str, origin: Origin,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """``geproxy`` started from another directory with ``workers = 2``: the TLS listener
    has its certificate, the docroot serves its page, the htpasswd file decides, and the
    access log is written beside the configuration."""
    conf = _conf(tmp_path, tls_ca, extra="workers = 2\n")
    monkeypatch.chdir(tmp_path / "elsewhere")  # the working directory the process inherits
    process = ProxyProcess("../conf/geproxy.ini")
    try:
        assert process.tls_address is not None
        host, port = process.tls_address
        page = curl("--cacert", ca_file, f"https://{host}:{port}/index.html")
        assert page.stdout == b"the pages beside the configuration\n", page.stderr
        target = f"http://127.0.0.1:{origin.port}/"
        refused = curl("-o", "/dev/null", "-w", "%{http_code}", "-x", process.url, target)
        assert refused.stdout == b"407"
        served = curl("-o", "/dev/null", "-w", "%{http_code}", "-x", process.url,
                      "--proxy-user", f"alice:{PASSWORD}", target)
        assert served.stdout == b"200"
        lines = _access_log_lines(conf / "logs" / "access.log", 3)
        assert [line.split()[5] for line in lines] == ["200", "407", "200"], lines
        assert not (tmp_path / "elsewhere" / "logs").exists()
    finally:
        assert process.stop() == 0
