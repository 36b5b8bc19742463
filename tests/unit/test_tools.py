"""The benchmark runner in its quick form, so it cannot rot."""

import re
import subprocess
import sys
from pathlib import Path

TOOLS = Path(__file__).parents[2] / "tools"


def test_bench_emit_quick():
    proc = subprocess.run([sys.executable, str(TOOLS / "bench_emit.py"), "--quick"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    rows = [line for line in proc.stdout.splitlines() if re.match(r"\| (toy|405b) \|", line)]
    assert len(rows) == 4, proc.stdout
    # emit rows: wall and RSS are positive numbers; compile rows: same kernel count per depth
    kernels = [int(r.split("|")[-2]) for r in rows if "| cpu |" in r]
    assert len(kernels) == 2 and kernels[0] == kernels[1] > 0, proc.stdout
