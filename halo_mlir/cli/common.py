"""What the commands share: one-line errors, the options several commands take."""

from __future__ import annotations

import functools
import sys

import click

from halo_mlir.errors import HaloError


def reports_errors(fn):
    """HaloError (and a missing/unwritable file) -> one line on stderr, exit 1."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except HaloError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(1)

    return wrapper


def int_list(ctx, param, value: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(x) for x in value.split(",") if x.strip())
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers like 1,4, got {value!r}")
    if not sizes or min(sizes) <= 0:
        raise click.BadParameter(f"expected positive batch sizes, got {value!r}")
    return sizes


def tp_callback(ctx, param, value: int | None) -> int | None:
    """--tp N: a device count, so at least 1 (None where the option has no default)."""
    if value is not None and value < 1:
        raise HaloError(f"--tp must be at least 1 (the number of devices), got {value}")
    return value


def moe_parallel_option(help: str):
    return click.option("--moe-parallel", default="ffn", show_default=True,
                        type=click.Choice(["ffn", "expert"]), help=help)


MOE_PARALLEL_HELP = ("Mixture-of-experts models with --tp: ffn splits every expert's ffn "
                      "rows over the devices; expert puts whole experts on each device "
                      "(experts/N each; the experts must divide by --tp).")


def tp_option(help: str, default: int | None = 1):
    return click.option("--tp", default=default, show_default=default is not None, type=int,
                        callback=tp_callback, help=help)


def allreduce_mode(ctx, param, value: str) -> str:
    from halo_mlir.sharding_passes.collectives import check_mode

    try:
        return check_mode(value)
    except HaloError as e:
        raise click.BadParameter(str(e)) from None


def allreduce_options(fn):
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
        "--allreduce", default="auto", show_default=True, callback=allreduce_mode,
        metavar="[auto|one-shot|reduce-scatter|star]",
        help="With --tp: how partial sums are all-reduced. one-shot: every device receives "
             "the N-1 others and adds them (1 step, N-1 copies in per device; small "
             "tensors); reduce-scatter: reduce-scatter + all-gather of contiguous 1/N "
             "chunks (2 steps, 2(N-1)/N of the tensor in per device; large tensors); star: "
             "through device 0; auto: one-shot up to the GPU's one-shot size (MI300X: 512 "
             "KiB, so decode), else reduce-scatter (prefill: its length is dynamic).")(fn)


class Group(click.Group):
    """Reports a HaloError raised while parsing a command's options (a callback such as
    --tp's) as one line and exit 1, like one raised by the command itself."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except HaloError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(1)



def print_report(report, cfg=None, opts=None) -> None:
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
