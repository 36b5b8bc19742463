"""Greedy generation over the paged KV cache: page allocator, prefill, decode loop.

`Generator` runs a compiled module (bs 1 entry points) through `runtime.Program`;
`build_from_gguf` makes that module and its parameters from a GGUF file, cached on disk by
content hash so the second run starts in seconds.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from halo_mlir.errors import HaloError

DEVICES = {  # --device -> (compile target, runtime driver)
    "cpu": ("cpu", "local-task"),
    "cuda": ("cuda", "cuda"),
    "hip": ("gfx942", "hip"),
}
NP_DTYPES = {"f32": np.float32, "f16": np.float16}


class PageAllocator:
    """Hands out KV-cache pages; a sequence owns its pages until it frees them."""

    def __init__(self, n_pages: int):
        self.free_pages = list(range(n_pages - 1, -1, -1))

    def alloc(self, n: int) -> list[int]:
        if n > len(self.free_pages):
            raise HaloError(f"out of KV-cache pages: need {n}, {len(self.free_pages)} free; "
                            "raise --pages or lower --max-tokens")
        return [self.free_pages.pop() for _ in range(n)]

    def free(self, pages: list[int]) -> None:
        self.free_pages.extend(reversed(pages))


@dataclasses.dataclass
class ModelFiles:
    vmfb: Path
    params: list[Path]
    config: dict  # the shortfin config.json contents


def cache_numpy_dtype(name: str):
    """config.json's kv_cache_dtype -> the numpy dtype of a host cache array."""
    import ml_dtypes

    table = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16,
             "float8_e4m3fnuz": ml_dtypes.float8_e4m3fnuz}
    try:
        return table[name]
    except KeyError:
        raise HaloError(f"kv_cache_dtype {name} is not supported here; choose one of "
                        f"{', '.join(table)}") from None


class Generator:
    def __init__(self, files: ModelFiles, *, driver: str = "local-task", pages: int = 64):
        from halo_mlir.runtime import Program

        kv = files.config["paged_kv_cache"]
        self.stride = kv["block_seq_stride"]
        self.page_elems = kv["paged_kv_block_size_elements_per_device"][0]
        self.dtype = cache_numpy_dtype(kv["kv_cache_dtype"])
        self.max_len = files.config["max_seq_len"]
        self.tp = len(kv["paged_kv_block_size_elements_per_device"])
        self.program = Program(files.vmfb, files.params, driver=driver, n_devices=self.tp)
        self.caches = [self.program.device_array(np.zeros((pages, self.page_elems), self.dtype), i)
                       for i in range(self.tp)]  # one per device, each its kv heads
        self.pages = PageAllocator(pages)

    def close(self):
        del self.caches
        self.program.close()

    def _padded_ids(self, owned: list[int], blocks: int) -> np.ndarray:
        return np.array([owned + [owned[-1]] * (blocks - len(owned))], np.int64)

    def prefill_logits(self, ids: list[int], owned: list[int]) -> np.ndarray:
        """logits [len(ids), vocab] (f32) for one sequence; writes its K/V into `owned`."""
        blocks = -(-len(ids) // self.stride)
        tokens = np.zeros((1, blocks * self.stride), np.int64)
        tokens[0, :len(ids)] = ids
        out = self.program.prefill(tokens, np.array([len(ids)], np.int64),
                                   self._padded_ids(owned, blocks), self.caches)
        return out[0, :len(ids)].astype(np.float32)

    def generate(self, ids: list[int], max_tokens: int,
                 stop: Callable[[int], bool] = lambda t: False,
                 record: list | None = None) -> Iterator[int]:
        """Greedy continuation of `ids`, one token at a time. `record`, when given,
        receives the logits [vocab] each token was chosen from."""
        if not ids:
            raise HaloError("the prompt is empty")
        total = len(ids) + max_tokens
        if total > self.max_len:
            raise HaloError(f"prompt + --max-tokens = {total} exceeds the model's max_seq_len "
                            f"{self.max_len}")
        owned = self.pages.alloc(-(-len(ids) // self.stride))
        try:
            logits = self.prefill_logits(ids, owned)[-1]
            token = int(logits.argmax())
            pos = len(ids)
            for i in range(max_tokens):
                if record is not None:
                    record.append(logits)
                yield token
                if stop(token) or i == max_tokens - 1:
                    return
                if pos // self.stride >= len(owned):
                    owned += self.pages.alloc(1)
                out = self.program.decode(
                    np.array([[token]], np.int64), np.array([pos + 1], np.int64),
                    np.array([pos], np.int64), np.array([owned], np.int64), self.caches)
                logits = out[0, 0].astype(np.float32)
                token = int(logits.argmax())
                pos += 1
        finally:
            self.pages.free(owned)


# ---- building from a GGUF, cached ------------------------------------------------------
def cache_dir() -> Path:
    root = os.environ.get("HALO_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "halo_mlir")
    return Path(root)


def file_digest(path: Path) -> str:
    """sha256 of the file's content, remembered per (path, size, mtime) so a large file is
    hashed once."""
    st = path.stat()
    memo = cache_dir() / "digests.json"
    key = f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}"
    known = json.loads(memo.read_text()) if memo.exists() else {}
    if key not in known:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 24), b""):
                h.update(chunk)
        known[key] = h.hexdigest()
        memo.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo.with_suffix(".partial")
        tmp.write_text(json.dumps(known))
        os.replace(tmp, memo)
    return known[key]


def _import_gguf_fp8(gguf: Path, out: Path, layout: str, progress, echo) -> None:
    """`import-params --quantize fp8` of a GGUF: scales calibrated on the shipped text with
    the GGUF's tokenizer."""
    from halo_mlir.params import calibrate
    from halo_mlir.params.fp8_import import import_fp8
    from halo_mlir.params.sources import GgufSource

    with GgufSource(gguf) as source:
        ids = calibrate.calibration_ids(source.cfg.vocab_size, tokenizer=source.tokenizer())
        echo(f"calibrating fp8 scales on {len(ids)} tokens")
        import_fp8(source, out, ids, layout=layout, progress=progress)


def build_from_gguf(g, *, dtype: str, keep_quantized: bool, device: str,
                    layer_loop: bool = False, echo=print) -> ModelFiles:
    """Import, emit and compile (bs 1) what `Generator` needs from the open GgufFile `g`;
    reuse cached results."""
    from iree.compiler import version as iree_version

    from halo_mlir import __version__
    from halo_mlir.api import module_text, write_module
    from halo_mlir.compile import compile_file
    from halo_mlir.model.llama import EmitOptions, emit_module
    from halo_mlir.model.service_config import service_config
    from halo_mlir.params.gguf_import import import_gguf, weight_formats
    from halo_mlir.progress import Progress

    target, _ = DEVICES[device]
    gguf = g.path
    digest = file_digest(gguf)
    layout = "stacked" if layer_loop else "per-layer"
    params_key = hashlib.sha256(
        f"{digest}:{dtype}:{keep_quantized}:{layout}:{__version__}".encode())
    params = cache_dir() / "params" / f"{params_key.hexdigest()[:24]}.irpa"
    if not params.exists():
        params.parent.mkdir(parents=True, exist_ok=True)
        echo(f"importing {gguf.name} -> {params}")
        progress = Progress("importing")
        try:
            if dtype == "fp8":
                _import_gguf_fp8(gguf, params, layout, progress, echo)
            else:
                import_gguf(gguf, params, dtype=dtype, keep_quantized=keep_quantized,
                            progress=progress, layout=layout, note=echo)
        finally:
            progress.close()
    cfg = g.config()
    formats = tuple(sorted(weight_formats(g, cfg, keep_quantized).items()))
    opts = EmitOptions(bs_prefill=(1,), bs_decode=(1,), dtype=dtype, weight_formats=formats,
                       layer_loop=layer_loop, quant_lanes=16 if target.startswith("cpu") else 0)
    module = emit_module(cfg, opts)
    with module.context:
        text = module_text(module, locations=False)
    vmfb_key = hashlib.sha256(f"{text}:{target}:{iree_version.VERSION}".encode()).hexdigest()
    out = cache_dir() / "modules" / vmfb_key[:24]
    vmfb = out / "model.vmfb"
    if not vmfb.exists():
        out.mkdir(parents=True, exist_ok=True)
        with module.context:
            write_module(module, out / "model.mlir", locations=True)
        compile_file(out / "model.mlir", vmfb, target=target, echo=echo)
    return ModelFiles(vmfb, [params], service_config(cfg, opts))
