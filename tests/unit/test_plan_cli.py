"""`halo-mlir plan` on the command line: table, JSON, and the does-not-fit error."""

import json

from conftest import halo
from test_cli_errors import assert_one_line_error


def test_plan_table_and_json():
    out = halo("plan", "--model", "8b", "--max-seq-len", "8192").stdout
    assert "16.06 GB" in out and "fits?        yes" in out
    data = json.loads(halo("plan", "--model", "405b", "--tp", "8", "--json").stdout)
    assert data["per_device"]["fits"] is True


def test_plan_does_not_fit_names_the_shortfall():
    proc = halo("plan", "--model", "70b", "--max-seq-len", "131072", "--batch", "64",
                "--require-fit", check=False)
    assert proc.returncode == 1
    assert_one_line_error(proc, "does not fit on mi300x", "short", "KV cache")


def test_plan_bad_input():
    assert_one_line_error(halo("plan", "--model", "8b", "--gpu", "b200", check=False),
                          "unknown GPU")
    assert_one_line_error(halo("plan", "--model", "8b", "--tp", "3", check=False),
                          "does not divide the kv heads")


def _units(line: str) -> set[str]:
    import re

    return set(re.findall(r"[\d.]+ (ms|s)\b", line))


def test_plan_one_unit_per_quantity_and_plurals():
    """Times of one row in one unit (ms per decode token; a prefill of a second or more in
    s), and "1 sequence", not "1 sequences"."""
    rows = {line.split()[0]: line for line in
            halo("plan", "--model", "405b", "--tp", "8", "--max-seq-len", "131072").stdout.splitlines()}
    assert "(204,032 tokens, 1 sequence of 131,072 tokens)" in rows["max"], rows["max"]
    assert _units(rows["decode"]) == {"ms"}, rows["decode"]
    assert _units(rows["prefill"]) == {"s"}, rows["prefill"]  # 405b prefill: tens of s
    small = {line.split()[0]: line for line in
             halo("plan", "--model", "toy", "--max-seq-len", "32").stdout.splitlines()}
    assert _units(small["decode"]) == {"ms"} and _units(small["prefill"]) == {"ms"}, small
    assert "for 32 tokens" in small["prefill"]
