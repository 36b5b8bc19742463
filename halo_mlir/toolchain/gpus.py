"""GPU specifications for the capacity planner (data, with the sources of each figure)."""

from __future__ import annotations

import dataclasses

from halo_mlir.errors import lookup

@dataclasses.dataclass(frozen=True)
class GpuSpec:
    """One device as the planner sees it. Rates are peak (datasheet) figures."""
    name: str
    memory_bytes: float          # usable HBM, bytes
    hbm_bytes_per_s: float       # HBM bandwidth, bytes/s
    peak_flops: dict             # compute dtype -> dense matrix FLOP/s
    links: int                   # Infinity Fabric links to peer GPUs
    link_bytes_per_s: float      # per link, per direction, bytes/s
    transfer_latency_s: float    # latency of one dependent cross-device step, s
    description: str
    # Fixed costs of the step-time model (step_time.py); assumptions, see below.
    kernel_launch_s: float = 2e-6   # one dispatch, on top of its bytes/FLOPs time
    copy_fixed_s: float = 2e-6      # one copy (a DMA or blit), on top of its bytes
    host_wait_s: float = 20e-6      # the host blocking on the device, then submitting again
    # Largest all-reduce (bytes per device) that `--allreduce auto` does one-shot; larger
    # ones reduce-scatter + all-gather. An assumption (see the MI300X sources below).
    allreduce_oneshot_max_bytes: int = 512 * 1024


# AMD Instinct MI300X (SPX, NPS1: one device per package). Sources:
# - 192 GB HBM3, 5.3 TB/s, FP16/BF16 dense matrix 1307.4 TFLOPS, FP8 2614.9 TFLOPS, 750 W:
#   AMD's MI300X datasheet figures as quoted in github.com/alpharomercoma/MI300X-vs-H200
#   (METHODOLOGY.md, REPORT.md); 192 GB / 5.3 TB/s also in docs.vultr.com/inference-cookbook/
#   rocm/getting-started/hardware-requirements and in MLCommons inference v4.1 system
#   descriptions ("AMD Instinct MI300X-NPS1-SPX-192GB-750W", HBM3). FP32 matrix 163.4 TFLOPS
#   is the same datasheet's figure.
# - Infinity Fabric: 7 links per GPU, x16 at 32 Gb/s per lane = 128 GB/s bidirectional, i.e.
#   64 GB/s per direction per link, 448 GB/s aggregate per direction (wheelersnetwork.com
#   2024/01, "AMD Looks to Infinity for AI Interconnects").
# - Transfer latency 10 us: an assumption (one cross-device copy with its launch and
#   synchronisation in HIP/IREE; small-message RCCL all-reduce steps on MI300X are of this
#   order), not a datasheet figure. The cost model charges it once per dependent
#   cross-device step (a submission that waits on another device's work).
# - Kernel launch 2 us, copy fixed cost 2 us, host wait 20 us (GpuSpec defaults): assumptions,
#   not measured here. Launch: the gap between dependent dispatches replayed from one command
#   buffer on one queue (a few us on AMD GPUs is the usual order). Copy: a copy is one more
#   command on the queue, like a dispatch. Host wait: the host waits on a fence, wakes up and
#   submits the next command buffer (one interrupt + submission round trip).
# - One-shot all-reduce threshold 512 KiB: an assumption, to be measured on MI300X. With
#   N devices on a fully connected node, one-shot takes S/link + 1 latency (each device
#   receives the N-1 partials over its N-1 links at once), reduce-scatter + all-gather
#   2S/(N*link) + 2 latencies; one-shot wins below S = latency*link/(1 - 2/N): 853 KB at
#   N=8 with the figures above (1.3 MB at N=4, always at N=2). vLLM's custom all-reduce
#   (csrc/custom_all_reduce.cuh) switches from its one-shot to its two-stage kernel at
#   256 KiB on 8 fully connected GPUs (512 KiB on up to 4), but its steps are in-kernel
#   barriers of a few us where ours are whole copies and submissions (the assumed 10 us);
#   we take 512 KiB, between the two.
_MI300X_PEAK = {"f16": 1307.4e12, "bf16": 1307.4e12, "fp8": 2614.9e12, "f32": 163.4e12}
_MI300X = GpuSpec(
    name="mi300x", memory_bytes=192e9, hbm_bytes_per_s=5.3e12, peak_flops=_MI300X_PEAK,
    links=7, link_bytes_per_s=64e9, transfer_latency_s=10e-6,
    description="AMD Instinct MI300X, SPX: 192 GB HBM3, 5.3 TB/s, 1307.4 TFLOPS f16")

# CPX: each of the 8 XCDs (38 CUs) is its own device (instinct.docs.amd.com, "AMD Instinct
# MI300X GPU Partitioning Overview"); with NPS4 memory (4 partitions of 48 GB) two CPX
# devices share a quadrant, so each gets 24 GB. We model a partition as 1/8 of the package:
# memory, HBM bandwidth and compute. Peer traffic keeps the xGMI link figures, an upper bound
# on its time (partitions on one package talk over the faster on-package fabric).
_CPX = 8
GPUS: dict[str, GpuSpec] = {
    "mi300x": _MI300X,
    "mi300x-cpx": dataclasses.replace(
        _MI300X, name="mi300x-cpx", memory_bytes=_MI300X.memory_bytes / _CPX,
        hbm_bytes_per_s=_MI300X.hbm_bytes_per_s / _CPX,
        peak_flops={k: v / _CPX for k, v in _MI300X_PEAK.items()},
        description="AMD Instinct MI300X, one CPX partition (1/8): 24 GB, 662.5 GB/s"),
}


# NVIDIA H100 SXM5 and H200 (the lent device machines, for `tools/bench/device.py` to set
# its measurements beside an estimate): NVIDIA's datasheets: H100 80 GB HBM3 at 3.35 TB/s,
# H200 141 GB HBM3e at 4.8 TB/s; both dense BF16/FP16 989.4 TFLOPS, FP8 1978.9 TFLOPS, TF32
# 494.7 TFLOPS (the f32 matmul column: IREE may use TF32 tensor cores or not); NVLink 4:
# 18 links, 900 GB/s in all both ways, so 25 GB/s per direction per link. Latencies and
# fixed costs: the same assumptions as MI300X's until a device check measures them. fp8
# is e4m3fn there (the model's f8E4M3FNUZ does not compile for cuda).
_H100_PEAK = {"f16": 989.4e12, "bf16": 989.4e12, "fp8": 1978.9e12, "f32": 494.7e12}
GPUS["h100"] = GpuSpec(
    name="h100", memory_bytes=80e9, hbm_bytes_per_s=3.35e12, peak_flops=_H100_PEAK, links=18,
    link_bytes_per_s=25e9, transfer_latency_s=10e-6,
    description="NVIDIA H100 SXM5: 80 GB HBM3, 3.35 TB/s, 989.4 TFLOPS f16")
GPUS["h200"] = dataclasses.replace(
    GPUS["h100"], name="h200", memory_bytes=141e9, hbm_bytes_per_s=4.8e12,
    description="NVIDIA H200: 141 GB HBM3e, 4.8 TB/s, 989.4 TFLOPS f16")


def gpu_spec(name: str) -> GpuSpec:
    """The GpuSpec called `name`; HaloError listing the known names otherwise."""
    return lookup(GPUS, name, "GPU")


