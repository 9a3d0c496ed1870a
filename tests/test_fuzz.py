"""The atheris fuzz target of http11 (fuzz/README.md): its seed corpus replays clean, and a
bounded run of the fuzzer itself finds no crash."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from http11_fuzz import TestOneInput, decode_input, encode_input  # fuzz/, on pythonpath
from http11_streams import check

ROOT = Path(__file__).resolve().parents[1]
FUZZ = ROOT / "fuzz"

# Read at collection, so that the replay test itself touches no file.
SEEDS = {path.name: path.read_bytes() for path in sorted((FUZZ / "corpus").iterdir())}
FUZZ_SECONDS = 20


@pytest.mark.pure
@pytest.mark.timeout(10)
@pytest.mark.parametrize("data", SEEDS.values(), ids=SEEDS.keys())
def test_seed_replays_clean(data: bytes) -> None:
    TestOneInput(data)
    # Every seed is a valid stream of its side, so it must parse without any error.
    side, max_size, max_line, methods, cuts, message = decode_input(data)
    events, error = check(side, message, cuts, methods, max_size, max_line)
    assert error is None and events[-1][0] in ("end", "tunnel"), events


@pytest.mark.pure
@pytest.mark.timeout(10)
def test_seeds_cover_both_sides() -> None:
    assert {decode_input(data)[0] for data in SEEDS.values()} == {"request", "response"}


@pytest.mark.pure
@pytest.mark.timeout(10)
def test_encode_input_is_what_decode_input_reads() -> None:
    message = b"HTTP/1.1 200 OK\r\n\r\n"
    data = encode_input("response", message, ["HEAD", "CONNECT"], [3, 65535], 256, 32)
    assert decode_input(data) == ("response", 256, 32, ("HEAD", "CONNECT", "GET", "GET"),
                                  [3, 65535], message)


@pytest.mark.timeout(FUZZ_SECONDS + 60)
def test_fuzzing_finds_no_crash(tmp_path: Path) -> None:
    # New corpus entries and crash artifacts go to tmp_path; the seeds are only read.
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    command = [sys.executable, str(FUZZ / "http11_fuzz.py"), f"-max_total_time={FUZZ_SECONDS}",
               "-timeout=5", f"-dict={FUZZ / 'http11.dict'}", f"-artifact_prefix={tmp_path}/",
               str(corpus), str(FUZZ / "corpus")]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                          errors="replace", timeout=FUZZ_SECONDS + 40)
    assert proc.returncode == 0, proc.stderr[-6000:]
    runs = re.search(r"^Done (\d+) runs", proc.stderr, re.MULTILINE)
    assert runs and int(runs.group(1)) > len(SEEDS), proc.stderr[-2000:]
