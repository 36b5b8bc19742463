"""`halo-mlir`: thin click commands over the library, one module per command group; each
parses its options, calls the library and reports (errors as one line, exit 1)."""

from __future__ import annotations

import click

from halo_mlir.cli import build, estimate, kernel, params, run, serve
from halo_mlir.cli.common import Group
from halo_mlir.support.version import __version__
from halo_mlir.toolchain.compat import installed_version


@click.group(cls=Group)
@click.version_option(__version__, prog_name="halo-mlir",
                      message=f"%(prog)s %(version)s (IREE {installed_version()})")
def main():
    """Emit Llama 3.1, Mixtral and Grok-1 inference programs directly as IREE MLIR.

    \b
    The flow:
      import-params  weights (safetensors or GGUF) -> .irpa
      emit           model config -> .mlir (prefill/decode over a paged KV cache)
      compile        .mlir -> .vmfb for a target (cpu, gfx942, cuda)
      run            the .vmfb from Python (halo_mlir.inference.runtime.Program) or iree-run-module
      generate       GGUF -> text in one command (imports, emits, compiles, caches)
      export-shortfin  a directory shortfin serves (all of the above in one step)
    plan and cost estimate memory and time; opt runs the passes alone; kernel is the
    workbench of the templated kernels. `halo-mlir COMMAND --help` for each.
    """


for command in (build.emit, build.compile_cmd, build.opt, params.import_params,
                estimate.plan_cmd, estimate.cost_cmd, estimate.profile_cmd, serve.export_shortfin_cmd, run.generate,
                run.perplexity, kernel.kernel_group):
    main.add_command(command)
