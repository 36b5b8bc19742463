"""docs/ABI.md against the code: its tables, expanded for small models, must equal what
`halo-mlir import-params` writes (keys, files, byte sizes), what `halo-mlir emit` reads
(the `#flow.parameter.named` globals with their types), the emitted entry points' argument
and result types, and the config.json that `emit --output-config` and `export-shortfin`
write. Editing a name, shape or value in the doc without changing the code fails here."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, halo

DOC = Path(REPO) / "docs" / "ABI.md"

# A small model every form accepts: head_dim 16 (paged kernels), K multiples of 32 (fp8
# and quantized kernels), 2 layers, GQA, llama3 RoPE scaling.
SMALL = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
         "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 64,
         "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
         "tie_word_embeddings": False,
         "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                          "original_max_position_embeddings": 8192, "rope_type": "llama3"}}
BYTES = {"f16": 2, "bf16": 2, "f32": 4, "f8E4M3FNUZ": 1, "i8": 1, "i64": 8}


# ---- reading the doc -------------------------------------------------------------------
def doc_tables(text: str | None = None) -> dict[str, list[list[dict[str, str]]]]:
    """{heading: [table, ...]}, a table being its rows as {column: cell}; cells without
    backticks."""
    text = DOC.read_text() if text is None else text
    out: dict[str, list] = {}
    heading, rows = None, None
    for line in text.splitlines() + [""]:
        if line.startswith("#"):
            heading = line.lstrip("#").strip()
        if line.startswith("|"):
            cells = [c.strip().replace("`", "") for c in line.strip().strip("|").split("|")]
            if rows is None:
                rows = [cells]
            elif not all(set(c) <= set("-: ") for c in cells):
                rows.append(cells)
        elif rows is not None:
            out.setdefault(heading, []).append([dict(zip(rows[0], r)) for r in rows[1:]])
            rows = None
    return out


def table(tables, heading: str, n: int = 0) -> list[dict[str, str]]:
    found = [h for h in tables if h == heading or h.startswith(heading + " (")]
    assert len(found) == 1, f"docs/ABI.md: no single section {heading!r} ({list(tables)})"
    return tables[found[0]][n]


def evaluate(expr: str, ns: dict):
    """A doc value or size: a Python expression over the symbols (divisions exact)."""
    expr = re.sub(r"(?<!/)/(?!/)", "//", expr)
    return eval(expr, {"__builtins__": {}, "sorted": sorted, "set": set, "null": None}, dict(ns))


def shape_of(text: str, ns: dict) -> tuple:
    inner = text.strip()
    assert inner.startswith("[") and inner.endswith("]"), text
    return tuple(evaluate(d, ns) for d in inner[1:-1].split(",") if d.strip())


def symbols(tables, cfg, *, stride=32, tp=1, bs_prefill=(4,), bs_decode=(4,),
            device_block_count=256, fp8_cache=False) -> dict:
    """The doc's symbols for `cfg` and the command line; derived ones from the doc."""
    ns = dict(hidden=cfg.hidden_size, layers=cfg.n_layers, n_heads=cfg.n_heads,
              n_kv_heads=cfg.n_kv_heads, head_dim=cfg.head_dim, ffn=cfg.ffn_dim,
              vocab=cfg.vocab_size, max_seq_len=cfg.max_seq_len, tied=cfg.tie_embeddings,
              stride=stride, tp=tp, bs_prefill=list(bs_prefill), bs_decode=list(bs_decode),
              device_block_count=device_block_count, fp8_cache=fp8_cache)
    rows = table(tables, "Symbols")
    assert {r["symbol"] for r in rows if not r["value"]} == set(ns), \
        "docs/ABI.md's symbol table lists other base symbols than the code has"
    for r in rows:
        if r["value"]:
            ns[r["symbol"]] = evaluate(r["value"], ns)
    return ns


def expand(rows, ns, *, dt: str, key_col="key") -> dict[str, dict]:
    """Rows with `{i}` / `{d}` patterns -> {key: {"shape", "dtype", "file", "d"}} for the
    rows whose `read when` holds."""
    out = {}
    for r in rows:
        if r.get("read when") and not evaluate(r["read when"], ns):
            continue
        layers = range(ns["layers"]) if "{i}" in r[key_col] else [None]
        devices = range(ns["tp"]) if "{d}" in r[key_col] + r.get("file", "") else [None]
        for i in layers:
            for d in devices:
                key = r[key_col].replace("{i}", str(i)).replace("{d}", str(d))
                assert key not in out, f"docs/ABI.md lists {key} twice"
                dtype = r.get("dtype", "DT")
                out[key] = {"shape": shape_of(r["shape"], {**ns, "i": i, "d": d}),
                            "dtype": dt if dtype == "DT" else dtype,
                            "file": r.get("file", "").replace("{d}", str(d)), "d": d}
    return out


# ---- what the code writes and reads ----------------------------------------------------
def irpa_sizes(path) -> dict[str, int]:
    import iree.runtime as rt

    index = rt.ParameterIndex()
    index.load(str(path))
    return {key: len(memoryview(e.file_view)) for key, e in index.items()}


def tensor_type(text: str) -> tuple[tuple, str]:
    """'2x?x64xf16' -> ((2, None, 64), 'f16')."""
    *dims, dtype = text.split("x")
    return tuple(None if d == "?" else int(d) for d in dims), dtype


_GLOBAL = re.compile(r'util\.global private @\S+ (?:\{stream\.affinity = #hal\.device\.promise'
                     r'<@__device_(\d+)>\} )?= #flow\.parameter\.named<"(\w+)"::"([^"]+)"> : '
                     r'tensor<([^>]*)>')


def module_params(text: str) -> list[tuple[str, tuple, str, int | None]]:
    """Every parameter global: (key, shape, dtype, device or None)."""
    out = []
    for m in _GLOBAL.finditer(text):
        assert m.group(2) == "model", m.group(0)
        shape, dtype = tensor_type(m.group(4))
        out.append((m.group(3), shape, dtype, None if m.group(1) is None else int(m.group(1))))
    assert out and text.count("parameter.named") == len(out)
    return out


def checkpoint(d: Path, hf: dict) -> Path:
    """config.json + model.safetensors with random values for `hf`."""
    from safetensors.numpy import save_file

    from halo_mlir.config import from_hf_dict
    from halo_mlir.params.names import hf_name, param_shapes

    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    save_file({hf_name(k): rng.standard_normal(s).astype(np.float32)
               for k, s in param_shapes(from_hf_dict(hf)).items()}, str(d / "model.safetensors"))
    (d / "config.json").write_text(json.dumps(hf))
    return d


def emit(d: Path, name: str, *args) -> str:
    halo("emit", *args, "--no-locations", "-o", d / f"{name}.mlir")
    return (d / f"{name}.mlir").read_text()


def check_import(want: dict, files: dict[str, dict[str, int]]) -> None:
    """The import's files hold exactly the doc's keys (in the doc's file) with its sizes."""
    for fname, got in files.items():
        mine = {k: v for k, v in want.items() if v["file"] in ("", fname)}
        assert sorted(got) == sorted(mine), fname
        for key, w in mine.items():
            assert got[key] == int(np.prod(w["shape"], dtype=np.int64)) * BYTES[w["dtype"]], key


def check_module(want: dict, text: str, tp: int = 1) -> None:
    """The module reads exactly the doc's keys with its shapes and dtypes; at tp > 1 every
    global is on a device, a shard on its own and a replicated key on every device."""
    got = module_params(text)
    assert sorted({k for k, *_ in got}) == sorted(want)
    for key, shape, dtype, device in got:
        assert (shape, dtype) == (want[key]["shape"], want[key]["dtype"]), key
        if tp == 1:
            assert device is None, key
        elif want[key]["d"] is not None:
            assert device == want[key]["d"], key
    if tp > 1:
        for key in want:
            devices = sorted(dev for k, _, _, dev in got if k == key)
            assert devices == ([want[key]["d"]] if want[key]["d"] is not None
                               else list(range(tp))), key


def cfg_of(hf: dict):
    from halo_mlir.config import from_hf_dict

    return from_hf_dict(hf)


# ---- the tests -------------------------------------------------------------------------
def test_presets_and_symbols():
    from halo_mlir.config import LLAMA3_ROPE_SCALING, PRESETS
    from halo_mlir.model.decoder import EmitOptions

    tables = doc_tables()
    rows = table(tables, "Model hyperparameters")
    # The Llama presets; the mixture-of-experts ones are in docs/moe.md.
    assert [r["preset"] for r in rows] == [p for p in PRESETS if PRESETS[p].family == "llama"]
    for r in rows:
        c = PRESETS[r["preset"]]
        assert [int(r[k]) for k in ("hidden", "layers", "n_heads", "n_kv_heads", "head_dim",
                                    "ffn", "vocab", "max_seq_len")] == [
            c.hidden_size, c.n_layers, c.n_heads, c.n_kv_heads, c.head_dim, c.ffn_dim,
            c.vocab_size, c.max_seq_len], r["preset"]
        assert (float(r["rope theta"]), float(r["rms eps"])) == (c.rope_theta, c.rms_eps)
        assert r["rope scaling"] == "llama3" and c.rope_scaling == LLAMA3_ROPE_SCALING
    assert {r["parameter"]: float(r["value"]) for r in table(tables, "Model hyperparameters", 1)} \
        == LLAMA3_ROPE_SCALING
    for cfg, stride in ((cfg_of(SMALL), 16), (PRESETS["405b"], 32)):
        ns = symbols(tables, cfg, stride=stride)
        assert ns["page_elems"] == cfg.page_elems(EmitOptions(block_seq_stride=stride).block_seq_stride)


@pytest.mark.parametrize("tied", [False, True])
def test_float_parameters(tmp_path, tied):
    hf = {**SMALL, "tie_word_embeddings": tied}
    d = checkpoint(tmp_path / "ckpt", hf)
    halo("import-params", "--safetensors", d, "--dtype", "f16", "-o", tmp_path / "m.irpa")
    tables = doc_tables()
    want = expand(table(tables, "Float parameters"), symbols(tables, cfg_of(hf)), dt="f16")
    assert ("output.weight" in want) != tied
    check_import(want, {"m.irpa": irpa_sizes(tmp_path / "m.irpa")})
    check_module(want, emit(tmp_path, "m", "--hf-config", d / "config.json"))


@pytest.mark.parametrize("vocab", [64, 63])  # lm_head split (64 % 2 == 0) or replicated
def test_rank_files(tmp_path, vocab):
    hf = {**SMALL, "vocab_size": vocab}
    d = checkpoint(tmp_path / "ckpt", hf)
    halo("import-params", "--safetensors", d, "--dtype", "f16", "--tp", 2,
         "-o", tmp_path / "NAME.irpa")
    tables = doc_tables()
    want = expand(table(tables, "Rank files"), symbols(tables, cfg_of(hf), tp=2), dt="f16")
    assert ("output.weight" in want) == (vocab % 2 == 1)
    check_import(want, {f"NAME.rank{i}.irpa": irpa_sizes(tmp_path / f"NAME.rank{i}.irpa")
                        for i in range(2)})
    assert not (tmp_path / "NAME.rank2.irpa").exists()
    check_module(want, emit(tmp_path, "m", "--hf-config", d / "config.json", "--tp", 2), tp=2)


def test_stacked_layout(tmp_path):
    d = checkpoint(tmp_path / "ckpt", SMALL)
    halo("import-params", "--safetensors", d, "--dtype", "f16", "--layout", "stacked",
         "-o", tmp_path / "s.irpa")
    tables = doc_tables()
    want = expand(table(tables, "Stacked layout"), symbols(tables, cfg_of(SMALL)), dt="f16")
    check_import(want, {"s.irpa": irpa_sizes(tmp_path / "s.irpa")})
    check_module(want, emit(tmp_path, "m", "--hf-config", d / "config.json", "--layer-loop"))


@pytest.fixture(scope="module")
def fp8_ckpt(tmp_path_factory):
    """The SMALL checkpoint and its per-layer fp8 import."""
    d = checkpoint(tmp_path_factory.mktemp("fp8"), SMALL)
    halo("import-params", "--safetensors", d, "--quantize", "fp8", "-o", d / "f.irpa")
    return d


def test_fp8_parameters(fp8_ckpt, tmp_path):
    d, tables = fp8_ckpt, doc_tables()
    rows = table(tables, "FP8 parameters")
    written = expand(rows, symbols(tables, cfg_of(SMALL), fp8_cache=True), dt="f16")
    check_import(written, {"f.irpa": irpa_sizes(d / "f.irpa")})
    check_module(written, emit(tmp_path, "m", "--hf-config", d / "config.json", "--dtype", "fp8"))
    # fp8 linears over an f16 cache read no attention scales.
    read = expand(rows, symbols(tables, cfg_of(SMALL), fp8_cache=False), dt="f16")
    assert 0 < len(read) < len(written)
    check_module(read, emit(tmp_path, "h", "--hf-config", d / "config.json", "--dtype", "fp8",
                            "--kv-cache-dtype", "f16"))


# ---- combined forms: the doc's rules over its base tables ------------------------------
def _pattern(text: str) -> re.Pattern:
    """A rule's key pattern: {i} a layer, NAME a dotted name, FIELD a field, KEY any key."""
    out = re.escape(text)
    for name, rx in (("\\{i\\}", r"(?P<i>\d+)"), ("NAME", r"(?P<NAME>[^:]+)"),
                     ("FIELD", r"(?P<FIELD>\w+)"), ("KEY", r"(?P<KEY>.+)")):
        out = out.replace(name, rx)
    return re.compile(out + "$")


def combine(tables, base: dict, ns: dict, *, stacked: bool, tp: int, split_dims: dict) -> dict:
    """Apply the doc's combination rules: stacked first, then tp. `split_dims`: the split
    dim of each TP1 float key (from the rank-file table), by key with `{i}` for layers."""
    rules = table(tables, "Combined forms")
    stack_rules = [(_pattern(r["key"]), r["becomes"]) for r in rules if r["form"] == "stacked"]
    tp_rules = {r["form"]: r["becomes"] for r in rules if r["form"].startswith("tp")}
    assert [r["shape"] for r in rules if r["form"] == "stacked"] == ["[layers, ...]"] * 2
    out = {}
    for key, w in base.items():
        shape, lead = w["shape"], 0
        plain = key.split(":")[0]
        kind = re.sub(r"^blk\.\d+\.", "blk.{i}.", plain)
        dim = split_dims.get(kind) if w["shape"] else None  # scalar scales replicate
        if stacked:
            for rx, becomes in stack_rules:
                m = rx.match(key)
                if m:
                    key = becomes.replace("NAME", m.group("NAME")).replace(
                        "FIELD", m.groupdict().get("FIELD") or "")
                    shape, lead = (ns["layers"], *shape), 1
                    break
        if tp == 1:
            out[key] = {**w, "shape": shape}
            continue
        if dim is None:  # "KEY in NAME.rank0.irpa"
            k, f = tp_rules["tp, replicated"].split(" in ")
            out[k.replace("KEY", key)] = {**w, "shape": shape, "file": f}
            continue
        for d in range(tp):
            k, f = tp_rules["tp, split"].split(" in ")
            s = list(shape)
            s[dim + lead] //= tp
            out[k.replace("KEY", key).replace("{d}", str(d))] = {
                **w, "shape": tuple(s), "file": f.replace("{d}", str(d)), "d": d}
    return out


def split_dims(tables, ns) -> dict[str, int]:
    """The split dim of each TP1 float key, from the doc's float and rank-file tables."""
    flat = {r["key"]: shape_of(r["shape"], ns) for r in table(tables, "Float parameters")}
    out = {}
    for r in table(tables, "Rank files"):
        if ".shard." in r["key"] and (not r["read when"] or evaluate(r["read when"], ns)):
            key = r["key"].split(".shard.")[0]
            s = shape_of(r["shape"], ns)
            (dim,) = [i for i, (a, b) in enumerate(zip(flat[key], s)) if a != b]
            out[key] = dim
    return out


@pytest.mark.parametrize("form", ["stacked-tp2", "fp8-tp2", "fp8-stacked-tp2"])
def test_combined_forms(form, fp8_ckpt, tmp_path):
    fp8_model, stacked, tp = form.startswith("fp8"), "stacked" in form, 2
    d = fp8_ckpt
    args = ["--tp", tp] + (["--layout", "stacked"] if stacked else [])
    args += ["--quantize", "fp8"] if fp8_model else ["--dtype", "f16"]
    halo("import-params", "--safetensors", d, *args, "-o", tmp_path / "NAME.irpa")
    tables = doc_tables()
    cfg = cfg_of(SMALL)
    ns = symbols(tables, cfg, tp=tp, fp8_cache=fp8_model)
    base = expand(table(tables, "FP8 parameters" if fp8_model else "Float parameters"),
                  {**ns, "tp": 1}, dt="f16")
    want = combine(tables, base, ns, stacked=stacked, tp=tp,
                   split_dims=split_dims(tables, {**ns, "tp": tp}))
    check_import(want, {f"NAME.rank{i}.irpa": irpa_sizes(tmp_path / f"NAME.rank{i}.irpa")
                        for i in range(tp)})
    emit_args = ["--tp", tp] + (["--layer-loop"] if stacked else []) + (
        ["--dtype", "fp8"] if fp8_model else [])
    check_module(want, emit(tmp_path, "m", "--hf-config", d / "config.json", *emit_args), tp=tp)


def test_kept_quantized_fields(tmp_path):
    """A GGUF with Q8_0 and Q4_1 matrices (the embedding and lm_head too): the import's
    fields and the module's globals, per layer and stacked; the doc's fields, block sizes,
    shapes and dtypes for every kept format equal quant.py's."""
    from test_gguf import CFG, write_gguf

    from halo_mlir.params.gguf_file import GgufFile
    from halo_mlir.quantization.blocks import FORMATS

    qtypes = {"token_embd.weight": "Q8_0", "blk.0.attn_q.weight": "Q8_0",
              "blk.0.ffn_down.weight": "Q8_0", "blk.0.ffn_up.weight": "Q4_1",
              "output.weight": "Q4_1"}
    gguf = tmp_path / "m.gguf"
    write_gguf(gguf, qtypes=qtypes)
    with GgufFile(gguf) as g:
        cfg = g.config()
    assert (cfg.hidden_size, cfg.ffn_dim, cfg.n_layers) == (CFG["hidden"], CFG["ffn"], 1)
    tables = doc_tables()
    rows = table(tables, "Kept-quantized weights")
    for name, fmt in FORMATS.items():
        mine = [r for r in rows if r["format"].lower() == name]
        fields = {r["key"].split(":")[1]: r for r in mine}
        assert list(fields) == list(fmt.fields), name
        for field, (dtype, tail) in fmt.fields.items():
            row = fields[field]
            assert (int(row["block"]), int(row["GGUF bytes"])) == (fmt.block, fmt.block_bytes)
            shape = shape_of(row["shape"], {"rows": 3, "cols": 2 * fmt.block})
            assert shape == (3, 2, *tail), (name, field)
            assert row["dtype"] == {np.float16: "f16", np.int8: "i8"}[dtype]

    ns = symbols(tables, cfg)
    flat = expand(table(tables, "Float parameters"), ns, dt="f16")
    want = {}
    for key, w in flat.items():
        if key not in qtypes:
            want[key] = w
            continue
        rows_, cols = w["shape"]
        for r in rows:
            if r["format"] == qtypes[key]:
                want[r["key"].replace("KEY", key)] = {
                    **w, "dtype": r["dtype"],
                    "shape": shape_of(r["shape"], {"rows": rows_, "cols": cols})}
    halo("import-params", "--gguf", gguf, "--keep-quantized", "-o", tmp_path / "q.irpa")
    check_import(want, {"q.irpa": irpa_sizes(tmp_path / "q.irpa")})
    check_module(want, emit(tmp_path, "q", "--gguf", gguf, "--keep-quantized"))
    stacked = combine(tables, want, ns, stacked=True, tp=1, split_dims={})
    assert "blk.ffn_up.weight.stacked:m" in stacked
    halo("import-params", "--gguf", gguf, "--keep-quantized", "--layout", "stacked",
         "-o", tmp_path / "s.irpa")
    check_import(stacked, {"s.irpa": irpa_sizes(tmp_path / "s.irpa")})
    check_module(stacked, emit(tmp_path, "s", "--gguf", gguf, "--keep-quantized",
                               "--layer-loop"))


# ---- entry points, cache layout, config.json -------------------------------------------
_IMPORT = re.compile(r"hal\.tensor\.import (?:on\(#hal\.device\.promise<@__device_(\d+)>\) )?"
                     r"wait\(%\w+\) => (consume )?%arg(\d+) : !hal\.buffer_view -> "
                     r"tensor<([^>]*)>")
_ALIAS = re.compile(r"hal\.tensor\.alias (?:on\(#hal\.device\.promise<@__device_(\d+)>\) )?"
                    r"wait\(%\w+\) => \S+ : tensor<([^>]*)>\{[^}]*\} to %arg(\d+)")
_EXPORT = re.compile(r"hal\.tensor\.export (?:on\(#hal\.device\.promise<@__device_(\d+)>\) )?"
                     r"\S+ : tensor<([^>]*)>")


def public_functions(text: str) -> dict[str, str]:
    """{name: text of the function} for every public util.func."""
    out = {}
    for m in re.finditer(r"^  util\.func public @([\w$.]+)\((.*?)^  \}", text, re.M | re.S):
        out[m.group(1)] = m.group(0)
    return out


def entry_signature(body: str) -> dict:
    """What an `$async` function imports, aliases and exports."""
    args = {int(m.group(3)): (tensor_type(m.group(4)), m.group(1), bool(m.group(2)))
            for m in _IMPORT.finditer(body)}
    aliased = {int(m.group(3)) for m in _ALIAS.finditer(body)}
    (export,) = [(tensor_type(m.group(2)), m.group(1)) for m in _EXPORT.finditer(body)]
    return {"args": [args[i] for i in sorted(args)], "aliased": aliased, "result": export}


def doc_signature(rows, ns, *, n: int, dt: str, cdt: str) -> dict:
    """The doc's table for one entry at batch size n, in the form of `entry_signature`."""
    def typ(text):
        m = re.fullmatch(r"(\w+)\[(.*)\]", text)
        dtype = {"DT": dt, "CDT": cdt}.get(m.group(1), m.group(1))
        dims = []
        for dim in m.group(2).split(","):
            dim = dim.strip()
            if re.search(r"\b[SBP]\b", dim):
                dims.append(None)
            else:
                dims.append(evaluate(dim, {**ns, "N": n}))
        return tuple(dims), dtype

    args, aliased, result = [], set(), None
    for r in rows:
        where = lambda d: None if ns["tp"] == 1 else str(d)  # noqa: E731
        if r["argument"] == "logits":
            result = (typ(r["type"]), where(r["device"]))
            continue
        copies = range(ns["tp"]) if r["argument"].endswith("[d]") else [None]
        for d in copies:
            device = r["device"] if d is None else r["device"].replace("d", str(d))
            if r["in place"] == "yes":
                aliased.add(len(args))
            args.append((typ(r["type"]), where(device), r["in place"] == "yes"))
    return {"args": args, "aliased": aliased, "result": result}


@pytest.mark.parametrize("tp, dtype, cache, extra", [
    (1, "f16", "f16", []), (2, "f16", "f16", []), (1, "fp8", "f8E4M3FNUZ", []),
    (1, "f32", "f32", []), (2, "fp8", "f16", ["--kv-cache-dtype", "f16", "--layer-loop"])])
def test_entry_points(tmp_path, tp, dtype, cache, extra):
    d = checkpoint(tmp_path / "ckpt", SMALL)
    text = emit(tmp_path, "m", "--hf-config", d / "config.json", "--bs-prefill", "1,4",
                "--bs-decode", "2", "--block-seq-stride", 16, "--dtype", dtype, "--tp", tp,
                *extra)
    tables = doc_tables()
    ns = symbols(tables, cfg_of(SMALL), stride=16, tp=tp, bs_prefill=(1, 4), bs_decode=(2,))
    dt = "f16" if dtype == "fp8" else dtype
    public = public_functions(text)
    want = {f"prefill_bs{n}": ("prefill_bs{N}", n) for n in (1, 4)}
    want.update({"decode_bs2": ("decode_bs{N}", 2)})
    assert sorted(public) == sorted([*want, *(f"{k}$async" for k in want)])
    for name, (heading, n) in want.items():
        doc = doc_signature(table(tables, heading), ns, n=n, dt=dt, cdt=cache)
        got = entry_signature(public[f"{name}$async"])
        assert got == doc, name
        n_args = len(doc["args"])
        header = public[name].split("\n")[0]
        assert header.count("!hal.buffer_view") == n_args + 1, name  # + the logits
        header = public[f"{name}$async"].split("\n")[0]
        assert header.count("!hal.fence") == 2 and header.count("!hal.buffer_view") == n_args + 1


def test_page_layout(tmp_path):
    from halo_mlir.sharding_passes.plan import cache_sharding

    d = checkpoint(tmp_path / "ckpt", SMALL)
    text = emit(tmp_path, "m", "--hf-config", d / "config.json", "--block-seq-stride", 16)
    tables = doc_tables()
    cfg = cfg_of(SMALL)
    ns = symbols(tables, cfg, stride=16)
    rows = table(tables, "Paged KV cache layout")
    assert [int(r["dim"]) for r in rows] == list(range(5))
    sizes = [evaluate(r["size"], ns) for r in rows]
    attrs = set(re.findall(r"halo\.kv_cache = array<i64: ([\d, ]+)>", text))
    assert attrs == {", ".join(map(str, sizes))}  # the entries' view of a page
    assert int(np.prod(sizes)) == ns["page_elems"]
    split = [i for i, r in enumerate(rows) if r["split at tp > 1"] == "yes"]
    assert split == [cache_sharding(cfg, 16).at]
    assert "kv head" in rows[split[0]]["holds"]


def doc_config(tables, ns, cdt: str) -> dict:
    names = {r["CDT"]: r["CDT_NAME"] for r in table(tables, "config.json", 1)}
    out: dict = {}
    for r in table(tables, "config.json"):
        *path, last = r["key"].split(".")
        node = out
        for p in path:
            node = node.setdefault(p, {})
        node[last] = evaluate(r["value"], {**ns, "CDT_NAME": names[cdt]})
    return out


@pytest.mark.parametrize("args, sym, cdt", [
    ([], {}, "f16"),
    (["--bs-prefill", "4,1,4", "--bs-decode", "8", "--block-seq-stride", 16, "--tp", 2,
      "--device-block-count", 100, "--dtype", "fp8"],
     dict(bs_prefill=(4, 1), bs_decode=(8,), stride=16, tp=2, device_block_count=100),
     "f8E4M3FNUZ"),
    (["--dtype", "bf16"], {}, "bf16"),
])
def test_config_json(tmp_path, args, sym, cdt):
    d = checkpoint(tmp_path / "ckpt", SMALL)
    halo("emit", "--hf-config", d / "config.json", *args, "-o", tmp_path / "m.mlir",
         "--output-config", tmp_path / "config.json")
    got = json.loads((tmp_path / "config.json").read_text())
    tables = doc_tables()
    assert got == doc_config(tables, symbols(tables, cfg_of(SMALL), **sym), cdt)


def test_export_shortfin_config(tmp_path, monkeypatch):
    """export-shortfin writes the same config.json (compiled by a stand-in: this test is
    about the files, not the compiler)."""
    from tokenizers import Tokenizer, models

    import halo_mlir.toolchain.compile
    import halo_mlir.export
    from halo_mlir.export import export_shortfin

    d = checkpoint(tmp_path / "ckpt", SMALL)
    Tokenizer(models.WordLevel({"a": 0, "</s>": 1}, unk_token="a")).save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    halo("import-params", "--safetensors", d, "--dtype", "f32", "-o", d / "m.irpa")
    monkeypatch.setattr(halo_mlir.export, "check_release", lambda: None)
    monkeypatch.setattr(halo_mlir.toolchain.compile, "compile_file",
                        lambda src, dst, **_: Path(dst).write_bytes(b"vmfb"))
    export_shortfin(tmp_path / "out", hf_config=str(d / "config.json"), params=str(d / "m.irpa"),
                    target="cpu", bs=(1, 4), device_block_count=64, echo=lambda _: None)
    got = json.loads((tmp_path / "out" / "config.json").read_text())
    tables = doc_tables()
    ns = symbols(tables, cfg_of(SMALL), bs_prefill=(1, 4), bs_decode=(1, 4),
                 device_block_count=64)
    assert got == doc_config(tables, ns, "f32")  # --target cpu: f32


# A small Mixtral (family `mixtral`): the SMALL model with 3 experts, top-2.
SMALL_MOE = {**{k: v for k, v in SMALL.items() if k != "rope_scaling"},
             "architectures": ["MixtralForCausalLM"], "model_type": "mixtral",
             "num_local_experts": 3, "num_experts_per_tok": 2, "sliding_window": None,
             "vocab_size": 300}  # room for a byte-level BPE vocabulary (256 bytes + merges)


@pytest.mark.parametrize("source", ["hf-config", "gguf"])
def test_export_shortfin_config_moe(tmp_path, monkeypatch, source):
    """export-shortfin of a mixture-of-experts model (from --hf-config with --params, and
    from a llama.cpp Mixtral GGUF) writes the config.json this doc specifies (compiled by a
    stand-in, as above)."""
    from tokenizers import Tokenizer, models

    import halo_mlir.toolchain.compile
    import halo_mlir.export
    from halo_mlir.export import export_shortfin
    from moe_gguf import byte_level_bpe, write_mixtral_gguf
    from test_moe import _tiny_checkpoint

    d = tmp_path / "ckpt"
    d.mkdir()
    cfg = cfg_of(SMALL_MOE)
    tensors = _tiny_checkpoint(d, hf=SMALL_MOE)
    monkeypatch.setattr(halo_mlir.export, "check_release", lambda: None)
    monkeypatch.setattr(halo_mlir.toolchain.compile, "compile_file",
                        lambda src, dst, **_: Path(dst).write_bytes(b"vmfb"))
    if source == "gguf":
        write_mixtral_gguf(d / "m.gguf", tensors, SMALL_MOE,
                           tokenizer=byte_level_bpe(SMALL_MOE["vocab_size"]))
        export_shortfin(tmp_path / "out", gguf=str(d / "m.gguf"), target="cpu", bs=(1, 4),
                        device_block_count=64, echo=lambda _: None)
    else:
        Tokenizer(models.WordLevel({"a": 0, "</s>": 1}, unk_token="a")).save(
            str(d / "tokenizer.json"))
        (d / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
        halo("import-params", "--safetensors", d, "--dtype", "f32", "-o", d / "m.irpa")
        export_shortfin(tmp_path / "out", hf_config=str(d / "config.json"),
                        params=str(d / "m.irpa"), target="cpu", bs=(1, 4),
                        device_block_count=64, echo=lambda _: None)
    got = json.loads((tmp_path / "out" / "config.json").read_text())
    tables = doc_tables()
    ns = symbols(tables, cfg, bs_prefill=(1, 4), bs_decode=(1, 4), device_block_count=64)
    assert got == doc_config(tables, ns, "f32")
    assert sorted(f.name for f in (tmp_path / "out").iterdir()) == [
        "config.json", "model.irpa", "model.vmfb", "tokenizer.json", "tokenizer_config.json"]


def test_iree_releases():
    from halo_mlir.toolchain import compat

    rows = table(doc_tables(), "IREE releases")
    assert sorted(r["release"] for r in rows) == sorted(compat.TABLE)
    for r in rows:
        shortfin = compat.TABLE[r["release"]].shortfin
        assert r["shortfin"] == (shortfin or "none"), r["release"]
