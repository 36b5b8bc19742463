"""plan and cost: what a model needs per device, and what its compiled step costs."""

from __future__ import annotations

import json

import click

from halo_mlir.cli.common import MOE_PARALLEL_HELP, moe_parallel_option, reports_errors, tp_option


@click.command("plan", short_help="Memory and latency estimate, no compile.")
@click.option("--model", help="Preset: 8b, 70b, 405b, toy, mixtral-8x7b, mixtral-8x22b or "
                                "grok-1 (or pass --hf-config).")
@click.option("--hf-config", type=click.Path(), help="An HF Llama-family config.json.")
@tp_option("Tensor-parallel devices the weights and KV cache are split over.")
@moe_parallel_option(MOE_PARALLEL_HELP)
@click.option("--dtype", default="f16", show_default=True,
              type=click.Choice(["f16", "bf16", "f32", "fp8"]),
              help="Weight dtype (fp8: linear weights in 1 byte, the rest f16).")
@click.option("--max-seq-len", type=int, help="Tokens per sequence (default: the model's).")
@click.option("--batch", default=1, show_default=True, type=int, help="Concurrent sequences.")
@click.option("--gpu", default="mi300x", show_default=True, help="mi300x (SPX) or mi300x-cpx.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--require-fit", is_flag=True, help="Exit 1 with the shortfall when it does not fit.")
@reports_errors
def plan_cmd(model, hf_config, tp, moe_parallel, dtype, max_seq_len, batch, gpu, as_json,
             require_fit):
    """Per-device memory and a roofline latency estimate, before compiling anything."""
    from halo_mlir.analysis import capacity
    from halo_mlir.params.model_source import load_model

    cfg = load_model(model=model, hf_config=hf_config, sources=("--model", "--hf-config")).cfg
    p = capacity.plan(cfg, tp=tp, dtype=dtype, max_seq_len=max_seq_len, batch=batch, gpu=gpu,
                      moe_parallel=moe_parallel)
    click.echo(json.dumps(p.to_json(), indent=2) if as_json else capacity.format_table(p))
    if require_fit:
        capacity.require_fit(p)


@click.command("cost", short_help="Counts and step time of a compiled module.")
@click.argument("module", type=click.Path())
@click.option("--target", default="gfx942", show_default=True,
              help="gfx942 (MI300X), cpu, cpu-generic or cuda.")
@tp_option("Devices the module was sharded for (default: its own).", default=None)
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
@reports_errors
def cost_cmd(module, target, tp, gpu, context, block_seq_stride, pages, minus, extra, as_json):
    """Counts and an estimated step time, read from the compiled (stream-level) program."""
    from halo_mlir.analysis import cost, cost_report

    def run(path):
        return cost.cost_file(path, target=target, tp=tp, gpu=gpu, context=context,
                              stride=block_seq_stride, pages=pages, extra_flags=list(extra),
                              echo=lambda m: click.echo(m, err=True))

    report = run(module)
    if minus:
        report = cost.per_layer_by_difference(report, run(minus))
    click.echo(json.dumps(report.to_json(), indent=2) if as_json else cost_report.format_report(report))
