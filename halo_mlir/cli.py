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


@click.group()
@click.version_option(package_name="halo-mlir")
def main():
    """Emit Llama 3.1 inference programs directly as IREE MLIR."""


def _load_config(model: str | None, hf_config: str | None, gguf: str | None,
                 layers: int | None, keep_quantized: bool = False):
    """(config, weight formats) from exactly one of a preset, an HF config, a GGUF file."""
    from halo_mlir import config

    given = [name for name, v in (("--model", model), ("--hf-config", hf_config),
                                  ("--gguf", gguf)) if v]
    if len(given) > 1:
        raise HaloError(f"pass one of --model, --hf-config, --gguf (got {' and '.join(given)})")
    if keep_quantized and not gguf:
        raise HaloError("--keep-quantized needs --gguf (the weights' formats come from it)")
    formats = {}
    if gguf:
        from halo_mlir.params.gguf_file import GgufFile
        from halo_mlir.params.gguf_import import weight_formats

        with GgufFile(gguf) as g:
            cfg = g.config()
            formats = weight_formats(g, cfg, keep_quantized)
    elif hf_config:
        cfg = config.from_hf_config(hf_config)
    else:
        cfg = config.preset(model or "toy")
    cfg = cfg.with_layers(layers)
    kept = tuple(sorted((k, f) for k, f in formats.items() if _in_layers(k, cfg.n_layers)))
    return cfg, kept


def _in_layers(key: str, n_layers: int) -> bool:
    return not key.startswith("blk.") or int(key.split(".")[1]) < n_layers


@main.command()
@click.option("--model", help="Preset: 8b, 70b, 405b or toy (default toy).")
@click.option("--hf-config", type=click.Path(), help="An HF Llama-family config.json.")
@click.option("--gguf", type=click.Path(), help="A llama GGUF: hyperparameters from its metadata.")
@click.option("--keep-quantized", is_flag=True,
              help="With --gguf: Q8_0/Q4_1 matrices run natively (import with the same flag).")
@click.option("--layers", type=int, help="Emit only the first N decoder blocks.")
@click.option("--bs-prefill", default="4", callback=_int_list, show_default=True)
@click.option("--bs-decode", default="4", callback=_int_list, show_default=True)
@click.option("--block-seq-stride", default=32, show_default=True, type=int)
@click.option("--dtype", default="f16", show_default=True, type=click.Choice(["f16", "bf16", "f32"]))
@click.option("--attention", default="fused", show_default=True,
              type=click.Choice(["fused", "decomposed"]))
@click.option("--device-block-count", default=256, show_default=True, type=int,
              help="KV pages per device, written to config.json.")
@click.option("--locations/--no-locations", default=True, show_default=True,
              help="Print op locations (blk.3.attn_q) in text MLIR.")
@click.option("-o", "--output", required=True, type=click.Path(),
              help="OUT.mlir (text) or OUT.mlirbc (bytecode).")
@click.option("--output-config", type=click.Path(), help="Write the shortfin config.json here.")
@_reports_errors
def emit(model, hf_config, gguf, keep_quantized, layers, bs_prefill, bs_decode,
         block_seq_stride, dtype, attention, device_block_count, locations, output,
         output_config):
    """Emit prefill_bs{N} / decode_bs{N} for a Llama model."""
    from halo_mlir.api import emit_to_file
    from halo_mlir.model.llama import EmitOptions
    from halo_mlir.model.service_config import service_config
    from halo_mlir.io_utils import atomic_write

    start = time.perf_counter()
    cfg, formats = _load_config(model, hf_config, gguf, layers, keep_quantized)
    opts = EmitOptions(bs_prefill=bs_prefill, bs_decode=bs_decode,
                       block_seq_stride=block_seq_stride, dtype=dtype, attention=attention,
                       weight_formats=formats)
    n_bytes = emit_to_file(cfg, opts, output, locations=locations)
    if output_config:
        with atomic_write(output_config) as f:
            json.dump(service_config(cfg, opts, device_block_count=device_block_count), f,
                      indent=2)
            f.write("\n")
    click.echo(f"wrote {output} ({n_bytes / 1e6:.1f} MB, {cfg.n_layers} layers, {dtype}) in "
               f"{time.perf_counter() - start:.2f} s", err=True)


@main.command("compile")
@click.argument("source", type=click.Path())
@click.option("--target", default="cpu", show_default=True,
              help="gfx942 (MI300X), cpu, cpu-generic or cuda.")
@click.option("-o", "--output", required=True, type=click.Path())
@click.option("--flag", "extra", multiple=True, help="Extra iree-compile flag (repeatable).")
@_reports_errors
def compile_cmd(source, target, output, extra):
    """Compile emitted MLIR to a vmfb with iree-compile."""
    from halo_mlir.compile import compile_file

    compile_file(source, output, target=target, extra_flags=list(extra),
                 echo=lambda m: click.echo(m, err=True))


@main.command("import-params")
@click.option("--safetensors", "st_path", type=click.Path(),
              help="model.safetensors, model.safetensors.index.json, or their directory.")
@click.option("--gguf", type=click.Path(), help="A llama GGUF file (llama.cpp).")
@click.option("--hf-config", type=click.Path(),
              help="With --safetensors: config.json (default: the one beside the checkpoint).")
@click.option("--dtype", default="f16", show_default=True, type=click.Choice(["f16", "bf16", "f32"]),
              help="dtype of the float (or dequantized) parameters.")
@click.option("--keep-quantized", is_flag=True,
              help="With --gguf: keep Q8_0/Q4_1 matrices in their block format.")
@click.option("-o", "--output", required=True, type=click.Path(), help="NAME.irpa")
@_reports_errors
def import_params(st_path, gguf, hf_config, dtype, keep_quantized, output):
    """Write an IRPA with ABI.md parameter keys from an HF checkpoint or a GGUF file."""
    from halo_mlir.progress import Progress

    if bool(st_path) == bool(gguf):
        raise HaloError("pass exactly one of --safetensors and --gguf")
    if keep_quantized and not gguf:
        raise HaloError("--keep-quantized applies to --gguf weights only")
    start = time.perf_counter()
    progress = Progress("importing")
    try:
        if gguf:
            from halo_mlir.params.gguf_import import import_gguf

            n = import_gguf(gguf, output, dtype=dtype, keep_quantized=keep_quantized,
                            progress=progress)
        else:
            from halo_mlir import config
            from halo_mlir.params.safetensors_import import import_safetensors

            src = Path(st_path)
            cfg_path = Path(hf_config) if hf_config else \
                (src if src.is_dir() else src.parent) / "config.json"
            n = import_safetensors(src, config.from_hf_config(cfg_path), output, dtype=dtype,
                                   progress=progress)
    finally:
        progress.close()
    click.echo(f"wrote {output} ({n / 1e6:.1f} MB) in {time.perf_counter() - start:.1f} s",
               err=True)


if __name__ == "__main__":
    main()
