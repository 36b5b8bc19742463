"""plan, cost and profile: what a model needs per device, what its compiled step should
cost, and what it measures."""

from __future__ import annotations

import json

import click

from halo_mlir.cli.common import MOE_PARALLEL_HELP, moe_parallel_option, reports_errors, tp_option
from halo_mlir.errors import HaloError


@click.command("plan", short_help="Memory and latency estimate, no compile.")
@click.option("--model", help="Preset: 8b, 70b, 405b, toy, mixtral-8x7b, mixtral-8x22b or "
                                "grok-1 (or pass --hf-config).")
@click.option("--hf-config", type=click.Path(),
              help="An HF Llama-family config.json (a published FP8 checkpoint's: its own "
                   "fp8 linears, the others and the KV cache in 2 bytes).")
@tp_option("Tensor-parallel devices the weights and KV cache are split over.")
@moe_parallel_option(MOE_PARALLEL_HELP)
@click.option("--dtype", type=click.Choice(["f16", "bf16", "f32", "fp8"]),
              help="Weight dtype (fp8: linear weights in 1 byte, the rest f16). [default: "
                   "f16; fp8 for an FP8 checkpoint's --hf-config]")
@click.option("--max-seq-len", type=int, help="Tokens per sequence (default: the model's).")
@click.option("--batch", default=1, show_default=True, type=int, help="Concurrent sequences.")
@click.option("--gpu", default="mi300x", show_default=True, help="mi300x (SPX), mi300x-cpx, h100 or h200.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--require-fit", is_flag=True, help="Exit 1 with the shortfall when it does not fit.")
@reports_errors
def plan_cmd(model, hf_config, tp, moe_parallel, dtype, max_seq_len, batch, gpu, as_json,
             require_fit):
    """Per-device memory and a roofline latency estimate, before compiling anything."""
    from halo_mlir.analysis import capacity
    from halo_mlir.params.model_source import load_model

    cfg = load_model(model=model, hf_config=hf_config, sources=("--model", "--hf-config")).cfg
    checkpoint = {}
    if hf_config and dtype in (None, "fp8"):
        from pathlib import Path

        from halo_mlir.params.fp8_checkpoint import read_scheme

        scheme = read_scheme(json.loads(Path(hf_config).read_text()), cfg)
        if scheme is not None:  # its cache has no fp8 scales: the activation dtype
            dtype = "fp8"
            checkpoint = dict(fp8_keys=scheme.fp8_keys, scheme=scheme.summary(),
                              kv_dtype=capacity.DTYPES["fp8"].activation)
    p = capacity.plan(cfg, tp=tp, dtype=dtype or "f16", max_seq_len=max_seq_len, batch=batch,
                      gpu=gpu, moe_parallel=moe_parallel, **checkpoint)
    click.echo(json.dumps(p.to_json(), indent=2) if as_json else capacity.format_table(p))
    if require_fit:
        capacity.require_fit(p)


@click.command("cost", short_help="Counts and step time of a compiled module.")
@click.argument("module", type=click.Path())
@click.option("--target", default="gfx942", show_default=True,
              help="gfx942 (MI300X), cpu, cpu-generic or cuda.")
@tp_option("Devices the module was sharded for (default: its own).", default=None)
@click.option("--gpu", default="mi300x", show_default=True, help="mi300x (SPX), mi300x-cpx, h100 or h200.")
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


@click.command("profile", short_help="Run and time each dispatch (HAL profiling).")
@click.argument("module", type=click.Path())
@click.option("--config", "config_path", required=True, type=click.Path(),
              help="The module's config.json (emit --output-config).")
@click.option("--params", multiple=True, type=click.Path(),
              help="Its IRPA file(s) (rank files for --tp N modules).")
@click.option("--random-params", is_flag=True,
              help="Profile without weights: splats of the parameter shapes of --source.")
@click.option("--source", type=click.Path(),
              help="The .mlir the module was compiled from: names each dispatch by the op "
                   "that emitted it (blk.3.attn_q) and gives --random-params their shapes.")
@click.option("--device", default="cpu", show_default=True,
              type=click.Choice(["cpu", "hip", "cuda"]), help="Where it runs.")
@click.option("--bs", type=int, help="Batch size (default: the module's first decode one).")
@click.option("--prompt-len", default=32, show_default=True, type=int,
              help="Tokens each row prefills; decode continues from there.")
@click.option("--steps", default=4, show_default=True, type=int,
              help="Decode steps measured (after a warm-up call).")
@click.option("--threads", type=int,
              help="With --device cpu: the runtime's worker threads (default: one per core).")
@click.option("--json", "json_out", type=click.Path(), help="Write the report as JSON here.")
@click.option("--perfetto", type=click.Path(),
              help="Write the decode steps as a Perfetto trace (OUT.pftrace; needs the "
                   "perfetto package: the `profile` extra).")
@reports_errors
def profile_cmd(module, config_path, params, random_params, source, device, bs, prompt_len,
                steps, threads, json_out, perfetto):
    """One prefill and --steps decode steps with IREE's HAL profiling: per step time,
    dispatches and copies per device, time by kind of op, the top dispatches."""
    from pathlib import Path

    from halo_mlir.inference import profile
    from halo_mlir.support.io import atomic_write

    if bool(params) == random_params:
        raise HaloError("pass the module's parameters with --params, or --random-params with "
                        "--source")
    try:
        config = json.loads(Path(config_path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise HaloError(f"{config_path}: cannot read the model config ({e})") from None
    report = profile.profile(module, config=config, params=[Path(p) for p in params],
                             device=device, bs=bs, prompt_len=prompt_len, steps=steps,
                             source=source, random_params=random_params, perfetto=perfetto,
                             threads=threads, echo=lambda m: click.echo(m, err=True))
    if json_out:
        with atomic_write(json_out) as f:
            json.dump(report, f, indent=1)
            f.write("\n")
    click.echo(profile.format_report(report))
