"""Every attention form and dtype we emit compiles for gfx942 (MI300X), and prefill
matmuls and prefill attention use MFMA at dynamic length (the S-divisibility hint, and the
attention's keys as [pages, stride]). Runs on CPU: only the compiler."""

import re

import pytest

from conftest import halo

CASES = [("paged", "f16"), ("paged", "bf16"), ("fused", "f16"), ("decomposed", "f16"),
         ("fused", "bf16")]


@pytest.mark.parametrize("attention,dtype", CASES)
def test_compiles_for_gfx942_with_mfma(tmp_path, attention, dtype):
    mlir, vmfb, dump = tmp_path / "m.mlir", tmp_path / "m.vmfb", tmp_path / "dump"
    halo("emit", "--model", "toy", "--layers", 1, "--attention", attention, "--dtype", dtype,
         "--bs-prefill", "1,4", "--bs-decode", "1,4", "-o", mlir)
    halo("compile", mlir, "--target", "gfx942", "-o", vmfb,
         f"--flag=--iree-hal-dump-executable-files-to={dump}")
    assert vmfb.stat().st_size > 0
    isa = "".join(p.read_text() for p in dump.glob("*.rocmasm"))
    mfma = re.findall(r"v_mfma_f32_\w+", isa)
    assert mfma, "no MFMA instruction in the gfx942 ISA"
    if attention != "decomposed":  # one attention op per prefill entry: it uses MFMA
        assert_prefill_attention_mfma(dump, ["1", "4"], f"v_mfma_f32_16x16x16_{dtype}")


def assert_prefill_attention_mfma(dump, batch_sizes, instruction):
    """Each prefill_bs{N} entry's attention dispatch (dynamic length) holds `instruction`."""
    counts = {name: asm.count(instruction) for name, asm in kernels_of(dump).items()
              if name.startswith("prefill") and "_attention_" in name}
    print(f"prefill attention dispatches and their {instruction} counts: {counts}")
    for bs in batch_sizes:
        mine = {n: c for n, c in counts.items() if n.startswith(f"prefill_bs{bs}$")}
        assert mine and all(mine.values()), f"prefill_bs{bs}: {mine or counts}"


def test_8b_prefill_attention_uses_mfma(tmp_path):
    """The default program at Llama 3 8B shapes (1 layer): its prefill attention (GQA 4,
    head_dim 128, dynamic length) uses MFMA."""
    mlir, vmfb, dump = tmp_path / "m.mlir", tmp_path / "m.vmfb", tmp_path / "dump"
    halo("emit", "--model", "8b", "--layers", 1, "--bs-prefill", "4", "--bs-decode", "4",
         "-o", mlir)
    halo("compile", mlir, "--target", "gfx942", "-o", vmfb,
         f"--flag=--iree-hal-dump-executable-files-to={dump}")
    assert_prefill_attention_mfma(dump, ["4"], "v_mfma_f32_16x16x16_f16")


# Each templated kernel alone (the workbench's `kernel compile`), at static shapes. MFMA is
# asserted where the shapes allow it: decode attention has one query per row, so MFMA needs
# G >= 16 query heads per kv head (405B-like) and a long context; at G = 4 it compiles
# without (a bandwidth-bound kernel). fp8 uses the f8 MFMA. Prefill attention takes its keys
# as [pages, stride] for MFMA at the model's dynamic length (asserted on the model above);
# at fully static shapes IREE 3.13 keeps both key dims and its MMA schedule, which takes one
# static key dim, declines: no MFMA there (NOTES.md).
KERNEL_CASES = [
    ("paged_decode_attention", {"group": 16, "kv_heads": 8, "head_dim": 128, "stride": 32},
     {"blocks": 64}, "v_mfma_f32_16x16x16_f16"),
    ("paged_decode_attention", {"dtype": "bf16", "group": 4, "head_dim": 128}, {}, None),
    ("paged_decode_attention_fp8", {"group": 16, "kv_heads": 8, "head_dim": 128, "stride": 32},
     {"blocks": 64}, "v_mfma_f32_16x16x16_f16"),
    ("paged_prefill_attention", {"dtype": "f16"}, {}, None),
    ("paged_prefill_attention", {"dtype": "bf16"}, {}, None),
    ("fp8_matmul", {}, {}, "v_mfma_f32_16x16x32_fp8_fp8"),
    ("fp8_matmul_rows", {}, {}, "v_mfma_f32_16x16x32_fp8_fp8"),
    ("fp8_matmul_tokens", {}, {}, "v_mfma_f32_16x16x32_fp8_fp8"),
    ("fp8_matmul_tokens", {"w_scales": "rows"}, {}, "v_mfma_f32_16x16x32_fp8_fp8"),
    ("fp8_attention", {"head_dim": 128}, {"s": 64, "t": 128}, "v_mfma_f32_16x16x32_fp8_fp8"),
    ("q8_0_matmul", {}, {}, None),
    ("q4_1_matmul", {}, {}, None),
    ("q8_0_rows", {}, {}, None),
    ("q4_1_rows", {}, {}, None),
    ("q4_k_matmul", {}, {}, None),
    ("q6_k_matmul", {}, {}, None),
    ("q4_k_rows", {}, {}, None),
    ("q6_k_rows", {}, {}, None),
]


@pytest.mark.parametrize("name,params,sizes,mfma", KERNEL_CASES,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(KERNEL_CASES)])
def test_kernel_compiles_for_gfx942(name, params, sizes, mfma):
    from halo_mlir.kernels.workbench import compile_report, instance

    r = compile_report(instance(name, params, sizes), "gfx942")
    print(f"{name} {params} {sizes}: {r.seconds:.2f} s, pipelines {r.pipelines}, MFMA {r.mfma}")
    assert r.dispatches >= 1
    if mfma:
        assert r.mfma.get(mfma, 0) > 0, r.mfma


def kernels_of(dump) -> dict[str, str]:
    """The dumped gfx942 ISA split by kernel: {kernel name: its assembly}."""
    text = "".join(p.read_text() for p in dump.glob("*.rocmasm"))
    parts = re.split(r"^\s*\.type\s+(\S+),@function\s*$", text, flags=re.M)
    return {parts[i]: parts[i + 1] for i in range(1, len(parts), 2)}


@pytest.mark.parametrize("extra", [[], ["--layer-loop"], ["--fp8-scales", "per-channel"],
                                   ["--fp8-input-scales", "dynamic"]],
                         ids=["unrolled", "loop", "per-channel", "dynamic"])
def test_fp8_model_compiles_for_gfx942_with_fp8_mfma(tmp_path, extra):
    """`--dtype fp8` (toy, 2 layers): every prefill fp8 linear and the prefill attention use
    the fp8 MFMA. (Decode's M = 4 matmuls and attention get no MFMA, as in f16.)"""
    mlir, vmfb, dump = tmp_path / "m.mlir", tmp_path / "m.vmfb", tmp_path / "dump"
    halo("emit", "--model", "toy", "--layers", 2, "--dtype", "fp8", "--bs-prefill", "4",
         "--bs-decode", "4", *extra, "-o", mlir)
    halo("compile", mlir, "--target", "gfx942", "-o", vmfb,
         f"--flag=--iree-hal-dump-executable-files-to={dump}")
    linears = {name: asm.count("v_mfma_f32_16x16x32_fp8_fp8")
               for name, asm in kernels_of(dump).items()
               if name.startswith("prefill") and "matmul" in name and "f8E4M3FNUZ" in name}
    print(f"prefill fp8 linears and their fp8 MFMA counts: {linears}")
    assert len(linears) >= 4 and all(linears.values()), linears
    assert_prefill_attention_mfma(dump, ["4"], "v_mfma_f32_16x16x32_fp8_fp8")


def test_decode_reads_weights_and_pages_with_128_bit_loads(tmp_path):
    """8B shapes, 1 layer, decode bs 4 (`--attention paged`), gfx942 ISA: the matmuls read
    weights with 128-bit loads, and the attention reads the KV pages in place (the page
    gathers fused into its dispatch) with 128-bit loads, no 16-bit ones; the cache write's
    scatter too. Not covered (see NOTES.md): the embedding lookup (16-bit loads of the
    table), RoPE, and the cache write's read of the row's current page, fused with the merge
    of the new K/V (one page per row and layer, read with narrow loads)."""
    from halo_mlir.toolchain.isa import load_widths, narrow, table

    mlir, vmfb, dump = tmp_path / "m.mlir", tmp_path / "m.vmfb", tmp_path / "dump"
    halo("emit", "--model", "8b", "--layers", 1, "--bs-prefill", 4, "--bs-decode", 4,
         "-o", mlir)
    halo("compile", mlir, "--target", "gfx942", "-o", vmfb,
         f"--flag=--iree-hal-dump-executable-files-to={dump}")
    print(table(dump, "decode"))
    decode = load_widths(dump, "decode")
    kind = {name: re.sub(r"^decode_bs4\$async_dispatch_\d+_", "", name).split("_")[0]
            for name in decode}
    matmuls = [n for n in decode if kind[n] == "matmul"]
    attention = [n for n in decode if kind[n] == "attention"]
    # the cache write: the page read fused with the merge (`gather_..._generic`), the scatter
    merges = [n for n in decode if kind[n] == "gather" and n.endswith("_generic")]
    gathers = [n for n in decode if kind[n] in ("gather", "scatter") and n not in merges]
    assert len(matmuls) >= 7 and len(attention) == 1 and gathers and len(merges) == 1, kind
    for n in matmuls:  # weights: 128-bit; a residual-add epilogue reads 1 f16 per row (4)
        assert decode[n].get("b128", 0) >= 8 and narrow(decode[n]) <= 4, (n, decode[n])
    for n in attention + gathers:  # KV pages: 128-bit, nothing narrower than the i1 mask
        assert decode[n].get("b128", 0) > 0 and not decode[n].get("b16"), (n, decode[n])
    # The attention's keys are (page, slot) straight from the cache: no separate gather
    # dispatch copies the pages for it (the one gather left is the cache write's).
    assert re.search(r"attention_4x1x8x4x128xDx32x128$", attention[0]), attention


# Fields read once per block (scales, mins): narrow loads are expected there and nowhere else.
SCALE_FIELDS = {"q8_0": 1, "q4_1": 2, "q4_k": 4, "q6_k": 2}


@pytest.mark.parametrize("fmt", list(SCALE_FIELDS))
def test_quantized_matmul_vectorizes_on_gfx942(fmt):
    """Each dequantize-in-matmul kernel at 8B shapes (4096 x 4096; its rows M are dynamic,
    so decode and prefill run this one kernel) compiles to a vector kernel, not a scalar
    fallback: the VectorDistribute pipeline, x and the quants read with 128-bit loads,
    narrow loads only for the per-block scale fields (one each), and the products as f32
    FMAs / packed multiplies."""
    from collections import Counter

    import tempfile
    from pathlib import Path

    from halo_mlir.toolchain.isa import kernels, widths
    from halo_mlir.kernels.workbench import compile_report, instance

    with tempfile.TemporaryDirectory() as tmp:
        r = compile_report(instance(f"{fmt}_matmul", {"n": 4096, "k": 4096}), "gfx942",
                           dump=Path(tmp))
        (name, asm), = kernels(tmp).items()
    loads = widths(asm)
    ops = Counter(re.findall(r"^\s*(v_\w+)", asm, re.M))
    fma = ops["v_fmac_f32_e32"] + ops["v_pk_fma_f32"]
    print(f"{fmt}_matmul: {name}: pipeline {r.pipelines}, loads {loads}, "
          f"fmac {fma}, v_pk_mul_f32 {ops['v_pk_mul_f32']}")
    assert r.pipelines == ["VectorDistribute"], r.pipelines
    assert loads.get("b128", 0) >= 4, loads
    assert sum(n for w, n in loads.items() if w != "b128") <= SCALE_FIELDS[fmt] + 1, loads
    assert fma >= 16 and ops["v_pk_mul_f32"] >= 4, ops


@pytest.mark.parametrize("fmt", list(SCALE_FIELDS))
def test_expert_matmul_compiles_for_gfx942(fmt):
    """The kept-quantized MoE decode kernel (`{fmt}_expert_matmul`: each row reads the
    blocks of the expert its id picks, inside the contraction) at Mixtral-like shapes (8
    experts, 4096 x 4096, 5 rows) compiles for gfx942 with the flag `compile` adds for MoE
    modules (the reduction VectorDistribute pipeline fails on it, as on the float gather
    form), and its arithmetic is vector code: x read with a 128-bit load, f32 FMAs and
    packed f32 multiplies. The quants are gathered: a data-dependent index (the expert id)
    makes IREE read them one byte a load (at least 16 8-bit loads), which this pins so a
    change in either direction shows (docs/quantized.md)."""
    from collections import Counter

    import tempfile
    from pathlib import Path

    from halo_mlir.toolchain.isa import kernels, widths
    from halo_mlir.kernels.workbench import compile_report, instance

    with tempfile.TemporaryDirectory() as tmp:
        r = compile_report(instance(f"{fmt}_expert_matmul", {"e": 8, "n": 4096, "k": 4096}),
                           "gfx942", dump=Path(tmp))
        (name, asm), = kernels(tmp).items()
    loads = widths(asm)
    ops = Counter(re.findall(r"^\s*(v_\w+)", asm, re.M))
    fma = ops["v_fmac_f32_e32"] + ops["v_pk_fma_f32"]
    print(f"{fmt}_expert_matmul: {name}: pipeline {r.pipelines}, loads {loads}, "
          f"fmac {fma}, v_pk_mul_f32 {ops['v_pk_mul_f32']}")
    assert r.pipelines == ["TileAndFuse"], r.pipelines
    assert loads.get("b128", 0) >= 1, loads
    assert loads.get("b8", 0) >= 16, loads
    assert fma >= 8 and ops["v_pk_mul_f32"] >= 8, ops


def test_k_quant_model_compiles_for_gfx942(tmp_path):
    """A whole program with Q4_K, Q6_K, Q8_0 and Q4_1 weights kept quantized (f16
    activations, hidden 512 = 2 super-blocks a row, bs 4) compiles for gfx942, and each
    K-quant matmul dispatch of prefill and decode, fused with its neighbours (the f16 -> f32
    input cast, RMSNorm), is still vector code: some 64/128-bit loads, packed f32
    multiplies, and few narrow loads (its scale fields, the fused input's f16 pieces)."""
    from collections import Counter

    import kquant_gguf as kq

    from halo_mlir.toolchain.isa import kernels, load_widths, narrow, table

    path, mlir, vmfb, dump = (tmp_path / n for n in ("m.gguf", "m.mlir", "m.vmfb", "dump"))
    kq.write(path, kq.tp_mix, hidden=512)
    halo("emit", "--gguf", path, "--keep-quantized", "--bs-prefill", 4, "--bs-decode", 4,
         "-o", mlir)
    halo("compile", mlir, "--target", "gfx942", "-o", vmfb,
         f"--flag=--iree-hal-dump-executable-files-to={dump}")
    k_quant = {n: w for n, w in load_widths(dump).items()
               if re.search(r"_f32xf16(xf16)?xi8xi8xi8xf32$", n)}
    print(table(dump))
    asm = kernels(dump)
    for entry in ("prefill_bs4", "decode_bs4"):
        mine = {n: w for n, w in k_quant.items() if n.startswith(entry)}
        assert len(mine) >= 5, (entry, list(k_quant))
        for n, w in mine.items():
            packed = Counter(re.findall(r"^\s*(v_pk_mul_f32)", asm[n], re.M))["v_pk_mul_f32"]
            assert w.get("b128", 0) + w.get("b64", 0) >= 1 and narrow(w) <= 8, (n, w)
            assert packed >= 2, (n, packed)


def test_fp8_experts_compile_for_gfx942(tmp_path):
    """A Grok-shaped model with fp8 experts (tests/moeq_gguf.py: 4 experts, hidden 256,
    expert ffn 512; --dtype fp8, f16 activations, an fp8 cache, bs 4) compiles for gfx942.
    The dense fp8 linears (attention) use the fp8 MFMA; the experts do not: the grouped
    prefill's per-expert fp8 matmuls have a dynamic row count (the tokens that picked the
    expert) with no divisibility to promise, and the decode form gathers the picked experts'
    fp8 rows one byte a load (docs/moe.md)."""
    import moeq_gguf as mq

    from halo_mlir.toolchain.isa import kernels, widths

    path, mlir, vmfb, dump = (tmp_path / n for n in ("m.gguf", "m.mlir", "m.vmfb", "dump"))
    mq.write(path, mq.MIXED)
    halo("emit", "--gguf", path, "--dtype", "fp8", "--bs-prefill", 4, "--bs-decode", 4,
         "-o", mlir)
    proc = halo("compile", mlir, "--target", "gfx942", "-o", vmfb,
                f"--flag=--iree-hal-dump-executable-files-to={dump}")
    assert "--iree-codegen-llvmgpu-use-reduction-vector-distribution=false" in proc.stderr
    found = kernels(dump)
    fp8_mfma = {n: a.count("v_mfma_f32_16x16x32_fp8_fp8") for n, a in found.items()}
    experts = {n: c for n, c in fp8_mfma.items() if "f8E4M3FNUZ" in n and "512" in n}
    print(f"fp8 MFMA per dispatch: {fp8_mfma}")
    print({n: widths(found[n]) for n in experts})
    assert any(c for n, c in fp8_mfma.items() if n.startswith("prefill") and n not in experts)
    assert experts and not any(experts.values()), experts
    decode = [n for n in experts if n.startswith("decode")]
    assert len(decode) == 3 and all(widths(found[n]).get("b8", 0) >= 16 for n in decode)
