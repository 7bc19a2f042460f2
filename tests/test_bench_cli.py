"""python -m benchmarks refuses bad options before it measures anything (a --json path in a missing
directory lost every result at the end; --threads 0 was a traceback)."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("argv, message", [
    (["--threads", "0"], "--threads 0: must be in [1, "),
    (["--threads", "100000"], "--threads 100000: must be in [1, "),
    (["--json", "{tmp}/none/out.json"], "no such directory (checked before the benchmarks run"),
    (["--only", ","], "--only names no benchmark"),
    (["--only", "kernel"], "unknown benchmark(s) kernel"),
])
def test_bad_options_stop_before_any_benchmark(tmp_path, argv, message):
    argv = [a.format(tmp=tmp_path) for a in argv]
    r = subprocess.run([sys.executable, "-m", "benchmarks", "--tiny", *argv], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and message in r.stderr and r.stdout == ""
