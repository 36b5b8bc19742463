"""Where a model's hyperparameters come from: a preset, an HF config.json or a GGUF's
metadata, with the GGUF's kept-quantized weight formats, checked for a TP degree before
anything is built. One place for `emit`, `plan`, `export-shortfin` and `generate`."""

from __future__ import annotations

import dataclasses

from halo_mlir import config
from halo_mlir.config import LlamaConfig
from halo_mlir.errors import HaloError
from halo_mlir.params.names import param_shapes
from halo_mlir.sharding_passes.plan import check_divisible, check_quantized_split

SOURCES = ("--model", "--hf-config", "--gguf")


@dataclasses.dataclass(frozen=True)
class ModelSource:
    cfg: LlamaConfig
    # Kept-quantized weights of the emitted layers: ((key, format), ...), sorted.
    formats: tuple[tuple[str, str], ...] = ()
    # What the user should know (weights dequantized after all, and why).
    notes: tuple[str, ...] = ()


def load_model(*, model: str | None = None, hf_config: str | None = None,
               gguf: str | None = None, layers: int | None = None,
               keep_quantized: bool = False, tp: int = 1, layer_loop: bool = False,
               dtype: str = "f16", sources: tuple[str, ...] = SOURCES) -> ModelSource:
    """The model of exactly one of a preset, an HF config, a GGUF file. `sources`: the flags
    the caller has, named in the errors. Kept-quantized weights are checked to split `tp`
    ways at block boundaries; with `layer_loop` a kind whose layers mix formats is
    dequantized (to `dtype`; gguf_import.layer_loop_note)."""
    given = [name for name, v in (("--model", model), ("--hf-config", hf_config),
                                  ("--gguf", gguf)) if v]
    if len(given) > 1:
        raise HaloError(f"pass one of {', '.join(sources)} (got {' and '.join(given)})")
    if not given:
        files = {"--hf-config": "--hf-config config.json", "--gguf": "--gguf FILE"}
        others = " or ".join(files[s] for s in sources if s in files)
        raise HaloError(f"no model: pass --model PRESET (one of {', '.join(config.PRESETS)}) "
                        f"or {others}")
    if keep_quantized and not gguf:
        raise HaloError("--keep-quantized needs --gguf (the weights' formats come from it)")
    formats, notes = {}, ()
    if gguf:
        from halo_mlir.params.gguf_file import GgufFile
        from halo_mlir.params.gguf_import import (dequantized_note, layer_loop_note,
                                                  weight_formats)

        with GgufFile(gguf) as g:
            cfg = g.config()
            formats = weight_formats(g, cfg, keep_quantized, layer_loop=layer_loop)
            if tp > 1:
                check_quantized_split(formats, param_shapes(cfg), tp)
            if keep_quantized:
                notes = tuple(n for n in (dequantized_note(g, cfg),
                                          layer_loop and layer_loop_note(g, cfg, dtype)) if n)
    elif hf_config:
        cfg = config.from_hf_config(hf_config)
    else:
        cfg = config.preset(model)
    cfg = cfg.with_layers(layers)
    kept = tuple(sorted((k, f) for k, f in formats.items() if _in_layers(k, cfg.n_layers)))
    return ModelSource(cfg, kept, notes)


def check_tp(cfg: LlamaConfig, formats: dict[str, str], tp: int, moe: str = "ffn") -> None:
    """Everything `tp` devices must divide: heads, ffn and hidden sizes (or the experts, for
    `moe` "expert"), and kept-quantized weights at block boundaries."""
    check_divisible(cfg, tp, moe)
    check_quantized_split(formats, param_shapes(cfg), tp)


def _in_layers(key: str, n_layers: int) -> bool:
    return not key.startswith("blk.") or int(key.split(".")[1]) < n_layers
