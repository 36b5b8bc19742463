"""emit, compile, opt: the model to MLIR, MLIR to a vmfb, the passes alone."""

from __future__ import annotations

import json
import time
from pathlib import Path

import click

from halo_mlir.cli.common import (MOE_PARALLEL_HELP, allreduce_options, int_list,
                                  moe_parallel_option, print_report, reports_errors, tp_option)
from halo_mlir.errors import HaloError


@click.command(short_help="Model config -> MLIR (prefill/decode entries).")
@click.option("--model", help="Preset: 8b, 70b, 405b, toy, mixtral-8x7b, mixtral-8x22b or "
                                "grok-1 (or pass --hf-config / --gguf).")
@click.option("--hf-config", type=click.Path(), help="An HF config.json (Llama family or "
                                                     "Mixtral).")
@click.option("--gguf", type=click.Path(), help="A llama GGUF: hyperparameters from its metadata.")
@click.option("--keep-quantized", is_flag=True,
              help="With --gguf: Q8_0/Q4_1/Q4_K/Q6_K matrices run natively (import with the same flag).")
@click.option("--layers", type=int, help="Emit only the first N decoder blocks.")
@click.option("--bs-prefill", default="4", callback=int_list, show_default=True,
              help="Batch sizes of the prefill entries, comma-separated (1,4: prefill_bs1 "
                   "and prefill_bs4).")
@click.option("--bs-decode", default="4", callback=int_list, show_default=True,
              help="Batch sizes of the decode entries, comma-separated.")
@click.option("--block-seq-stride", default=32, show_default=True, type=int,
              help="Tokens per KV-cache page (prefill lengths are multiples of it).")
@click.option("--dtype", type=click.Choice(["f16", "bf16", "f32", "fp8"]),
              help="fp8: linear weights and inputs in f8E4M3FNUZ with per-tensor scales "
                   "(parameters from `import-params --quantize fp8`), the rest in f16. "
                   "[default: f16; fp8 for a published FP8 checkpoint's --hf-config]")
@click.option("--kv-cache-dtype", type=click.Choice(["fp8", "f16", "bf16", "f32"]),
              help="The KV cache's dtype [default: fp8 with --dtype fp8, else --dtype]. An "
                   "fp8 cache makes attention fp8 (Q, K, V quantized with the layer's scales).")
@click.option("--activation-dtype", default="f16", show_default=True,
              type=click.Choice(["f16", "bf16", "f32"]),
              help="With --dtype fp8: norms, residuals and logits (f32 leaves the fp8 "
                   "roundings as the only difference from an f32 reference).")
@click.option("--fp8-scales", metavar="per-tensor|per-channel",
              help="With --dtype fp8: the weight scales' scheme the parameters were imported "
                   "with (`import-params --fp8-scales`): one per weight (KEY:d) or one per "
                   "output row (KEY:d_rows). [default: per-tensor; an FP8 checkpoint's own]")
@click.option("--fp8-input-scales", type=click.Choice(["static", "dynamic"]),
              help="With --dtype fp8: each linear's input scale from the parameters "
                   "(q_input:rscale), or each token's own, computed in the program from its "
                   "amax (docs/fp8.md). [default: static; an FP8 checkpoint's own]")
@click.option("--fp8-activation-ub", type=float,
              help="With --fp8-input-scales dynamic: an upper bound on a token's amax "
                   "(fbgemm's activation_scale_ub).")
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
@tp_option("Tensor-parallel degree: run the sharding pass over N devices.")
@moe_parallel_option(MOE_PARALLEL_HELP)
@allreduce_options
@click.option("--device-block-count", default=256, show_default=True, type=int,
              help="KV pages per device, written to config.json.")
@click.option("--locations/--no-locations", default=True, show_default=True,
              help="Print op locations (blk.3.attn_q) in text MLIR.")
@click.option("-o", "--output", required=True, type=click.Path(),
              help="OUT.mlir (text) or OUT.mlirbc (bytecode).")
@click.option("--output-config", type=click.Path(), help="Write the shortfin config.json here.")
@reports_errors
def emit(model, hf_config, gguf, keep_quantized, layers, bs_prefill, bs_decode,
         block_seq_stride, dtype, kv_cache_dtype, activation_dtype, fp8_scales,
         fp8_input_scales, fp8_activation_ub, attention,
         template_dir, moe_prefill, layer_loop, tp, moe_parallel, allreduce, allreduce_dtype,
         device_block_count, locations, output,
         output_config):
    """Emit prefill_bs{N} / decode_bs{N} for a Llama, Mixtral or Grok-1 model."""
    from halo_mlir.api import emit_to_file
    from halo_mlir.model.attention_form import resolve
    from halo_mlir.model.decoder import EmitOptions
    from halo_mlir.model.service_config import service_config
    from halo_mlir.params.model_source import load_model
    from halo_mlir.support.io import atomic_write

    start = time.perf_counter()
    source = load_model(model=model, hf_config=hf_config, gguf=gguf, layers=layers,
                        keep_quantized=keep_quantized, tp=tp, layer_loop=layer_loop,
                        dtype=dtype or "f16")
    for note in source.notes:
        click.echo(note, err=True)
    cfg, formats = source.cfg, source.formats
    fp8 = dict(dtype=dtype or "f16", fp8_scales=fp8_scales or "per-tensor",
               fp8_input_scales=fp8_input_scales or "static",
               fp8_activation_ub=fp8_activation_ub)
    if hf_config:
        checkpoint = _checkpoint_fp8(hf_config, cfg, dtype, fp8_scales, fp8_input_scales,
                                     fp8_activation_ub, kv_cache_dtype)
        if checkpoint:  # no cache scales: the cache in the activation dtype
            fp8, kv_cache_dtype = checkpoint, kv_cache_dtype or activation_dtype
    opts = EmitOptions(bs_prefill=bs_prefill, bs_decode=bs_decode,
                       block_seq_stride=block_seq_stride, attention=attention,
                       weight_formats=formats, layer_loop=layer_loop,
                       template_dir=template_dir, kv_cache_dtype=kv_cache_dtype,
                       fp8_activations=activation_dtype, **fp8,
                       moe_prefill=moe_prefill, moe_parallel=moe_parallel)
    dtype = opts.dtype
    opts, chosen = resolve(cfg, opts)
    n_bytes, report = emit_to_file(cfg, opts, output, locations=locations, tp=tp,
                                   allreduce=allreduce, allreduce_dtype=allreduce_dtype)
    if output_config:
        with atomic_write(output_config) as f:
            json.dump(service_config(cfg, opts, device_block_count=device_block_count, tp=tp),
                      f, indent=2)
            f.write("\n")
    if report:
        print_report(report, cfg, opts)
    if chosen:  # after the writes: an error stays the only line
        click.echo(chosen, err=True)
    click.echo(f"wrote {output} ({n_bytes / 1e6:.1f} MB, {cfg.n_layers} layers, {dtype}) in "
               f"{time.perf_counter() - start:.2f} s", err=True)


def _checkpoint_fp8(hf_config, cfg, dtype, scales, inputs, ub, kv_cache_dtype) -> dict | None:
    """The fp8 EmitOptions of a published FP8 checkpoint's config.json (its scheme: which
    linears are fp8, its scales; the cache in the activation dtype), with the flags given
    checked against it; None for a float checkpoint."""
    from halo_mlir.params.fp8_checkpoint import read_scheme

    # load_model has read this file already (a missing or broken one is reported there)
    scheme = read_scheme(json.loads(Path(hf_config).read_text()), cfg)
    if scheme is None:
        return None
    opts = scheme.emit_options()
    if dtype not in (None, "fp8"):
        raise HaloError(f"{hf_config}: {scheme.summary()}; its program is --dtype fp8 (the "
                        f"default for it): drop --dtype {dtype}")
    if scales not in (None, scheme.weight_scales):
        raise HaloError(f"{hf_config}: the checkpoint's weight scales are "
                        f"{scheme.weight_scales}; drop --fp8-scales {scales}")
    if inputs == "static" and scheme.input_scales == "dynamic":
        raise HaloError(f"{hf_config}: the checkpoint has no static input scales (its inputs "
                        "are scaled per token); drop --fp8-input-scales static")
    if kv_cache_dtype == "fp8":
        raise HaloError(f"{hf_config}: the checkpoint has no KV-cache scales for an fp8 "
                        "cache; drop --kv-cache-dtype fp8")
    if inputs == "dynamic":  # a static checkpoint run with per-token scales instead
        opts["fp8_input_scales"] = "dynamic"
    if ub is not None:
        opts["fp8_activation_ub"] = ub
    return opts


@click.command("compile", short_help="MLIR -> vmfb with iree-compile.")
@click.argument("source", type=click.Path())
@click.option("--target", default="cpu", show_default=True,
              help="gfx942 (MI300X), cpu, cpu-generic or cuda.")
@click.option("-o", "--output", required=True, type=click.Path(), help="OUT.vmfb")
@tp_option("Devices the module was sharded for (emit --tp N).")
@click.option("--flag", "extra", multiple=True, help="Extra iree-compile flag (repeatable).")
@reports_errors
def compile_cmd(source, target, output, tp, extra):
    """Compile emitted MLIR to a vmfb with iree-compile."""
    from halo_mlir.toolchain.compile import compile_file

    compile_file(source, output, target=target, extra_flags=list(extra), tp=tp,
                 echo=lambda m: click.echo(m, err=True))


@click.command(short_help="Run the sharding passes on an MLIR file.")
@click.argument("source", type=click.Path())
@click.option("--shard", "shard", help="Run the sharding pass: tp=N.")
@allreduce_options
@click.option("--verify-placement", is_flag=True,
              help="Check device placement (also runs after --shard).")
@click.option("--split-input-file", is_flag=True,
              help="Treat `// -----` separated parts as independent modules (lit tests).")
@click.option("-o", "--output", required=True, type=click.Path(), help="OUT.mlir, or - for stdout.")
@reports_errors
def opt(source, shard, allreduce, allreduce_dtype, verify_placement, split_input_file, output):
    """Run halo_mlir passes on an MLIR file (for lit tests and experiments)."""
    from halo_mlir.api import module_text, parse_module, read_module, write_module
    from halo_mlir.support.io import atomic_write

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
        print_report(report)


def _declared_devices(module) -> int:
    import re

    found = {int(m) for m in re.findall(r"@__device_(\d+)", str(module))}
    return max(found) + 1 if found else 1
