"""Coverage-guided fuzz target (atheris, libFuzzer) for geproxy.protocol.http11: its request and
response sides. Run from the repository root (fuzz/README.md):

    python fuzz/http11_fuzz.py -dict=fuzz/http11.dict -max_total_time=60 -timeout=5 \
        "$(mktemp -d)" fuzz/corpus

An input is ``[options][methods][cut count][cuts, 2 bytes each]... message``, read through
atheris.FuzzedDataProvider. Bit 0 of ``options`` picks the side (0: a client's stream of
requests, 1: an upstream's stream of responses), bits 1-2 the head size limit, bits 3-4 the
request line limit (small limits reach the checks that large inputs would); each pair of
bits of ``methods`` is the method of one request the responses answer, in order. The message
is checked by http11_streams.check, fed whole and cut at the cuts (taken modulo its length):
an exception out of TestOneInput is a crash.
"""

from __future__ import annotations

import sys
from typing import Sequence

import atheris

with atheris.instrument_imports(include=["geproxy"]):
    # Coverage comes from geproxy's bytecode, instrumented as it is first imported: here,
    # when this runs as a script. Imported by the tests, geproxy is loaded already and stays
    # as it is.
    from http11_streams import MAX_SIZE, check

    from geproxy.protocol.http11 import MAX_REQUEST_LINE

MAX_SIZES = (MAX_SIZE, 4096, 256, 64)
MAX_LINES = (MAX_REQUEST_LINE, 1024, 128, 32)
METHODS = ("GET", "HEAD", "CONNECT", "POST")
SIDES = ("request", "response")
Options = tuple[str, int, int, tuple[str, ...], list[int], bytes]


def decode_input(data: bytes) -> Options:
    """side, max_size, max_line, methods, cuts and message from a fuzzer's input."""
    fdp = atheris.FuzzedDataProvider(data)
    options = fdp.ConsumeUInt(1)
    bits = fdp.ConsumeUInt(1)
    cuts = [fdp.ConsumeUInt(2) for _ in range(fdp.ConsumeUInt(1) % 16)]
    message = fdp.ConsumeBytes(fdp.remaining_bytes())
    methods = tuple(METHODS[bits >> shift & 3] for shift in (0, 2, 4, 6))
    return (SIDES[options & 1], MAX_SIZES[options >> 1 & 3], MAX_LINES[options >> 3 & 3],
            methods, cuts, message)


def encode_input(side: str, message: bytes, methods: Sequence[str] = (),
                 cuts: Sequence[int] = (), max_size: int = MAX_SIZE,
                 max_line: int = MAX_REQUEST_LINE) -> bytes:
    """The input that decode_input reads back as these: how the seed corpus is written."""
    methods = (tuple(methods) + ("GET",) * 4)[:4]
    bits = sum(METHODS.index(m) << 2 * i for i, m in enumerate(methods))
    options = SIDES.index(side) | MAX_SIZES.index(max_size) << 1 | (
        MAX_LINES.index(max_line) << 3)
    return bytes([options, bits, len(cuts)]) + b"".join(
        c.to_bytes(2, "little") for c in cuts) + message


def TestOneInput(data: bytes) -> None:  # the name atheris and libFuzzer call
    side, max_size, max_line, methods, cuts, message = decode_input(data)
    check(side, message, cuts, methods, max_size, max_line)


def main(argv: list[str]) -> None:
    atheris.Setup(argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
