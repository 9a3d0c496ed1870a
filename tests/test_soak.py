"""The short soak (bench/soak.py --short): about 30 s of tunnels, requests and aborting
clients against geproxy in its own process; it must end with no descriptor, greenlet or RSS
growth and no error outside the aborts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SOAK = Path(__file__).resolve().parent.parent / "bench" / "soak.py"
#: The soak's own bounds (30 s of load, 30 s to settle, the starts) fit well within this.
LIMIT = 120


@pytest.mark.timeout(LIMIT + 60)
def test_the_short_soak_finds_no_growth() -> None:
    # A new seed each run covers more paths; the soak prints it, to replay a failure.
    process = subprocess.Popen([sys.executable, str(SOAK), "--short"],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        output, _ = process.communicate(timeout=LIMIT)
    except subprocess.TimeoutExpired:
        process.terminate()  # the soak stops its proxy and origin on SIGTERM
        try:
            output, _ = process.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            output, _ = process.communicate(timeout=10)
        pytest.fail(f"the soak ran over {LIMIT} s:\n{output.decode(errors='replace')}")
    text = output.decode(errors="replace")
    assert process.returncode == 0, text
    assert "**PASSED**" in text, text
