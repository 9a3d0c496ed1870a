"""geproxy.hosts reads numeric IPv4 forms without a socket: held to the C library's
inet_aton, which is what a resolver would make of the same text."""

from __future__ import annotations

import ipaddress
import socket

from hypothesis import given, settings
from hypothesis import strategies as st

from geproxy.hosts import ip_literal

_PART = st.one_of(
    st.integers(0, 2**32).map(str),
    st.integers(0, 2**32).map(lambda n: "0" + format(n, "o")),
    st.integers(0, 2**32).map(lambda n: "0x" + format(n, "x")),
    st.sampled_from(["", "0", "0x", "00", "08", "0x1g", "1a", "256", "4294967296"]),
)


def _libc(text: str):
    try:
        return ipaddress.IPv4Address(socket.inet_aton(text))
    except OSError:
        return None


@settings(max_examples=3000, deadline=None)
@given(st.lists(_PART, min_size=1, max_size=5).map(".".join))
def test_numeric_forms_read_as_inet_aton_reads_them(text: str) -> None:
    if not text[:1].isdigit():
        return  # not a numeric host: ip_literal reads it as a name (None), as it did before
    assert ip_literal(text) == _libc(text)


def test_known_numeric_forms() -> None:
    assert ip_literal("127.1") == ipaddress.IPv4Address("127.0.0.1")
    assert ip_literal("2130706433") == ipaddress.IPv4Address("127.0.0.1")
    assert ip_literal("0x7f.1") == ipaddress.IPv4Address("127.0.0.1")
    assert ip_literal("017700000001") == ipaddress.IPv4Address("127.0.0.1")
    assert ip_literal("1.2.3.256") is None
    assert ip_literal("1.2.3.4.5") is None
    assert ip_literal("example.com") is None
