"""The ``sni`` plugin: the ClientHello parser, and the check in log and enforce modes.

The parser is tested on ClientHellos that Python's ``ssl`` really produces (an SSLObject over
memory BIOs: no socket), on hand-built ones for the corner cases, and on every truncation and
a byte-wise mutation of a real one. End-to-end cases run real TLS clients (curl, Python
``ssl``) through a real proxy to the HTTPS ``tls_origin`` (certificate for origin.test and
127.0.0.1) or to a raw origin that records what reaches it.
"""

from __future__ import annotations

import logging
import random
import socket
import ssl
from pathlib import Path
from typing import Any, Optional

import gevent
import gevent.event
import pytest
from geproxy_plugins.sni import (
    MALFORMED,
    NO_NAME,
    NOT_HELLO,
    NOT_TLS,
    SNI,
    TRUNCATED,
    parse_sni,
    read_client_hello,
)

from geproxy import DEFAULT_PLUGINS, Config, ConfigError
from geproxy.policy.plugins import load
from geproxy.testing import (
    StaticResolver,
    curl,
    open_tunnel,
    recv_all,
    require_tool,
    wait_for_records,
)

pytestmark = pytest.mark.timeout(30)

SNI_IS_BUILTIN = any(name == "sni" for name, _ in DEFAULT_PLUGINS)


def _plugins() -> list[Any]:
    """SNI(); once SNI is a built-in, the built-in reads the [sni] section."""
    return [] if SNI_IS_BUILTIN else [SNI()]


# -- ClientHellos ---------------------------------------------------------------------------


def python_hello(server_hostname: Optional[str] = "origin.test",
                 maximum_version: Optional[ssl.TLSVersion] = None) -> bytes:
    """The ClientHello Python's ssl (OpenSSL) sends, captured through memory BIOs."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    if maximum_version is not None:
        context.maximum_version = maximum_version
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=server_hostname)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def _u16(value: int) -> bytes:
    return value.to_bytes(2, "big")


def extension(kind: int, body: bytes) -> bytes:
    return _u16(kind) + _u16(len(body)) + body


def server_name(*names: bytes, kinds: Optional[list[int]] = None) -> bytes:
    """A server_name extension listing ``names`` (host_name type unless ``kinds``)."""
    types = kinds or [0] * len(names)
    entries = b"".join(bytes([types[i]]) + _u16(len(name)) + name
                       for i, name in enumerate(names))
    return extension(0, _u16(len(entries)) + entries)


#: What a TLS 1.3 client sends besides the name: supported_versions, key_share (x25519),
#: signature_algorithms, supported_groups, psk_key_exchange_modes.
TLS13_EXTENSIONS = (
    extension(43, b"\x04\x03\x04\x03\x03")
    + extension(51, _u16(36) + b"\x00\x1d" + _u16(32) + bytes(range(32)))
    + extension(13, _u16(4) + b"\x08\x04\x04\x03")
    + extension(10, _u16(2) + b"\x00\x1d")
    + extension(45, b"\x01\x01")
)


def hello(*extensions: bytes, record_size: int = 16384, handshake_type: int = 1,
          with_extensions: bool = True) -> bytes:
    """A ClientHello (TLS 1.3 style: legacy version 1.2, a 32-byte session id) with
    ``extensions`` in that order, in TLS records of at most ``record_size`` bytes."""
    body = b"\x03\x03" + bytes(32) + b"\x20" + bytes(range(32))
    body += _u16(6) + b"\x13\x01\x13\x02\x13\x03" + b"\x01\x00"
    if with_extensions:
        joined = b"".join(extensions)
        body += _u16(len(joined)) + joined
    message = bytes([handshake_type]) + len(body).to_bytes(3, "big") + body
    return b"".join(b"\x16\x03\x01" + _u16(len(message[i:i + record_size]))
                    + message[i:i + record_size]
                    for i in range(0, len(message), record_size))


# -- the parser -----------------------------------------------------------------------------


@pytest.mark.pure
@pytest.mark.parametrize("maximum_version", [None, ssl.TLSVersion.TLSv1_2])
def test_a_real_client_hello_gives_its_name(maximum_version):
    data = python_hello("origin.test", maximum_version)
    assert data[:1] == b"\x16" and data[5] == 1
    assert read_client_hello(data) == ("origin.test", "")


@pytest.mark.pure
def test_a_real_client_hello_without_sni():
    assert read_client_hello(python_hello(None)) == (None, NO_NAME)


@pytest.mark.pure
def test_python_sends_idna_names_as_a_labels():
    assert parse_sni(python_hello("Bücher.Test")) == "xn--bcher-kva.test"


@pytest.mark.pure
def test_every_truncation_gives_the_name_or_none_and_never_raises():
    data = python_hello("origin.test")
    name_end = data.index(b"origin.test") + len(b"origin.test")
    for size in range(len(data) + 1):
        name, why = read_client_hello(data[:size])
        if size >= name_end:
            assert (name, why) == ("origin.test", ""), size
        else:
            assert name is None and why in (TRUNCATED, NOT_TLS), (size, why)
    no_name = python_hello(None)
    for size in range(len(no_name) + 1):
        assert parse_sni(no_name[:size]) is None


@pytest.mark.pure
def test_mutated_and_random_bytes_never_raise():
    data = python_hello("origin.test")
    for index in range(len(data)):
        for value in (0x00, 0x01, 0x7F, 0xFF, data[index] ^ 0x80):
            mutated = data[:index] + bytes([value]) + data[index + 1:]
            name = parse_sni(mutated)
            assert name is None or (isinstance(name, str) and name.isprintable()
                                    and " " not in name)
    rng = random.Random(6066)
    for _ in range(2000):
        size = rng.randrange(0, 600)
        garbage = bytes(rng.randrange(256) for _ in range(size))
        for data in (garbage, b"\x16\x03\x01" + _u16(size) + garbage,
                     b"\x16\x03\x01" + _u16(size + 4) + b"\x01" + size.to_bytes(3, "big")
                     + garbage):
            name = parse_sni(data)
            assert name is None or isinstance(name, str)


@pytest.mark.pure
@pytest.mark.parametrize("data, why", [
    (b"", NOT_TLS),
    (b"GET / HTTP/1.1\r\nHost: origin.test\r\n\r\n", NOT_TLS),
    (b"SSH-2.0-OpenSSH_9.6\r\n", NOT_TLS),
    (b"\x80\x2e\x01\x03\x01" + bytes(44), NOT_TLS),  # an SSLv2-format hello: no extensions
    (b"\x16", TRUNCATED),
    (b"\x16\x03\x01\x02", TRUNCATED),
    (b"\x16\x03\x01\x02\x00", TRUNCATED),
    (b"\x16\x07\x01\x00\x05\x01\x00\x00\x01\x00", NOT_TLS),  # not record version 3.x
    (b"\x17\x03\x03\x00\x05hello", NOT_TLS),  # application data
    (b"\x16\x03\x01\xff\xff\x01\xff\xff\xff" + bytes(30), TRUNCATED),  # lengths beyond it
])
def test_what_is_not_a_client_hello(data, why):
    assert read_client_hello(data) == (None, why)


@pytest.mark.pure
@pytest.mark.parametrize("raw, name", [
    (b"ORIGIN.Test.", "origin.test"),
    (b"XN--BCHER-KVA.TEST", "xn--bcher-kva.test"),
    ("Bücher.test".encode(), "xn--bcher-kva.test"),  # raw UTF-8: its A-label
    (b"a\xffb.test", "a\\xffb.test"),  # neither: escaped, one printable token
    (b"two words.test", "two\\x20words.test"),
    (b"10.0.0.1", "10.0.0.1"),
])
def test_names_are_lowered_and_printable(raw, name):
    assert parse_sni(hello(server_name(raw), *[TLS13_EXTENSIONS])) == name


@pytest.mark.pure
def test_tls13_style_hellos_with_the_name_anywhere_among_the_extensions():
    name = server_name(b"origin.test")
    for data in (hello(name, TLS13_EXTENSIONS), hello(TLS13_EXTENSIONS, name),
                 hello(extension(65281, b"\x00"), name, extension(21, bytes(300)))):
        assert read_client_hello(data) == ("origin.test", "")
    assert read_client_hello(hello(TLS13_EXTENSIONS)) == (None, NO_NAME)
    assert read_client_hello(hello(with_extensions=False)) == (None, NO_NAME)


@pytest.mark.pure
def test_a_hello_split_over_several_records():
    data = hello(TLS13_EXTENSIONS, server_name(b"origin.test"), record_size=7)
    assert read_client_hello(data) == ("origin.test", "")
    assert read_client_hello(data[:len(data) - 20]) == (None, TRUNCATED)
    # A record of another type in between ends the handshake bytes looked at.
    first = hello(server_name(b"origin.test"), record_size=40)
    cut = first[:45] + b"\x17\x03\x03\x00\x01x" + first[45:]
    assert read_client_hello(cut) == (None, TRUNCATED)


@pytest.mark.pure
@pytest.mark.parametrize("extensions, why", [
    ((server_name(b"origin.test"), server_name(b"evil.test")), MALFORMED),
    ((server_name(b"origin.test", b"evil.test"),), MALFORMED),
    ((server_name(b""),), MALFORMED),
    ((server_name(b"a" * 256),), MALFORMED),
    ((server_name(b"a\x00.test"),), MALFORMED),
    ((server_name(b"origin.test", kinds=[1]),), MALFORMED),  # no host_name in the list
    ((extension(0, b""),), MALFORMED),
    ((extension(0, _u16(14) + b"\x00" + _u16(11) + b"origin.test" + b"xx"),), MALFORMED),
    ((extension(0, _u16(20) + b"\x00" + _u16(11) + b"origin.test"),), MALFORMED),
])
def test_ambiguous_or_broken_server_names_give_no_name(extensions, why):
    assert read_client_hello(hello(*extensions)) == (None, why)


@pytest.mark.pure
def test_an_unknown_name_type_before_the_host_name_is_skipped():
    data = hello(server_name(b"opaque", b"origin.test", kinds=[7, 0]))
    assert parse_sni(data) == "origin.test"


@pytest.mark.pure
def test_a_server_hello_is_not_a_client_hello():
    assert read_client_hello(hello(server_name(b"origin.test"), handshake_type=2)) == (
        None, NOT_HELLO)


@pytest.mark.pure
def test_an_extension_longer_than_the_extensions_is_malformed():
    data = hello(extension(0, b""))
    # Say the server_name extension is 200 bytes long, inside an extensions block of 4.
    broken = data.replace(b"\x00\x04\x00\x00\x00\x00", b"\x00\x04\x00\x00\x00\xc8")
    assert broken != data and read_client_hello(broken) == (None, MALFORMED)


# -- the decision ---------------------------------------------------------------------------


def _configured(**section: Any) -> SNI:
    plugin = SNI()
    values = {"mode": "enforce", "deny": [], "require": False,
              "require_ports": ((443, 443),)}
    values.update(section)
    plugin.configure(Config("test.ini", {"sni": values}))
    return plugin


@pytest.mark.pure
@pytest.mark.parametrize("host, port, name, rule", [
    ("origin.test", 443, "origin.test", None),
    ("origin.test", 443, "evil.test", "sni_mismatch"),
    ("origin.test", 443, "sub.origin.test", "sni_mismatch"),
    ("origin.test", 443, "127.0.0.1", "sni_mismatch"),
    ("origin.test", 443, None, None),
    ("127.0.0.1", 443, "origin.test", None),
    ("127.0.0.1", 443, "internal.corp.example", "sni_deny"),
    ("::1", 8443, "corp.example", "sni_deny"),
    ("127.0.0.1", 443, "10.1.2.3", "sni_deny"),
    ("corp.example", 443, "corp.example", "sni_deny"),
    ("127.0.0.1", 443, None, None),
])
def test_decide(host, port, name, rule):
    plugin = _configured(deny=[".corp.example", "10.0.0.0/8"])
    verdict = plugin.decide(host, port, name)
    assert (verdict.rule if verdict else None) == rule
    if verdict is not None:
        assert verdict.status == 403 and verdict.error == "http_request_denied"


@pytest.mark.pure
def test_decide_require_applies_to_its_ports():
    plugin = _configured(require=True, require_ports=((443, 443), (8000, 8100)))
    for port, rule in ((443, "sni_missing"), (8050, "sni_missing"), (8443, None)):
        verdict = plugin.decide("origin.test", port, None, NOT_TLS)
        assert (verdict.rule if verdict else None) == rule
    assert plugin.decide("origin.test", 443, "origin.test") is None


@pytest.mark.pure
def test_off_is_the_default_and_inspects_nothing():
    plugin = SNI()
    assert not plugin.inspects_tunnels
    configured = _configured(mode="off", require=True)
    assert not configured.inspects_tunnels
    assert configured.on_tunnel_data(None, None, None, b"anything") is None
    assert _configured(mode="log").inspects_tunnels


# -- configuration --------------------------------------------------------------------------


def _load(tmp_path: Path, section: str) -> tuple[Any, Any]:
    path = tmp_path / "sni.ini"
    plugins = "" if SNI_IS_BUILTIN else "plugins = geproxy_plugins.sni:SNI\n"
    path.write_text(f"[geproxy]\n{plugins}access_log = off\n[sni]\n{section}")
    pm, config = load(str(path), entry_points=False)
    return pm.get_plugin("sni"), config


def test_the_defaults(tmp_path):
    plugin, config = _load(tmp_path, "")
    assert dict(config.section("sni")) == {"mode": "off", "deny": [], "require": False,
                                           "require_ports": ((443, 443),)}
    assert (plugin.mode, plugin.inspects_tunnels, plugin.require_ports) == (
        "off", False, ((443, 443),))


@pytest.mark.parametrize("section, key, problem", [
    ("mode = loud\n", "mode", "must be one of off, log, enforce"),
    ("mode = Enforce\n", "mode", "must be one of"),
    ("deny = .corp.example not/a/pattern\n", "deny", "not/a/pattern"),
    ("require = maybe\n", "require", ""),
    ("require_ports = 443 https\n", "require_ports", "'https'"),
    ("require_ports = 0\n", "require_ports", "'0'"),
    ("require_ports = 9000-8000\n", "require_ports", "'9000-8000'"),
])
def test_bad_values_stop_the_start_naming_the_key(tmp_path, section, key, problem):
    with pytest.raises(ConfigError) as caught:
        _load(tmp_path, section)
    assert (caught.value.section, caught.value.key) == ("sni", key)
    assert problem in str(caught.value)


# -- end to end -----------------------------------------------------------------------------


def _start(proxy_factory, **options: str):
    ini = "[sni]\n" + "".join(f"{key} = {value}\n" for key, value in options.items())
    resolver = StaticResolver({"origin.test": ["127.0.0.1"], "evil.test": ["127.0.0.1"]})
    return proxy_factory(ini, plugins=_plugins(), resolver=resolver)


def _open_tunnel(proxy, target: str, extra: bytes = b"") -> socket.socket:
    """CONNECT through ``proxy``; returns the socket once the 200 came."""
    sock, head = open_tunnel(proxy, target, extra)
    assert head == b"HTTP/1.1 200 Connection Established\r\n\r\n", head
    return sock


def _get_over_tls(sock: socket.socket, server_hostname: Optional[str],
                  ca_file: Optional[str] = None) -> bytes:
    """A TLS client in the tunnel (verifying against ``ca_file``, or not at all when None):
    GET /echo; the answer. Raises OSError (ssl.SSLError included) when the tunnel closes."""
    if ca_file is not None:
        context = ssl.create_default_context(cafile=ca_file)
    else:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    with context.wrap_socket(sock, server_hostname=server_hostname) as tls:
        tls.sendall(b"GET /echo HTTP/1.1\r\nHost: origin.test\r\nConnection: close\r\n\r\n")
        return recv_all(tls)


class Recorder:
    """A raw origin handler that keeps all it received until EOF (or a reset)."""

    def __init__(self) -> None:
        self.received: list[bytes] = []
        self.done = gevent.event.Event()

    def __call__(self, sock: socket.socket) -> None:
        data = b""
        try:
            data = recv_all(sock)
        finally:
            self.received.append(data)
            self.done.set()

    def wait(self) -> list[bytes]:
        assert self.done.wait(timeout=10), "the origin connection did not end"
        return self.received


def _recording_origin(raw_origin) -> tuple[Any, Recorder]:
    recorder = Recorder()
    return raw_origin(recorder), recorder


def test_log_mode_records_the_name_curl_asked_for(proxy_factory, tls_origin, ca_file):
    require_tool("curl")
    proxy = _start(proxy_factory, mode="log")
    out = curl("--cacert", ca_file, "-x", proxy.url, tls_origin.url("/", host="origin.test"))
    assert (out.returncode, out.stdout) == (0, b"hello\n"), out.stderr
    [record] = wait_for_records(proxy, 1)
    assert (record.method, record.status, record.sni, record.rule) == (
        "CONNECT", 200, "origin.test", None)


def test_log_mode_lets_a_mismatch_through_with_a_warning(proxy_factory, tls_origin, caplog):
    caplog.set_level(logging.WARNING, logger="geproxy_plugins.sni")
    proxy = _start(proxy_factory, mode="log")
    sock = _open_tunnel(proxy, f"origin.test:{tls_origin.port}")
    answer = _get_over_tls(sock, "evil.test")
    assert answer.startswith(b"HTTP/1.1 200 OK")
    [record] = wait_for_records(proxy, 1)
    assert (record.sni, record.rule, record.error) == ("evil.test", None, None)
    assert len(tls_origin.seen) == 1
    assert any(f"sni would close CONNECT origin.test:{tls_origin.port}" in message
               and "(rule sni_mismatch)" in message for message in caplog.messages)


def test_enforce_lets_the_matching_name_through(proxy_factory, tls_origin, ca_file):
    require_tool("curl")
    proxy = _start(proxy_factory, mode="enforce", require="on",
                   require_ports=str(tls_origin.port))
    size = 256 * 1024
    out = curl("--cacert", ca_file, "-x", proxy.url,
               tls_origin.url(f"/bytes/{size}", host="origin.test"))
    assert out.returncode == 0 and len(out.stdout) == size, out.stderr
    [record] = wait_for_records(proxy, 1)
    assert (record.status, record.sni, record.rule, record.close_reason) == (
        200, "origin.test", None, "done")


def test_enforce_closes_a_mismatch_before_a_byte_reaches_the_origin(proxy_factory,
                                                                    tls_origin):
    proxy = _start(proxy_factory, mode="enforce")
    sock = _open_tunnel(proxy, f"origin.test:{tls_origin.port}")
    with pytest.raises(OSError):  # the proxy closes the tunnel: no TLS handshake
        _get_over_tls(sock, "evil.test")
    sock.close()
    [record] = wait_for_records(proxy, 1)
    assert (record.status, record.rule, record.sni, record.error, record.close_reason) == (
        200, "sni_mismatch", "evil.test", "http_request_denied", "denied")
    assert tls_origin.seen == []


def test_enforce_mismatch_sends_the_origin_nothing(proxy_factory, raw_origin):
    proxy = _start(proxy_factory, mode="enforce")
    server, recorder = _recording_origin(raw_origin)
    sock = _open_tunnel(proxy, f"origin.test:{server.port}")
    try:
        sock.sendall(python_hello("evil.test") + b"and more")
        assert recv_all(sock) == b""
    finally:
        sock.close()
    assert recorder.wait() == [b""]
    [record] = wait_for_records(proxy, 1)
    assert (record.rule, record.sni) == ("sni_mismatch", "evil.test")


def test_enforce_bare_ip_connect_with_a_name_is_allowed(proxy_factory, tls_origin, ca_file):
    proxy = _start(proxy_factory, mode="enforce")
    sock = _open_tunnel(proxy, f"127.0.0.1:{tls_origin.port}")
    answer = _get_over_tls(sock, "origin.test", ca_file)
    assert answer.startswith(b"HTTP/1.1 200 OK") and b'"path": "/echo"' in answer
    [record] = wait_for_records(proxy, 1)
    assert (record.sni, record.rule) == ("origin.test", None)


def test_enforce_bare_ip_connect_with_a_denied_name_is_closed(proxy_factory, raw_origin,
                                                              tls_origin):
    proxy = _start(proxy_factory, mode="enforce", deny=".test")
    server, recorder = _recording_origin(raw_origin)
    sock = _open_tunnel(proxy, f"127.0.0.1:{server.port}")
    with pytest.raises(OSError):
        _get_over_tls(sock, "origin.test")
    sock.close()
    assert recorder.wait() == [b""]
    sock = _open_tunnel(proxy, f"127.0.0.1:{tls_origin.port}")
    with pytest.raises(OSError):
        _get_over_tls(sock, "Sub.Origin.TEST")
    sock.close()
    records = wait_for_records(proxy, 2)
    assert [(r.rule, r.sni) for r in records] == [
        ("sni_deny", "origin.test"), ("sni_deny", "sub.origin.test")]
    assert tls_origin.seen == []


def _plain_text(sock: socket.socket) -> bytes:
    sock.sendall(b"HELO plain text\r\n")
    sock.shutdown(socket.SHUT_WR)
    return recv_all(sock)


@pytest.mark.parametrize("client", ["plain text", "TLS without SNI"])
def test_require_closes_tunnels_without_a_name(proxy_factory, raw_origin, client):
    server, recorder = _recording_origin(raw_origin)
    proxy = _start(proxy_factory, mode="enforce", require="on",
                   require_ports=f"443 {server.port}")
    sock = _open_tunnel(proxy, f"origin.test:{server.port}")
    try:
        if client == "plain text":
            assert _plain_text(sock) == b""
        else:
            with pytest.raises(OSError):
                _get_over_tls(sock, None)
    finally:
        sock.close()
    assert recorder.wait() == [b""]
    [record] = wait_for_records(proxy, 1)
    assert (record.rule, record.sni, record.close_reason) == ("sni_missing", None, "denied")


@pytest.mark.parametrize("options", [
    {"mode": "enforce"},  # require is off by default
    {"mode": "enforce", "require": "on"},  # the origin's port is not 443
    {"mode": "log", "require": "on", "require_ports": "1-65535"},  # only logged
    {"mode": "off", "require": "on", "require_ports": "1-65535"},
])
def test_plain_text_passes_unchanged_when_nothing_requires_a_name(proxy_factory, raw_origin,
                                                                  options):
    server, recorder = _recording_origin(raw_origin)
    proxy = _start(proxy_factory, **options)
    sock = _open_tunnel(proxy, f"origin.test:{server.port}")
    try:
        assert _plain_text(sock) == b""
    finally:
        sock.close()
    assert recorder.wait() == [b"HELO plain text\r\n"]
    [record] = wait_for_records(proxy, 1)
    assert (record.rule, record.sni, record.error) == (None, None, None)


def test_a_hello_cut_short_is_no_name_and_passes_unchanged(proxy_factory, raw_origin, caplog):
    caplog.set_level(logging.DEBUG, logger="geproxy_plugins.sni")
    data = python_hello("evil.test")
    server, recorder = _recording_origin(raw_origin)
    proxy = _start(proxy_factory, mode="enforce")
    # Nothing more is sent before the 200: the first piece is exactly these 40 bytes.
    sock = _open_tunnel(proxy, f"origin.test:{server.port}", extra=data[:40])
    try:
        sock.sendall(data[40:])
        sock.shutdown(socket.SHUT_WR)
        assert recv_all(sock) == b""
    finally:
        sock.close()
    assert recorder.wait() == [data]
    [record] = wait_for_records(proxy, 1)
    assert (record.rule, record.sni, record.close_reason) == (None, None, "done")
    assert any("no complete server_name in the first 40 bytes" in message
               for message in caplog.messages)


def test_a_hello_cut_short_is_closed_when_a_name_is_required(proxy_factory, raw_origin):
    server, recorder = _recording_origin(raw_origin)
    proxy = _start(proxy_factory, mode="enforce", require="on", require_ports=str(server.port))
    data = python_hello("origin.test")
    sock = _open_tunnel(proxy, f"origin.test:{server.port}", extra=data[:40])
    try:
        assert recv_all(sock) == b""
    finally:
        sock.close()
    assert recorder.wait() == [b""]
    [record] = wait_for_records(proxy, 1)
    assert (record.rule, record.sni) == ("sni_missing", None)


def test_mode_off_reads_nothing(proxy_factory, tls_origin):
    proxy = _start(proxy_factory)
    plugin = proxy.server.pm.get_plugin("sni")
    assert isinstance(plugin, SNI) and not plugin.inspects_tunnels
    sock = _open_tunnel(proxy, f"origin.test:{tls_origin.port}")
    assert _get_over_tls(sock, "evil.test").startswith(b"HTTP/1.1 200 OK")
    [record] = wait_for_records(proxy, 1)
    assert (record.sni, record.rule) == (None, None)
