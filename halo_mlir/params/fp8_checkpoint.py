"""Published FP8 checkpoints (already quantized, OCP e4m3fn): their scheme, read from
config.json's `quantization_config`, and their import to the FP8 parameters of docs/ABI.md
without dequantizing (docs/fp8-checkpoints.md).

Two layouts: compressed-tensors (`quant_method` "compressed-tensors", format
`float-quantized`: `NAME.weight` F8_E4M3, `NAME.weight_scale` [1] or [out, 1], a static
`NAME.input_scale` [1] or none for dynamic per-token inputs; `ignore` and `config_groups`
`targets` choose the linears) and fbgemm (`quant_method` "fbgemm_fp8": `NAME.weight`
F8_E4M3, `NAME.weight_scale` [out, 1], inputs quantized per token at run time with their
amax bounded by `activation_scale_ub`; `modules_to_not_convert` stay in floats).

Each fp8 linear KEY is written as `KEY:qs` f8E4M3FNUZ with the checkpoint's bits (0x80, the
e4m3fn -0, as 0x00) and `KEY:d` / `KEY:d_rows` = 2 * weight_scale (a byte means half its
e4m3fn value in fnuz: quantization/fp8.py); a static input scale as `q_input:rscale` =
2 * input_scale. Every other linear stays a float `KEY` in the import's dtype.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
from pathlib import Path
from typing import Callable

import numpy as np

from halo_mlir.config import LlamaConfig
from halo_mlir.errors import HaloError
from halo_mlir.params.names import hf_sources, param_shapes
from halo_mlir.params.safetensors_file import SafetensorsFile
from halo_mlir.quantization import fp8

LAYOUTS = ("compressed-tensors", "fbgemm_fp8")
INPUT_SCALES = ("static", "dynamic")
# compressed-tensors formats whose fp8 weights are plain F8_E4M3 tensors.
CT_FORMATS = ("float-quantized", "naive-quantized")
# transformers' FbgemmFp8Config default when a config leaves it out.
FBGEMM_DEFAULT_UB = 1200.0
FN_CODE = "F8_E4M3"  # safetensors' name of OCP float8 e4m3fn
FLOAT_CODES = ("F32", "F16", "BF16", "F64")
# Row blocks hold at most this many bytes once converted to f32 (as params.sources').
BLOCK_BYTES = 64 << 20
# compressed-tensors presets a config group may name instead of spelling out its scheme
# (quantization/quant_scheme.py): FP8 (static per-tensor weights and inputs) and
# FP8_DYNAMIC (per-channel weights, dynamic per-token inputs).
_FLOAT8 = {"num_bits": 8, "type": "float", "symmetric": True}
CT_PRESETS = {
    "FP8": {"weights": {**_FLOAT8, "strategy": "tensor"},
            "input_activations": {**_FLOAT8, "strategy": "tensor", "dynamic": False}},
    "FP8_DYNAMIC": {"weights": {**_FLOAT8, "strategy": "channel"},
                    "input_activations": {**_FLOAT8, "strategy": "token", "dynamic": True}},
}
_FIX = "import a float checkpoint with --quantize fp8 instead"


@dataclasses.dataclass(frozen=True)
class Fp8Scheme:
    """How a published FP8 checkpoint is quantized, in this package's terms.

    - `layout`: one of LAYOUTS;
    - `weight_scales`: `fp8.SCALES` ("per-tensor": `KEY:d` [], "per-channel": `KEY:d_rows`);
    - `input_scales`: "static" (a `q_input:rscale` per fp8 linear) or "dynamic" (each
      token's scale computed at run time from its amax; e4m3fn's 448 is 224 in fnuz);
    - `activation_scale_ub`: fbgemm's bound on a token's amax (None: unbounded);
    - `fp8_keys`: the ABI keys (`blk.{i}.attn_q.weight`, ...) of the linears in fp8;
      `float_linears`: the other linears (sorted), kept in the activation dtype;
    - `notes`: what the checkpoint holds that the import does not use (sorted)."""

    layout: str
    weight_scales: str
    input_scales: str
    activation_scale_ub: float | None
    fp8_keys: frozenset[str]
    float_linears: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()

    def entries(self, cfg: LlamaConfig) -> dict[str, tuple[tuple[int, ...], str]]:
        """Every parameter the import writes: key -> (shape, IR dtype), `float` for the
        activation dtype, in `param_shapes` order. No `q_output:rscale` or
        `kv_cache.quantizer:rscale`: the checkpoint has no cache scales."""
        out: dict[str, tuple[tuple[int, ...], str]] = {}
        for key, shape in param_shapes(cfg).items():
            if key not in self.fp8_keys:
                out[key] = (shape, "float")
                continue
            qs, d = fp8.weight_keys(key, self.weight_scales)
            out[qs] = (shape, fp8.FP8)
            out[d] = ((shape[0],) if self.weight_scales == "per-channel" else (), "f32")
            if self.input_scales == "static":
                out[fp8.input_scale_key(key.split(".")[1], key.split(".")[2])] = ((), "f32")
        return out

    def as_dict(self) -> dict:
        """The scheme as JSON-ready values (sorted lists)."""
        d = dataclasses.asdict(self)
        d["fp8_keys"] = sorted(self.fp8_keys)
        d["float_linears"], d["notes"] = list(self.float_linears), list(self.notes)
        return d

    def emit_options(self) -> dict:
        """The EmitOptions fields (halo_mlir.model.options) of a program reading this
        import: fp8 linears exactly these, the checkpoint's weight and input scales (static
        ones saturating at e4m3fn's 448, 224 in fnuz), its amax bound, and the KV cache in
        the activation dtype (the checkpoint has no cache scales)."""
        return {"dtype": "fp8", "fp8_scales": self.weight_scales,
                "fp8_input_scales": self.input_scales,
                "fp8_activation_ub": self.activation_scale_ub,
                "fp8_linears": tuple(sorted(self.fp8_keys)),
                "fp8_input_max": fp8.FN_MAX_IN_FNUZ}

    def summary(self) -> str:
        n = len(self.fp8_keys)
        ub = "" if self.activation_scale_ub is None else \
            f", token amax bounded by {self.activation_scale_ub:g}"
        return (f"FP8 checkpoint ({self.layout}): {n} of {n + len(self.float_linears)} "
                f"linears in fp8, {self.weight_scales} weight scales, {self.input_scales} "
                f"input scales{ub}")


# ---- the scheme, from config.json -------------------------------------------------------
def quantization_config(hf_config: dict) -> dict | None:
    """config.json's quantization config, where compressed-tensors looks for it
    (utils/safetensors_load.py): `quantization_config`, then `text_config`'s, then the
    older `compression_config`."""
    for qc in (hf_config.get("quantization_config"),
               (hf_config.get("text_config") or {}).get("quantization_config"),
               hf_config.get("compression_config")):
        if qc is not None:
            return qc
    return None


def read_scheme(hf_config: dict, cfg: LlamaConfig) -> Fp8Scheme | None:
    """The FP8 scheme of a checkpoint with config.json `hf_config` (model `cfg`), or None
    when it has no quantization config (a float checkpoint)."""
    qc = quantization_config(hf_config)
    if qc is None:
        return None
    if not isinstance(qc, dict):
        raise HaloError("config.json: quantization_config is not a JSON object; is this a "
                        "model's config.json?")
    method = qc.get("quant_method")
    if method not in LAYOUTS:
        raise HaloError(f"config.json: quant_method {method!r} is not an FP8 layout halo-mlir "
                        f"imports (one of {', '.join(LAYOUTS)}); {_FIX}")
    if cfg.is_moe:
        raise HaloError(f"config.json: {method} checkpoints of mixture-of-experts models "
                        f"({cfg.family}) are not supported yet; {_FIX}")
    return _compressed_tensors(qc, cfg) if method == "compressed-tensors" else _fbgemm(qc, cfg)


def linear_modules(cfg: LlamaConfig) -> dict[str, str]:
    """ABI key -> HF module name of every linear (`blk.3.attn_q.weight` ->
    `model.layers.3.self_attn.q_proj`) and of lm_head, from the safetensors importer's
    table (names.HF_NAMES)."""
    return {key: hf_sources(key, cfg)[0].removesuffix(".weight")
            for key in param_shapes(cfg) if fp8.is_linear(key) or key == "output.weight"}


def _ct_match(name: str, target: str, classes: tuple[str, ...]) -> bool:
    """compressed-tensors' matching (utils/match.py): `re:PATTERN` is re.match on the
    module name, a class name matches the module's class or a base, else the exact name."""
    if target.startswith("re:"):
        try:
            return re.match(target[3:], name) is not None
        except re.error as e:
            raise HaloError(f"config.json: {target!r} in the quantization_config is not a "
                            f"valid regular expression ({e}); fix the config") from None
    return target == name or target in classes


def _ct_args(group: str, args, what: str) -> dict | None:
    """QuantizationArgs as a dict with compressed-tensors' defaults, strategy inferred."""
    if args is None:
        return None
    if not isinstance(args, dict):
        raise HaloError(f"config.json: config group {group!r} has a malformed {what}")
    a = {"num_bits": 8, "type": "int", "symmetric": True, "group_size": None,
         "strategy": None, "dynamic": False, "block_structure": None, **args}
    if a["strategy"] is None:
        g = a["group_size"]
        a["strategy"] = "tensor" if g is None else "channel" if g == -1 else "group"
    return a


def _ct_scheme(group: str, spec, formats: set) -> tuple[str, str]:
    """(weight scales, input scales) of one config group, or a one-line error."""
    where = f"config.json: config group {group!r}"
    if isinstance(spec, list):  # a preset name with its targets
        if group not in CT_PRESETS:
            raise HaloError(f"{where} is the preset {group}; of the presets only "
                            f"{', '.join(CT_PRESETS)} are supported; {_FIX}")
        spec = CT_PRESETS[group]
    if not isinstance(spec, dict):
        raise HaloError(f"{where} is neither a scheme nor a preset's targets; fix the config")
    if spec.get("format") is not None:
        formats.add(spec["format"])
    w = _ct_args(group, spec.get("weights"), "weights")
    x = _ct_args(group, spec.get("input_activations"), "input_activations")
    if w is None:
        raise HaloError(f"{where} quantizes no weights; only FP8 weights are supported; {_FIX}")
    if (w["type"], w["num_bits"]) != ("float", 8):
        raise HaloError(f"{where}: weights are {w['type']}{w['num_bits']}; only FP8 "
                        f"(type float, 8 bits) is supported; {_FIX}")
    if w["strategy"] not in ("tensor", "channel") or w["dynamic"] or not w["symmetric"]:
        raise HaloError(f"{where}: {w['strategy']}-wise weight scales (dynamic "
                        f"{w['dynamic']}, symmetric {w['symmetric']}) are not supported; "
                        f"only static symmetric per-tensor or per-channel ones; {_FIX}")
    if x is None:
        raise HaloError(f"{where} quantizes weights only (no input_activations); FP8 "
                        f"weight-only checkpoints are not supported yet; {_FIX}")
    if spec.get("output_activations") is not None:
        raise HaloError(f"{where} quantizes output activations; not supported; {_FIX}")
    if (x["type"], x["num_bits"], x["symmetric"]) != ("float", 8, True):
        raise HaloError(f"{where}: input activations are {x['type']}{x['num_bits']}; only "
                        f"symmetric FP8 is supported; {_FIX}")
    if x["strategy"] == "tensor" and x["dynamic"] is False:
        inputs = "static"
    elif x["strategy"] == "token" and x["dynamic"] is True:
        inputs = "dynamic"
    else:
        raise HaloError(f"{where}: {x['strategy']}-wise input scales with dynamic "
                        f"{x['dynamic']} are not supported; only static per-tensor or "
                        f"dynamic per-token ones; {_FIX}")
    return ("per-tensor" if w["strategy"] == "tensor" else "per-channel"), inputs


def _one(kinds: dict[str, set[str]], what: str, layout: str) -> str:
    """The single value of `kinds` (value -> keys having it); a mix is one error."""
    if len(kinds) != 1:
        shown = "; ".join(f"{v} for {sorted(keys)[0]}" + (f" and {len(keys) - 1} more"
                                                          if len(keys) > 1 else "")
                          for v, keys in sorted(kinds.items()))
        raise HaloError(f"config.json: this {layout} checkpoint mixes {what} across its "
                        f"linears ({shown}); one scheme a checkpoint is supported; {_FIX}")
    return next(iter(kinds))


def _compressed_tensors(qc: dict, cfg: LlamaConfig) -> Fp8Scheme:
    formats = {qc.get("format", "fakequant")}  # compressed-tensors' default format
    groups = qc.get("config_groups") or {}
    if not isinstance(groups, dict) or not groups:
        raise HaloError("config.json: compressed-tensors quantization_config has no "
                        "config_groups; is the config complete?")
    for field in ("sparsity_config", "transform_config"):
        if qc.get(field):
            raise HaloError(f"config.json: compressed-tensors {field} is not supported (its "
                            f"weights are not plain FP8 linears); {_FIX}")
    schemes = {g: _ct_scheme(g, spec, formats) for g, spec in groups.items()}
    formats.discard("mixed-precision")
    bad = sorted(str(f) for f in formats if f not in CT_FORMATS)
    if bad:
        raise HaloError(f"config.json: compressed-tensors format {bad[0]!r} is not supported; "
                        f"only {' and '.join(CT_FORMATS)} (F8_E4M3 weights); {_FIX}")
    # target -> group; a later group naming a target takes it (lifecycle/apply.py)
    owner = {}
    for g, spec in groups.items():
        for t in (spec if isinstance(spec, list) else spec.get("targets") or []):
            owner[t] = g
    ignore = list(qc.get("ignore") or [])
    embed = hf_sources("token_embd.weight", cfg)[0].removesuffix(".weight")
    if any(_ct_match(embed, t, ("Embedding", "Module")) for t in owner) and \
            not any(_ct_match(embed, t, ("Embedding", "Module")) for t in ignore):
        raise HaloError(f"config.json: the quantization_config quantizes {embed}; fp8 "
                        f"embeddings are not supported; {_FIX}")
    fp8_keys, scales, inputs = set(), {}, {}
    for key, module in linear_modules(cfg).items():
        classes = ("Linear", "Module")
        if any(_ct_match(module, t, classes) for t in ignore):
            continue
        names = sorted((t for t in owner if not t.startswith("re:") and t == module)) + \
            sorted(t for t in owner if t.startswith("re:") and _ct_match(module, t, ()))
        names += sorted(t for t in owner if t in classes and t not in names)
        if not names:
            continue
        if key == "output.weight":
            raise HaloError(f"config.json: the quantization_config quantizes {module}; an "
                            f"fp8 lm_head is not supported (add it to ignore); {_FIX}")
        w, x = schemes[owner[names[0]]]
        fp8_keys.add(key)
        scales.setdefault(w, set()).add(key)
        inputs.setdefault(x, set()).add(key)
    if not fp8_keys:
        raise HaloError("config.json: the quantization_config quantizes none of the model's "
                        "linears (check config_groups targets and ignore)")
    notes = ()
    if qc.get("kv_cache_scheme"):
        notes = ("kv_cache_scheme: not used; the cache stays in the activation dtype "
                 "(the checkpoint's k_scale / v_scale are not read)",)
    layout = "compressed-tensors"
    return _scheme(layout, cfg, fp8_keys, _one(scales, "weight scales", layout),
                   _one(inputs, "input scales", layout), None, notes)


def fbgemm_skips(name: str, patterns) -> bool:
    """Whether transformers leaves module `name` unconverted for `modules_to_not_convert`
    `patterns` (quantizers/quantizers_utils.py should_convert_module): a pattern matches
    from the start up to a module boundary (as a regex), or as a suffix of the name."""
    boundary = r"(?:(?<=\.)|(?=\.|$))"
    for p in patterns:
        try:
            hit = re.match(rf"(?:{p}){boundary}", name) is not None
        except re.error:
            hit = name == p or name.startswith(p + ".")
        if hit or name.endswith(p):
            return True
    return False


def _fbgemm(qc: dict, cfg: LlamaConfig) -> Fp8Scheme:
    ub = qc.get("activation_scale_ub", FBGEMM_DEFAULT_UB)
    if isinstance(ub, bool) or not isinstance(ub, (int, float)) or not ub > 0 or \
            not np.isfinite(ub):
        raise HaloError(f"config.json: fbgemm_fp8 activation_scale_ub {ub!r} is not a "
                        "positive number; fix the config")
    skip = qc.get("modules_to_not_convert")
    if skip is not None and (not isinstance(skip, list) or
                             not all(isinstance(p, str) for p in skip)):
        raise HaloError("config.json: fbgemm_fp8 modules_to_not_convert is not a list of "
                        "module names; fix the config")
    fp8_keys = set()
    for key, module in linear_modules(cfg).items():
        # without a list transformers keeps the output embedding (lm_head) unconverted
        if fbgemm_skips(module, skip if skip is not None else ["lm_head"]):
            continue
        if key == "output.weight":
            raise HaloError(f"config.json: modules_to_not_convert leaves {module} in fp8; "
                            f"an fp8 lm_head is not supported; {_FIX}")
        fp8_keys.add(key)
    if not fp8_keys:
        raise HaloError("config.json: fbgemm_fp8 modules_to_not_convert leaves no linear in "
                        "fp8; import it as a float checkpoint after removing "
                        "quantization_config")
    return _scheme("fbgemm_fp8", cfg, fp8_keys, "per-channel", "dynamic", float(ub), ())


def _scheme(layout, cfg, fp8_keys, scales, inputs, ub, notes) -> Fp8Scheme:
    linears = [k for k in linear_modules(cfg) if k != "output.weight"]
    return Fp8Scheme(layout, scales, inputs, ub, frozenset(fp8_keys),
                     tuple(sorted(k for k in linears if k not in fp8_keys)),
                     tuple(sorted(notes)))


def config_path(path: str | Path, hf_config: str | Path | None = None) -> Path:
    """The config.json of a checkpoint: `hf_config` if given; `path` itself when it is a
    config (a .json file other than a safetensors index); else the one beside it."""
    if hf_config:
        return Path(hf_config)
    p = Path(path)
    if p.suffix == ".json" and not p.name.endswith(".index.json"):
        return p
    return (p if p.is_dir() else p.parent) / "config.json"


def scheme_from_checkpoint(path: str | Path,
                           hf_config: str | Path | None = None) -> Fp8Scheme | None:
    """The FP8 scheme of the checkpoint at `path` (its directory, a safetensors file or
    index, or its config.json; `hf_config`: another config.json), None for a float one."""
    from halo_mlir import config

    cfg_file = config_path(path, hf_config)
    cfg = config.from_hf_config(cfg_file)  # one-line errors for a missing or broken file
    return read_scheme(json.loads(cfg_file.read_text()), cfg)


# ---- the import ---------------------------------------------------------------------------
class Fp8File(SafetensorsFile):
    """A safetensors file whose F8_E4M3 tensors read as their bytes (uint8)."""

    def dtype(self, name: str) -> np.dtype:
        if self.code(name) == FN_CODE:
            return np.dtype(np.uint8)
        return super().dtype(name)

    def code(self, name: str) -> str:
        return self.tensors[name]["dtype"]


def preflight(cfg: LlamaConfig, scheme: Fp8Scheme, out: str | Path, tp: int = 1,
              layout: str = "per-layer", moe: str = "ffn") -> None:
    """The checks that need no weights: TP degree, output directory, and with `--layout
    stacked` one dtype a weight kind (a stacked entry holds every layer)."""
    from halo_mlir.params.fp8_import import preflight as fp8_preflight
    from halo_mlir.params.names import LAYOUTS as PARAM_LAYOUTS

    if layout not in PARAM_LAYOUTS:
        raise HaloError(f"unknown --layout {layout!r}: choose one of {', '.join(PARAM_LAYOUTS)}")
    fp8_preflight(cfg, out, tp, moe, scheme.weight_scales)
    if layout != "stacked":
        return
    layers: dict[str, dict[bool, list[int]]] = {}
    for key in linear_modules(cfg):
        if key.startswith("blk."):
            _, i, kind, _ = key.split(".")
            layers.setdefault(kind, {}).setdefault(key in scheme.fp8_keys, []).append(int(i))
    for kind, by in layers.items():
        if len(by) > 1:
            raise HaloError(f"--layout stacked: blk.*.{kind}.weight is fp8 in layers "
                            f"{_spans(by[True])} and float in layers {_spans(by[False])} of "
                            f"this checkpoint, and a stacked entry holds one dtype; import "
                            f"with --layout per-layer (and emit without --layer-loop)")


def _spans(layers: list[int]) -> str:
    """[0, 1, 2, 5] -> "0-2,5"."""
    out: list[list[int]] = []
    for i in sorted(layers):
        if out and out[-1][1] == i - 1:
            out[-1][1] = i
        else:
            out.append([i, i])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in out)


@dataclasses.dataclass(frozen=True)
class _Source:
    """Where each entry's data is: the checkpoint tensor, and what it becomes."""

    name: str  # HF tensor name
    file: Fp8File
    kind: str  # "float", "bits" (fp8 weight), "weight_scale", "input_scale"


def _locate(file_of, cfg: LlamaConfig, scheme: Fp8Scheme) -> dict[str, _Source]:
    """Every entry's checkpoint tensor, checked against the scheme before anything is
    written: fp8 weights F8_E4M3, float tensors not, scales present, float, of the shape the
    scheme says."""
    modules = linear_modules(cfg)
    out: dict[str, _Source] = {}
    for key, (shape, kind) in scheme.entries(cfg).items():
        if kind == "float":
            name = hf_sources(key, cfg)[0]
            f = file_of(name)
            if f.code(name) == FN_CODE:
                why = "ignore, or no target" if scheme.layout == "compressed-tensors" else \
                    "modules_to_not_convert"
                raise HaloError(f"{f.path}: {name} is {FN_CODE}, but the quantization_config "
                                f"keeps {name.removesuffix('.weight')} in floats ({why}); is "
                                "config.json this checkpoint's?")
            out[key] = _Source(name, f, "float")
        elif kind == fp8.FP8:
            weight = key[:-len(":qs")]
            name = hf_sources(weight, cfg)[0]
            f = file_of(name)
            if f.code(name) != FN_CODE:
                raise HaloError(f"{f.path}: {name} is {f.code(name)}, but the "
                                f"quantization_config makes {modules[weight]} fp8 ({FN_CODE} "
                                f"expected); is config.json this checkpoint's?")
            out[key] = _Source(name, f, "bits")
        else:
            field = "input_scale" if key.endswith(":rscale") else "weight_scale"
            layer, linear = key.split(".")[1], key.split(".")[2]
            module = modules[f"blk.{layer}.{linear}.weight"]
            out[key] = _scale(file_of, f"{module}.{field}", shape, scheme, field)
    return out


def _scale(file_of, name: str, shape: tuple[int, ...], scheme: Fp8Scheme,
           field: str) -> _Source:
    f = file_of(name, missing_ok=True)
    if f is None or name not in f.tensors:
        where = f.path if f is not None else "the checkpoint's index"
        raise HaloError(f"{where}: checkpoint lacks {name}, which its quantization_config "
                        f"needs ({scheme.weight_scales} weight scales, {scheme.input_scales} "
                        "input scales); the checkpoint is incomplete: download it again")
    if f.code(name) not in FLOAT_CODES:
        raise HaloError(f"{f.path}: {name} has dtype {f.code(name)}; a scale is one of "
                        f"{', '.join(FLOAT_CODES)}; is the checkpoint damaged?")
    got = f.shape(name)
    want = [shape, (*shape, 1)] if shape else [(), (1,)]
    if got not in want:
        shown = " or ".join(str(list(w)) for w in want)
        what = "input scale" if field == "input_scale" else f"{scheme.weight_scales} weight scale"
        raise HaloError(f"{f.path}: {name} has shape {list(got)}; a {what} is {shown}; is "
                        f"config.json this checkpoint's?")
    return _Source(name, f, field)


def _rows(f: Fp8File, name: str):
    """The tensor in row blocks: (start, stop, rows) of at most BLOCK_BYTES as f32."""
    shape = f.shape(name)
    if len(shape) < 2:
        yield 0, shape[0] if shape else 1, f.rows(name, 0, shape[0] if shape else 1)
        return
    step = max(1, BLOCK_BYTES // (int(np.prod(shape[1:], dtype=np.int64)) * 4))
    for start in range(0, shape[0], step):
        stop = min(start + step, shape[0])
        yield start, stop, f.rows(name, start, stop)


def _fnuz_blocks(src: _Source):
    """The fp8 weight as f8E4M3FNUZ row blocks of the same bits (0x80 as 0x00)."""
    for start, _, bits in _rows(src.file, src.name):
        if fp8.fn_nan_count(bits):
            row = start + int(np.argwhere((bits & 0x7F) == 0x7F)[0][0])
            raise HaloError(f"{src.file.path}: {src.name} holds NaN (e4m3fn 0x7F / 0xFF, "
                            f"first in row {row}); fp8 weights must be finite: the checkpoint "
                            "is damaged, download it again")
        yield fp8.fnuz_from_fn(bits)


def _doubled(src: _Source, shape: tuple[int, ...]) -> np.ndarray:
    """2 * the checkpoint's scale as f32 of the entry's `shape` ([] from [] or [1], [out]
    from [out, 1] or [out]); every value finite and positive."""
    stored = src.file.shape(src.name)
    s = src.file.rows(src.name, 0, stored[0] if stored else 1).astype(np.float32).reshape(shape)
    bad = ~(np.isfinite(s) & (s > 0))
    if np.any(bad):
        raise HaloError(f"{src.file.path}: {src.name} holds {float(s[bad].ravel()[0])!r}; a "
                        "scale is finite and positive: the checkpoint is damaged, download "
                        "it again")
    return (s * np.float32(fp8.FN_TO_FNUZ_SCALE)).astype(np.float32)


def import_fp8_checkpoint(path: str | Path, cfg: LlamaConfig, scheme: Fp8Scheme,
                          out: str | Path, *, dtype: str = "f16", tp: int = 1,
                          layout: str = "per-layer", moe: str = "ffn",
                          progress: Callable[[int, int, str], None] = lambda *_: None,
                          note: Callable[[str], None] = lambda _: None) -> int:
    """Write `scheme.entries(cfg)` from the FP8 checkpoint at `path` to `out` (rank files
    for tp > 1, stacked entries for layout `stacked`), fp8 bits and scales as they are,
    floats converted to `dtype`, in row blocks. `note` gets the scheme's summary and notes
    once every tensor is found (before the long part). Returns the bytes written; nothing
    is left at `out` on error."""
    from halo_mlir.params import irpa
    from halo_mlir.params.safetensors_import import numpy_dtype, open_checkpoint

    np_dtype = numpy_dtype(dtype)
    preflight(cfg, scheme, out, tp, layout, moe)
    entries = scheme.entries(cfg)
    with contextlib.ExitStack() as stack:
        file_of, _ = open_checkpoint(path, cfg, stack, file_class=Fp8File)
        located = _locate(file_of, cfg, scheme)
        for line in (scheme.summary(), *(f"note: {n}" for n in scheme.notes)):
            note(line)
        writer = stack.enter_context(irpa.writer(out, tp, layout, moe))
        for n, key in enumerate(entries):
            progress(n, len(entries), key)
            src = located[key]
            if src.kind == "float":
                writer.add_chunks(key, (rows.astype(np_dtype, copy=False)
                                        for _, _, rows in _rows(src.file, src.name)))
            elif src.kind == "bits":
                writer.add_chunks(key, _fnuz_blocks(src))
            else:
                # A static input scale s: the checkpoint's program quantizes x as
                # e4m3fn(x / s); ours as fnuz(x / (2 s)). x / (2 s) is exactly (x / s) / 2,
                # and the fnuz grid is the e4m3fn grid halved (same bits, ties to the same
                # even mantissa), so both round to the same bits for |x / s| <= 448, where
                # e4m3fn saturates; 448 / 2 = 224 < 240, fnuz's largest, so nothing that
                # e4m3fn keeps is clipped (fnuz reaches 240, e4m3fn's 480, before saturating).
                writer.add(key, _doubled(src, entries[key][0]))
        progress(len(entries), len(entries), "")
        writer.commit()
        return writer.nbytes
