"""The benchmark runner in its quick form (tiny sizes), so it cannot rot."""

import re
import subprocess
import sys
from pathlib import Path

RUNNER = Path(__file__).parents[2] / "tools" / "bench" / "run.py"


def test_bench_runner_quick(tmp_path):
    out = tmp_path / "BENCHMARKS.md"
    out.write_text("# Benchmarks\n\nhand-written notes stay\n")
    proc = subprocess.run([sys.executable, str(RUNNER), "--quick", "-o", str(out)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    text = out.read_text()
    rows = [line.split("|")[1:-1] for line in text.splitlines() if line.startswith("| toy |")]
    emit = [r for r in rows if len(r) == 7]
    assert len(emit) == 4 and all(float(r[4]) > 0 and float(r[5]) > 0 for r in emit), text
    # compile rows: the distinct kernel count is flat in depth for each (tp, form)
    kernels: dict = {}
    for r in (r for r in rows if len(r) == 8):
        kernels.setdefault((r[2], r[3]), set()).add(int(r[7]))
    assert len(kernels) == 4 and all(len(k) == 1 for k in kernels.values()), kernels
    decode = [r for r in rows if len(r) == 6]
    assert len(decode) == 1 and all(float(decode[0][k].split()[0]) > 0 for k in (3, 4)), text
    assert re.search(r"iree-base-compiler \d+\.\d+", text)
    fp8 = [line.split("|")[1:-1] for line in text.split("### FP8")[1].splitlines()
           if line.startswith("| 1 | unrolled |")]
    assert len(fp8) == 1 and all(float(fp8[0][k]) > 0 for k in (2, 5)) and int(fp8[0][7]) > 0

    # a second run of one section replaces that table only; the rest of the file stays
    proc = subprocess.run([sys.executable, str(RUNNER), "--quick", "--only", "emit", "-o",
                           str(out)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    again = out.read_text()
    assert again.count("<!-- bench:begin -->") == 1 and "hand-written notes stay" in again
    assert again.count("### Emission") == 1 and "### CPU decode step" in again
    assert again.split("### Emission")[0].count("<!-- section") == 1  # emit stays first
