"""The decoder as IREE MLIR: prefill_bs{N} and decode_bs{N} over a paged KV cache.

Reads top-down like the model: embed -> blocks -> final norm -> lm_head, for every model
family; a block's FFN is the family's (`model/families.py`: dense SwiGLU for Llama, routed
experts for Mixtral). The two entry points differ only in where a block's K/V come from.
"""

from __future__ import annotations

from typing import Sequence

from halo_mlir.quantization import fp8
from halo_mlir.config import LlamaConfig, inv_freq
from halo_mlir.errors import HaloError
from halo_mlir.ir_builder import Builder, Value
from halo_mlir.ir_builder.entry_points import build_entry
from halo_mlir.ops import kv_cache
from halo_mlir.ops.attention import ATTENTION
from halo_mlir.ops.embedding import embedding
from halo_mlir.ops.fp8 import fp8_linear, fp8_linear_tokens, quantize
from halo_mlir.ops.linear import add, linear
from halo_mlir.ops.paged_attention import paged_decode, paged_prefill
from halo_mlir.ops.norm import rmsnorm
from halo_mlir.ops.quantized import quantized_embedding, quantized_linear
from halo_mlir.ops.rope import rope, rope_table
from halo_mlir.model.families import family
from halo_mlir.model.options import (ATTENTION_FORMS, DTYPES, KV_CACHE_DTYPES,  # noqa: F401
                                     MOE_PREFILL_FORMS, EmitOptions)
from halo_mlir.params.names import block_shapes, block_weights, stacked_key
from halo_mlir.quantization.blocks import quant_format

class _Model:
    """Per-module emission state: config, options and the builder."""

    def __init__(self, b: Builder, cfg: LlamaConfig, opts: EmitOptions):
        self.b, self.cfg, self.opts, self.dt = b, cfg, opts, opts.activation_dtype
        self.family = family(cfg.family)
        self.family.check(opts)
        if opts.moe_parallel == "expert":
            from halo_mlir.sharding_passes.plan import check_moe_parallel
            check_moe_parallel(cfg, opts.moe_groups, opts.moe_parallel)
            quantized = any(key.endswith("_exps.weight") for key, _ in opts.weight_formats)
            if quantized or opts.dtype == "fp8":
                what = "fp8" if opts.dtype == "fp8" else "kept-quantized"
                raise HaloError(f"--moe-parallel expert does not run {what} experts yet; use "
                                "--moe-parallel ffn (each expert split over the devices)")
        self.attention = self.family.attention_form(opts.attention)
        self.block_weights = block_weights(cfg)
        self.formats = dict(opts.weight_formats)
        if opts.dtype == "fp8":  # the block linears: `KEY:qs`, `KEY:d` (and the input scale)
            keys = {f"blk.{i}.{name}.weight" for i in range(cfg.n_layers)
                    for name in (*fp8.LINEARS, *fp8.EXPERTS) if name in self.block_weights}
            if opts.fp8_linears is not None:
                unknown = sorted(set(opts.fp8_linears) - keys)
                if unknown:
                    raise HaloError(f"fp8 linear {unknown[0]} is not a linear of {cfg.name} "
                                    f"({cfg.n_layers} layers); check the checkpoint's config")
                keys &= set(opts.fp8_linears)
            self.formats.update({key: "fp8" for key in keys})
        self.fp8_dynamic = opts.fp8_input_scales == "dynamic"
        if self.fp8_dynamic and any(f"{name}.weight" in key for key in self.formats
                                    for name in fp8.EXPERTS):
            raise HaloError("--fp8-input-scales dynamic runs dense linears; fp8 experts take "
                            "static input scales (import-params --quantize fp8)")
        # Attention in fp8 over an fp8 cache: Q, K, V quantized with the layer's scales.
        self.kv_fp8 = opts.cache_dtype == fp8.FP8
        b.template_dir = opts.template_dir
        b.quant_lanes = opts.quant_lanes
        b.quant_prefill_dequant = opts.quant_prefill_dequant
        b.quant_blocks = opts.quant_blocks
        b.layer_loop = opts.layer_loop
        if opts.layer_loop:  # one loop body: every layer's weight of a kind in one format
            for name in self.block_weights:
                found = {self.formats.get(f"blk.{i}.{name}.weight") for i in range(cfg.n_layers)}
                if len(found) > 1:
                    shown = ", ".join(sorted(str(f or cfg.name and "float") for f in found))
                    raise HaloError(f"--layer-loop needs every layer's {name} weight in one "
                                    f"format, found {shown}; emit without --layer-loop (a "
                                    "GGUF: gguf_import.weight_formats(..., layer_loop=True) "
                                    "dequantizes such a kind)")

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

    def embed(self, tokens: Value) -> Value:
        shape = (self.cfg.vocab_size, self.cfg.hidden_size)
        if "token_embd.weight" in self.formats:
            fmt, fields = self.quantized_fields("token_embd.weight", shape)
            return quantized_embedding(self.b, fmt, fields, tokens, *shape, dtype=self.dt)
        return embedding(self.b, self.w("token_embd.weight", shape), tokens)

    # ---- the decoder ---------------------------------------------------------------
    def forward(self, tokens: Value, positions: Value, seq_lens: Value, kv: "_Stack") -> Value:
        """tokens[N,S], positions[N,S] -> logits[N,S,V]; `kv` runs the blocks over the cache."""
        b, cfg = self.b, self.cfg
        with b.at("token_embd"):
            h = self.embed(tokens)
            if cfg.embedding_scale != 1.0:
                h = self.scaled(h, cfg.embedding_scale)
        with b.at("rope"):
            freqs = b.dense(inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling), "f32")
            rotary = rope_table(b, positions, freqs)
        h = kv.run(h, positions, seq_lens, rotary)
        with b.at("output_norm"):
            h = rmsnorm(b, h, self.w("output_norm.weight", (cfg.hidden_size,)),
                        eps=cfg.rms_eps, dtype=self.dt)
        key = "token_embd.weight" if cfg.tie_embeddings else "output.weight"
        with b.at("output"):
            logits = self.linear(key, (cfg.vocab_size, cfg.hidden_size), h)
            if cfg.logit_scale != 1.0:
                logits = self.scaled(logits, cfg.logit_scale)
            return logits

    def scaled(self, x: Value, factor: float) -> Value:
        """x * factor (in f32, rounded to the activation dtype): Grok-1's embedding and
        output multipliers."""
        b, dt = self.b, self.dt
        c = b.scalar(factor, "f32")
        return b.map("bsd->bsd", [x], dt, lambda v: b.cast(b.mulf(b.cast(v, "f32"), c), dt))

    def block(self, i: int, h: Value, positions: Value, seq_lens: Value,
              rotary: tuple[Value, Value], kv, weights) -> Value:
        """One decoder block; `weights[name]` is a weight Value or (format, fields)."""
        b, cfg, dt = self.b, self.cfg, self.dt

        def linear_(name, x):
            """The block's weight `name` applied to x, located at blk.i.NAME (so a profile
            names the FFN's gate, up and down apart)."""
            w = weights[name]
            with b.at(f"blk.{i}.{name}"):
                if isinstance(w, tuple) and w[0] == "fp8" and self.fp8_dynamic:
                    return fp8_linear_tokens(b, x, *w[1], dtype=dt,
                                             ub=self.opts.fp8_activation_ub)
                if isinstance(w, tuple) and w[0] == "fp8":
                    return fp8_linear(b, x, *w[1], dtype=dt, top=self.opts.fp8_input_max)
                if isinstance(w, tuple):
                    return quantized_linear(b, x, w[0], w[1], block_shapes(cfg)[
                        f"blk.{{i}}.{name}.weight"][0], dtype=dt)
                return linear(b, x, w, dtype=dt)

        with b.at(f"blk.{i}.attn_norm"):
            x = rmsnorm(b, h, weights["attn_norm"], eps=cfg.rms_eps, dtype=dt)
        heads = {}
        for name, count in (("attn_q", cfg.n_heads), ("attn_k", cfg.n_kv_heads),
                            ("attn_v", cfg.n_kv_heads)):
            with b.at(f"blk.{i}.{name}"):
                y = linear_(name, x)
                n, s, _ = b.dims(y)
                heads[name] = b.reshape(y, [[0], [1], [2, 3]], [n, s, count, cfg.head_dim])
        with b.at(f"blk.{i}.rope"):
            q = rope(b, heads["attn_q"], *rotary, dtype=dt)
            k = rope(b, heads["attn_k"], *rotary, dtype=dt)
        with b.at(f"blk.{i}.attention"):
            k = b.transpose(k, [0, 2, 1, 3])  # [N,KVH,S,D]
            v = b.transpose(heads["attn_v"], [0, 2, 1, 3])
            n, s = b.dims(q)[:2]
            q = b.reshape(q, [[0], [1], [2, 3], [4]],
                          [n, s, cfg.n_kv_heads, cfg.group_size, cfg.head_dim])
            o = kv(i, q, k, v)  # the cache update and attention over it
            o = b.reshape(o, [[0], [1], [2, 3, 4]], [n, s, cfg.n_heads * cfg.head_dim])
        with b.at(f"blk.{i}.attn_output"):
            y = linear_("attn_output", o)
        if "attn_output_norm" in weights:  # Grok-1: the attention output normed, then added
            with b.at(f"blk.{i}.attn_output_norm"):
                y = rmsnorm(b, y, weights["attn_output_norm"], eps=cfg.rms_eps, dtype=dt)
        with b.at(f"blk.{i}.attn_output"):
            h = add(b, h, y)
        with b.at(f"blk.{i}.ffn_norm"):
            x = rmsnorm(b, h, weights["ffn_norm"], eps=cfg.rms_eps, dtype=dt)
        with b.at(f"blk.{i}.ffn"):
            y = self.family.ffn(self, i, x, weights, linear_)
        if "layer_output_norm" in weights:  # Grok-1: the FFN output normed, then added
            with b.at(f"blk.{i}.layer_output_norm"):
                y = rmsnorm(b, y, weights["layer_output_norm"], eps=cfg.rms_eps, dtype=dt)
        with b.at(f"blk.{i}.ffn"):
            return add(b, h, y)

    # ---- entry points --------------------------------------------------------------
    def cache_type(self):
        return self.b.tensor_type([None, self.cfg.page_elems(self.opts.block_seq_stride)], self.opts.cache_dtype)

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

    def prefill(self, bs: int):
        b = self.b
        i64 = "i64"
        args = [b.tensor_type([bs, None], i64), b.tensor_type([bs], i64),
                b.tensor_type([bs, None], i64), self.cache_type()]
        logits_t = b.tensor_type([bs, None, self.cfg.vocab_size], self.dt)
        name = f"prefill_bs{bs}"
        with b.function(f"{name}$impl", args, [logits_t, args[3]], private=True) as (
                tokens, seq_lens, pages, cache):
            # S is a multiple of the page size (docs/ABI.md): tell IREE (`util.assume.int`), so
            # prefill matmuls with their dynamic M get MFMA on gfx942.
            self.mark_entry(name, 3, divisors=(0, 1, self.opts.block_seq_stride))
            impl = b.current_function
            with b.at("positions"):
                n, s = b.dims(tokens)
                positions = b.generic("->bs", [], [b.empty([n, s], i64)],
                                      lambda _: b.cast(b.linalg_index(1), i64))
            stack = _Stack(self, name, self.view(cache), pages)
            logits = self.forward(tokens, positions, seq_lens, stack)
            b.ret(logits, kv_cache.cache_flat(b, stack.cache))
        build_entry(b, impl)

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
            impl = b.current_function
            with b.at("positions"):
                positions = b.reshape(start, [[0, 1]], [bs, 1])
            stack = _Stack(self, name, self.view(cache), pages, start)
            logits = self.forward(tokens, positions, seq_lens, stack)
            b.ret(logits, kv_cache.cache_flat(b, stack.cache))
        build_entry(b, impl)


class _Stack:
    """The decoder blocks of one entry point. Each layer is a call to a private layer
    function (one per entry and weight-format signature; IREE inlines it), taking that
    layer's weights and an opaque layer index: the IR has one block body per entry, passes
    work on it once, and every layer shares its kernels.

    Unrolled, each layer writes its K/V into the cache. As a loop (`layer_loop`) the cache
    is read-only inside the loop and the layers' K/V go to a loop-carried accumulator
    written once after it (see `kv_cache`: a cache carried through the loop gets copied)."""

    def __init__(self, m: "_Model", entry: str, cache6: Value, pages: Value,
                 start: Value | None = None):
        self.m, self.entry, self.cache, self.pages, self.start = m, entry, cache6, pages, start
        self.acc: Value | None = None  # the loop's K/V accumulator
        self.functions: dict[tuple, str] = {}
        # Decode: every layer's gather rows, once per step (kv_cache.decode_tables).
        self.tables: tuple[Value, ...] = ()
        if start is not None:
            with m.b.at("kv_cache"):
                self.tables = kv_cache.decode_tables(m.b, pages, start, m.cfg.n_layers,
                                                     m.opts.block_seq_stride)

    def run(self, h: Value, positions: Value, seq_lens: Value, rotary: tuple) -> Value:
        """Every decoder block: one call per layer, or one `scf.for` (`layer_loop`)."""
        if self.m.opts.layer_loop:
            return self.loop(h, positions, seq_lens, rotary)
        b = self.m.b
        for i in range(self.m.cfg.n_layers):
            with b.at(f"blk.{i}"):
                weights, formats = self.weights(lambda key, shape: (key, shape),
                                                f"blk.{i}.{{}}.weight")
                # Opaque, so the layer is a kernel operand and not a constant once inlined.
                layer = b.barrier(b.scalar(i, "i64"))
                h = self.call(h, positions, seq_lens, rotary, layer, weights, formats)
        return h

    def loop(self, h: Value, positions: Value, seq_lens: Value, rotary: tuple) -> Value:
        """`scf.for %l` over the layers: layer %l's weights are slices of the stacked
        globals; the carried values are pinned to the device at the top of the body
        (otherwise IREE copies them every iteration)."""
        m, b = self.m, self.m.b
        n = m.cfg.n_layers
        with b.at("blk"):
            stacked, formats = self.weights(lambda key, shape: (stacked_key(key), (n, *shape)),
                                            "blk.0.{}.weight")
            if self.start is None:
                acc = kv_cache.prefill_accumulator(b, self.cache, self.pages)
            else:
                acc = kv_cache.decode_accumulator(b, self.cache, b.shape(self.pages)[0])
            with b.loop(n, [h, acc]) as (op, l, (h_in, acc_in)):
                self.acc = b.pin(acc_in)
                weights = [b.layer_slice(w, l) for w in stacked]
                h_out = self.call(b.pin(h_in), positions, seq_lens, rotary, b.cast(l, "i64"),
                                  weights, formats)
                b.end_loop([h_out, self.acc])
            h, acc = op.results
        with b.at("kv_cache"):
            if self.start is None:
                self.cache = kv_cache.prefill_write(b, self.cache, acc, self.pages)
            else:
                self.cache = kv_cache.decode_write(b, self.cache, acc, self.pages, self.start)
        return h

    def weights(self, place, template: str) -> tuple[list[Value], tuple]:
        """One layer's weights (or their stacks) as call arguments, with their formats:
        `place(key, shape)` -> the (key, shape) of the global to load."""
        m = self.m
        values, formats = [], []

        def scalar(key, shape=()):  # a per-layer fp8 scale: [] (or [layers] stacked)
            key, shape = place(key, shape)
            return m.b.param(key, shape, "f32")
        for name in m.block_weights:
            layer_key = template.format(name)
            key, shape = place(layer_key, block_shapes(m.cfg)[f"blk.{{i}}.{name}.weight"])
            fmt = m.formats.get(layer_key)
            if fmt == "fp8":
                qs = fp8.weight_keys(key)[0]
                d = fp8.weight_keys(layer_key, m.opts.fp8_scales)[1]
                rows = (shape[-2],) if m.opts.fp8_scales == "per-channel" else ()
                if name in fp8.EXPERTS:  # a scale per expert [experts] (or [experts, out])
                    rows = (shape[-3], *rows)
                prefix = layer_key[:-len("weight")]  # "blk.{i}.NAME."
                values += [m.b.param(qs, shape, fp8.FP8), scalar(d, rows)]
                if not m.fp8_dynamic:
                    values.append(scalar(f"{prefix}q_input:rscale"))
            elif fmt is not None:
                lead = tuple(shape[:-2])
                fields = quant_format(fmt).field_shapes(*shape[-2:])
                values += [m.b.param(f"{key}:{field}", (*lead, *fshape), fdtype)
                           for field, (fshape, fdtype) in fields.items()]
            else:
                values.append(m.w(key, shape))
            formats.append(fmt)
        if m.kv_fp8:  # the layer's Q and K/V scales (fp8.q_scale_key, fp8.kv_scale_key)
            prefix = template.split("{}")[0]  # "blk.{i}."
            values += [scalar(f"{prefix}attn_q.q_output:rscale"),
                       scalar(f"{prefix}kv_cache.quantizer:rscale")]
        return values, tuple(formats)

    def call(self, h, positions, seq_lens, rotary, layer, weights, formats) -> Value:
        """Call the layer function; updates the cache (unrolled) or the accumulator."""
        extra = [self.pages] + ([self.start, *self.tables] if self.start is not None else [])
        state = [self.cache] + ([self.acc] if self.acc is not None else [])
        args = [h, positions, seq_lens, *rotary, *extra, *state, layer, *weights]
        fn = self.functions.get(formats) or self.define(formats, args)
        h, updated = self.m.b.call(fn, args, [h.type, state[-1].type])
        if self.acc is not None:
            self.acc = updated
        else:
            self.cache = updated
        return h

    def define(self, formats: tuple, args: list) -> str:
        m, b = self.m, self.m.b
        name = f"{self.entry}$layer{len(self.functions)}"
        looped = self.acc is not None
        state_t = (self.acc if looped else self.cache).type
        with b.function(name, [a.type for a in args], [args[0].type, state_t],
                        private=True) as params, b.at("blk"):
            h, positions, seq_lens, cos, sin, pages = params[:6]
            rest = params[6:]
            start = read_rows = write_rows = None
            if self.start is not None:
                start, read_rows, write_rows, rest = rest[0], rest[1], rest[2], rest[3:]
            cache, rest = rest[0], rest[1:]
            acc = None
            if looped:
                acc, rest = rest[0], rest[1:]
            layer, rest = rest[0], rest[1:]
            weights = {}
            for wname, fmt in zip(m.block_weights, formats):
                n = 1 if fmt is None else (2 if m.fp8_dynamic else 3) if fmt == "fp8" else \
                    len(quant_format(fmt).fields)
                weights[wname] = rest[0] if fmt is None else (fmt, rest[:n])
                rest = rest[n:]
            scales = None
            if m.kv_fp8:
                q_rscale, kv_rscale = rest[:2]
                qk = b.map(",->", [q_rscale, kv_rscale], "f32", b.mulf)
                scales = (qk, kv_rscale)
            state = {"cache": cache, "acc": acc}

            form = m.attention
            # The loop reads a read-only cache; the paged kernels take f16/bf16/f32 only.
            paged = form == "paged" and not looped and not m.kv_fp8

            def rows(which):  # this layer's gather rows of K (0) or V (1)
                return kv_cache.layer_rows(b, read_rows, layer, which)

            def gathered(k, v):
                """(K, V) attention reads: the fresh ones (prefill) or the pages (decode)."""
                if looped and start is None:  # prefill: fresh K/V, kept for the write
                    state["acc"] = kv_cache.prefill_accumulate(b, state["acc"], k, v, layer)
                    return k, v
                # Decode: the fused op reads the gathered pages as they are ([N,B,KVH,
                # stride,D], the gathers fuse into its dispatch); decomposed reads [N,KVH,T,D].
                if form == "decomposed":
                    def read(c, which, separate=True):
                        return kv_cache.read_pages(b, c, rows(which), separate)
                else:
                    def read(c, which, separate=True):
                        return kv_cache.read_blocks(b, c, rows(which))
                if looped:  # decode: the cache's pages with this token's K/V in place
                    state["acc"] = kv_cache.decode_accumulate(b, state["acc"], k, v, layer)
                    return tuple(kv_cache.with_position(b, read(cache, which, False), x, start)
                                 for which, x in ((0, k), (1, v)))
                if start is None:  # prefill: the fresh K/V are the keys and values
                    state["cache"] = kv_cache.write_blocks(b, state["cache"], k, v, pages, layer)
                    return k, v
                c = state["cache"] = kv_cache.write_position(
                    b, state["cache"], k, v, kv_cache.layer_rows(b, write_rows, layer), start)
                return read(c, 0), read(c, 1)

            def kv(_, q, k, v):
                if m.kv_fp8:  # Q, K and V in fp8 alike: K/V as stored in the cache
                    q, k, v = (quantize(b, x, s) for x, s in ((q, q_rscale), (k, kv_rscale),
                                                              (v, kv_rscale)))
                if paged and start is None:
                    o, state["cache"] = paged_prefill(b, q, k, v, seq_lens, state["cache"],
                                                      pages, layer, dtype=m.dt)
                    return o
                if paged:
                    with b.at("blk.*.kv_cache"):
                        state["cache"] = kv_cache.write_position(
                            b, state["cache"], k, v, kv_cache.layer_rows(b, write_rows, layer),
                            start)
                    return paged_decode(b, q, state["cache"], rows(0), rows(1), seq_lens,
                                        dtype=m.dt)
                with b.at("blk.*.kv_cache"):
                    k_all, v_all = gathered(k, v)
                # In the loop, `paged` attends with the fused op (same numbers): the cache
                # there does not hold this layer's K/V yet (see kv_cache).
                how = "fused" if form == "paged" else form
                extra = {}
                if how == "fused" and start is None:  # prefill: T = pages * stride
                    extra["blocks"] = (b.dims(pages)[1], m.opts.block_seq_stride)
                if m.cfg.attn_softcap or m.cfg.attn_scale is not None:  # decomposed only
                    extra.update(multiplier=m.cfg.attn_scale, softcap=m.cfg.attn_softcap)
                return ATTENTION[how](b, q, k_all, v_all, positions, seq_lens, dtype=m.dt,
                                      scales=scales, **extra)

            h = m.block("*", h, positions, seq_lens, (cos, sin), kv, weights)
            b.ret(h, state["acc"] if looped else state["cache"])
        self.functions[formats] = name
        return name


def emit_module(cfg: LlamaConfig, opts: EmitOptions = EmitOptions(), *, context=None):
    """Build the module (an `ir.Module`) in `context` (a fresh one when None)."""
    from halo_mlir.model.attention_form import resolve

    opts, _ = resolve(cfg, opts)
    b = Builder(context)
    with b.context, b.at("halo_mlir"):
        module = b.new_module()
        m = _Model(b, cfg, opts)
        for bs in sorted(set(opts.bs_prefill)):
            m.prefill(bs)
        for bs in sorted(set(opts.bs_decode)):
            m.decode(bs)
        if opts.moe_parallel == "expert" and opts.moe_groups > 1:
            _split_experts(module, opts.moe_groups)
        if not module.operation.verify():
            raise HaloError("internal error: the emitted module does not verify")
    return module


def _split_experts(module, groups: int) -> None:
    """Expert parallelism: the stacked experts' globals carry their split (`halo.split`
    along the expert dim, which the sharding pass's plan then keeps), so the module says
    itself how it shards (`opt --shard tp=N` too)."""
    from iree.compiler import ir

    from halo_mlir.sharding_passes.pipeline import param_key
    from halo_mlir.sharding_passes.plan import EXPERT_STYLES, shard_key, weight_sharding
    from halo_mlir.sharding_passes.shard import split_attr

    for op in module.body.operations:
        key = param_key(op) if op.operation.name == "util.global" else None
        if key and any(name in key for name in EXPERT_STYLES):
            s = weight_sharding(key, None, groups, moe="expert")
            op.attributes["halo.split"] = ir.DenseI64ArrayAttr.get(split_attr(s))
            op.attributes["halo.shard_name"] = ir.StringAttr.get(
                shard_key(key, 0, "expert").rsplit(".", 2)[1])
