"""GGUF files (llama.cpp): hyperparameters from metadata, tensors read in row blocks.

Metadata and tensor info come from the `gguf` package; tensor data is read with pread, so
importing a many-GB file keeps resident memory at one block.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

from halo_mlir.config import LLAMA3_ROPE_SCALING, LlamaConfig, inv_freq
from halo_mlir.errors import HaloError
from halo_mlir.support.io import check_header
from halo_mlir.params.fd_file import FdFile

SUPPORTED_ARCHS = ("llama", "grok")

# llama.cpp's mixture-of-experts FFN (gguf-py MODEL_TENSOR.FFN_*_EXP): the router
# `ffn_gate_inp` [experts, hidden] and the experts stacked, `ffn_gate_exps` / `ffn_up_exps`
# [experts, ffn, hidden] and `ffn_down_exps` [experts, hidden, ffn] (HF order; GGUF lists the
# dimensions reversed). Files converted before the stacked names hold one 2-D tensor per
# expert, `blk.N.ffn_gate.E.weight` and so on; they are read as the stacked tensor.
EXPERT_KINDS = ("gate", "up", "down")
_PER_EXPERT = re.compile(r"^blk\.(\d+)\.ffn_(gate|up|down)\.(\d+)\.weight$")
_LAYOUT_HELP = ("halo_mlir reads llama.cpp's stacked blk.N.ffn_{gate,up,down}_exps tensors "
                "or the older per-expert blk.N.ffn_{gate,up,down}.E ones")

# Grok-1's published constants (xai-org/grok-1 run.py / model.py), used for a `grok` GGUF
# without the keys (gguf-py's key names): metadata key (after `grok.`) -> (LlamaConfig
# field, default).
GROK_SCALES = {
    "attention.output_scale": ("attn_scale", 0.08838834764831845),
    "attn_logit_softcapping": ("attn_softcap", 30.0),
    "embedding_scale": ("embedding_scale", 78.38367176906169),
    "logit_scale": ("logit_scale", 0.5773502691896257),
}


class GgufFile(FdFile):
    def __init__(self, path: str | Path):
        import gguf

        self.path = check_header(path, "a GGUF file", (b"GGUF",))
        try:
            self.reader = gguf.GGUFReader(str(self.path))
        except Exception as e:  # the gguf package raises bare ValueError/IndexError
            raise HaloError(f"{self.path}: not a readable GGUF file ({e}); is it truncated?") \
                from None
        size = self.path.stat().st_size
        self.tensors = {t.name: t for t in self.reader.tensors}
        for t in self.reader.tensors:
            if t.data_offset + t.n_bytes > size:
                raise HaloError(f"{self.path}: tensor {t.name} extends past the end of the "
                                "file; the file is truncated, download it again")
        self.split_experts = self._group_per_expert()
        self._fd = os.open(self.path, os.O_RDONLY)

    def _group_per_expert(self) -> dict[str, list[str]]:
        """Stacked key (`blk.N.ffn_gate_exps.weight`) -> its per-expert tensors in expert
        order, for a file in the older per-expert layout (when the stacked one is absent)."""
        found: dict[str, dict[int, str]] = {}
        for name in self.tensors:
            m = _PER_EXPERT.match(name)
            if m:
                key = f"blk.{m.group(1)}.ffn_{m.group(2)}_exps.weight"
                found.setdefault(key, {})[int(m.group(3))] = name
        out = {}
        for key, by_expert in found.items():
            if key in self.tensors:
                continue
            names = [by_expert.get(e) for e in range(len(by_expert))]
            if None in names:
                raise HaloError(f"{self.path}: the per-expert tensors of {key} are experts "
                                f"{sorted(by_expert)}, not 0..{len(by_expert) - 1}; the file "
                                "is incomplete")
            kinds = {(self.tensors[n].tensor_type, tuple(self.tensors[n].shape.tolist()))
                     for n in names}
            if len(kinds) > 1:
                raise HaloError(f"{self.path}: the per-expert tensors of {key} differ in type "
                                f"or shape ({names[0]} vs the others); {_LAYOUT_HELP}")
            out[key] = names
        return out


    # ---- metadata --------------------------------------------------------------------
    def get(self, key: str, default=None):
        field = self.reader.fields.get(key)
        return default if field is None else field.contents()

    def require(self, key: str):
        value = self.get(key)
        if value is None:
            raise HaloError(f"{self.path}: metadata key {key} is missing; not a complete "
                            "llama GGUF")
        return value

    @property
    def architecture(self) -> str:
        return str(self.get("general.architecture", "?"))

    def config(self, *, check_experts: bool = True) -> LlamaConfig:
        """Hyperparameters from the `{arch}.*` metadata keys; for a mixture of experts, the
        router and expert tensors checked against them (`check_experts=False`: metadata
        only)."""
        arch = self.architecture
        if arch not in SUPPORTED_ARCHS:
            raise HaloError(f"{self.path}: architecture {arch!r} is not supported; halo_mlir "
                            f"emits {', '.join(SUPPORTED_ARCHS)} models")
        a = lambda k: self.require(f"{arch}.{k}")  # noqa: E731
        family = {}
        if arch == "grok":  # Grok-1: 8 experts top-2 (not renormalized), GELU (tanh) experts
            family = dict(family="grok", moe_renormalize=False, ffn_activation="gelu_tanh",
                          **{field: float(self.get(f"{arch}.{key}", default))
                             for key, (field, default) in GROK_SCALES.items()})
        elif int(self.get(f"{arch}.expert_count") or 0):
            # llama.cpp writes Mixtral as a `llama` GGUF with expert metadata and tensors:
            # top-k of the router's softmax, the k weights renormalized, SiLU experts.
            family = dict(family="mixtral", moe_renormalize=True)
        elif self.has("blk.0.ffn_gate_exps.weight"):
            raise HaloError(f"{self.path}: the file has expert tensors (blk.0.ffn_gate_exps."
                            f"weight) but no {arch}.expert_count; set {arch}.expert_count and "
                            f"{arch}.expert_used_count in its metadata")
        if family:
            family.update(self._expert_counts(arch))
        heads = int(a("attention.head_count"))
        hidden = int(a("embedding_length"))
        tokens = self.get("tokenizer.ggml.tokens")
        vocab = self.get(f"{arch}.vocab_size") or (len(tokens) if tokens else None)
        if vocab is None:
            vocab = int(self.shape("token_embd.weight")[0])
        head_dim = int(self.get(f"{arch}.rope.dimension_count") or hidden // heads)
        theta = float(self.get(f"{arch}.rope.freq_base", 10000.0))
        cfg = LlamaConfig(
            hidden_size=hidden, n_layers=int(a("block_count")), n_heads=heads,
            n_kv_heads=int(self.get(f"{arch}.attention.head_count_kv") or heads),
            head_dim=head_dim, ffn_dim=int(a("feed_forward_length")), vocab_size=int(vocab),
            rope_theta=theta,
            rms_eps=float(self.get(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
            rope_scaling=self._rope_scaling(head_dim, theta),
            tie_embeddings="output.weight" not in self.tensors,
            max_seq_len=int(self.get(f"{arch}.context_length", 8192)),
            name=str(self.get("general.name", self.path.stem)), **family)
        if cfg.is_moe and check_experts:
            self._check_experts(cfg, arch)
        return cfg

    def _expert_counts(self, arch: str) -> dict:
        """n_experts and experts_per_token from `{arch}.expert_count` / `expert_used_count`,
        checked: a token runs 1..expert_count experts."""
        experts = int(self.require(f"{arch}.expert_count"))
        used = int(self.require(f"{arch}.expert_used_count"))
        if not 1 <= used <= experts:
            raise HaloError(f"{self.path}: {arch}.expert_used_count = {used} (experts a token "
                            f"runs) is not in 1..{arch}.expert_count = {experts}; fix the "
                            "metadata (gguf-py's gguf_set_metadata.py) or use the file it was "
                            "converted from")
        return dict(n_experts=experts, experts_per_token=used)

    def _check_experts(self, cfg: LlamaConfig, arch: str) -> None:
        """Every layer's router and experts are there, in a layout halo_mlir reads, with as
        many experts as the metadata says (emit reads no tensor, so a mismatch would
        otherwise show only when the parameters are loaded)."""
        e, d, f = cfg.n_experts, cfg.hidden_size, cfg.ffn_dim
        want = {"gate": (e, f, d), "up": (e, f, d), "down": (e, d, f)}
        names = {"gate": "[experts, ffn, hidden]", "up": "[experts, ffn, hidden]",
                 "down": "[experts, hidden, ffn]"}
        for i in range(cfg.n_layers):
            router = f"blk.{i}.ffn_gate_inp.weight"
            if not self.has(router):
                raise HaloError(f"{self.path}: a mixture-of-experts GGUF ({arch}.expert_count = "
                                f"{e}) without the router {router}; the file is incomplete")
            for kind in EXPERT_KINDS:
                key = f"blk.{i}.ffn_{kind}_exps.weight"
                if not self.has(key):
                    raise HaloError(f"{self.path}: a mixture-of-experts GGUF ({arch}.expert_count"
                                    f" = {e}) without {key} or blk.{i}.ffn_{kind}.0.weight: an "
                                    f"unknown expert layout; {_LAYOUT_HELP}")
                shape = self.shape(key)
                if len(shape) == 3 and shape[0] != e and shape[1:] == want[kind][1:]:
                    raise HaloError(f"{self.path}: {arch}.expert_count = {e} disagrees with "
                                    f"{key}, which holds {shape[0]} experts; fix the metadata "
                                    "or use the file it was converted from")
                if shape != want[kind]:
                    raise HaloError(f"{self.path}: {key} has shape {list(shape)}, not "
                                    f"{names[kind]} = {list(want[kind])} as the metadata implies "
                                    f"(expert_count, feed_forward_length, embedding_length): an "
                                    f"unknown expert layout; {_LAYOUT_HELP}")
            if self.shape(router) != (e, d):
                raise HaloError(f"{self.path}: {router} has shape {list(self.shape(router))}, "
                                f"not [experts, hidden] = {[e, d]}; {arch}.expert_count = {e} "
                                "disagrees with the router")

    def _rope_scaling(self, head_dim: int, theta: float) -> dict | None:
        """llama.cpp stores llama3 scaling as per-frequency divisors (`rope_freqs.weight`);
        accept them when they are the llama3 ones."""
        if "rope_freqs.weight" not in self.tensors:
            return None
        factors = self.read_rows("rope_freqs.weight", 0, 1).astype(np.float64).reshape(-1)
        plain = inv_freq(head_dim, theta, None)
        llama3 = inv_freq(head_dim, theta, LLAMA3_ROPE_SCALING)
        if not np.allclose(plain / factors, llama3, rtol=1e-4):
            raise HaloError(f"{self.path}: rope_freqs.weight is not llama3 scaling with "
                            "factor 8; other RoPE scalings are not supported")
        return dict(LLAMA3_ROPE_SCALING)

    # ---- tensors ---------------------------------------------------------------------
    def has(self, name: str) -> bool:
        """A tensor of the file, or a stacked expert tensor made of per-expert ones."""
        return name in self.tensors or name in self.split_experts

    def qtype(self, name: str) -> str:
        name = self.split_experts.get(name, [name])[0]
        return self.tensors[name].tensor_type.name

    def shape(self, name: str) -> tuple[int, ...]:
        """Logical shape in HF order ([out, in]); GGUF lists dimensions reversed."""
        if name in self.split_experts:
            parts = self.split_experts[name]
            return (len(parts), *self.shape(parts[0]))
        return tuple(int(d) for d in reversed(self.tensors[name].shape.tolist()))

    def read_rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """Raw rows [start, stop): for block formats, uint8 [rows, bytes per row]."""
        import gguf

        if name in self.split_experts:  # rows of expert e are [e * per, (e + 1) * per)
            parts, per = self.split_experts[name], self.shape(name)[1]
            return np.concatenate([
                self.read_rows(parts[e], max(start, e * per) - e * per,
                               min(stop, (e + 1) * per) - e * per)
                for e in range(start // per, -(-stop // per))])
        t = self.tensors[name]
        rows = int(np.prod(self.shape(name)[:-1])) if len(self.shape(name)) > 1 else 1
        row_bytes = t.n_bytes // rows
        data = os.pread(self._fd, (stop - start) * row_bytes, t.data_offset + start * row_bytes)
        qtype = t.tensor_type
        if qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            dtype = np.float32 if qtype == gguf.GGMLQuantizationType.F32 else np.float16
            return np.frombuffer(data, dtype).reshape(stop - start, -1)
        return np.frombuffer(data, np.uint8).reshape(stop - start, row_bytes)

    def rows_f32(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) dequantized to f32 (by the gguf package)."""
        import gguf

        raw = self.read_rows(name, start, stop)
        qtype = gguf.GGMLQuantizationType[self.qtype(name)]
        if qtype == gguf.GGMLQuantizationType.F32:
            return raw
        try:
            return gguf.quants.dequantize(raw, qtype).reshape(stop - start, -1).astype(np.float32)
        except NotImplementedError:
            raise HaloError(f"{self.path}: tensor {name} has quantization {qtype.name}, "
                            "which cannot be dequantized; supported: F32, F16, BF16, Q8_0, "
                            "Q4_1, Q4_K and the other formats of the gguf package") from None
