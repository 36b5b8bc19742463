#!/usr/bin/env python3
"""Benchmark halo-mlir against its peer exporter, sharktank (AMD's torch-tracing exporter).

For each (layers, tp) in the matrix, both tools produce a paged-Llama module with
prefill_bs{B} and decode_bs{B} entry points for the same toy model (hidden 512, 8 heads,
8 kv heads, head_dim 64, ffn 1024, vocab 1024, rope theta 500000, context 4096,
block-seq-stride 32, f16), and the script measures:

  * export/emit wall time (s) and peak RSS (MB) of the exporting process (os.wait4),
  * size of the exported text MLIR (MB),
  * number of lines holding `flow.tensor.transfer` (as `grep -c` counts them), and the
    transfers one prefill/decode call executes (halo-mlir emits one layer function per
    entry and calls it L times, so its grep count is flat in depth),
  * gfx942 iree-compile wall time (s) and peak RSS, or the failure and its first error.

sharktank side:
  1. a random-weight IRPA dataset is written by this script's `make-dataset` subcommand,
     in a child process, with sharktank's own `make_random_llama_theta` (the helper its
     toy_llama uses);
  2. for tp > 1 it is sharded with `python -m sharktank.examples.sharding.shard_llm_dataset`;
  3. `python -m sharktank.examples.export_paged_llm_v1` exports it (timed as "export");
  4. iree-compile with `--iree-hal-target-device=hip[i]` for i < tp and
     `--iree-rocm-target=gfx942` compiles it.
Steps 1-2 are timed too and reported as "prep" (not counted in export).

halo-mlir side: `halo-mlir emit --model toy --layers L --tp N` and
`halo-mlir compile X --target gfx942 --tp N` (which runs the same iree-compile flags).

Both MLIR files are compiled by the SAME iree-compile (by default the one next to the
halo-mlir executable, i.e. halo's IREE 3.13). The peer venv needs its own IREE 3.6 Python
bindings for the export: iree-turbine 3.6 calls `IntegerType.isinstance`, which the 3.13
bindings no longer have (export dies with AttributeError).

sharktank's Grok (export time and prefill logits on the same random weights) is compared
by tools/bench_peer_grok.py, which uses the same virtualenv.

This script must run in its OWN virtualenv holding torch + sharktank; it only calls
halo-mlir as an external program and is never imported by halo_mlir. Set-up that works
(torch first: it resolves to a local CPU wheel; other torch specs pull CUDA wheels; the
constraint stops pip from swapping it):

    python3 -m venv venv
    venv/bin/pip install 'torch==2.13.0'
    echo 'torch==2.13.0+cpu' > constraints.txt
    venv/bin/pip install -c constraints.txt sharktank==3.6.0 iree-turbine==3.6.0 \\
        iree-base-compiler==3.6.0 iree-base-runtime==3.6.0

Example:

    venv/bin/python tools/bench_peer.py --layers 8 --tp 8,1 \\
        --halo-mlir /path/to/halo/venv/bin/halo-mlir \\
        --iree-compile /path/to/halo/venv/bin/iree-compile \\
        --work-dir out --markdown RESULTS.md --json results.json
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

# The toy config both tools export (halo-mlir's `--model toy` preset).
TOY = dict(hidden=512, heads=8, kv_heads=8, head_dim=64, ffn=1024, vocab=1024,
           rope_theta=500000.0, rms_eps=1e-5, context=4096)
BLOCK_SEQ_STRIDE = 32
BATCH = 4


@dataclass
class Measured:
    """One timed child process."""
    cmd: list[str]
    rc: int | None = None
    wall_s: float | None = None
    rss_mb: float | None = None
    timed_out: bool = False
    error: str | None = None   # first `error:` line (or last stderr line) when rc != 0

    @property
    def ok(self) -> bool:
        return self.rc == 0 and not self.timed_out


@dataclass
class Row:
    tool: str
    layers: int
    tp: int
    prep: Measured | None = None
    export: Measured | None = None
    mlir_mb: float | None = None
    transfers: int | None = None
    transfers_per_call: dict[str, int] = field(default_factory=dict)
    compile: Measured | None = None
    notes: list[str] = field(default_factory=list)


def run_measured(cmd: list[str], log: Path, timeout_s: float, env=None) -> Measured:
    """Run cmd, capturing output to log; wall time and peak RSS via os.wait4."""
    m = Measured(cmd=[str(c) for c in cmd])
    print("$", " ".join(m.cmd), flush=True)
    with open(log, "wb") as out:
        t0 = time.monotonic()
        proc = subprocess.Popen(m.cmd, stdout=out, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
        deadline = t0 + timeout_s
        while True:
            pid, status, ru = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                m.timed_out = True
                os.killpg(proc.pid, 9)
                pid, status, ru = os.wait4(proc.pid, 0)
                break
            time.sleep(0.05)
        m.wall_s = round(time.monotonic() - t0, 2)
    proc.returncode = os.waitstatus_to_exitcode(status)
    m.rc = proc.returncode
    m.rss_mb = round(ru.ru_maxrss / 1024, 1)  # Linux: KiB
    if not m.ok:
        text = log.read_text(errors="replace")
        errs = [ln.strip() for ln in text.splitlines() if "error:" in ln]
        tail = [ln.strip() for ln in text.splitlines() if ln.strip()]
        m.error = (errs[0] if errs else (tail[-1] if tail else f"rc={m.rc}"))[:300]
        if m.timed_out:
            m.error = f"timed out after {timeout_s:.0f} s"
    print(f"  rc={m.rc} wall={m.wall_s}s rss={m.rss_mb}MB" + (f" ERROR {m.error}" if m.error else ""),
          flush=True)
    return m


_FUNC = re.compile(rb"(?:func\.func|util\.func)\s+(?:public\s+|private\s+)?@([^\s(]+)\(")
_CALL = re.compile(rb"call @([^\s(]+)\(")


def mlir_stats(path: Path) -> tuple[float, int, dict[str, int]]:
    """(size in MB, lines holding flow.tensor.transfer, transfers executed per entry call).

    The line count is what `grep -c flow.tensor.transfer` prints: a static count, so a
    layer function called N times counts once. The per-entry figure follows the call
    graph (transfers of each callee times its call count) from prefill_bs*/decode_bs*.
    """
    size = path.stat().st_size / 1e6
    lines = 0
    own: dict[str, int] = {}
    calls: dict[str, dict[str, int]] = {}
    cur = None
    with open(path, "rb") as f:
        for line in f:
            m = _FUNC.search(line)
            if m:
                cur = m.group(1).decode()
                own.setdefault(cur, 0)
                calls.setdefault(cur, {})
                continue
            if b"flow.tensor.transfer" in line:
                lines += 1
                if cur:
                    own[cur] += 1
            if cur:
                for c in _CALL.findall(line):
                    c = c.decode()
                    calls[cur][c] = calls[cur].get(c, 0) + 1

    memo: dict[str, int] = {}

    def expanded(fn: str, depth=0) -> int:
        if fn not in memo:
            memo[fn] = 0 if depth > 50 else own.get(fn, 0) + sum(
                n * expanded(c, depth + 1) for c, n in calls.get(fn, {}).items())
        return memo[fn]

    entries = {fn: expanded(fn) for fn in own if re.fullmatch(r"(prefill|decode)_bs\d+", fn)}
    return round(size, 2), lines, entries


def gfx942_flags(tp: int) -> list[str]:
    devices = (["--iree-hal-target-device=hip"] if tp == 1 else
               [f"--iree-hal-target-device=hip[{i}]" for i in range(tp)])
    return devices + ["--iree-rocm-target=gfx942"]


# ---------------------------------------------------------------- sharktank dataset

def make_dataset(layers: int, out: Path, seed: int) -> None:
    """Write a random-weight unsharded IRPA for the toy config (runs in the child)."""
    import torch
    from sharktank.layers.configs import LlamaHParams, LlamaModelConfig
    from sharktank.models.llama.testing import make_random_llama_theta
    from sharktank.types import Dataset

    torch.manual_seed(seed)
    hp = LlamaHParams(
        model_arch="llama",
        vocab_size=TOY["vocab"],
        context_length=TOY["context"],
        embedding_length=TOY["hidden"],
        block_count=layers,
        feed_forward_length=TOY["ffn"],
        rope_dimension_count=TOY["head_dim"],
        rope_freq_base=TOY["rope_theta"],
        attention_head_count=TOY["heads"],
        attn_head_dim=TOY["head_dim"],
        attention_layer_norm_rms_epsilon=TOY["rms_eps"],
        attention_head_count_kv=TOY["kv_heads"],
        expert_count=0,
        expert_used_count=0,
    )
    config = LlamaModelConfig(hp=hp, block_seq_stride=BLOCK_SEQ_STRIDE,
                              activation_dtype=torch.float16, attention_dtype=torch.float16)
    theta = make_random_llama_theta(config=config, vocab_size=TOY["vocab"],
                                    dtype_rest=torch.float16, dtype_norm=torch.float32)
    Dataset(config.hp.to_gguf_props(), theta).save(str(out))


# ---------------------------------------------------------------- the two tools

def bench_sharktank(layers: int, tp: int, work: Path, args) -> Row:
    row = Row("sharktank", layers, tp)
    d = work / f"sharktank_l{layers}_tp{tp}"
    d.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    irpa = d / "toy.irpa"
    prep = run_measured([py, __file__, "make-dataset", "--layers", str(layers), "--out", irpa],
                        d / "make_dataset.log", args.timeout)
    if prep.ok and tp > 1:
        sharded = d / f"toy.tp{tp}.irpa"
        shard = run_measured([py, "-m", "sharktank.examples.sharding.shard_llm_dataset",
                              "--irpa-file", irpa, "--output-irpa-file", sharded,
                              "--tensor-parallelism-size", str(tp)],
                             d / "shard.log", args.timeout)
        prep = Measured(cmd=prep.cmd + ["&&"] + shard.cmd, rc=shard.rc,
                        wall_s=round(prep.wall_s + shard.wall_s, 2),
                        rss_mb=max(prep.rss_mb, shard.rss_mb),
                        timed_out=shard.timed_out, error=shard.error)
        irpa = sharded
    row.prep = prep
    if not prep.ok:
        row.notes.append("dataset preparation failed")
        return row
    mlir = d / "model.mlir"
    row.export = run_measured(
        [py, "-m", "sharktank.examples.export_paged_llm_v1", "--irpa-file", irpa,
         "--output-mlir", mlir, "--output-config", d / "config.json",
         "--bs-prefill", str(BATCH), "--bs-decode", str(BATCH),
         "--block-seq-stride", str(BLOCK_SEQ_STRIDE),
         "--tensor-parallelism-size", str(tp)],
        d / "export.log", args.timeout)
    if not row.export.ok or not mlir.exists():
        return row
    row.mlir_mb, row.transfers, row.transfers_per_call = mlir_stats(mlir)
    if not args.no_compile:
        row.compile = run_measured([args.iree_compile, mlir, *gfx942_flags(tp),
                                    "-o", d / "model.vmfb"],
                                   d / "compile.log", args.compile_timeout)
    return row


def bench_halo(layers: int, tp: int, work: Path, args) -> Row:
    row = Row("halo-mlir", layers, tp)
    d = work / f"halo_l{layers}_tp{tp}"
    d.mkdir(parents=True, exist_ok=True)
    mlir = d / "model.mlir"
    row.export = run_measured(
        [args.halo_mlir, "emit", "--model", "toy", "--layers", str(layers), "--tp", str(tp),
         "--bs-prefill", str(BATCH), "--bs-decode", str(BATCH),
         "--block-seq-stride", str(BLOCK_SEQ_STRIDE),
         "-o", mlir, "--output-config", d / "config.json"],
        d / "emit.log", args.timeout)
    if not row.export.ok or not mlir.exists():
        return row
    row.mlir_mb, row.transfers, row.transfers_per_call = mlir_stats(mlir)
    if not args.no_compile:
        row.compile = run_measured([args.halo_mlir, "compile", mlir, "--target", "gfx942",
                                    "--tp", str(tp), "-o", d / "model.vmfb"],
                                   d / "compile.log", args.compile_timeout)
    return row


# ---------------------------------------------------------------- reporting

def row_from_dict(d: dict) -> Row:
    m = lambda x: None if x is None else Measured(**x)
    return Row(d["tool"], d["layers"], d["tp"], m(d.get("prep")), m(d.get("export")),
               d.get("mlir_mb"), d.get("transfers"), d.get("transfers_per_call") or {},
               m(d.get("compile")), d.get("notes", []))


def fmt(v, nd=2):
    return "—" if v is None else (f"{v:.{nd}f}" if isinstance(v, float) else str(v))


def compile_cell(m: Measured | None) -> str:
    if m is None:
        return "not run"
    if m.ok:
        return f"{m.wall_s:.1f} s ({m.rss_mb:.0f} MB)"
    why = m.error or f"rc={m.rc}"
    why = re.sub(r"^\S+:\d+:\d+:\s*(error:)", r"\1", why)  # drop the file:line:col prefix
    return f"FAILED after {m.wall_s:.1f} s: `{why[:120].replace('|', '/')}`"


def per_call(d: dict[str, int]) -> str:
    pre = [v for k, v in sorted(d.items()) if k.startswith("prefill")]
    dec = [v for k, v in sorted(d.items()) if k.startswith("decode")]
    return "/".join(str(x[0]) if x else "—" for x in (pre, dec)) if d else "—"


def markdown(rows: list[Row]) -> str:
    out = ["| tool | layers | tp | prep s | export/emit wall s | peak RSS MB | MLIR MB "
           "| transfers (grep -c) | transfers executed prefill/decode | gfx942 compile s (peak RSS) or failure |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        e = r.export
        exp = ("—" if e is None else fmt(e.wall_s) if e.ok
               else f"FAILED ({fmt(e.wall_s)} s): `{(e.error or '')[:80]}`")
        prep = "—" if r.prep is None else fmt(r.prep.wall_s)
        out.append(f"| {r.tool} | {r.layers} | {r.tp} | {prep} | {exp} | "
                   f"{fmt(e.rss_mb, 0) if e else '—'} | {fmt(r.mlir_mb)} | {fmt(r.transfers)} | "
                   f"{per_call(r.transfers_per_call)} | "
                   f"{compile_cell(r.compile) if e and e.ok else '—'} |")
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd")
    md = sub.add_parser("make-dataset", help="(internal) write a random toy IRPA")
    md.add_argument("--layers", type=int, required=True)
    md.add_argument("--out", type=Path, required=True)
    md.add_argument("--seed", type=int, default=12345)

    p.add_argument("--layers", default="8,1,2,4",
                   help="comma-separated layer counts, run in this order [%(default)s]")
    p.add_argument("--tp", default="8,1", help="comma-separated TP degrees [%(default)s]")
    p.add_argument("--tools", default="sharktank,halo-mlir",
                   help="which of sharktank,halo-mlir to run [%(default)s]")
    p.add_argument("--halo-mlir", default=shutil.which("halo-mlir") or "halo-mlir",
                   help="halo-mlir executable (from halo's own venv)")
    p.add_argument("--iree-compile",
                   help="iree-compile for sharktank's MLIR [default: the one next to "
                        "--halo-mlir, so both tools compile with the same IREE]")
    p.add_argument("--work-dir", type=Path, default=Path("peer_bench_out"))
    p.add_argument("--timeout", type=float, default=1800, help="per export step, s")
    p.add_argument("--compile-timeout", type=float, default=1800, help="per compile, s")
    p.add_argument("--no-compile", action="store_true", help="skip iree-compile")
    p.add_argument("--json", type=Path,
                   help="results JSON: rows already there are kept, re-measured ones replaced")
    p.add_argument("--markdown", type=Path, help="write the markdown table here")
    p.add_argument("--report-only", action="store_true",
                   help="run nothing: re-read --json, recount the MLIR files still in "
                        "--work-dir, rewrite --json/--markdown")
    args = p.parse_args(argv)

    if args.cmd == "make-dataset":
        make_dataset(args.layers, args.out, args.seed)
        return 0

    if args.iree_compile is None:
        sibling = Path(args.halo_mlir).with_name("iree-compile")
        args.iree_compile = str(sibling) if sibling.exists() else "iree-compile"
    tools = args.tools.split(",")
    bad = set(tools) - {"sharktank", "halo-mlir"}
    if bad:
        p.error(f"unknown tools: {', '.join(sorted(bad))}")
    args.work_dir.mkdir(parents=True, exist_ok=True)
    # Rows already in --json are kept (a re-measured (tool, layers, tp) replaces its old row),
    # so the matrix can be filled in over several runs.
    rows: list[Row] = ([row_from_dict(d) for d in json.loads(args.json.read_text())]
                       if args.json and args.json.exists() else [])
    if args.report_only:
        for r in rows:
            prefix = "sharktank" if r.tool == "sharktank" else "halo"
            mlir = args.work_dir / f"{prefix}_l{r.layers}_tp{r.tp}" / "model.mlir"
            if r.export and r.export.ok and mlir.exists():
                r.mlir_mb, r.transfers, r.transfers_per_call = mlir_stats(mlir)
        if args.json:
            args.json.write_text(json.dumps([asdict(r) for r in rows], indent=1))
    for layers in ([] if args.report_only else (int(x) for x in args.layers.split(","))):
        for tp in (int(x) for x in args.tp.split(",")):
            for tool in tools:
                fn = bench_sharktank if tool == "sharktank" else bench_halo
                row = fn(layers, tp, args.work_dir, args)
                rows = [r for r in rows if (r.tool, r.layers, r.tp) != (tool, layers, tp)]
                rows.append(row)
                rows.sort(key=lambda r: (-r.layers, -r.tp, r.tool != "sharktank"))
                if args.json:
                    args.json.write_text(json.dumps([asdict(r) for r in rows], indent=1))
                if args.markdown:
                    args.markdown.write_text(markdown(rows))
    if args.markdown:
        args.markdown.write_text(markdown(rows))
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
