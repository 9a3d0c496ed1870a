"""Test data: a deterministic byte pattern and its digest."""

from __future__ import annotations

import hashlib
from typing import Iterator

# 2047 different digests: 65504 bytes with no shorter period, and not a power of two, so
# a relay that drops, repeats or reorders buffer-sized pieces changes the digest.
_BLOCK = b"".join(hashlib.sha256(b"geproxy %d" % i).digest() for i in range(2047))
_DOUBLE = _BLOCK * 2


def pattern(size: int, block: int = 64 * 1024) -> Iterator[bytes]:
    """The first ``size`` bytes of an endless repetition of a 65504-byte block, in pieces
    of at most ``block`` bytes; the bytes do not depend on the piece size."""
    sent = 0
    period = len(_BLOCK)
    while sent < size:
        start = sent % period
        piece = _DOUBLE[start: start + min(block, period, size - sent)]
        sent += len(piece)
        yield piece


def pattern_sha256(size: int) -> str:
    digest = hashlib.sha256()
    for piece in pattern(size):
        digest.update(piece)
    return digest.hexdigest()
