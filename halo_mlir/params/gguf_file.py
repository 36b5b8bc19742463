"""GGUF files (llama.cpp): hyperparameters from metadata, tensors read in row blocks.

Metadata and tensor info come from the `gguf` package; tensor data is read with pread, so
importing a many-GB file keeps resident memory at one block.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from halo_mlir.config import LLAMA3_ROPE_SCALING, LlamaConfig
from halo_mlir.errors import HaloError
from halo_mlir.io_utils import check_header
from halo_mlir.params.fd_file import FdFile
from halo_mlir.ops.rope import inv_freq

SUPPORTED_ARCHS = ("llama",)


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
        self._fd = os.open(self.path, os.O_RDONLY)


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

    def config(self) -> LlamaConfig:
        """Hyperparameters from the `{arch}.*` metadata keys."""
        arch = self.architecture
        if arch not in SUPPORTED_ARCHS:
            raise HaloError(f"{self.path}: architecture {arch!r} is not supported; halo_mlir "
                            f"emits {', '.join(SUPPORTED_ARCHS)} models")
        a = lambda k: self.require(f"{arch}.{k}")  # noqa: E731
        if int(self.get(f"{arch}.expert_count") or 0):
            raise HaloError(f"{self.path}: a mixture-of-experts GGUF ({arch}.expert_count = "
                            f"{self.get(f'{arch}.expert_count')}) is not supported yet; import "
                            "the HF safetensors checkpoint instead")
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
            name=str(self.get("general.name", self.path.stem)))
        return cfg

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
    def qtype(self, name: str) -> str:
        return self.tensors[name].tensor_type.name

    def shape(self, name: str) -> tuple[int, ...]:
        """Logical shape in HF order ([out, in]); GGUF lists dimensions reversed."""
        return tuple(int(d) for d in reversed(self.tensors[name].shape.tolist()))

    def read_rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """Raw rows [start, stop): for block formats, uint8 [rows, bytes per row]."""
        import gguf

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
        qtype = self.tensors[name].tensor_type
        if qtype == gguf.GGMLQuantizationType.F32:
            return raw
        try:
            return gguf.quants.dequantize(raw, qtype).reshape(stop - start, -1).astype(np.float32)
        except NotImplementedError:
            raise HaloError(f"{self.path}: tensor {name} has quantization {qtype.name}, "
                            "which cannot be dequantized; supported: F32, F16, BF16, Q8_0, "
                            "Q4_1, Q4_K and the other formats of the gguf package") from None
