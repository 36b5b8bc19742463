"""Model hyperparameters: a dataclass, the presets (Llama 3.1, Mixtral, Grok-1), and HF
config.json parsing."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np

from halo_mlir.errors import HaloError, lookup

# Family name -> whether it is a mixture of experts (the families themselves, with their
# blocks and parameter names, are in halo_mlir.model.families and halo_mlir.params.names).
FAMILIES = {"llama": False, "mixtral": True, "grok": True}
# FFN activations (the expert / dense gate's nonlinearity): silu (Llama, Mixtral) or the tanh
# approximation of GELU (Grok-1: jax.nn.gelu's default).
FFN_ACTIVATIONS = ("silu", "gelu_tanh")

LLAMA3_ROPE_SCALING = {
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


def inv_freq(head_dim: int, theta: float, scaling: dict | None) -> np.ndarray:
    """Per-pair inverse frequencies [head_dim/2], f32, as HF's `rope_type` default/llama3."""
    freq = 1.0 / (np.float32(theta) ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    freq = freq.astype(np.float32)
    if scaling is None:
        return freq
    factor = scaling["factor"]
    lo, hi = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_ctx = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / freq
    scaled = np.where(wavelen > old_ctx / lo, freq / factor, freq)
    smooth = (old_ctx / wavelen - lo) / (hi - lo)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_ctx / hi) & (wavelen <= old_ctx / lo)
    return np.where(medium, smoothed, scaled).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    hidden_size: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn_dim: int
    vocab_size: int
    rope_theta: float
    rms_eps: float
    # None = plain RoPE; otherwise the llama3 parameters (keys of LLAMA3_ROPE_SCALING).
    rope_scaling: dict | None = None
    tie_embeddings: bool = False
    max_seq_len: int = 8192
    name: str = "custom"
    # The model family (halo_mlir.model.families: which block it runs, how its parameters
    # are named). For a mixture-of-experts family `ffn_dim` is each expert's FFN size.
    family: str = "llama"
    n_experts: int = 0  # MoE: experts per layer (0: a dense FFN)
    experts_per_token: int = 0  # MoE: top-k experts each token runs
    moe_renormalize: bool = True  # MoE: the k router weights divided by their sum (Mixtral)
    # Grok-1's extras (the defaults leave Llama and Mixtral as they are):
    ffn_activation: str = "silu"  # FFN_ACTIVATIONS: the gate's nonlinearity
    attn_scale: float | None = None  # attention logits' multiplier (None: 1/sqrt(head_dim))
    attn_softcap: float = 0.0  # > 0: logits -> cap * tanh(logits / cap) after the scale
    embedding_scale: float = 1.0  # token embeddings multiplied by this
    logit_scale: float = 1.0  # output logits multiplied by this

    def page_elems(self, stride: int, tp: int = 1) -> int:
        """Elements of one KV-cache page (docs/ABI.md) on one of `tp` devices:
        layers * 2 * (kv_heads / tp) * stride * head_dim."""
        return self.n_layers * 2 * (self.n_kv_heads // tp) * stride * self.head_dim

    def __post_init__(self):
        for field in ("hidden_size", "n_layers", "n_heads", "n_kv_heads", "head_dim",
                      "ffn_dim", "vocab_size"):
            if getattr(self, field) <= 0:
                raise HaloError(f"config {self.name}: {field} must be positive, got {getattr(self, field)}")
        if self.n_heads % self.n_kv_heads:
            raise HaloError(f"config {self.name}: heads ({self.n_heads}) must be a multiple of "
                            f"kv heads ({self.n_kv_heads})")
        if self.head_dim % 2:
            raise HaloError(f"config {self.name}: head_dim must be even for RoPE, got {self.head_dim}")
        if self.family not in FAMILIES:
            raise HaloError(f"config {self.name}: unknown family {self.family!r}: choose one of "
                            f"{', '.join(FAMILIES)}")
        if FAMILIES[self.family] != bool(self.n_experts):
            need = "n_experts >= 1" if FAMILIES[self.family] else "n_experts = 0"
            raise HaloError(f"config {self.name}: family {self.family} needs {need}, got "
                            f"{self.n_experts}")
        if self.ffn_activation not in FFN_ACTIVATIONS:
            raise HaloError(f"config {self.name}: unknown ffn_activation "
                            f"{self.ffn_activation!r}: choose one of {', '.join(FFN_ACTIVATIONS)}")
        if self.attn_softcap < 0:
            raise HaloError(f"config {self.name}: attn_softcap must be >= 0 (0: none), got "
                            f"{self.attn_softcap}")
        if self.n_experts and not 1 <= self.experts_per_token <= self.n_experts:
            raise HaloError(f"config {self.name}: experts_per_token must be in 1..{self.n_experts}"
                            f", got {self.experts_per_token}")

    @property
    def is_moe(self) -> bool:
        return self.n_experts > 0

    @property
    def group_size(self) -> int:
        """Query heads per kv head (GQA)."""
        return self.n_heads // self.n_kv_heads

    def with_layers(self, n_layers: int | None) -> "LlamaConfig":
        """The first n_layers blocks only (None keeps all)."""
        if n_layers is None:
            return self
        if not 1 <= n_layers <= self.n_layers:
            raise HaloError(f"--layers {n_layers} is out of range: {self.name} has "
                            f"{self.n_layers} layers; pick 1..{self.n_layers}")
        return dataclasses.replace(self, n_layers=n_layers)


def _llama31(name, hidden, layers, heads, ffn):
    return LlamaConfig(hidden_size=hidden, n_layers=layers, n_heads=heads, n_kv_heads=8,
                       head_dim=128, ffn_dim=ffn, vocab_size=128256, rope_theta=500000.0,
                       rms_eps=1e-5, rope_scaling=dict(LLAMA3_ROPE_SCALING),
                       max_seq_len=131072, name=name)


def _mixtral(name, hidden, layers, heads, ffn, vocab, max_seq_len):
    # HF config.json of mistralai/Mixtral-8x7B-v0.1 / Mixtral-8x22B-v0.1: 8 kv heads,
    # head_dim 128, 8 experts top-2, rope_theta 1e6, rms eps 1e-5, no rope scaling.
    return LlamaConfig(hidden_size=hidden, n_layers=layers, n_heads=heads, n_kv_heads=8,
                       head_dim=128, ffn_dim=ffn, vocab_size=vocab, rope_theta=1e6,
                       rms_eps=1e-5, max_seq_len=max_seq_len, name=name, family="mixtral",
                       n_experts=8, experts_per_token=2)


def _grok1() -> LlamaConfig:
    # xai-org/grok-1 run.py / model.py: emb_size 6144, widening_factor 8 (ffn_size(6144, 8) =
    # 32768 per expert), key_size 128, 48 query / 8 kv heads, 64 layers, vocab 128 * 1024,
    # 8 experts top-2 (softmax probabilities, not renormalized), RMSNorm eps 1e-5, RoPE base
    # 10000 without scaling, attn_output_multiplier 0.08838834764831845 then 30 * tanh(x / 30),
    # embedding_multiplier_scale 78.38367176906169, output_multiplier_scale
    # 0.5773502691896257, tied input/output embeddings (InOutEmbed), sequence_len 8192.
    return LlamaConfig(hidden_size=6144, n_layers=64, n_heads=48, n_kv_heads=8, head_dim=128,
                       ffn_dim=32768, vocab_size=131072, rope_theta=10000.0, rms_eps=1e-5,
                       tie_embeddings=True, max_seq_len=8192, name="grok-1", family="grok",
                       n_experts=8, experts_per_token=2, moe_renormalize=False,
                       ffn_activation="gelu_tanh", attn_scale=0.08838834764831845,
                       attn_softcap=30.0, embedding_scale=78.38367176906169,
                       logit_scale=0.5773502691896257)


PRESETS: dict[str, LlamaConfig] = {
    "8b": _llama31("8b", 4096, 32, 32, 14336),
    "70b": _llama31("70b", 8192, 80, 64, 28672),
    "405b": _llama31("405b", 16384, 126, 128, 53248),
    # A small model for demos and quick compiles (the peer-comparison toy config).
    "toy": LlamaConfig(hidden_size=512, n_layers=8, n_heads=8, n_kv_heads=8, head_dim=64,
                       ffn_dim=1024, vocab_size=1024, rope_theta=500000.0, rms_eps=1e-5,
                       rope_scaling=dict(LLAMA3_ROPE_SCALING), max_seq_len=4096, name="toy"),
    "mixtral-8x7b": _mixtral("mixtral-8x7b", 4096, 32, 32, 14336, 32000, 32768),
    "mixtral-8x22b": _mixtral("mixtral-8x22b", 6144, 56, 48, 16384, 32768, 65536),
    "grok-1": _grok1(),
}


def preset(name: str) -> LlamaConfig:
    return lookup(PRESETS, name, "preset")


def _rope_from_hf(d: dict, where: str) -> tuple[float, dict | None]:
    """(theta, llama3 scaling or None) from either HF layout.

    transformers <5 writes `rope_theta` + `rope_scaling`; 5.x writes `rope_parameters`
    holding both.
    """
    params = d.get("rope_parameters") or {}
    scaling = d.get("rope_scaling") or params
    theta = d.get("rope_theta", params.get("rope_theta", 10000.0))
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "default":
        return float(theta), None
    if rope_type != "llama3":
        raise HaloError(f"{where}: rope type {rope_type!r} is not supported; "
                        "supported: default, llama3")
    try:
        return float(theta), {k: type(v)(scaling[k]) for k, v in LLAMA3_ROPE_SCALING.items()}
    except KeyError as e:
        raise HaloError(f"{where}: llama3 rope scaling lacks {e.args[0]!r}") from None


def from_hf_dict(d: dict, where: str = "config.json") -> LlamaConfig:
    """A LlamaConfig from the keys of an HF config.json (Llama family, or Mixtral)."""
    model_type = d.get("model_type", "llama")
    if model_type not in HF_MODEL_TYPES:
        raise HaloError(f"{where}: model_type {model_type!r} is not a Llama-family model or "
                        f"Mixtral; halo_mlir emits {', '.join(HF_MODEL_TYPES)}")
    if d.get("hidden_act", "silu") != "silu":
        raise HaloError(f"{where}: hidden_act {d['hidden_act']!r} is not supported; "
                        "Llama uses silu")
    for bias in ("attention_bias", "mlp_bias"):
        if d.get(bias):
            raise HaloError(f"{where}: {bias}=true is not supported (Llama has no biases)")
    try:
        heads = int(d["num_attention_heads"])
        hidden = int(d["hidden_size"])
        theta, scaling = _rope_from_hf(d, where)
        return LlamaConfig(
            hidden_size=hidden,
            n_layers=int(d["num_hidden_layers"]),
            n_heads=heads,
            n_kv_heads=int(d.get("num_key_value_heads") or heads),
            head_dim=int(d.get("head_dim") or hidden // heads),
            ffn_dim=int(d["intermediate_size"]),
            vocab_size=int(d["vocab_size"]),
            rope_theta=theta,
            rms_eps=float(d.get("rms_norm_eps", 1e-5)),
            rope_scaling=scaling,
            tie_embeddings=bool(d.get("tie_word_embeddings", False)),
            max_seq_len=int(d.get("max_position_embeddings", 8192)),
            name=str(d.get("_name_or_path") or "hf"),
            **_moe_from_hf(d, HF_MODEL_TYPES[model_type], where),
        )
    except KeyError as e:
        raise HaloError(f"{where}: missing key {e.args[0]!r}; is this a Llama config.json?") from None
    except (TypeError, ValueError) as e:
        raise HaloError(f"{where}: bad value ({e})") from None


# HF model_type -> family.
HF_MODEL_TYPES = {"llama": "llama", "mistral": "llama", "mixtral": "mixtral"}


def _moe_from_hf(d: dict, family: str, where: str) -> dict:
    """The family's fields: Mixtral's expert count and top-k (it renormalizes the k weights)."""
    if family == "llama":
        return {}
    if d.get("sliding_window") is not None:
        raise HaloError(f"{where}: sliding_window {d['sliding_window']} is not supported "
                        "(halo_mlir attends to the whole context); set it to null")
    experts, used = int(d["num_local_experts"]), int(d["num_experts_per_tok"])
    if experts >= 1 and not 1 <= used <= experts:
        raise HaloError(f"{where}: num_experts_per_tok {used} (experts a token runs) is not in "
                        f"1..num_local_experts ({experts}); fix config.json")
    return dict(family=family, n_experts=experts, experts_per_token=used, moe_renormalize=True)


def from_hf_config(path: str | Path) -> LlamaConfig:
    path = Path(path)
    try:
        d = json.loads(path.read_text())
    except FileNotFoundError:
        raise HaloError(f"{path}: no such file; pass the model's config.json") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise HaloError(f"{path}: malformed JSON ({e}); pass the model's config.json") from None
    if not isinstance(d, dict):
        raise HaloError(f"{path}: expected a JSON object, got {type(d).__name__}")
    return from_hf_dict(d, str(path))
