"""kernel: the templated-kernel workbench (list, show, check, compile, bench)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from halo_mlir.cli.common import Group, reports_errors
from halo_mlir.errors import HaloError


@click.group("kernel", cls=Group, short_help="The templated-kernel workbench.")
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
@reports_errors
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
@reports_errors
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
@reports_errors
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
@reports_errors
def kernel_bench(name, params, sizes, template_dir, device, repetitions):
    """Time the kernel with iree-benchmark-module at realistic sizes (`kernel list`)."""
    from halo_mlir.kernels.workbench import bench

    inst = _instance(name, params, sizes, template_dir, bench=True)
    r = bench(inst, device, repetitions)
    click.echo(f"{_describe(inst)} on {device}: {r.mean_ms:.3f} ms mean of {repetitions}; "
               f"inputs {r.input_bytes / 1e6:.1f} MB")
