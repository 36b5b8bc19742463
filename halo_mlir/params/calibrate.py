"""FP8 scales: weight amax, and activation amax by running the original model in numpy.

The forward is HF LlamaForCausalLM's math in f32 over one sequence of calibration tokens
(positions 0..T-1): RMSNorm, RoPE (`config.inv_freq`, rotate_half), causal softmax
attention with GQA, SiLU MLP. It runs layer by layer, and every linear streams its weight
in row blocks (`x @ W[a:b].T`), so memory is the activations plus one block, whatever
the model's size; the same pass records each weight's amax (of the whole weight, or of each
row for per-channel scales). Every scale is `fp8.scale_of(amax)` (amax / 240).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from halo_mlir.quantization import fp8
from halo_mlir.params.names import POST_NORMS
from halo_mlir.config import LlamaConfig
from halo_mlir.errors import HaloError

DEFAULT_TOKENS = 256
SEED = 0


def default_text() -> Path:
    """The calibration text shipped in the package."""
    return Path(__file__).resolve().parent.parent / "data" / "calibration.txt"


def random_ids(vocab_size: int, n_tokens: int = DEFAULT_TOKENS) -> np.ndarray:
    """The ids used when no tokenizer is available: deterministic (seed 0), in the vocab."""
    return np.random.default_rng(SEED).integers(0, vocab_size, size=n_tokens, dtype=np.int64)


def calibration_ids(vocab_size: int, n_tokens: int | None = None, tokenizer=None,
                    text: str | None = None) -> np.ndarray:
    """The first `n_tokens` (default DEFAULT_TOKENS) ids of `text` (default: the shipped
    text) as `tokenizer` encodes it; `random_ids` without a tokenizer. One sequence."""
    n_tokens = DEFAULT_TOKENS if n_tokens is None else n_tokens
    if n_tokens < 1:
        raise HaloError(f"--calibration-tokens must be at least 1, got {n_tokens}")
    if tokenizer is None:
        return random_ids(vocab_size, n_tokens)
    if text is None:
        text = default_text().read_text(encoding="utf-8")
    ids = np.asarray(tokenizer.encode(text), dtype=np.int64)[:n_tokens]
    if ids.size == 0:
        raise HaloError("the calibration text encodes to no tokens; pass a longer "
                        "--calibration-text")
    if ids.max() >= vocab_size or ids.min() < 0:
        raise HaloError(f"the tokenizer gives id {int(ids.max())}, outside the model's "
                        f"vocabulary ({vocab_size}); is --tokenizer this model's?")
    return ids


def read_text(path: str | Path | None) -> str:
    path = Path(path) if path else default_text()
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise HaloError(f"{path}: no such file; pass --calibration-text a text file") from None
    except (UnicodeDecodeError, IsADirectoryError) as e:
        raise HaloError(f"{path}: not a UTF-8 text file ({e})") from None


# ---- the forward -------------------------------------------------------------------------
def rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    var = np.mean(np.square(x), axis=-1, keepdims=True, dtype=np.float32)
    return (x / np.sqrt(var + np.float32(eps))) * w


def rope_tables(cfg: LlamaConfig, n_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """(cos, sin) [T, head_dim] for positions 0..T-1 (HF: the frequencies repeated twice)."""
    from halo_mlir.config import inv_freq

    freqs = np.arange(n_tokens, dtype=np.float32)[:, None] * \
        inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)[None, :]
    angles = np.concatenate([freqs, freqs], axis=-1)
    return np.cos(angles), np.sin(angles)


def apply_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """x [T, heads, head_dim]: x * cos + rotate_half(x) * sin, rotate_half = (-x2, x1)."""
    half = x.shape[-1] // 2
    rotated = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, cfg: LlamaConfig) -> np.ndarray:
    """Causal softmax attention, q [T, H, hd], k/v [T, KV, hd] -> [T, H * hd]; query head
    h reads kv head h // group_size. One kv group at a time ([group, T, T] scores)."""
    t, g = q.shape[0], cfg.group_size
    masked = np.triu(np.ones((t, t), dtype=bool), k=1)
    out = np.empty_like(q)
    scale = np.float32(cfg.head_dim ** -0.5 if cfg.attn_scale is None else cfg.attn_scale)
    for j in range(cfg.n_kv_heads):
        qh = q[:, j * g:(j + 1) * g].transpose(1, 0, 2)  # [g, T, hd]
        scores = (qh @ k[:, j].T) * scale  # [g, T, T]
        if cfg.attn_softcap:  # Grok-1: cap * tanh(x / cap)
            cap = np.float32(cfg.attn_softcap)
            scores = cap * np.tanh(scores / cap)
        scores[:, masked] = -np.inf
        scores -= scores.max(axis=-1, keepdims=True)
        np.exp(scores, out=scores)
        scores /= scores.sum(axis=-1, keepdims=True)
        out[:, j * g:(j + 1) * g] = (scores @ v[:, j]).transpose(1, 0, 2)
    return out.reshape(t, -1)


def silu(x: np.ndarray) -> np.ndarray:
    return x / (np.float32(1) + np.exp(-x))


def gelu_tanh(x: np.ndarray) -> np.ndarray:
    """GELU's tanh approximation (Grok-1's experts)."""
    c = np.float32(np.sqrt(2.0 / np.pi))
    return np.float32(0.5) * x * (np.float32(1) + np.tanh(c * (x + np.float32(0.044715) * x ** 3)))


ACTIVATIONS = {"silu": silu, "gelu_tanh": gelu_tanh}


def _amax(x: np.ndarray) -> float:
    return float(max(x.max(), -x.min())) if x.size else 0.0


class _Run:
    """The forward over one sequence, streaming weights from `source`; `scales` collects
    every f32 scale of `params.names.fp8_param_entries(cfg, weight_scales)` (weight `:d` or `:d_rows`,
    and the activation rscales)."""

    def __init__(self, source, weight_scales: str = "per-tensor"):
        self.source = source
        self.cfg = source.cfg
        self.weight_scales = weight_scales
        self.scales: dict[str, np.float32 | np.ndarray] = {}

    def linear(self, key: str, x: np.ndarray) -> np.ndarray:
        """x @ W^T, W read in row blocks; records W's scale (`KEY:d`, or `KEY:d_rows`: one
        per row)."""
        rows = self.source.shape(key)[0]
        out = np.empty((x.shape[0], rows), np.float32)
        amax = 0.0
        row_amax = np.zeros(rows, np.float32) if self.weight_scales == "per-channel" else None
        for start, stop, w in self.source.row_blocks(key):
            np.matmul(x, w.T, out=out[:, start:stop])
            if row_amax is None:
                amax = max(amax, _amax(w))
            elif w.size:
                row_amax[start:stop] = np.abs(w).max(axis=1)
        scale_key = fp8.weight_keys(key, self.weight_scales)[1]
        self.scales[scale_key] = fp8.scale_of(amax) if row_amax is None else \
            fp8.row_scales(row_amax)
        return out

    def vector(self, key: str) -> np.ndarray:
        return next(self.source.row_blocks(key))[2]

    def embed(self, ids: np.ndarray) -> np.ndarray:
        rows = {int(i): self.source.rows("token_embd.weight", int(i), int(i) + 1)[0]
                for i in np.unique(ids)}
        x = np.stack([rows[int(i)] for i in ids]).astype(np.float32)
        return x * np.float32(self.cfg.embedding_scale)

    def post_norm(self, i: int, name: str, y: np.ndarray) -> np.ndarray:
        """Grok-1's norms on the attention / FFN output before the residual add."""
        if name not in POST_NORMS.get(self.cfg.family, ()):
            return y
        return rms_norm(y, self.vector(f"blk.{i}.{name}.weight"), self.cfg.rms_eps)

    def moe(self, i: int, h: np.ndarray) -> np.ndarray:
        """Router + top-k experts (ops/moe.py's math in numpy); records each expert stack's
        scales (`KEY:d` [experts], or `KEY:d_rows` [experts, rows]) and input scales (h for gate/up; act(gate) * up over
        every picked (token, slot) for down)."""
        cfg, s = self.cfg, self.scales
        w = lambda name: f"blk.{i}.{name}.weight"  # noqa: E731
        logits = h @ self.source.rows(w("ffn_gate_inp"), 0, cfg.n_experts).T
        p = np.exp(logits - logits.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        top = np.argsort(-p, axis=-1, kind="stable")[:, :cfg.experts_per_token]
        gates = np.take_along_axis(p, top, -1)
        if cfg.moe_renormalize:
            gates = gates / gates.sum(-1, keepdims=True)
        act = ACTIVATIONS[cfg.ffn_activation]
        rows = self.weight_scales == "per-channel"  # amax per expert (and row)
        amax = {name: np.zeros((cfg.n_experts, *((self.source.shape(w(name))[1],) if rows
                                                 else ())), np.float32)
                for name in fp8.EXPERTS}
        out, m_amax = np.zeros_like(h), 0.0
        for e in range(cfg.n_experts):
            weights = {name: self.source.expert_rows(w(name), e) for name in fp8.EXPERTS}
            for name, we in weights.items():
                amax[name][e] = np.abs(we).max(axis=1) if rows else _amax(we)
            tok, slot = np.nonzero(top == e)
            if not len(tok):
                continue
            x = h[tok]
            m = act(x @ weights["ffn_gate_exps"].T) * (x @ weights["ffn_up_exps"].T)
            m_amax = max(m_amax, _amax(m))
            np.add.at(out, tok, gates[tok, slot][:, None] * (m @ weights["ffn_down_exps"].T))
        for name in fp8.EXPERTS:
            s[fp8.weight_keys(w(name), self.weight_scales)[1]] = fp8.row_scales(amax[name])
        s[fp8.input_scale_key(i, "ffn_gate_exps")] = fp8.scale_of(_amax(h))
        s[fp8.input_scale_key(i, "ffn_up_exps")] = fp8.scale_of(_amax(h))
        s[fp8.input_scale_key(i, "ffn_down_exps")] = fp8.scale_of(m_amax)
        return out

    def layer(self, i: int, x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
        cfg, s, t = self.cfg, self.scales, x.shape[0]
        w = lambda name: f"blk.{i}.{name}.weight"  # noqa: E731
        h = rms_norm(x, self.vector(w("attn_norm")), cfg.rms_eps)
        for name in ("attn_q", "attn_k", "attn_v"):
            s[fp8.input_scale_key(i, name)] = fp8.scale_of(_amax(h))
        q = apply_rope(self.linear(w("attn_q"), h).reshape(t, cfg.n_heads, cfg.head_dim), cos, sin)
        k = apply_rope(self.linear(w("attn_k"), h).reshape(t, cfg.n_kv_heads, cfg.head_dim),
                       cos, sin)
        v = self.linear(w("attn_v"), h).reshape(t, cfg.n_kv_heads, cfg.head_dim)
        s[fp8.q_scale_key(i)] = fp8.scale_of(_amax(q))
        s[fp8.kv_scale_key(i)] = fp8.scale_of(max(_amax(k), _amax(v)))
        a = attention(q, k, v, cfg)
        s[fp8.input_scale_key(i, "attn_output")] = fp8.scale_of(_amax(a))
        x = x + self.post_norm(i, "attn_output_norm", self.linear(w("attn_output"), a))
        h = rms_norm(x, self.vector(w("ffn_norm")), cfg.rms_eps)
        if cfg.is_moe:
            return x + self.post_norm(i, "layer_output_norm", self.moe(i, h))
        for name in ("ffn_gate", "ffn_up"):
            s[fp8.input_scale_key(i, name)] = fp8.scale_of(_amax(h))
        m = silu(self.linear(w("ffn_gate"), h)) * self.linear(w("ffn_up"), h)
        s[fp8.input_scale_key(i, "ffn_down")] = fp8.scale_of(_amax(m))
        return x + self.linear(w("ffn_down"), m)


def calibrate(source, ids: np.ndarray,
              progress: Callable[[int, int, str], None] = lambda *_: None,
              weight_scales: str = "per-tensor") -> dict:
    """Every f32 entry of `params.names.fp8_param_entries(source.cfg, weight_scales)` (`KEY:d` of each
    linear weight, or `KEY:d_rows` [rows] per-channel, and the activation rscales), from the
    model's forward over `ids`."""
    cfg = source.cfg
    run = _Run(source, weight_scales)
    with np.errstate(over="ignore"):  # exp(-x) of a very negative x is inf: silu -> -0
        x = run.embed(np.asarray(ids))
        cos, sin = rope_tables(cfg, len(ids))
        for i in range(cfg.n_layers):
            progress(i, cfg.n_layers, f"blk.{i}")
            x = run.layer(i, x, cos, sin)
    progress(cfg.n_layers, cfg.n_layers, "")
    return run.scales
