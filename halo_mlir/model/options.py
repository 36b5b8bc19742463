"""What `emit` is asked for: EmitOptions (batch sizes, dtypes, attention form, weight forms,
layer loop, tensor-parallel expert placement) and their checks, which run when the options
are made, before anything is emitted."""

from __future__ import annotations

import dataclasses

from halo_mlir.quantization import fp8
from halo_mlir.errors import HaloError
from halo_mlir.ops.attention import ATTENTION
from halo_mlir.sharding_passes.plan import MOE_PARALLEL  # how --tp splits experts

# fp8: linear weights and activations in f8E4M3FNUZ (halo_mlir.quantization.fp8), the rest in f16.
DTYPES = ("f16", "bf16", "f32", "fp8")
KV_CACHE_DTYPES = ("f16", "bf16", "f32", "fp8")
# paged: the templated kernels reading the cache pages (halo_mlir/kernels/attention.py);
# fused / decomposed: K/V gathered first, then one attention op or matmul-softmax-matmul;
# auto: paged where the kernels' constraints hold, else fused (model/attention_form.py).
ATTENTION_FORMS = ("auto", "paged", *ATTENTION)
# How a mixture-of-experts prefill runs its experts (ops/moe.py): `grouped` sorts the
# (token, slot) pairs by expert and runs one matmul chain per expert; `gather` reads each
# token's experts' weights inside the contraction (the decode form).
MOE_PREFILL_FORMS = ("grouped", "gather")
# An fp8 model's activation scales: one per linear from calibration or the checkpoint
# (static), or one per token computed in the program (dynamic).
FP8_INPUT_SCALES = ("static", "dynamic")


@dataclasses.dataclass(frozen=True)
class EmitOptions:
    bs_prefill: tuple[int, ...] = (4,)
    bs_decode: tuple[int, ...] = (4,)
    block_seq_stride: int = 32
    dtype: str = "f16"
    attention: str = "auto"
    # (ABI key, quantized format) for weights kept in a block format (see halo_mlir.quantization.blocks).
    weight_formats: tuple[tuple[str, str], ...] = ()
    # The decoder stack as one `scf.for` over stacked weights (parameter layout `stacked`).
    layer_loop: bool = False
    # Render templated kernels from this folder (an author's edited copy) when set.
    template_dir: str | None = None
    # The KV cache's dtype; None: fp8 for an fp8 model, else the activation dtype.
    kv_cache_dtype: str | None = None
    # An fp8 model's norms, residuals, attention output and logits (docs/ABI.md: f16); f32 makes
    # the fp8 roundings the only difference from an f32 reference.
    fp8_activations: str = "f16"
    # Mixture-of-experts families only: the prefill's expert form (MOE_PREFILL_FORMS).
    moe_prefill: str = "grouped"
    # Mixture-of-experts families only: `ffn` (each expert's ffn rows split over the devices
    # by --tp) or `expert` (expert parallelism: whole experts per device, the experts run in
    # `moe_groups` groups, one per device; `api.emit_to_file` sets it to tp).
    moe_parallel: str = "ffn"
    moe_groups: int = 1
    # An fp8 model's weight scales (fp8.SCALES): per-tensor `KEY:d` [] or per-channel
    # `KEY:d_rows` [out], as the parameters were imported (`import-params --fp8-scales`).
    fp8_scales: str = "per-tensor"
    # An fp8 model's input scales (FP8_INPUT_SCALES): `static`, each linear's
    # `q_input:rscale` (calibrated, or from the checkpoint), or `dynamic`, each token's own
    # amax computed in the program (ops/fp8.quantize_tokens), bounded by
    # `fp8_activation_ub` when set (fbgemm's activation_scale_ub).
    fp8_input_scales: str = "static"
    fp8_activation_ub: float | None = None
    # The block linears stored in fp8 (ABI keys, `blk.3.attn_q.weight`); None: every one
    # (`import-params --quantize fp8`). A published checkpoint may leave some in the
    # activation dtype (`KEY` instead of `KEY:qs`).
    fp8_linears: tuple[str, ...] | None = None
    # Where a static input scale saturates (x / rscale within +-this): fnuz's 240 for our
    # own scales, 224 (e4m3fn's 448) for a published e4m3fn checkpoint's.
    fp8_input_max: float = fp8.FP8_MAX
    # Q8_0 / Q4_1 matmuls: 0 one in-order reduction (GPUs), 16 the lane-sum form that IREE's
    # CPU codegen vectorizes (docs/cpu-quantized.md); `generate` picks 16 on cpu.
    quant_lanes: int = 0
    # Kept-quantized matmuls with more than one row per sequence (the prefill): False the
    # dequantize-in-matmul kernel (GPUs); True the weight dequantized to f32 in a dispatch of
    # its own, then a plain matmul (docs/cpu-quantized.md); `generate` picks True on cpu.
    quant_prefill_dequant: bool = False
    # Q8_0 / Q4_1 / Q4_K matmuls with one row per sequence (the decode): False the kernels
    # above; True `{fmt}_matmul_blocks`, the block loop unrolled into one elementwise op that
    # IREE's CPU codegen vectorizes over 16/32 lanes; `generate` picks True on cpu.
    quant_blocks: bool = False

    @property
    def activation_dtype(self) -> str:
        return self.fp8_activations if self.dtype == "fp8" else self.dtype

    @property
    def cache_dtype(self) -> str:
        """The KV cache's IR element type."""
        kv = self.kv_cache_dtype or ("fp8" if self.dtype == "fp8" else self.dtype)
        return fp8.FP8 if kv == "fp8" else kv

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise HaloError(f"unknown --dtype {self.dtype!r}: choose one of {', '.join(DTYPES)}")
        if self.fp8_activations not in DTYPES[:3]:
            raise HaloError(f"unknown --activation-dtype {self.fp8_activations!r}: choose one "
                            f"of {', '.join(DTYPES[:3])}")
        if self.fp8_activations != "f16" and self.dtype != "fp8":
            raise HaloError("--activation-dtype applies to --dtype fp8 only (other models "
                            "compute in --dtype)")
        kv = self.kv_cache_dtype
        if kv is not None:
            if kv not in KV_CACHE_DTYPES:
                raise HaloError(f"unknown --kv-cache-dtype {kv!r}: choose one of "
                                f"{', '.join(KV_CACHE_DTYPES)}")
            if kv == "fp8" and self.dtype != "fp8":
                raise HaloError("--kv-cache-dtype fp8 needs --dtype fp8 (the cache's scales "
                                "come with the fp8 parameters)")
            if kv != "fp8" and kv != self.activation_dtype:
                raise HaloError(f"--kv-cache-dtype {kv} with --dtype {self.dtype}: the cache "
                                f"holds fp8 or the activation dtype ({self.activation_dtype})")
        fp8.check_scales(self.fp8_scales)
        if self.fp8_scales != "per-tensor" and self.dtype != "fp8":
            raise HaloError("--fp8-scales applies to --dtype fp8 only")
        if self.fp8_input_scales not in FP8_INPUT_SCALES:
            raise HaloError(f"unknown --fp8-input-scales {self.fp8_input_scales!r}: choose one "
                            f"of {', '.join(FP8_INPUT_SCALES)}")
        if self.dtype != "fp8" and (self.fp8_input_scales != "static" or self.fp8_linears
                                    is not None or self.fp8_activation_ub is not None):
            raise HaloError("--fp8-input-scales, the activation bound and fp8 linears apply "
                            "to --dtype fp8 only")
        if not 0 < self.fp8_input_max <= fp8.FP8_MAX:
            raise HaloError(f"fp8_input_max {self.fp8_input_max}: the saturation of an fp8 "
                            f"input, in (0, {fp8.FP8_MAX:g}]")
        if self.fp8_activation_ub is not None and (self.fp8_input_scales != "dynamic" or
                                                   not self.fp8_activation_ub > 0):
            raise HaloError(f"an activation scale bound ({self.fp8_activation_ub}) needs "
                            "--fp8-input-scales dynamic and a positive value")
        if self.dtype == "fp8" and self.weight_formats:
            raise HaloError("--dtype fp8 takes fp8 parameters (`import-params --quantize fp8`), "
                            "not kept-quantized GGUF weights; drop --keep-quantized")
        if self.attention not in ATTENTION_FORMS:
            raise HaloError(f"unknown --attention {self.attention!r}: choose one of "
                            f"{', '.join(ATTENTION_FORMS)}")
        if self.moe_prefill not in MOE_PREFILL_FORMS:
            raise HaloError(f"unknown --moe-prefill {self.moe_prefill!r}: choose one of "
                            f"{', '.join(MOE_PREFILL_FORMS)}")
        if self.moe_parallel not in MOE_PARALLEL:
            raise HaloError(f"unknown --moe-parallel {self.moe_parallel!r}: choose one of "
                            f"{', '.join(MOE_PARALLEL)}")
        if self.moe_groups < 1 or (self.moe_groups > 1 and self.moe_parallel != "expert"):
            raise HaloError(f"moe_groups {self.moe_groups}: groups of experts are for "
                            "--moe-parallel expert (one per device)")
        if self.block_seq_stride <= 0:
            raise HaloError(f"--block-seq-stride must be positive, got {self.block_seq_stride}")
        for bs in (*self.bs_prefill, *self.bs_decode):
            if bs <= 0:
                raise HaloError(f"batch sizes must be positive, got {bs}")
