"""Tiny Llama checkpoints in the two published FP8 layouts (docs/fp8-checkpoints.md), for
`import-params --safetensors` of an already-quantized checkpoint.

The model is hf_reference.AWKWARD with 2 layers (GQA: hidden 96, 6 heads, 2 kv heads,
head_dim 16, ffn 160, vocab 300) with random weights, in bf16 as published checkpoints are:

- compressed-tensors, written by the compressed-tensors package itself (apply the config,
  set the scales, `ModelCompressor.compress_model`, `save_pretrained`, `update_config`), in
  three schemes (CT_SCHEMES): per-tensor weights with static input scales (its FP8 preset),
  per-channel weights with static input scales, per-channel weights with dynamic per-token
  inputs (its FP8_DYNAMIC preset); `ignore: ["lm_head"]`;
- fbgemm_fp8, written from its specification (transformers integrations/fbgemm_fp8.py and
  FBGEMM's quantize_fp8_row): per-row e4m3fn weights, `weight_scale` f32 [out, 1] = row
  amax / 448, no activation scales (dynamic per token, amax bounded by
  `activation_scale_ub`), and a `modules_to_not_convert` list whose modules stay bf16.

A few weights are set to tiny negatives before quantizing so that the checkpoints hold
e4m3fn's -0 (byte 0x80). Each builder returns an `Fp8Checkpoint` with the tensors as
written and `dequantized`: every weight as the checkpoint means it, in f32 (an fp8 weight's
e4m3fn value times its scale, decoded by torch), keyed by HF name: a reference model loads
it with `load_state_dict`.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent / "e2e"))
from hf_reference import make_model  # noqa: E402

LAYERS = 2
FN_MAX = 448.0
CT_SCHEMES = {  # name -> (weight strategy, input scales)
    "ct-tensor-static": ("tensor", "static"),
    "ct-channel-static": ("channel", "static"),
    "ct-channel-dynamic": ("channel", "dynamic"),
}
# fbgemm: layer 0's attention projections and lm_head stay bf16 (as Meta's 405B FP8 keeps
# attention, the first and last blocks and lm_head out of fp8, at a smaller scale).
FBGEMM_NOT_CONVERT = ["model.layers.0.self_attn", "lm_head"]
FBGEMM_UB = 1200.0
# Where tiny negative weights are planted (they quantize to e4m3fn -0, byte 0x80).
NEG_ZERO_AT = ("model.layers.1.mlp.up_proj.weight", "model.layers.0.mlp.down_proj.weight")


@dataclasses.dataclass
class Fp8Checkpoint:
    path: Path
    name: str
    tensors: dict  # HF name -> torch tensor, as written
    dequantized: dict  # HF name -> f32 torch tensor (fp8 weights: value * scale)
    hf_config: dict


def _model(seed: int):
    """The random model in bf16 with the planted -0 weights."""
    import torch

    with tempfile.TemporaryDirectory() as scratch:
        model = make_model(Path(scratch), seed=seed, num_hidden_layers=LAYERS)
    model = model.to(torch.bfloat16)
    with torch.no_grad():
        params = dict(model.named_parameters())
        for name in NEG_ZERO_AT:
            params[name][0, :5] = -1e-30
            params[name][1, 3] = 0.0
    return model


def _dequantized(tensors: dict) -> dict:
    import torch

    out = {}
    for name, t in tensors.items():
        if not name.endswith(".weight"):
            continue
        if t.dtype == torch.float8_e4m3fn:
            scale = tensors[name + "_scale"].float()
            out[name] = t.float() * (scale if scale.ndim == 2 else scale.reshape(()))
        else:
            out[name] = t.float()
    return out


def _input_amax(model, n_tokens: int = 32) -> dict:
    """Each linear's input amax over a forward of pseudo-random tokens."""
    import torch

    amax, hooks = {}, []
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear):
            hooks.append(mod.register_forward_pre_hook(
                lambda m, args, n=name: amax.__setitem__(n, max(amax.get(n, 0.0), float(
                    args[0].detach().abs().max())))))
    ids = torch.from_numpy(np.random.default_rng(1).integers(0, 300, (1, n_tokens)))
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    return amax


def compressed_tensors_checkpoint(out: Path, scheme: str, seed: int = 0) -> Fp8Checkpoint:
    """A compressed-tensors `float-quantized` checkpoint in `out` (CT_SCHEMES[scheme])."""
    import torch
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (QuantizationArgs, QuantizationConfig,
                                                 QuantizationScheme, apply_quantization_config)
    from safetensors.torch import load_file

    strategy, inputs = CT_SCHEMES[scheme]
    model = _model(seed)
    amax = _input_amax(model)
    fp8 = dict(num_bits=8, type="float", symmetric=True)
    group = QuantizationScheme(
        targets=["Linear"],
        weights=QuantizationArgs(**fp8, strategy=strategy, dynamic=False),
        input_activations=QuantizationArgs(**fp8, strategy="tensor", dynamic=False)
        if inputs == "static" else QuantizationArgs(**fp8, strategy="token", dynamic=True))
    config = QuantizationConfig(config_groups={"group_0": group}, ignore=["lm_head"],
                                quantization_status="frozen")
    apply_quantization_config(model, config, show_progress=False)
    with torch.no_grad():
        for name, mod in model.named_modules():
            if not hasattr(mod, "weight_scale"):
                continue
            w = mod.weight.float().abs()
            a = w.amax(dim=1, keepdim=True) if strategy == "channel" else w.max().reshape(1)
            mod.weight_scale.copy_((a / FN_MAX).to(mod.weight_scale.dtype))
            if hasattr(mod, "input_scale"):
                mod.input_scale.fill_(amax[name] / FN_MAX)
    compressor = ModelCompressor.from_pretrained_model(model, "float-quantized")
    compressor.compress_model(model)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    compressor.update_config(out)
    tensors = load_file(str(out / "model.safetensors"))
    return Fp8Checkpoint(out, scheme, tensors, _dequantized(tensors),
                         json.loads((out / "config.json").read_text()))


def _not_converted(name: str, patterns) -> bool:
    return any(name == p or name.startswith(p + ".") for p in patterns)


def fbgemm_checkpoint(out: Path, not_convert=tuple(FBGEMM_NOT_CONVERT), seed: int = 1,
                      ub: float = FBGEMM_UB) -> Fp8Checkpoint:
    """An fbgemm_fp8 checkpoint in `out`: every linear outside `not_convert` per-row fp8."""
    import torch
    from safetensors.torch import save_file

    model = _model(seed)
    tensors = {}
    for name, p in model.state_dict().items():
        module = name.removesuffix(".weight")
        linear = isinstance(model.get_submodule(module), torch.nn.Linear)
        if not linear or _not_converted(module, not_convert):
            tensors[name] = p.contiguous()
            continue
        w = p.float()
        row_max = w.abs().amax(dim=1).clamp(min=1e-12)
        scale = row_max / FN_MAX
        q = (w * (FN_MAX / row_max)[:, None]).clamp(-FN_MAX, FN_MAX).to(torch.float8_e4m3fn)
        tensors[name] = q.contiguous()
        tensors[f"{module}.weight_scale"] = scale.reshape(-1, 1).to(torch.float32).contiguous()
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    hf_config = model.config.to_dict()
    hf_config["torch_dtype"] = "bfloat16"
    hf_config["quantization_config"] = {"quant_method": "fbgemm_fp8",
                                        "activation_scale_ub": ub,
                                        "modules_to_not_convert": list(not_convert)}
    (out / "config.json").write_text(json.dumps(hf_config, indent=2))
    return Fp8Checkpoint(out, "fbgemm", tensors, _dequantized(tensors), hf_config)


def build(out: Path, name: str) -> Fp8Checkpoint:
    """The checkpoint `name` (a CT_SCHEMES key or "fbgemm") in `out`."""
    return fbgemm_checkpoint(out) if name == "fbgemm" else \
        compressed_tensors_checkpoint(out, name)
