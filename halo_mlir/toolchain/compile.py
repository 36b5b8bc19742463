"""iree-compile for each target: the flags live in one table."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

from halo_mlir.errors import HaloError, lookup

TARGET_FLAGS: dict[str, list[str]] = {
    # MI300X. The chip flag's name depends on the IREE release (compat.py): {rocm_target}.
    # --iree-opt-generalize-matmul keeps batch-1 contractions generic: otherwise IREE makes
    # them named matvecs, and their f16 rounding and residual adds become kernels of their
    # own (8B TP1 decode bs 1: 18 -> 13 kernels a layer; TP8: 20 -> 15 per device).
    "gfx942": ["--iree-hal-target-device=hip", "{rocm_target}=gfx942",
               "--iree-opt-generalize-matmul"],
    # This machine's CPU; numerics tests run here.
    "cpu": ["--iree-hal-target-device=local", "--iree-hal-local-target-device-backends=llvm-cpu",
            "--iree-llvmcpu-target-cpu=host"],
    # Portable CPU artifacts.
    "cpu-generic": ["--iree-hal-target-device=local",
                    "--iree-hal-local-target-device-backends=llvm-cpu",
                    "--iree-llvmcpu-target-cpu=generic"],
    # NVIDIA (the lent GPU machines): same IR, CUDA backend.
    "cuda": ["--iree-hal-target-device=cuda", "--iree-opt-generalize-matmul"],
}


def target_flags(target: str, iree=None) -> list[str]:
    """Flags for `target` under the IREE release `iree` (a compat row; default: the
    installed one)."""
    from halo_mlir.toolchain import compat

    flags = lookup(TARGET_FLAGS, target, "target")
    iree = iree or compat.current()
    return [f.format(rocm_target=iree.rocm_target_flag) for f in flags] + \
        list(iree.extra_flags.get(target, ()))


def iree_compile_binary() -> str:
    from iree.compiler.tools import binaries

    return binaries.find_tool("iree-compile")


def device_flags(target: str, tp: int) -> list[str]:
    """Flags for `tp` devices of `target`: the device flag repeated as DEVICE[i]."""
    flags = target_flags(target)
    if tp == 1:
        return flags
    device = next(f for f in flags if f.startswith("--iree-hal-target-device="))
    name = device.split("=", 1)[1]
    rest = [f for f in flags if f is not device]
    return [f"--iree-hal-target-device={name}[{i}]" for i in range(tp)] + rest


def _check_attention(src: Path, target: str) -> None:
    """A fused attention op that the installed release crashes on for `target` (compat.py):
    say so instead of iree-compile's crash dump."""
    from halo_mlir.toolchain import compat

    iree = compat.current()
    if iree.attention_for(target) == "fused" or src.suffix == ".mlirbc":
        return
    with open(src, errors="replace") as f:
        if any("iree_linalg_ext.attention" in line for line in f):
            raise HaloError(f"{src}: IREE {iree.release} cannot compile the fused attention op "
                            f"for {target}; emit with --attention decomposed")


# IREE 3.13 llvm-cpu fails on the fp8 decode attention op (f8E4M3FNUZ q/k/v) at batch 1
# with fewer query heads per kv head than this ("'vector.mask' op expects a
# 'vector<2x16x16xi1>' mask"); batch 2, or 3 heads per kv head, compile (NOTES.md).
CPU_FP8_DECODE_MIN_GROUP = 3

_ATTENTION_TYPES = re.compile(r"^\s*\}\) : \(tensor<1x\d+x(\d+)x1x\d+xf8E4M3FNUZ>")


def _check_cpu_fp8_attention(src: Path, target: str) -> None:
    """The fp8 decode attention op at batch 1 with 1-2 query heads per kv head, which
    llvm-cpu fails on with a page of IR (CPU_FP8_DECODE_MIN_GROUP): say so and name the
    fixes instead."""
    if not target.startswith("cpu") or src.suffix == ".mlirbc":
        return
    in_attention = False
    with open(src, errors="replace") as f:
        for line in f:
            if '"iree_linalg_ext.attention"(' in line:
                in_attention = True
            elif in_attention and line.lstrip().startswith("}) : ("):
                in_attention = False
                m = _ATTENTION_TYPES.match(line)
                if m and int(m.group(1)) < CPU_FP8_DECODE_MIN_GROUP:
                    raise HaloError(
                        f"{src}: IREE's CPU codegen fails on the fp8 decode attention at batch "
                        f"1 with {m.group(1)} query head(s) per kv head; emit with --attention "
                        "decomposed (or auto), --kv-cache-dtype f16, or decode batch sizes "
                        "above 1")


# Targets with f8E4M3FNUZ arithmetic: MI300 (gfx942) natively; the CPU emulates it. NVIDIA
# GPUs (cuda) have the OCP e4m3fn format, not fnuz.
FP8_TARGETS = ("gfx942", "cpu", "cpu-generic")


def _check_fp8(src: Path, target: str, extra_flags: list[str]) -> None:
    """An fp8 module for a target without f8E4M3FNUZ: say so before iree-compile fails."""
    chips = [f.split("=", 1)[1] for f in extra_flags if "-target=gfx" in f]
    unsupported = target not in FP8_TARGETS or any(c != "gfx942" for c in chips)
    if not unsupported or src.suffix == ".mlirbc":
        return
    with open(src, errors="replace") as f:
        if any("f8E4M3FNUZ" in line for line in f):
            where = chips[0] if chips else target
            raise HaloError(f"{src} is an fp8 (f8E4M3FNUZ) model and {where} has no fnuz FP8; "
                            f"compile it for one of {', '.join(FP8_TARGETS)}, or emit with "
                            "--dtype f16")


# gfx942: IREE 3.13's reduction VectorDistribute pipeline fails ("failed to distribute") on
# the MoE decode contraction that reads each token's expert rows inside its body
# (ops/moe.py expert_linear); without that pipeline the module compiles. Added only for
# modules with stacked expert weights, so other models' flags are unchanged.
MOE_FLAGS = {"gfx942": ["--iree-codegen-llvmgpu-use-reduction-vector-distribution=false"]}


def _moe_flags(src: Path, target: str) -> list[str]:
    """MOE_FLAGS[target] when `src` (text or bytecode) holds stacked expert weights or a
    kept-quantized expert kernel (`halo_*_expert_matmul_*`, which reads its rows the same way)."""
    flags = MOE_FLAGS.get(target)
    if not flags:
        return []
    with open(src, "rb") as f:
        return list(flags) if any(b"_exps.weight" in line or b"_expert_matmul" in line
                                  for line in f) else []


# iree-compile errors with a known cause in our modules: error text -> what to do instead.
KNOWN_FAILURES = {
    # iree-stream-elide-timepoints: its whole-program analysis stops after 32 fixpoint
    # iterations. A mixture-of-experts layer loop with the grouped prefill (per-expert
    # chains of dispatches on every device) at 4 or more devices does not settle in time.
    "failed to solve for timepoint coverage": (
        "IREE's timepoint analysis did not converge; with a mixture-of-experts "
        "--layer-loop module at --tp 4 or more, emit it with --moe-prefill gather"),
}


# A folder of compiled modules keyed by their content: the same source, flags and IREE
# release give the same output, copied instead of compiled again (the test suite sets it
# to a folder of its session; a compile writing side files, `--...dump...`, is not cached).
CACHE_ENV = "HALO_COMPILE_CACHE"


def _cache_entry(src: Path, cmd: list[str], out: Path) -> Path | None:
    import hashlib

    from halo_mlir.toolchain import compat

    root = os.environ.get(CACHE_ENV)
    if not root or any("dump" in flag for flag in cmd):
        return None
    h = hashlib.sha256("\0".join([compat.installed_version(), *cmd[2:]]).encode())
    with open(src, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return Path(root) / f"{h.hexdigest()[:32]}{out.suffix}"


def _failure(src: Path, out: Path, target: str, stderr: str) -> HaloError:
    """One line for a failed iree-compile: its first error, the known fix if any, and the
    file holding its whole output (often pages of IR)."""
    log = out.with_name(f"{out.name}.iree-compile.log")
    try:
        log.write_text(stderr)
        where = f"; its full output is in {log}"
    except OSError:
        where = ""
    first = next((line.strip() for line in stderr.splitlines() if "error:" in line), "")
    first = first[first.find("error:"):] if first else "no error message"
    fix = next((f"; {fix}" for text, fix in KNOWN_FAILURES.items() if text in stderr), "")
    return HaloError(f"iree-compile failed on {src} for {target}: {first[:300]}{fix}{where}")


def compile_file(src: str | Path, out: str | Path, *, target: str,
                 extra_flags: list[str] | None = None, tp: int = 1, echo=print) -> float:
    """Compile `src` to `out` (written atomically). Returns the wall time in seconds."""
    src, out = Path(src), Path(out)
    if not src.exists():
        raise HaloError(f"{src}: no such file")
    if src.stat().st_size == 0:
        raise HaloError(f"{src} is empty; expected MLIR (write it with `halo-mlir emit`)")
    _check_attention(src, target)
    _check_fp8(src, target, extra_flags or [])
    _check_cpu_fp8_attention(src, target)
    moe = [f for f in _moe_flags(src, target) if f not in (extra_flags or [])]
    cmd = [iree_compile_binary(), str(src), *device_flags(target, tp), *moe,
           *(extra_flags or [])]
    tmp = out.with_name(f".{out.name}.partial")
    echo(f"compiling {src} for {target} ...")
    if moe:
        echo(f"note: mixture-of-experts module: adding {' '.join(moe)} (the experts' decode "
             "contraction does not compile in that pipeline)")
    start = time.perf_counter()
    cached = _cache_entry(src, cmd, out)
    try:
        if cached is not None and cached.exists():
            shutil.copyfile(cached, tmp)
        else:
            proc = subprocess.run([*cmd, "-o", str(tmp)], stderr=subprocess.PIPE, text=True)
            if proc.returncode != 0:
                raise _failure(src, out, target, proc.stderr)
            if cached is not None:
                cached.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(tmp, cached.with_name(f".{cached.name}.partial"))
                os.replace(cached.with_name(f".{cached.name}.partial"), cached)
        os.replace(tmp, out)
    except OSError as e:
        raise HaloError(f"{out}: cannot write ({e.strerror})") from None
    finally:
        if tmp.exists():
            tmp.unlink()
    elapsed = time.perf_counter() - start
    echo(f"wrote {out} in {elapsed:.1f} s")
    return elapsed
