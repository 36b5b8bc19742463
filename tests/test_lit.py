"""Runs the lit + FileCheck IR tests (tests/lit) as part of the pytest suite."""

import subprocess
import sys
from pathlib import Path

LIT_DIR = Path(__file__).parent / "lit"


def test_lit_suite():
    lit = Path(sys.executable).with_name("lit")  # the console script beside this python
    proc = subprocess.run([str(lit), "-v", str(LIT_DIR)],
                          capture_output=True, text=True)
    print(proc.stdout[-4000:])
    assert proc.returncode == 0, proc.stdout[-8000:] + proc.stderr[-2000:]
    assert "Passed" in proc.stdout and "Failed" not in proc.stdout.split("Testing Time")[-1]
