"""The Llama decoder as IREE MLIR: prefill_bs{N} and decode_bs{N} over a paged KV cache.

Reads top-down like the model: embed -> blocks -> final norm -> lm_head. The two entry
points differ only in where a block's K/V come from (`PrefillKV`, `DecodeKV`).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

from halo_mlir.config import LlamaConfig
from halo_mlir.errors import HaloError
from halo_mlir.ir_builder import Builder, Value
from halo_mlir.model.entry import build_entry
from halo_mlir.ops import kv_cache
from halo_mlir.ops.attention import ATTENTION
from halo_mlir.ops.embedding import embedding
from halo_mlir.ops.ffn import silu_mul
from halo_mlir.ops.linear import add, linear
from halo_mlir.ops.norm import rmsnorm
from halo_mlir.ops.quantized import quantized_embedding, quantized_linear
from halo_mlir.ops.rope import inv_freq, rope
from halo_mlir.params.names import block_shapes
from halo_mlir.quant import quant_format

DTYPES = ("f16", "bf16", "f32")


@dataclasses.dataclass(frozen=True)
class EmitOptions:
    bs_prefill: tuple[int, ...] = (4,)
    bs_decode: tuple[int, ...] = (4,)
    block_seq_stride: int = 32
    dtype: str = "f16"
    attention: str = "fused"
    # (ABI key, quantized format) for weights kept in a block format (see halo_mlir.quant).
    weight_formats: tuple[tuple[str, str], ...] = ()

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise HaloError(f"unknown --dtype {self.dtype!r}: choose one of {', '.join(DTYPES)}")
        if self.attention not in ATTENTION:
            raise HaloError(f"unknown --attention {self.attention!r}: choose one of "
                            f"{', '.join(ATTENTION)}")
        if self.block_seq_stride <= 0:
            raise HaloError(f"--block-seq-stride must be positive, got {self.block_seq_stride}")
        for bs in (*self.bs_prefill, *self.bs_decode):
            if bs <= 0:
                raise HaloError(f"batch sizes must be positive, got {bs}")


def page_elems(cfg: LlamaConfig, opts: EmitOptions) -> int:
    """Elements of one KV-cache page (ABI.md): layers * 2 * kv_heads * stride * head_dim."""
    return cfg.n_layers * 2 * cfg.n_kv_heads * opts.block_seq_stride * cfg.head_dim


class _Model:
    """Per-module emission state: config, options and the builder."""

    def __init__(self, b: Builder, cfg: LlamaConfig, opts: EmitOptions):
        self.b, self.cfg, self.opts, self.dt = b, cfg, opts, opts.dtype
        self.formats = dict(opts.weight_formats)

    def w(self, key: str, shape: Sequence[int]) -> Value:
        return self.b.param(key, shape, self.dt)

    def quantized_fields(self, key: str, shape: Sequence[int]) -> tuple[str, list[Value]]:
        fmt = quant_format(self.formats[key])
        return fmt.name, [self.b.param(f"{key}:{field}", fshape, fdtype)
                          for field, (fshape, fdtype) in fmt.field_shapes(*shape).items()]

    def linear(self, key: str, shape: Sequence[int], x: Value) -> Value:
        """x @ W^T for the weight `key` [out, in], plain or kept quantized."""
        if key in self.formats:
            fmt, fields = self.quantized_fields(key, shape)
            return quantized_linear(self.b, x, fmt, fields, shape[0], dtype=self.dt)
        return linear(self.b, x, self.w(key, shape), dtype=self.dt)

    def block_linear(self, i: int, name: str, x: Value) -> Value:
        template = f"blk.{{i}}.{name}.weight"
        return self.linear(template.format(i=i), block_shapes(self.cfg)[template], x)

    def block_w(self, i: int, name: str) -> Value:
        template = f"blk.{{i}}.{name}.weight"
        return self.w(template.format(i=i), block_shapes(self.cfg)[template])

    def embed(self, tokens: Value) -> Value:
        shape = (self.cfg.vocab_size, self.cfg.hidden_size)
        if "token_embd.weight" in self.formats:
            fmt, fields = self.quantized_fields("token_embd.weight", shape)
            return quantized_embedding(self.b, fmt, fields, tokens, *shape, dtype=self.dt)
        return embedding(self.b, self.w("token_embd.weight", shape), tokens)

    # ---- the decoder ---------------------------------------------------------------
    def forward(self, tokens: Value, positions: Value, seq_lens: Value, kv) -> Value:
        """tokens[N,S], positions[N,S] -> logits[N,S,V]; `kv` reads/writes the cache."""
        b, cfg = self.b, self.cfg
        with b.at("token_embd"):
            h = self.embed(tokens)
        with b.at("rope"):
            freqs = b.dense(inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling), "f32")
        for i in range(cfg.n_layers):
            h = self.block(i, h, positions, seq_lens, freqs, kv)
        with b.at("output_norm"):
            h = rmsnorm(b, h, self.w("output_norm.weight", (cfg.hidden_size,)),
                        eps=cfg.rms_eps, dtype=self.dt)
        key = "token_embd.weight" if cfg.tie_embeddings else "output.weight"
        with b.at("output"):
            return self.linear(key, (cfg.vocab_size, cfg.hidden_size), h)

    def block(self, i: int, h: Value, positions: Value, seq_lens: Value, freqs: Value,
              kv) -> Value:
        b, cfg, dt = self.b, self.cfg, self.dt
        with b.at(f"blk.{i}.attn_norm"):
            x = rmsnorm(b, h, self.block_w(i, "attn_norm"), eps=cfg.rms_eps, dtype=dt)
        heads = {}
        for name, count in (("attn_q", cfg.n_heads), ("attn_k", cfg.n_kv_heads),
                            ("attn_v", cfg.n_kv_heads)):
            with b.at(f"blk.{i}.{name}"):
                y = self.block_linear(i, name, x)
                n, s, _ = b.dims(y)
                heads[name] = b.reshape(y, [[0], [1], [2, 3]], [n, s, count, cfg.head_dim])
        with b.at(f"blk.{i}.rope"):
            q = rope(b, heads["attn_q"], positions, freqs, dtype=dt)
            k = rope(b, heads["attn_k"], positions, freqs, dtype=dt)
        with b.at(f"blk.{i}.kv_cache"):
            k = b.transpose(k, [0, 2, 1, 3])  # [N,KVH,S,D]
            v = b.transpose(heads["attn_v"], [0, 2, 1, 3])
            k_all, v_all = kv(i, k, v)
        with b.at(f"blk.{i}.attention"):
            n, s = b.dims(q)[:2]
            q = b.reshape(q, [[0], [1], [2, 3], [4]],
                          [n, s, cfg.n_kv_heads, cfg.group_size, cfg.head_dim])
            o = ATTENTION[self.opts.attention](b, q, k_all, v_all, positions, seq_lens, dtype=dt)
            o = b.reshape(o, [[0], [1], [2, 3, 4]], [n, s, cfg.n_heads * cfg.head_dim])
        with b.at(f"blk.{i}.attn_output"):
            h = add(b, h, self.block_linear(i, "attn_output", o))
        with b.at(f"blk.{i}.ffn_norm"):
            x = rmsnorm(b, h, self.block_w(i, "ffn_norm"), eps=cfg.rms_eps, dtype=dt)
        with b.at(f"blk.{i}.ffn"):
            gate = self.block_linear(i, "ffn_gate", x)
            up = self.block_linear(i, "ffn_up", x)
            y = self.block_linear(i, "ffn_down", silu_mul(b, gate, up, dtype=dt))
            return add(b, h, y)

    # ---- entry points --------------------------------------------------------------
    def cache_type(self):
        return self.b.tensor_type([None, page_elems(self.cfg, self.opts)], self.dt)

    def mark_entry(self, name: str, cache_arg: int, divisors: tuple = ()) -> None:
        """Metadata for `entry.build_entry` and passes: the entry point this implements,
        which argument is updated in place (returned after the regular results), size
        promises, and the cache page's factors."""
        cfg = self.cfg
        extra = {"halo.divisors": list(divisors)} if divisors else {}
        self.b.annotate(**{"halo.entry": name, "halo.inplace": [cache_arg]}, **extra, arg_attrs={
            cache_arg: {"halo.kv_cache": [cfg.n_layers, 2, cfg.n_kv_heads,
                                          self.opts.block_seq_stride, cfg.head_dim]}})

    def view(self, cache: Value) -> Value:
        cfg = self.cfg
        return kv_cache.cache_view(self.b, cache, layers=cfg.n_layers, kv_heads=cfg.n_kv_heads,
                                   stride=self.opts.block_seq_stride, head_dim=cfg.head_dim)

    def layer_index(self, i: int) -> Value:
        # Opaque so the layer is a kernel operand, not a constant: one kernel for all layers.
        return self.b.barrier(self.b.scalar(i, "i64"))

    def prefill(self, bs: int):
        b = self.b
        i64 = "i64"
        args = [b.tensor_type([bs, None], i64), b.tensor_type([bs], i64),
                b.tensor_type([bs, None], i64), self.cache_type()]
        logits_t = b.tensor_type([bs, None, self.cfg.vocab_size], self.dt)
        name = f"prefill_bs{bs}"
        with b.function(f"{name}$impl", args, [logits_t, args[3]], private=True) as (
                tokens, seq_lens, pages, cache):
            # S is a multiple of the page size (ABI.md): tell IREE (`util.assume.int`), so
            # prefill matmuls with their dynamic M get MFMA on gfx942.
            self.mark_entry(name, 3, divisors=(0, 1, self.opts.block_seq_stride))
            with b.at("positions"):
                n, s = b.dims(tokens)
                positions = b.generic("->bs", [], [b.empty([n, s], i64)],
                                      lambda _: b.cast(b.linalg_index(1), i64))
            state = {"cache": self.view(cache)}

            def kv(i, k, v):
                state["cache"] = kv_cache.write_blocks(b, state["cache"], k, v, pages,
                                                       self.layer_index(i))
                return k, v

            logits = self.forward(tokens, positions, seq_lens, kv)
            b.ret(logits, kv_cache.cache_flat(b, state["cache"]))
        build_entry(b, b.current_function)

    def decode(self, bs: int):
        b = self.b
        i64 = "i64"
        args = [b.tensor_type([bs, 1], i64), b.tensor_type([bs], i64), b.tensor_type([bs], i64),
                b.tensor_type([bs, None], i64), self.cache_type()]
        logits_t = b.tensor_type([bs, 1, self.cfg.vocab_size], self.dt)
        name = f"decode_bs{bs}"
        with b.function(f"{name}$impl", args, [logits_t, args[4]], private=True) as (
                tokens, seq_lens, start, pages, cache):
            self.mark_entry(name, 4)
            with b.at("positions"):
                positions = b.reshape(start, [[0, 1]], [bs, 1])
            state = {"cache": self.view(cache)}

            def kv(i, k, v):
                layer = self.layer_index(i)
                c = kv_cache.write_position(b, state["cache"], k, v, pages, start, layer)
                state["cache"] = c
                return (kv_cache.read_pages(b, c, pages, layer, 0),
                        kv_cache.read_pages(b, c, pages, layer, 1))

            logits = self.forward(tokens, positions, seq_lens, kv)
            b.ret(logits, kv_cache.cache_flat(b, state["cache"]))
        build_entry(b, b.current_function)


def emit_module(cfg: LlamaConfig, opts: EmitOptions = EmitOptions(), *, context=None):
    """Build the module (an `ir.Module`) in `context` (a fresh one when None)."""
    b = Builder(context)
    with b.context, b.at("halo_mlir"):
        module = b.new_module()
        m = _Model(b, cfg, opts)
        for bs in sorted(set(opts.bs_prefill)):
            m.prefill(bs)
        for bs in sorted(set(opts.bs_decode)):
            m.decode(bs)
        if not module.operation.verify():
            raise HaloError("internal error: the emitted module does not verify")
    return module
