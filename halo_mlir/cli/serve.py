"""export-shortfin: one directory shortfin's LLM server loads."""

from __future__ import annotations

import time

import click

from halo_mlir.cli.common import int_list, reports_errors, tp_option


@click.command("export-shortfin", short_help="A directory shortfin serves.")
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
@tp_option("Tensor-parallel devices.")
@click.option("--bs", default="1,4", show_default=True, callback=int_list,
              help="Batch sizes compiled for prefill and decode.")
@click.option("--dtype", type=click.Choice(["f16", "bf16", "f32"]),
              help="Activations and KV cache (default: f32 on cpu, f16 on gfx942); with "
                   "--params, the dtype they were imported with.")
@click.option("--keep-quantized", is_flag=True, help="With --gguf: run Q8_0/Q4_1/Q4_K/Q6_K natively.")
@click.option("--device-block-count", default=256, show_default=True, type=int,
              help="KV-cache pages shortfin allocates.")
@click.option("--force", is_flag=True, help="Replace the contents of a non-empty --out.")
@reports_errors
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
