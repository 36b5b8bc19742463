"""The capacity planner against numbers worked out by hand (GB = 1e9 bytes)."""

import json

import pytest

from halo_mlir.analysis.capacity import (GPUS, activation_terms, allreduce_seconds, format_table,
                                gpu_spec, kv_bytes_per_token, param_count, plan,
                                require_fit, weight_bytes)
from halo_mlir.config import from_hf_dict, preset
from halo_mlir.errors import HaloError

MI300X = 192_000_000_000  # bytes, AMD's stated capacity
WORKSPACE = 9_600_000_000  # default 5% of it


# ---- parameter counts ---------------------------------------------------------------

def test_8b_param_count_is_exact():
    # embed      128256*4096                      =   525,336,576
    # per layer: q 4096*4096                      =    16,777,216
    #            k, v 1024*4096 each              =     4,194,304 x 2
    #            o 4096*4096                      =    16,777,216
    #            gate/up/down 3*14336*4096        =   176,160,768
    #            2 norms of 4096                  =         8,192
    #            sum                              =   218,112,000  x 32 = 6,979,584,000
    # final norm                                  =         4,096
    # lm_head    128256*4096                      =   525,336,576
    # total 525,336,576*2 + 6,979,584,000 + 4,096 = 8,030,261,248
    assert param_count(preset("8b")) == 8_030_261_248


def test_70b_and_405b_param_counts():
    # 70b: embed = lm_head = 128256*8192 = 1,050,673,152
    #   layer: q,o 2*8192*8192 = 134,217,728; k,v 2*1024*8192 = 16,777,216;
    #          ffn 3*28672*8192 = 704,643,072; norms 16,384  -> 855,654,400 x 80
    #   = 68,452,352,000 + 2*1,050,673,152 + 8,192 = 70,553,706,496
    assert param_count(preset("70b")) == 70_553_706_496
    # 405b: embed = lm_head = 128256*16384 = 2,101,346,304
    #   layer: q,o 2*16384^2 = 536,870,912; k,v 2*1024*16384 = 33,554,432;
    #          ffn 3*53248*16384 = 2,617,245,696; norms 32,768 -> 3,187,703,808 x 126
    #   = 401,650,679,808 + 2*2,101,346,304 + 16,384 = 405,853,388,800
    assert param_count(preset("405b")) == 405_853_388_800


def test_tied_embeddings_have_no_lm_head():
    cfg = from_hf_dict({"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
                        "num_key_value_heads": 2, "num_hidden_layers": 2, "vocab_size": 100,
                        "tie_word_embeddings": True})
    # embed 100*64 = 6,400 (once); layer: q,o 2*64*64 = 8,192; k,v 2*32*64 = 4,096;
    # ffn 3*128*64 = 24,576; norms 128 -> 36,992 x 2 = 73,984; final norm 64
    assert param_count(cfg) == 6_400 + 73_984 + 64
    untied = from_hf_dict({**_hf(cfg), "tie_word_embeddings": False})
    assert param_count(untied) == param_count(cfg) + 6_400


def _hf(cfg):
    return {"hidden_size": cfg.hidden_size, "intermediate_size": cfg.ffn_dim,
            "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads,
            "num_hidden_layers": cfg.n_layers, "vocab_size": cfg.vocab_size}


# ---- weights per device -------------------------------------------------------------

def test_8b_f16_tp1_weights():
    # 8,030,261,248 params * 2 bytes = 16,060,522,496 bytes = 16.06 GB
    assert weight_bytes(preset("8b"), 1, "f16") == 16_060_522_496
    assert plan(preset("8b"), max_seq_len=4096).weight_bytes == 16_060_522_496
    assert weight_bytes(preset("8b"), 1, "bf16") == 16_060_522_496
    assert weight_bytes(preset("8b"), 1, "f32") == 32_121_044_992


def test_405b_tp8_weights_f16_and_fp8():
    # Split by 8: block matmuls 3,187,671,040/8 = 398,458,880 a layer x 126 = 50,205,818,880
    #             lm_head 2,101,346,304/8 = 262,668,288
    # Replicated: token_embd 2,101,346,304; norms 126*2*16384 + 16384 = 4,145,152
    # f16: (50,205,818,880 + 262,668,288 + 2,101,346,304 + 4,145,152) * 2 = 105,147,957,248
    assert weight_bytes(preset("405b"), 8, "f16") == 105_147_957_248
    # fp8: block matmuls 1 byte; lm_head, embedding, norms stay f16:
    # 50,205,818,880 + (262,668,288 + 2,101,346,304 + 4,145,152) * 2 = 54,942,138,368
    # i.e. ~405e9/8 = 50.7e9 plus ~4.2e9 of replicated f16 embedding.
    fp8 = weight_bytes(preset("405b"), 8, "fp8")
    assert fp8 == 54_942_138_368
    assert 405e9 / 8 < fp8 < 405e9 / 8 + 4.5e9


# ---- KV cache -----------------------------------------------------------------------

def test_kv_bytes_per_token_and_page():
    cfg = preset("8b")
    # 32 layers * 2 (K, V) * 8 kv heads * 128 * 2 bytes = 131,072
    assert kv_bytes_per_token(cfg, 1, "f16") == 131_072
    assert kv_bytes_per_token(cfg, 2, "f16") == 65_536     # 4 kv heads a device
    assert kv_bytes_per_token(cfg, 1, "fp8") == 65_536
    # page_elems (docs/ABI.md) = 32 * 2 * 8 * 32 * 128 = 2,097,152 elems = 4,194,304 bytes
    assert cfg.page_elems(32, 1) == 2_097_152
    assert plan(cfg, max_seq_len=4096).page_bytes == 4_194_304


def test_kv_pages_round_up():
    # 3 sequences of 100 tokens: ceil(100/32) = 4 pages each -> 12 pages
    p = plan(preset("8b"), max_seq_len=100, batch=3)
    assert p.kv_pages == 12
    assert p.kv_bytes == 12 * 4_194_304


def test_kv_dtype_defaults():
    assert plan(preset("8b"), max_seq_len=64).kv_dtype == "f16"
    assert plan(preset("8b"), max_seq_len=64, dtype="bf16").kv_dtype == "bf16"
    fp8 = plan(preset("8b"), max_seq_len=64, dtype="fp8")
    assert (fp8.kv_dtype, fp8.act_dtype) == ("fp8", "f16")
    assert plan(preset("8b"), max_seq_len=64, dtype="fp8", kv_dtype="f16").kv_dtype == "f16"


# ---- fits / does not fit --------------------------------------------------------------

def test_70b_f16_tp1_does_not_fit_at_full_context():
    # "70B OOM on one MI300": weights alone are 70,553,706,496 * 2 = 141.1 GB; with the
    # model's 131,072-token context the KV cache adds 131,072 * 327,680 B = 42.9 GB
    # (80 layers * 2 * 8 * 128 * 2 = 327,680 B a token), workspace 9.6 GB: over 192 GB
    # before counting any activation.
    p = plan(preset("70b"), max_seq_len=131_072)
    assert p.weight_bytes == 141_107_412_992
    assert p.kv_bytes == 131_072 * 327_680 == 42_949_672_960
    assert p.weight_bytes + p.kv_bytes + WORKSPACE > MI300X
    assert not p.fits and p.max_pages == 0
    assert p.shortfall_bytes == p.total_bytes - MI300X
    # A short context does fit (the weights are 141 GB of 192).
    assert plan(preset("70b"), max_seq_len=8192).fits


def test_405b_f16_tp8_fits_with_kv_capacity():
    p = plan(preset("405b"), tp=8, max_seq_len=131_072)
    assert p.capacity_bytes == MI300X
    # page: 126 layers * 2 * (8/8 kv heads) * 32 * 128 * 2 bytes = 2,064,384
    assert p.page_bytes == 2_064_384
    # 1 sequence of 131,072 tokens = 4,096 pages = 8,455,716,864 bytes
    assert p.kv_bytes == 4_096 * 2_064_384 == 8_455_716_864
    # Prefill activations of 131,072 tokens on one device (f16 = 2 bytes):
    assert p.activation_phase == "prefill"
    assert p.activation_terms == {
        "hidden": 2 * 131_072 * 16_384 * 2,          #  8,589,934,592
        "qkv": 131_072 * (16 + 2) * 128 * 2,         #    603,979,776
        "kv_gathered": 2 * 1 * 131_072 * 128 * 2,    #     67,108,864
        "attn_out": 131_072 * 16 * 128 * 2,          #    536,870,912
        "scores": 131_072 * 131_072,                 # 17,179,869,184 (fused: i1 mask)
        "ffn": 2 * 131_072 * 6_656 * 2,              #  3,489,660,928
        "logits": 131_072 * 128_256 * 2,             # 33,621,540,864
    }
    assert p.activation_bytes == 64_088_965_120
    # total = 105,147,957,248 + 8,455,716,864 + 64,088,965,120 + 9,600,000,000
    assert p.total_bytes == 187_292_639_232
    assert p.fits
    # free for KV = 192e9 - 105,147,957,248 - 64,088,965,120 - 9.6e9 = 13,163,077,632
    # max pages = 13,163,077,632 // 2,064,384 = 6,376 (204,032 tokens)
    assert p.max_pages == 6_376 and p.max_tokens == 204_032
    assert require_fit(p) is p


def test_impossible_request_reports_shortfall():
    # 70B f16 TP1, 64 sequences of 131,072 tokens: the KV cache alone is
    # 64 * 4,096 pages * 10,485,760 B = 2,748,779,069,440 B = 2,748.8 GB.
    p = plan(preset("70b"), max_seq_len=131_072, batch=64)
    assert p.kv_pages == 262_144 and p.page_bytes == 10_485_760
    assert p.kv_bytes == 2_748_779_069_440
    assert not p.fits
    assert p.shortfall_bytes == p.total_bytes - MI300X > 2_748_779_069_440 - MI300X
    with pytest.raises(HaloError) as e:
        require_fit(p)
    msg = str(e.value)
    assert "\n" not in msg
    assert "does not fit on mi300x" in msg
    assert f"{p.shortfall_bytes / 1e9:,.1f} GB short" in msg
    assert "KV cache 2,748.8" in msg
    assert "--tp" in msg and "fp8" in msg


def test_require_fit_suggests_the_tp_that_fits():
    p = plan(preset("70b"), max_seq_len=131_072)
    with pytest.raises(HaloError, match=r"GB short .*use --tp 2 \(fits\)"):
        require_fit(p)
    assert plan(preset("70b"), max_seq_len=131_072, tp=2).fits


def test_cpx_partition_is_an_eighth():
    cpx = gpu_spec("mi300x-cpx")
    assert cpx.memory_bytes == 24e9
    assert cpx.hbm_bytes_per_s == pytest.approx(5.3e12 / 8)
    assert cpx.peak_flops["f16"] == pytest.approx(1307.4e12 / 8)
    # 8B f16 weights (16.06 GB) + KV of 131,072 tokens (17.2 GB) > 24 GB
    assert not plan(preset("8b"), gpu="mi300x-cpx").fits
    assert plan(preset("8b"), gpu="mi300x-cpx", max_seq_len=8192).fits


def test_mi300x_figures():
    g = GPUS["mi300x"]
    assert (g.memory_bytes, g.hbm_bytes_per_s) == (192e9, 5.3e12)
    assert (g.peak_flops["f16"], g.peak_flops["bf16"], g.peak_flops["fp8"]) == (
        1307.4e12, 1307.4e12, 2614.9e12)
    assert g.links * g.link_bytes_per_s == 448e9


# ---- roofline -------------------------------------------------------------------------

def test_decode_roofline_8b():
    p = plan(preset("8b"), max_seq_len=4096)
    # Bytes read: weights minus the (looked-up) embedding, plus 4,096 tokens of KV:
    # 16,060,522,496 - 525,336,576*2 + 4,096*131,072 = 15,546,720,256
    assert p.decode.bytes_read == 15_546_720_256
    # FLOPs: 2 * (block matmuls 6,979,321,856 + lm_head 525,336,576)
    #        + attention 4 * 32 layers * 32 heads * 128 * 4,096 keys = 17,156,800,512
    assert p.decode.flops == 17_156_800_512
    assert p.decode.bound == "memory" and p.decode.comm_s == 0
    # The time is the cost model's (the same as `halo-mlir cost`'s): per kernel max(bytes,
    # FLOPs) + a launch. 32 layers * 13 kernels (as emitted: 2 norms, 7 matmuls, RoPE of Q,
    # the cache page's read-merge and scatter, attention) + 8 per call (embedding, RoPE
    # tables, mask, gather rows, write rows, final norm, lm_head) = 424 launches; the
    # kernels also move activations, so a little over the plain roofline (2.93 ms) + 424 * 2 us.
    assert p.decode.dispatches == 424
    assert p.decode.estimate.launch_s == pytest.approx(424 * GPUS["mi300x"].kernel_launch_s)
    plain = 15_546_720_256 / 5.3e12
    assert plain + 424 * 2e-6 < p.decode.seconds < 1.01 * plain + 424 * 2e-6
    assert p.decode_tokens_per_s == pytest.approx(1 / p.decode.seconds)


def test_prefill_roofline_8b_is_compute_bound():
    p = plan(preset("8b"), max_seq_len=8192)
    # 2 * 8,192 * 7,504,658,432 + 4*32*32*128 * (8,192*8,193/2 causal pairs)
    assert p.prefill.flops == 140_550_657_277_952
    assert p.prefill.bound == "compute"
    # Each kernel takes the longer of its bytes and FLOPs, so the call takes at least the
    # plain compute roofline (107.5 ms), and not much more here.
    plain = 140_550_657_277_952 / 1307.4e12
    assert plain < p.prefill.seconds < 1.05 * plain


def test_allreduce_comm_term():
    gpu = GPUS["mi300x"]
    fixed = gpu.copy_fixed_s
    assert allreduce_seconds(1, 8192, 2, 1, gpu) == 0
    # one-shot, 8 devices: each receives the 7 partials at once over 7 links (each copy
    # with its fixed cost), 1 step
    one = 16_384 / 64e9 + 7 * fixed + 10e-6
    assert allreduce_seconds(1, 8192, 2, 8, gpu, "one-shot") == pytest.approx(one)
    # reduce-scatter + all-gather: 2 steps, each a 1/8 chunk from every peer at once
    assert allreduce_seconds(1, 8192, 2, 8, gpu, "reduce-scatter") == pytest.approx(
        2 * (16_384 / 8 / 64e9 + 7 * fixed + 10e-6))
    # star (device 0): the 7 partials in, over 7 links, then 2 steps
    assert allreduce_seconds(1, 8192, 2, 8, gpu, "star") == pytest.approx(
        16_384 / 64e9 + 7 * fixed + 2 * 10e-6)
    # auto: one-shot up to 512 KiB, reduce-scatter above
    assert allreduce_seconds(1, 8192, 2, 8, gpu) == pytest.approx(one)
    big = 64 * 8192 * 2  # 1 MiB
    assert allreduce_seconds(64, 8192, 2, 8, gpu) == pytest.approx(
        2 * (big / 8 / 64e9 + 7 * fixed + 10e-6))
    # 70B decode, batch 1 (auto: one-shot): 2 all-reduces a layer * 80 layers, through the
    # same cost model; gathering the vocab-split logits on device 0 adds 7 copies (in
    # parallel over 7 links) and one dependent step.
    p = plan(preset("70b"), tp=8, max_seq_len=8192)
    assert p.decode.dependent_steps == 160 * 1 + 1
    logits = 128_256 // 8 * 2 / 64e9 + 7 * fixed + 10e-6
    assert p.decode.comm_s == pytest.approx(160 * one + logits)
    e = p.decode.estimate
    assert p.decode.seconds == pytest.approx(e.dispatch_s + e.launch_s + e.comm_s)


# ---- activations ----------------------------------------------------------------------

def test_decomposed_attention_holds_f32_scores():
    cfg = preset("8b")
    fused = activation_terms(cfg, tp=1, act_bytes=2, batch=1, q_len=1024, kv_len=1024)
    dec = activation_terms(cfg, tp=1, act_bytes=2, batch=1, q_len=1024, kv_len=1024,
                           attention="decomposed")
    assert fused["scores"] == 1024 * 1024                   # i1 mask, 1 byte
    assert dec["scores"] == 2 * 32 * 1024 * 1024 * 4        # scores + probs, f32


def test_prefill_batch_and_len_shrink_activations():
    big = plan(preset("70b"), max_seq_len=131_072, batch=64)
    small = plan(preset("70b"), max_seq_len=131_072, batch=64, prefill_batch=1,
                 prefill_len=8192)
    assert small.kv_bytes == big.kv_bytes
    assert small.activation_bytes < big.activation_bytes
    assert small.prefill.tokens == 8192


# ---- errors -----------------------------------------------------------------------------

@pytest.mark.parametrize("tp", [3, 16])
def test_tp_must_divide_kv_heads(tp):
    with pytest.raises(HaloError, match=rf"--tp {tp} does not divide the kv heads \(8\)"):
        plan(preset("8b"), tp=tp)


@pytest.mark.parametrize("kwargs, pattern", [
    ({"gpu": "b200"}, r"unknown GPU 'b200': choose one of mi300x, mi300x-cpx, h100, h200"),
    ({"dtype": "int4"}, r"unknown --dtype 'int4'"),
    ({"kv_dtype": "f64"}, r"unknown --kv-dtype 'f64'"),
    ({"batch": 0}, r"--batch must be at least 1"),
    ({"tp": 0}, r"--tp must be at least 1"),
    ({"workspace_fraction": 1.5}, r"workspace fraction"),
    ({"allreduce": "tree"}, r"unknown --allreduce 'tree'"),
    ({"attention": "flash"}, r"unknown attention 'flash'"),
])
def test_bad_knobs(kwargs, pattern):
    with pytest.raises(HaloError, match=pattern):
        plan(preset("8b"), max_seq_len=128, **kwargs)


# ---- output -----------------------------------------------------------------------------

def test_format_table_and_json():
    p = plan(preset("405b"), tp=8, max_seq_len=131_072)
    text = format_table(p)
    for row in ("weights", "KV cache", "activations", "workspace", "total", "capacity",
                "fits?", "max pages", "decode step", "prefill"):
        assert f"  {row}" in text, row
    assert "105.15 GB" in text and "4,096 pages x 2,064,384 B" in text
    assert "6,376 (204,032 tokens" in text and "tokens/s" in text
    d = json.loads(json.dumps(p.to_json()))
    assert d["model"] == "405b" and d["tp"] == 8
    assert d["per_device"]["weight_bytes"] == 105_147_957_248
    assert d["per_device"]["fits"] is True and d["per_device"]["max_pages"] == 6_376
    assert d["decode"]["tokens_per_s"] == pytest.approx(1 / p.decode.seconds)
    assert "NO:" in format_table(plan(preset("70b"), max_seq_len=131_072))
