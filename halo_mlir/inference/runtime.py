"""Load a compiled module with its parameters and call prefill/decode (iree.runtime).

Used by the tests and by tools; the cache stays on the device between calls and is
updated in place by the module (docs/ABI.md).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

import numpy as np

from halo_mlir.errors import HaloError


_RANK = re.compile(r"\.rank(\d+)\.irpa$")


def _check_ranks(params, n_devices: int) -> None:
    """Rank files (NAME.rank{i}.irpa) must be exactly ranks 0..n_devices-1 of one import."""
    ranks = sorted(int(m.group(1)) for p in params if (m := _RANK.search(str(p))))
    if ranks and ranks != list(range(n_devices)):
        raise HaloError(f"rank files {ranks} do not match {n_devices} devices; pass "
                        f"NAME.rank0.irpa .. NAME.rank{n_devices - 1}.irpa from one "
                        f"`import-params --tp {n_devices}`")
    stems = {_RANK.sub("", str(p)) for p in params if _RANK.search(str(p))}
    if len(stems) > 1:
        raise HaloError(f"rank files come from different imports: {sorted(stems)}")


def _fp8_scales_mismatch(key: str, keys: list[str]) -> str | None:
    """The module reads per-channel weight scales (`KEY:d_rows`) and the files hold
    per-tensor ones (`KEY:d`), or the other way round: what to run instead."""
    base = re.sub(r"\.shard\.\d+$", "", key)
    for field, other, module, files in ((":d_rows", ":d", "per-channel", "per-tensor"),
                                        (":d", ":d_rows", "per-tensor", "per-channel")):
        if not base.endswith(field):
            continue
        twin = base[:-len(field)] + other
        if any(k == twin or k.startswith(twin + ".shard.") for k in keys):
            return (f"the module reads {module} fp8 weight scales ({base}: emitted with "
                    f"--fp8-scales {module}) but the files hold {files} ones ({twin}): emit "
                    f"with --fp8-scales {files}, or import with --fp8-scales {module}")
    return None


class Program:
    """A vmfb + IRPA files on `n_devices` local devices of `driver`."""

    def __init__(self, vmfb: str | Path, params: Sequence[str | Path], *, n_devices: int = 1,
                 driver: str = "local-task"):
        import iree.runtime as rt

        self._rt = rt
        from halo_mlir.support.io import check_parameter_file, check_vmfb

        check_vmfb(vmfb)
        for p in params:
            check_parameter_file(p)
        _check_ranks(params, n_devices)
        self.instance = rt.VmInstance()
        self.driver = rt.get_driver(driver)
        self.devices = [self.driver.create_default_device() for _ in range(n_devices)]
        self.hal = rt.create_hal_module(self.instance, devices=self.devices)
        self.index = rt.ParameterIndex()
        for p in params:
            try:
                self.index.load(str(p))
            except (RuntimeError, ValueError, NotImplementedError) as e:
                raise HaloError(f"{p}: not a readable parameter file ("
                                f"{' '.join(str(e).split())[:200]}); write it again with "
                                "`halo-mlir import-params`") from None
        self.io = rt.create_io_parameters_module(
            self.instance, self.index.create_provider(scope="model"))
        try:
            self.main = rt.VmModule.mmap(self.instance, str(vmfb))
        except ValueError as e:
            raise HaloError(f"{vmfb}: not a module this IREE runtime loads ("
                            f"{' '.join(str(e).split())[:200]}); compile it again with "
                            "`halo-mlir compile`") from None
        try:
            self.context = rt.VmContext(self.instance, modules=[self.hal, self.io, self.main])
        except (RuntimeError, ValueError) as e:
            msg = str(e)
            key = re.search(r"no parameter found in index with key '([^']+)'", msg)
            if key:
                raise HaloError(self._missing(key.group(1))) from None
            size = re.search(r"parameter `([^`]+)` range out of bounds \(offset=\d+, "
                             r"length=(\d+), size=(\d+)\)", msg)
            if size:
                raise HaloError(f"parameter {size.group(1)} holds {size.group(3)} bytes but the "
                                f"module reads {size.group(2)}: import the parameters with the "
                                "--dtype the module was emitted with") from None
            device = re.search(r"HAL device `(\w+)` not found", msg)
            if device:
                raise HaloError(f"the module was compiled for more devices than the "
                                f"{n_devices} given (it needs {device.group(1)}); pass "
                                "--tp/n_devices equal to the compile's") from None
            raise
        self._invokers: dict[str, object] = {}

    def _missing(self, key: str) -> str:
        """Why a parameter the module reads is not in the files: a layout mismatch
        (`--layer-loop` modules read `blk.NAME.stacked`), else a missing file."""
        stacked_files = any(".stacked" in k for k, _ in self.index.items())
        if ".stacked" in key and not stacked_files:
            return (f"the module reads stacked parameters ({key}: emitted with --layer-loop) "
                    "but the files hold the per-layer layout; import them with "
                    "`halo-mlir import-params --layout stacked`")
        if key.startswith("blk.") and ".stacked" not in key and stacked_files:
            return (f"the module reads per-layer parameters ({key}) but the files hold the "
                    "stacked layout; emit with --layer-loop, or import with --layout per-layer")
        keys = [k for k, _ in self.index.items()]
        for have, want, mode in ((".expert_shard.", ".shard.", "expert"),
                                 (".shard.", ".expert_shard.", "ffn")):
            if want in key and key.replace(want, have) in keys:
                other = "ffn" if mode == "expert" else "expert"
                return (f"the files hold --moe-parallel {mode} shards "
                        f"({key.replace(want, have)}) but the module was emitted with "
                        f"--moe-parallel {other} (it reads {key}): emit with --moe-parallel "
                        f"{mode}, or import with --moe-parallel {other}")
        fp8_files = any(k.endswith(":qs") for k in keys)
        scheme = _fp8_scales_mismatch(key, keys)
        if scheme:
            return scheme
        if key.endswith((":qs", ":d", ":d_rows", ":rscale")) and not fp8_files:
            return (f"the module is an fp8 model and reads {key}, which the files lack: "
                    "import the parameters with `halo-mlir import-params --quantize fp8`")
        if key.endswith(":rscale") or (key.endswith((":d", ":d_rows")) and
                                       f"{key.rsplit(':', 1)[0]}:qs" in keys):
            return (f"the fp8 parameters lack the scale {key}; re-import with `halo-mlir "
                    "import-params --quantize fp8` (it computes every scale)")
        if fp8_files and f"{key}:qs" in keys:
            return (f"the files hold fp8 weights ({key}:qs) but the module reads {key}: emit "
                    "with --dtype fp8, or import without --quantize")
        return (f"parameter {key} is in none of the given files; pass every NAME.rank{{i}}.irpa "
                "of the import that matches this module")

    @property
    def device(self):
        return self.devices[0]

    def function(self, name: str):
        inv = self._invokers.get(name)
        if inv is None:
            fn = self.main.lookup_function(name)
            if fn is None:
                raise HaloError(f"the module has no function {name}; it exports "
                                f"{', '.join(self.main.function_names)}")
            inv = self._invokers[name] = self._rt.FunctionInvoker(self.context, self.device, fn)
        return inv

    def device_array(self, array: np.ndarray, device: int = 0):
        return self._rt.asdevicearray(self.devices[device], array)

    def prefill(self, tokens, seq_lens, block_ids, caches) -> np.ndarray:
        bs = tokens.shape[0]
        out = self.function(f"prefill_bs{bs}")(tokens, seq_lens, block_ids, *caches)
        return np.array(out.to_host())  # a copy: it must outlive the device

    def decode(self, tokens, seq_lens, start_positions, block_ids, caches) -> np.ndarray:
        bs = tokens.shape[0]
        out = self.function(f"decode_bs{bs}")(tokens, seq_lens, start_positions, block_ids,
                                              *caches)
        return np.array(out.to_host())  # a copy: it must outlive the device

    def close(self):
        """Release runtime objects in dependency order (avoids crashes at exit)."""
        for attr in ("_invokers", "context", "main", "io", "index", "hal", "devices", "driver",
                     "instance"):
            if hasattr(self, attr):
                delattr(self, attr)

    def __enter__(self):
        return self

    def __exit__(self, *_):
        self.close()
