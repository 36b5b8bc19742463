"""The kernel author's workbench (`halo-mlir kernel ...`): one kernel in a module with a
`main` that takes concrete shapes, compiled alone; checked on CPU against its numpy
reference, compiled for gfx942 with a report of what codegen chose, or benchmarked.

`main` takes bf16 / fp8 tensors as their bits (i16 / i8: the runtime has no such numpy
types; `flow.tensor.bitcast` reinterprets them without a dispatch) and scalars (and 0-d tensors) as tensor<1xT>, then casts to the kernel's (possibly dynamic) types.
"""

from __future__ import annotations

import dataclasses
import re
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

from halo_mlir.errors import HaloError
from halo_mlir.kernels import kernel
from halo_mlir.kernels.registry import Arg, Kernel, numpy_dtype, render

_STORAGE = {"bf16": "i16", "f8E4M3FNUZ": "i8"}  # passed as bits


def _ttype(shape, dtype: str) -> str:
    return "tensor<" + "".join(f"{s}x" for s in shape) + dtype + ">"


@dataclasses.dataclass
class Instance:
    """One specialisation at concrete sizes."""
    kernel: Kernel
    values: dict
    sizes: dict
    args: list[Arg]
    results: list[Arg]
    text: str  # the whole module: kernel + main


def instance(name: str, params: dict, sizes: dict | None = None, *, bench: bool = False,
             template_dir: Path | None = None) -> Instance:
    k = kernel(name)
    values = k.validate(dict(params))
    if k.harness is None:
        raise HaloError(f"kernel {name}: no harness to run it")
    chosen = {s: spec[1 if bench else 0] for s, spec in k.harness.sizes.items()}
    for key, v in (sizes or {}).items():
        if key not in chosen:
            raise HaloError(f"kernel {name}: unknown size {key!r}; sizes: "
                            f"{', '.join(k.harness.sizes) or 'none'}")
        if not isinstance(v, int) or v < 0:
            raise HaloError(f"kernel {name}: size {key} must be a non-negative int, got {v!r}")
        chosen[key] = v
    args, results = k.harness.args(values, chosen)
    symbol, text = render(k, values, template_dir)
    return Instance(k, values, chosen, args, results, text + _main(symbol, text, args, results))


def _kernel_signature(symbol: str, text: str):
    from iree.compiler import ir

    with ir.Context():
        try:
            module = ir.Module.parse(text)
        except ir.MLIRError as e:
            numbered = "\n".join(f"{i + 1:4d}  {line}" for i, line in enumerate(text.splitlines()))
            raise HaloError(f"{symbol}: the rendered MLIR does not parse: "
                            f"{' '.join(str(e).split())}\n{numbered}") from None
        for op in module.body.operations:
            if op.attributes["sym_name"].value == symbol:
                ft = ir.FunctionType(ir.TypeAttr(op.attributes["function_type"]).value)
                return [str(t) for t in ft.inputs], [str(t) for t in ft.results]
    raise HaloError(f"{symbol}: the template defines no function @{symbol}")


def _main(symbol: str, text: str, args: list[Arg], results: list[Arg]) -> str:
    """`util.func public @main` over concrete shapes, calling the kernel."""
    ins, outs = _kernel_signature(symbol, text)
    if len(ins) != len(args) or len(outs) != len(results):
        raise HaloError(f"{symbol}: the template's function takes {len(ins)} arguments and "
                        f"returns {len(outs)}; the harness expects {len(args)} and {len(results)}")
    lines, params, call_args = ["  %c0 = arith.constant 0 : index"], [], []
    for i, (a, want) in enumerate(zip(args, ins)):
        io = _STORAGE.get(a.dtype, a.dtype)
        shape = a.shape or (1,)
        params.append(f"%a{i}: {_ttype(shape, io)}")
        v = f"%a{i}"
        if io != a.dtype:
            lines.append(f"  %b{i} = flow.tensor.bitcast {v} : {_ttype(shape, io)} -> "
                         f"{_ttype(shape, a.dtype)}")
            v = f"%b{i}"
        if not a.shape and want.startswith("tensor<"):  # a 0-d tensor
            lines.append(f"  %s{i} = tensor.collapse_shape {v} [] : {_ttype(shape, a.dtype)} "
                         f"into {want}")
            call_args.append(f"%s{i}")
            continue
        if not a.shape:
            lines.append(f"  %s{i} = tensor.extract {v}[%c0] : {_ttype(shape, a.dtype)}")
            call_args.append(f"%s{i}")
            continue
        if _ttype(shape, a.dtype) != want:
            lines.append(f"  %x{i} = tensor.cast {v} : {_ttype(shape, a.dtype)} to {want}")
            v = f"%x{i}"
        call_args.append(v)
    rs = [f"%r#{i}" for i in range(len(outs))] if len(outs) > 1 else ["%r"]
    lines.append(f"  %r{':' + str(len(outs)) if len(outs) > 1 else ''} = util.call @{symbol}("
                 f"{', '.join(call_args)}) : ({', '.join(ins)}) -> ({', '.join(outs)})")
    ret, ret_types = [], []
    for i, (r, have, res) in enumerate(zip(rs, outs, results)):
        io = _STORAGE.get(res.dtype, res.dtype)
        static = _ttype(res.shape, res.dtype)
        lines.append(f"  %y{i} = tensor.cast {r} : {have} to {static}")
        v = f"%y{i}"
        if io != res.dtype:
            lines.append(f"  %z{i} = flow.tensor.bitcast {v} : {static} -> {_ttype(res.shape, io)}")
            v = f"%z{i}"
        ret.append(v)
        ret_types.append(_ttype(res.shape, io))
    lines.append(f"  util.return {', '.join(ret)} : {', '.join(ret_types)}")
    return (f"\nutil.func public @main({', '.join(params)}) -> ({', '.join(ret_types)}) {{\n"
            + "\n".join(lines) + "\n}\n")


def _io(x: np.ndarray, dtype: str) -> np.ndarray:
    """An input array in main's argument form (bits for bf16 / fp8, scalars as [1])."""
    x = np.ascontiguousarray(x)
    storage = _STORAGE.get(dtype)
    return x.view(numpy_dtype(storage)) if storage else x


def compile_text(text: str, out: Path, target: str, extra: list[str] | None = None) -> float:
    from halo_mlir.toolchain.compile import compile_file

    src = out.with_suffix(".mlir")
    src.write_text(text)
    return compile_file(src, out, target=target, extra_flags=extra or [], echo=lambda m: None)


@dataclasses.dataclass
class CheckResult:
    max_error: float
    tolerance: float
    errors: list[tuple[str, float]]  # per result
    compile_s: float
    total_s: float

    @property
    def ok(self) -> bool:
        return self.max_error <= self.tolerance


def check(inst: Instance, *, seed: int = 0, workdir: Path | None = None) -> CheckResult:
    """Compile for CPU, run on random inputs, compare with the numpy reference."""
    import iree.runtime as rt

    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(workdir or tmp)
        vmfb = d / "kernel.vmfb"
        compile_s = compile_text(inst.text, vmfb, "cpu")
        rng = np.random.default_rng(seed)
        inputs = inst.kernel.harness.inputs(inst.values, inst.sizes, rng)
        config = rt.Config("local-task")
        ctx = rt.SystemContext(config=config)
        ctx.add_vm_module(rt.VmModule.mmap(config.vm_instance, str(vmfb)))
        got = ctx.modules.module.main(*[_io(x, a.dtype) for x, a in zip(inputs, inst.args)])
        got = got if isinstance(got, (list, tuple)) else [got]
        got = [np.array(g.to_host()).view(numpy_dtype(r.dtype))  # a copy: outlives ctx
               for g, r in zip(got, inst.results)]
        del ctx, config
    want = inst.kernel.harness.reference(inst.values, inputs)
    errors = [(r.name, _max_error(g, w)) for r, g, w in zip(inst.results, got, want)]
    return CheckResult(max(e for _, e in errors), inst.kernel.harness.tolerance(inst.values),
                       errors, compile_s, time.perf_counter() - start)


def _max_error(got: np.ndarray, want: np.ndarray) -> float:
    """max |got - want| in f32; a NaN or inf anywhere counts as infinite."""
    err = np.abs(got.astype(np.float32) - np.asarray(want, np.float32))
    return float(err.max()) if np.isfinite(err).all() else float("inf")


@dataclasses.dataclass
class CompileReport:
    target: str
    seconds: float
    dispatches: int
    mfma: dict[str, int]  # instruction -> count in the ISA
    pipelines: list[str]  # codegen pipeline per dispatch


def compile_report(inst: Instance, target: str = "gfx942",
                   dump: Path | None = None) -> CompileReport:
    """Compile for `target`, dumping the executables; count MFMA instructions in the ISA
    and read each dispatch's codegen pipeline."""
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(dump) if dump else Path(tmp)
        d.mkdir(parents=True, exist_ok=True)
        seconds = compile_text(inst.text, d / "kernel.vmfb", target,
                               [f"--iree-hal-dump-executable-files-to={d}"])
        isa = "".join(p.read_text(errors="replace") for p in d.glob("*.rocmasm"))
        mfma: dict[str, int] = {}
        for m in re.findall(r"\b(v_mfma_\w+)", isa):
            mfma[m] = mfma.get(m, 0) + 1
        configured = [p.read_text(errors="replace") for p in sorted(d.glob("*configured*.mlir"))]
        pipelines = []
        for text in configured:
            pipelines += re.findall(r"translation_info<pipeline\s*=\s*#?[\w.]*<?(\w+)>?", text)
        dispatches = len(configured) or len(list(d.glob("*.rocmasm")))
    return CompileReport(target, seconds, dispatches, mfma, pipelines)


BENCH_DRIVERS = {"cpu": ("cpu", "local-task"), "cuda": ("cuda", "cuda"), "hip": ("gfx942", "hip")}


@dataclasses.dataclass
class BenchReport:
    device: str
    input_bytes: int
    mean_ms: float
    raw: str


def bench(inst: Instance, device: str = "cpu", repetitions: int = 10) -> BenchReport:
    """Time `main` with iree-benchmark-module on inputs of the instance's sizes."""
    from iree.runtime import benchmark_exe

    if device not in BENCH_DRIVERS:
        raise HaloError(f"unknown --device {device!r}: choose one of {', '.join(BENCH_DRIVERS)}")
    target, driver = BENCH_DRIVERS[device]
    rng = np.random.default_rng(0)
    inputs = inst.kernel.harness.inputs(inst.values, inst.sizes, rng)
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        compile_text(inst.text, d / "kernel.vmfb", target)
        flags = []
        for i, (x, a) in enumerate(zip(inputs, inst.args)):
            np.save(d / f"in{i}.npy", _io(x, a.dtype))
            flags.append(f"--input=@{d / f'in{i}.npy'}")
        cmd = [benchmark_exe(), f"--module={d / 'kernel.vmfb'}", f"--device={driver}",
               "--function=main", f"--benchmark_repetitions={repetitions}",
               "--benchmark_report_aggregates_only=true", *flags]
        proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise HaloError(f"iree-benchmark-module failed: {proc.stderr.strip()[-400:]}")
    mean = re.search(r"_mean\s+([\d.]+)\s*(ms|us|ns)", proc.stdout)
    if not mean:
        raise HaloError(f"no mean time in iree-benchmark-module's output:\n{proc.stdout[-400:]}")
    ms = float(mean.group(1)) * {"ms": 1, "us": 1e-3, "ns": 1e-6}[mean.group(2)]
    return BenchReport(device, sum(x.nbytes for x in inputs), ms, proc.stdout)
