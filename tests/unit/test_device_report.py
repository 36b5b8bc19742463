"""`tools/bench/run.py --device-report FILE`: the device check's JSON (tools/bench/device.py)
as a BENCHMARKS.md section per card, and its constants printed or written (`--write-gpus`)
into the card's spec in gpus.py. Every file written here is a copy under tmp_path."""

import ast
import difflib
import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
RUNNER = ROOT / "tools" / "bench" / "run.py"
CHECK = ROOT / "tools" / "bench" / "device.py"
GPUS_PY = ROOT / "halo_mlir" / "toolchain" / "gpus.py"
DATE = "2026-12-01"


def report(card: str = "h100", device: str = "cuda", launch_s: float = 2.49e-6,
           **changes) -> dict:
    """A report as device.py writes it on an H100 (8B-shaped decode, bs 4, 2 and 32 layers)."""
    r = {"device": device, "gpu": card, "model": "8b", "date": DATE, "batch": 4,
         "context": 513, "steps": 8,
         "depths": [
             {"layers": 2, "compile_s": 21.4, "measured_step_ms": 1.212,
              "measured_dispatch_ms": 0.871, "estimated_step_ms": 0.905, "roofline_ms": 0.668,
              "dispatches": 41, "copies": 0.0, "gap_per_dispatch_us": 8.32,
              "kinds": {"lm_head": 0.402, "gate/up": 0.15}},
             {"layers": 32, "compile_s": 88.0, "measured_step_ms": 6.105,
              "measured_dispatch_ms": 5.032, "estimated_step_ms": 5.462, "roofline_ms": 4.925,
              "dispatches": 431, "copies": 0.0, "gap_per_dispatch_us": 2.49,
              "kinds": {"gate/up": 2.1, "down": 1.05, "attention": 0.8}}],
         "per_layer": {"measured_step_ms": 0.1631, "estimated_step_ms": 0.1519,
                       "roofline_ms": 0.1419},
         "smollm2_tokens_per_s": 412.34,
         "suggested": {"kernel_launch_s": launch_s}}
    r.update(changes)
    return r


def write_json(path: Path, obj) -> Path:
    path.write_text(json.dumps(obj))
    return path


def run(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(RUNNER), *map(str, args)], capture_output=True,
                          text=True, check=False, timeout=120)


def ok(*args) -> subprocess.CompletedProcess:
    proc = run(*args)
    assert proc.returncode == 0, proc.stderr
    return proc


def assert_one_line_error(proc, *words):
    assert proc.returncode == 1, (proc.returncode, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for w in words:
        assert w in lines[0], (w, lines[0])
    assert "Traceback" not in proc.stderr


def section(text: str, card: str) -> str:
    begin, end = f"<!-- device:{card}:begin -->", f"<!-- device:{card}:end -->"
    assert text.count(begin) == 1 and text.count(end) == 1, text[-3000:]
    return text[text.index(begin):text.index(end) + len(end)]


def table_rows(sec: str) -> dict[str, list[str]]:
    """First cell -> the other cells, for the rows of the section's table."""
    rows = [line.split("|")[1:-1] for line in sec.splitlines() if line.startswith("| ")]
    return {r[0].strip(): [c.strip() for c in r[1:]] for r in rows}


def load_gpus(path: Path) -> dict:
    """GPUS of a gpus.py file, imported from that path."""
    spec = importlib.util.spec_from_file_location(f"gpus_{abs(hash(str(path)))}", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses reads the module while it builds GpuSpec
    try:
        spec.loader.exec_module(mod)
    finally:
        del sys.modules[spec.name]
    return mod.GPUS


@pytest.fixture
def bench(tmp_path) -> Path:
    """A copy of the repository's BENCHMARKS.md."""
    return Path(shutil.copy(ROOT / "BENCHMARKS.md", tmp_path / "BENCHMARKS.md"))


@pytest.fixture
def gpus(tmp_path) -> Path:
    """A copy of halo_mlir/toolchain/gpus.py."""
    return Path(shutil.copy(GPUS_PY, tmp_path / "gpus.py"))


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """The device check's real CPU dry run (toy model, 2 and 3 layers; ~20 s), once."""
    out = tmp_path_factory.mktemp("dry") / "dry.json"
    proc = subprocess.run([sys.executable, str(CHECK), "--device", "cpu", "--quick",
                           "--steps", "2", "-o", str(out)], capture_output=True, text=True,
                          check=False, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out, proc


# ---- the BENCHMARKS.md section --------------------------------------------------------------
def test_section_between_its_markers(tmp_path, bench):
    before, gpus_before = bench.read_text(), GPUS_PY.read_bytes()
    proc = ok("--device-report", write_json(tmp_path / "h100.json", report()), "-o", bench)
    text = bench.read_text()
    assert text.startswith(before) and len(text) > len(before)  # the rest as it was
    sec = section(text, "h100")
    assert text.endswith(sec + "\n")  # appended: no device section before it
    assert f"## Measured on h100 (cuda), {DATE}" in sec
    assert "batch 4, context 513 tokens, median of 8 steps" in sec
    rows = table_rows(sec)
    # measured, dispatches, estimate, roofline, measured/estimate, measured/roofline,
    # dispatches, copies, gap per dispatch, compile
    assert rows["2"] == ["1.212", "0.871", "0.905", "0.668", "1.34", "1.81", "41", "0", "8.32",
                         "21.4"]
    assert rows["32"] == ["6.105", "5.032", "5.462", "4.925", "1.12", "1.24", "431", "0",
                          "2.49", "88.0"]
    assert rows["per layer"] == ["0.163", "", "0.152", "0.142", "1.07", "1.15", "", "", "", ""]
    assert "SmolLM2-135M, `halo-mlir generate --device cuda`: 412.3 tokens/s." in sec
    assert "at 32 layers (ms): gate/up 2.100, down 1.050, attention 0.800." in sec
    assert "dry run" not in sec
    # the constants printed as they stand in gpus.py; gpus.py itself untouched
    assert f"    kernel_launch_s=2.49e-6,  # calibrated: h100 (cuda), {DATE}\n" in proc.stdout
    assert "h200 is made from h100's spec" in proc.stdout
    assert "copy_fixed_s" in proc.stdout.split("not measured")[1]
    assert GPUS_PY.read_bytes() == gpus_before


def test_section_without_tokens_or_kinds(tmp_path):
    r = report(smollm2_tokens_per_s=None)
    for row in r["depths"]:
        del row["kinds"]
    out = tmp_path / "B.md"  # a file that does not exist yet
    ok("--device-report", write_json(tmp_path / "r.json", r), "-o", out)
    sec = section(out.read_text(), "h100")
    assert out.read_text().startswith("# Benchmarks\n")
    assert "tokens/s" not in sec and "by kind" not in sec and "| per layer |" in sec
    # blank lines at the end of a file and no newline at its end stay as they were
    for tail in ("notes\n\n\n", "notes"):
        other = tmp_path / "tail.md"
        other.write_text(tail)
        ok("--device-report", tmp_path / "r.json", "-o", other)
        assert other.read_text().startswith(tail) and section(other.read_text(), "h100") == sec


def test_rerun_replaces_and_second_card_adds(tmp_path, bench):
    original = bench.read_text()
    first = write_json(tmp_path / "h100.json", report())
    ok("--device-report", first, "-o", bench)
    once = bench.read_text()
    ok("--device-report", first, "-o", bench)
    assert bench.read_text() == once  # the same report twice: the same file

    h100 = section(once, "h100")
    ok("--device-report", write_json(tmp_path / "h200.json", report("h200", launch_s=2.2e-6)),
       "-o", bench)
    two = bench.read_text()
    h200 = section(two, "h200")
    assert section(two, "h100") == h100 and two.startswith(once.rstrip("\n"))
    assert two.index(h100) < two.index(h200) and f"## Measured on h200 (cuda), {DATE}" in h200

    # a new h100 report replaces h100's section only
    depths = report()["depths"]
    depths[1]["measured_step_ms"] = 7.25
    ok("--device-report", write_json(tmp_path / "h100b.json", report(depths=depths)),
       "-o", bench)
    three = bench.read_text()
    new = section(three, "h100")
    assert new != h100 and table_rows(new)["32"][0] == "7.250"
    assert three.replace(new, h100) == two  # every other byte as it was
    assert section(three, "h200") == h200 and three.startswith(original)


def test_dry_run_report_to_its_own_file(tmp_path, dry_run):
    path, check = dry_run
    r = json.loads(path.read_text())
    assert (r["batch"], r["context"], r["steps"]) == (4, 513, 2)
    assert "gpus.py: kernel_launch_s=" in check.stdout and "calibrated: mi300x (cpu)" in \
        check.stdout
    out = tmp_path / "dry.md"
    out.write_text("# Dry run\n")
    proc = ok("--device-report", path, "-o", out)
    sec = section(out.read_text(), "mi300x")
    assert f"## Measured on mi300x (cpu), {r['date']}" in sec and "dry run" in sec
    rows = table_rows(sec)
    for d in r["depths"]:
        cells = rows[str(d["layers"])]
        assert cells[0] == f"{d['measured_step_ms']:.3f}" and cells[2] == \
            f"{d['estimated_step_ms']:.3f}" and cells[6] == str(d["dispatches"])
    assert rows["per layer"][2] == f"{r['per_layer']['estimated_step_ms']:.3f}"
    assert "not for gpus.py" in proc.stdout and "calibrated: mi300x (cpu)" in proc.stdout


def test_cpu_report_never_writes_gpus(tmp_path, dry_run, gpus):
    path, _ = dry_run
    before = gpus.read_bytes()
    out = tmp_path / "dry.md"
    proc = run("--device-report", path, "-o", out, "--gpus-py", gpus, "--write-gpus")
    assert_one_line_error(proc, "dry run", "calibrates nothing", "--device cuda or hip")
    assert gpus.read_bytes() == before and not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpus.py"]  # nothing half-written


def test_cpu_report_not_into_the_repository_benchmarks(tmp_path):
    repo = ROOT / "BENCHMARKS.md"
    before = repo.read_bytes()
    try:
        proc = run("--device-report", write_json(tmp_path / "cpu.json", report(device="cpu")))
        assert_one_line_error(proc, "dry run", "-o FILE")
        assert repo.read_bytes() == before
    finally:
        if repo.read_bytes() != before:
            repo.write_bytes(before)


# ---- gpus.py ----------------------------------------------------------------------------
# card -> the cards made from its spec (dataclasses.replace), whose value follows
FOLLOWERS = {"h100": {"h200"}, "h200": set(), "mi300x": {"mi300x-cpx"}, "mi300x-cpx": set()}


@pytest.mark.parametrize("card", sorted(FOLLOWERS))
def test_write_gpus_one_line_in_the_cards_spec(tmp_path, gpus, card):
    device = "hip" if card.startswith("mi300x") else "cuda"
    before = gpus.read_text()
    old = load_gpus(gpus)
    rep = write_json(tmp_path / "r.json", report(card, device, launch_s=3.07e-6))
    proc = ok("--device-report", rep, "-o", tmp_path / "B.md", "--gpus-py", gpus, "--write-gpus")
    line = f"kernel_launch_s=3.07e-6,  # calibrated: {card} ({device}), {DATE}"
    assert f"    {line}\n" in proc.stdout
    after = gpus.read_text()
    diff = [d for d in difflib.ndiff(before.splitlines(), after.splitlines())
            if d[:2] in ("+ ", "- ")]
    assert len(diff) == 1 and diff[0][2:].strip() == line, diff
    # an argument of the card's spec: the call that names it
    calls = [n for n in ast.walk(ast.parse(after)) if isinstance(n, ast.Call) and any(
        k.arg == "name" and getattr(k.value, "value", None) == card for k in n.keywords)]
    assert len(calls) == 1
    at = after.splitlines().index(diff[0][2:]) + 1
    assert [k.lineno for k in calls[0].keywords if k.arg == "kernel_launch_s"] == [at]

    new = load_gpus(gpus)
    assert new[card].kernel_launch_s == 3.07e-6
    for other in new:
        if other != card:
            expect = 3.07e-6 if other in FOLLOWERS[card] else old[other].kernel_launch_s
            assert new[other].kernel_launch_s == expect, other
            assert (f"{other} is made from {card}'s spec" in proc.stdout) == \
                (other in FOLLOWERS[card])
        for field in ("memory_bytes", "hbm_bytes_per_s", "copy_fixed_s", "host_wait_s",
                      "transfer_latency_s", "description"):
            assert getattr(new[other], field) == getattr(old[other], field)


def test_write_gpus_rerun_replaces_its_line(tmp_path, gpus, monkeypatch):
    before = gpus.read_text()
    first = write_json(tmp_path / "a.json", report(launch_s=2.49e-6))
    ok("--device-report", first, "-o", tmp_path / "B.md", "--gpus-py", gpus, "--write-gpus")
    once = gpus.read_text()
    ok("--device-report", first, "-o", tmp_path / "B.md", "--gpus-py", gpus, "--write-gpus")
    assert gpus.read_text() == once
    later = write_json(tmp_path / "b.json", report(launch_s=4.2e-6, date="2027-01-15"))
    ok("--device-report", later, "-o", tmp_path / "B.md", "--gpus-py", gpus, "--write-gpus")
    after = gpus.read_text()
    added = [r for r in after.splitlines() if r not in before.splitlines()]
    assert added == ["    kernel_launch_s=4.2e-6,  # calibrated: h100 (cuda), 2027-01-15"]
    assert len(after.splitlines()) == len(before.splitlines()) + 1

    # the analysis reads the calibrated spec: the step estimate's launches scale with it
    from halo_mlir.analysis import capacity
    from halo_mlir.config import preset
    from halo_mlir.toolchain import gpus as gpus_module

    base = capacity.plan(preset("8b"), gpu="h100", batch=4).decode.estimate
    monkeypatch.setitem(gpus_module.GPUS, "h100", load_gpus(gpus)["h100"])
    calibrated = capacity.plan(preset("8b"), gpu="h100", batch=4).decode.estimate
    assert calibrated.launch_s == pytest.approx(base.launch_s * 4.2e-6 / 2e-6)
    assert calibrated.seconds > base.seconds


def test_write_gpus_refuses_a_shared_line(tmp_path, gpus):
    shared = gpus.read_text().replace("link_bytes_per_s=25e9, transfer_latency_s=10e-6,",
                                      "link_bytes_per_s=25e9, kernel_launch_s=2e-6,", 1)
    assert shared != gpus.read_text()
    gpus.write_text(shared)
    out = tmp_path / "B.md"
    proc = run("--device-report", write_json(tmp_path / "r.json", report()), "-o", out,
               "--gpus-py", gpus, "--write-gpus")
    assert_one_line_error(proc, "kernel_launch_s", "line of its own")
    assert gpus.read_text() == shared and not out.exists()


def test_write_gpus_needs_the_cards_spec(tmp_path, gpus):
    gpus.write_text(gpus.read_text().replace('name="h100"', 'name="h100-sxm"'))
    proc = run("--device-report", write_json(tmp_path / "r.json", report()), "-o",
               tmp_path / "B.md", "--gpus-py", gpus, "--write-gpus")
    assert_one_line_error(proc, "name='h100'", str(gpus))
    assert not (tmp_path / "B.md").exists()


# ---- bad input ----------------------------------------------------------------------------
def _without(key):
    r = report()
    del r[key]
    return r


def _row_without(key):
    r = report()
    del r["depths"][1][key]
    return r


def _row_with(key, value):
    r = report()
    r["depths"][0][key] = value
    return r


BAD = {
    "missing": (None, ["no such file", "tools/bench/device.py"]),
    "not json": ("{'device': 'cuda'", ["is not JSON", "tools/bench/device.py -o"]),
    "a list": ([1, 2], ["JSON list", "not a device check report"]),
    "no per_layer": (_without("per_layer"), ["lacks per_layer", "tools/bench/device.py"]),
    "no suggested": (_without("suggested"), ["lacks suggested"]),
    "row key": (_row_without("roofline_ms"), ["depths[1] lacks roofline_ms"]),
    "row value": (_row_with("dispatches", "many"), ["depths[0].dispatches", "not a number"]),
    "unknown card": (report("a100"), ["'a100'", "gpus.py", "h100", "--gpu"]),
    "unknown device": (report(device="rocm"), ["device", "'rocm'", "cuda"]),
    "bad date": (report(date="yesterday"), ["date", "YYYY-MM-DD"]),
    "unknown constant": (report(suggested={"warp_size": 64}), ["suggested.warp_size",
                                                                "kernel_launch_s"]),
    "not positive": (report(launch_s=-1e-6), ["suggested.kernel_launch_s", "not positive"]),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_report_is_one_line(tmp_path, gpus, case):
    content, words = BAD[case]
    path = tmp_path / "device.json"
    if isinstance(content, str):
        path.write_text(content)
    elif content is not None:
        write_json(path, content)
    out = tmp_path / "B.md"
    out.write_text("# Benchmarks\n\nkept\n")
    before = gpus.read_bytes()
    proc = run("--device-report", path, "-o", out, "--gpus-py", gpus, "--write-gpus")
    assert_one_line_error(proc, *words)
    assert out.read_text() == "# Benchmarks\n\nkept\n" and gpus.read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]
