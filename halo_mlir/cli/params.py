"""import-params: checkpoint weights (safetensors or GGUF) to IRPA parameter files."""

from __future__ import annotations

import time
from pathlib import Path

import click

from halo_mlir.cli.common import MOE_PARALLEL_HELP, moe_parallel_option, reports_errors, tp_option
from halo_mlir.errors import HaloError


@click.command("import-params", short_help="Weights (safetensors/GGUF) -> IRPA.")
@click.option("--safetensors", "st_path", type=click.Path(),
              help="model.safetensors, model.safetensors.index.json, or their directory.")
@click.option("--gguf", type=click.Path(), help="A llama GGUF file (llama.cpp).")
@click.option("--hf-config", type=click.Path(),
              help="With --safetensors: config.json (default: the one beside the checkpoint).")
@click.option("--dtype", default="f16", show_default=True, type=click.Choice(["f16", "bf16", "f32"]),
              help="dtype of the float (or dequantized) parameters; with --quantize fp8 "
                   "or an FP8 checkpoint, of the embedding, norms, lm_head and float linears.")
@click.option("--keep-quantized", is_flag=True,
              help="With --gguf: keep Q8_0/Q4_1/Q4_K/Q6_K matrices in their block format.")
@tp_option("Write NAME.rank{i}.irpa per device (split tensors as KEY.shard.{i}).")
@moe_parallel_option(MOE_PARALLEL_HELP + " Emit with the same --moe-parallel.")
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
@reports_errors
def import_params(st_path, gguf, hf_config, dtype, keep_quantized, tp, moe_parallel, layout,
                  quantize,
                  fp8_scales, calibration_text, calibration_tokens, tokenizer, output):
    """Write an IRPA with docs/ABI.md parameter keys from an HF checkpoint or a GGUF file.
    A published FP8 checkpoint (compressed-tensors or fbgemm_fp8, from its config.json) is
    imported as it is: fp8 weights and their scales, no calibration (docs/fp8-checkpoints.md)."""
    from halo_mlir.support.progress import Progress

    if bool(st_path) == bool(gguf):
        raise HaloError("pass exactly one of --safetensors and --gguf")
    if quantize is not None:
        from halo_mlir.params.fp8_import import check_quantize

        check_quantize(quantize, keep_quantized)
        if fp8_scales is not None:
            from halo_mlir.quantization.fp8 import check_scales

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
    scheme = None
    if st_path:
        from halo_mlir.params.fp8_checkpoint import scheme_from_checkpoint

        scheme = scheme_from_checkpoint(st_path, hf_config)
        if scheme is not None and quantize is not None:
            raise HaloError(f"{st_path} is already an FP8 checkpoint ({scheme.layout}); drop "
                            "--quantize fp8: import-params --safetensors imports its fp8 "
                            "weights and scales as they are")
    start = time.perf_counter()
    if scheme is not None:
        n = _import_fp8_checkpoint(st_path, hf_config, scheme, dtype, tp, layout, output,
                                   moe_parallel)
    elif quantize is not None:
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


def _import_fp8_checkpoint(st_path, hf_config, scheme, dtype, tp, layout, output, moe) -> int:
    """import-params --safetensors DIR of a published FP8 checkpoint: no calibration, the
    checkpoint's fp8 weights and scales as they are (docs/fp8-checkpoints.md)."""
    from halo_mlir import config
    from halo_mlir.params.fp8_checkpoint import config_path, import_fp8_checkpoint
    from halo_mlir.support.progress import Progress

    cfg = config.from_hf_config(config_path(st_path, hf_config))
    progress = Progress("importing")
    try:
        return import_fp8_checkpoint(st_path, cfg, scheme, output, dtype=dtype, tp=tp,
                                     layout=layout, moe=moe, progress=progress,
                                     note=lambda m: click.echo(m, err=True))
    finally:
        progress.close()


def _import_fp8(st_path, gguf, hf_config, dtype, tp, layout, calibration_text,
                calibration_tokens, tokenizer, output, scales="per-tensor",
                moe="ffn") -> int:
    """import-params --quantize fp8: calibration tokens, then calibrate + write."""
    from halo_mlir.params import calibrate
    from halo_mlir.params.fp8_import import import_fp8, preflight
    from halo_mlir.params.sources import open_source
    from halo_mlir.support.progress import Progress
    from halo_mlir.params.tokenizer import JsonTokenizer

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
