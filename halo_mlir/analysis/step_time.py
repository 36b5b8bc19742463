"""The step-time model shared by `halo-mlir cost` (records read from the compiled program)
and `halo-mlir plan` (records built from the config): one model, two sources of records.

A record says what one device does; the estimate is a pure function of the records and a
GpuSpec (every constant lives in gpus.py):

- a dispatch: max(bytes read + written / HBM bandwidth, FLOPs / peak for its dtype)
  + `kernel_launch_s`;
- a copy between devices: bytes / `link_bytes_per_s` + `copy_fixed_s`; copies from
  different peers use different links, so a device's link time is the busiest link's;
- a copy inside a device (or a fill): bytes / HBM bandwidth + `copy_fixed_s`;
- a dependent cross-device step (a submission waiting on another device's work, on the
  longest such chain): `transfer_latency_s`;
- a host wait (the host blocks on the device before it can submit more): `host_wait_s`.

Devices run in parallel: the step takes the busiest device's dispatch and copy time, plus
the latencies of the dependent steps and host waits, which serialize the devices.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict

from halo_mlir.toolchain.gpus import GpuSpec


@dataclasses.dataclass(frozen=True)
class Dispatch:
    """One kernel launch on `device`, `count` times. Bytes: HBM traffic; dtype: the
    peak-rate column of gpus.py for its FLOPs (contractions only)."""
    name: str
    device: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    flops: int = 0
    dtype: str = "f16"
    kv_bytes_read: int = 0       # of bytes_read: from the KV cache
    weight_bytes_read: int = 0   # of bytes_read: from parameters (globals)
    count: int = 1
    where: str = ""              # the emitting op, from its location: blk.3.attn_q, output


@dataclasses.dataclass(frozen=True)
class Copy:
    """One copy executed on `device`; `peer` is the other device for a cross-device copy
    (None: inside the device, or a fill)."""
    device: int
    bytes: int
    peer: int | None = None
    count: int = 1

    @property
    def cross(self) -> bool:
        return self.peer is not None and self.peer != self.device


@dataclasses.dataclass(frozen=True)
class Estimate:
    """Seconds of one call, and its terms (busiest device for the per-device terms)."""
    seconds: float
    device: int            # the busiest device
    dispatch_s: float      # sum over its dispatches of max(memory, compute)
    launch_s: float        # its launches
    memory_s: float        # of dispatch_s: what bytes alone would take
    compute_s: float       # of dispatch_s: what FLOPs alone would take
    copy_s: float          # its copies (link + in-device + fixed costs)
    step_s: float          # dependent cross-device steps * latency
    host_wait_s: float     # host waits * latency

    @property
    def comm_s(self) -> float:
        """Time spent on communication and synchronisation: copies, steps, host waits."""
        return self.copy_s + self.step_s + self.host_wait_s

    def to_json(self) -> dict:
        return {**dataclasses.asdict(self), "comm_s": self.comm_s}


def peak(gpu: GpuSpec, dtype: str) -> float:
    """The peak matrix rate for `dtype` (f32 for dtypes the spec does not list)."""
    return gpu.peak_flops.get(dtype, gpu.peak_flops["f32"])


def dispatch_seconds(d: Dispatch, gpu: GpuSpec) -> float:
    """One launch of `d`, without its launch cost."""
    return max((d.bytes_read + d.bytes_written) / gpu.hbm_bytes_per_s,
               d.flops / peak(gpu, d.dtype))


def estimate(dispatches, copies, gpu: GpuSpec, *, dependent_steps: float = 0,
             host_waits: float = 0) -> Estimate:
    """The step time of `dispatches` and `copies` (records) on devices of kind `gpu`."""
    per = defaultdict(lambda: {"dispatch": 0.0, "launch": 0.0, "memory": 0.0, "compute": 0.0,
                               "fixed": 0.0, "local": 0.0, "links": defaultdict(float)})
    for d in dispatches:
        t = per[d.device]
        t["dispatch"] += d.count * dispatch_seconds(d, gpu)
        t["memory"] += d.count * (d.bytes_read + d.bytes_written) / gpu.hbm_bytes_per_s
        t["compute"] += d.count * d.flops / peak(gpu, d.dtype)
        t["launch"] += d.count * gpu.kernel_launch_s
    for c in copies:
        t = per[c.device]
        t["fixed"] += c.count * gpu.copy_fixed_s
        if c.cross:
            t["links"][c.peer] += c.count * c.bytes / gpu.link_bytes_per_s
        else:  # read and write in HBM
            t["local"] += c.count * 2 * c.bytes / gpu.hbm_bytes_per_s

    def copy_s(t):
        return t["fixed"] + t["local"] + max(t["links"].values(), default=0.0)

    def busy(t):
        return t["dispatch"] + t["launch"] + copy_s(t)

    device = max(per, key=lambda k: busy(per[k]), default=0)
    t = per[device]
    step_s = dependent_steps * gpu.transfer_latency_s
    wait_s = host_waits * gpu.host_wait_s
    return Estimate(seconds=busy(t) + step_s + wait_s, device=device,
                    dispatch_s=t["dispatch"], launch_s=t["launch"], memory_s=t["memory"],
                    compute_s=t["compute"], copy_s=copy_s(t), step_s=step_s,
                    host_wait_s=wait_s)
