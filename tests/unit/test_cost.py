"""halo_mlir.analysis.cost: the reader of stream-level IR on a hand-written program, the command on
toy modules compiled for gfx942, plan vs cost, and bad input."""

import json
import re
import subprocess
import sys

import pytest

from halo_mlir.analysis import cost, stream_ir

from halo_mlir.analysis import step_time
from halo_mlir.analysis.capacity import plan
from halo_mlir.config import preset
from halo_mlir.toolchain.gpus import GPUS

# Two devices. Device 0 gathers 2 of 8 cache pages (the cache is argument 4: [P, 4] f16),
# then a loop of 3 iterations: device 1 pulls 64 bytes from device 0 (invalidate from
# device 0) and runs a 4x8x16 matmul; the host waits once after the loop.
SNIPPET = r"""
module {
  util.global private @__device_0 : !hal.device
  util.global private @__device_1 : !hal.device
  util.global private @w : !stream.resource<constant>
  stream.executable private @ex {
    stream.executable.export public @gather workgroups() -> (index, index, index) {
      %x, %y, %z = iree_tensor_ext.dispatch.workgroup_count_from_slice()
      stream.return %x, %y, %z : index, index, index
    }
    builtin.module {
      func.func @gather(%arg0: !stream.binding, %arg1: !stream.binding, %arg2: !stream.binding, %arg3: i32) {
        %c0 = arith.constant 0 : index
        %0 = arith.index_castui %arg3 : i32 to index
        %1 = stream.binding.subspan %arg0[%c0] : !stream.binding -> !iree_tensor_ext.dispatch.tensor<readonly:tensor<?x4xf16>>{%0}
        %2 = stream.binding.subspan %arg1[%c0] : !stream.binding -> !iree_tensor_ext.dispatch.tensor<readonly:tensor<2x1xi64>>
        %3 = stream.binding.subspan %arg2[%c0] : !stream.binding -> !iree_tensor_ext.dispatch.tensor<writeonly:tensor<2x4xf16>>
        %4 = iree_tensor_ext.dispatch.tensor.load %1, offsets = [0, 0], sizes = [%0, 4], strides = [1, 1] : !iree_tensor_ext.dispatch.tensor<readonly:tensor<?x4xf16>>{%0} -> tensor<?x4xf16>
        %5 = iree_tensor_ext.dispatch.tensor.load %2, offsets = [0, 0], sizes = [2, 1], strides = [1, 1] : !iree_tensor_ext.dispatch.tensor<readonly:tensor<2x1xi64>> -> tensor<2x1xi64>
        %6 = tensor.empty() : tensor<2x4xf16>
        %7 = iree_linalg_ext.gather dimension_map = [0] ins(%4, %5 : tensor<?x4xf16>, tensor<2x1xi64>) outs(%6 : tensor<2x4xf16>) -> tensor<2x4xf16>
        iree_tensor_ext.dispatch.tensor.store %7, %3, offsets = [0, 0], sizes = [2, 4], strides = [1, 1] : tensor<2x4xf16> -> !iree_tensor_ext.dispatch.tensor<writeonly:tensor<2x4xf16>>
        return
      }
    }
  }
  stream.executable private @mm {
    stream.executable.export public @mm workgroups() -> (index, index, index) {
      %x, %y, %z = iree_tensor_ext.dispatch.workgroup_count_from_slice()
      stream.return %x, %y, %z : index, index, index
    }
    builtin.module {
      func.func @mm(%arg0: !stream.binding, %arg1: !stream.binding, %arg2: !stream.binding) {
        %c0 = arith.constant 0 : index
        %cst = arith.constant 0.0 : f32
        %0 = stream.binding.subspan %arg0[%c0] : !stream.binding -> !iree_tensor_ext.dispatch.tensor<readonly:tensor<4x16xf16>>
        %1 = stream.binding.subspan %arg1[%c0] : !stream.binding -> !iree_tensor_ext.dispatch.tensor<readonly:tensor<16x8xf16>>
        %2 = stream.binding.subspan %arg2[%c0] : !stream.binding -> !iree_tensor_ext.dispatch.tensor<writeonly:tensor<4x8xf32>>
        %3 = iree_tensor_ext.dispatch.tensor.load %0, offsets = [0, 0], sizes = [4, 16], strides = [1, 1] : !iree_tensor_ext.dispatch.tensor<readonly:tensor<4x16xf16>> -> tensor<4x16xf16>
        %4 = iree_tensor_ext.dispatch.tensor.load %1, offsets = [0, 0], sizes = [16, 8], strides = [1, 1] : !iree_tensor_ext.dispatch.tensor<readonly:tensor<16x8xf16>> -> tensor<16x8xf16>
        %5 = tensor.empty() : tensor<4x8xf32>
        %6 = linalg.fill ins(%cst : f32) outs(%5 : tensor<4x8xf32>) -> tensor<4x8xf32>
        %7 = linalg.matmul ins(%3, %4 : tensor<4x16xf16>, tensor<16x8xf16>) outs(%6 : tensor<4x8xf32>) -> tensor<4x8xf32>
        iree_tensor_ext.dispatch.tensor.store %7, %2, offsets = [0, 0], sizes = [4, 8], strides = [1, 1] : tensor<4x8xf32> -> !iree_tensor_ext.dispatch.tensor<writeonly:tensor<4x8xf32>>
        return
      }
    }
  }
  util.func public @decode_bs2$async(%a0: !hal.buffer_view, %a1: !hal.buffer_view, %a2: !hal.buffer_view, %a3: !hal.buffer_view, %a4: !hal.buffer_view, %f: !hal.fence) {
    %c0 = arith.constant 0 : index
    %c1 = arith.constant 1 : index
    %c3 = arith.constant 3 : index
    %c8 = arith.constant 8 : index
    %c16 = arith.constant 16 : index
    %c64 = arith.constant 64 : index
    %c256 = arith.constant 256 : index
    %c128 = arith.constant 128 : index
    %w = util.global.load immutable @w : !stream.resource<constant>
    %p = hal.buffer_view.dim<%a4 : !hal.buffer_view>[0] : index
    %bytes = arith.muli %p, %c8 : index
    %p32 = arith.index_castui %p : index to i32
    %cache = stream.tensor.import on(#hal.device.affinity<@__device_0>) consume %a4 : !hal.buffer_view -> tensor<?x4xf16>{%p} in !stream.resource<external>{%bytes}
    %idx = stream.tensor.import on(#hal.device.affinity<@__device_0>) %a1 : !hal.buffer_view -> tensor<2x1xi64> in !stream.resource<external>{%c16}
    %t0 = stream.timepoint.immediate => !stream.timepoint
    %r, %rt = stream.resource.alloca uninitialized on(#hal.device.affinity<@__device_0>) await(%t0) => !stream.resource<transient>{%c16} => !stream.timepoint
    %e0 = stream.cmd.execute on(#hal.device.affinity<@__device_0>) await(%rt) => with(%cache as %x0: !stream.resource<external>{%bytes}, %idx as %x1: !stream.resource<external>{%c16}, %r as %x2: !stream.resource<transient>{%c16}) {
      stream.cmd.dispatch @ex::@gather(%p32 : i32) {
        ro %x0[%c0 for %bytes] : !stream.resource<external>{%bytes},
        ro %x1[%c0 for %c16] : !stream.resource<external>{%c16},
        wo %x2[%c0 for %c16] : !stream.resource<transient>{%c16}
      }
    } => !stream.timepoint
    cf.br ^loop(%c0, %e0 : index, !stream.timepoint)
  ^loop(%i: index, %tp: !stream.timepoint):
    %more = arith.cmpi ult, %i, %c3 : index
    cf.cond_br %more, ^body, ^exit
  ^body:
    %o, %ot = stream.resource.alloca uninitialized on(#hal.device.affinity<@__device_1>) await(%tp) => !stream.resource<transient>{%c256} => !stream.timepoint
    %e1 = stream.cmd.execute on(#hal.device.affinity<@__device_1>) await(%ot) => with(%r as %y0: !stream.resource<transient>{%c16}, %w as %y1: !stream.resource<constant>{%c256}, %o as %y2: !stream.resource<transient>{%c256}) {
      stream.cmd.invalidate from(#hal.device.affinity<@__device_0>) %y0[%c0 for %c16] : !stream.resource<transient>{%c16}
      stream.cmd.copy %y0[%c0], %y2[%c128], %c16 : !stream.resource<transient>{%c16} -> !stream.resource<transient>{%c256}
      stream.cmd.dispatch @mm::@mm {
        ro %y2[%c0 for %c128] : !stream.resource<transient>{%c256},
        ro %y1[%c0 for %c256] : !stream.resource<constant>{%c256},
        wo %y2[%c128 for %c128] : !stream.resource<transient>{%c256}
      }
    } => !stream.timepoint
    %next = arith.addi %i, %c1 : index
    cf.br ^loop(%next, %e1 : index, !stream.timepoint)
  ^exit:
    %done = stream.timepoint.await %tp => %r : !stream.resource<transient>{%c16}
    util.return
  }
}
"""


def _snippet_cost(pages=8):
    p = cost.Program(SNIPPET)
    return cost.cost_program(p, "mi300x", context=32, stride=32, pages=pages).entries[0]


def test_snippet_counts_the_loop_body_once_per_iteration():
    e = _snippet_cost()
    assert e.name == "decode_bs2$async" and e.batch == 2 and e.devices == 2
    t = e.total
    assert (t.dispatches, t.submissions, t.host_waits) == (1 + 3, 1 + 3, 1)
    assert (t.cross_copies, t.cross_copy_bytes, t.local_copies) == (3, 3 * 16, 0)
    # device 1 waits on device 0 once; later iterations wait on device 1 itself
    assert t.dependent_steps == 1
    assert e.loop_trips == 3
    body = e.loop_body
    assert (body.dispatches, body.cross_copies, body.submissions) == (1, 1, 1)


def test_snippet_bytes_from_the_executables():
    e = _snippet_cost(pages=8)
    gather, mm = e.dispatch_records[0], e.dispatch_records[1]
    # the gather reads 2 of the 8 pages (2 x 4 f16 = 16 B), not the whole 64 B binding,
    # plus its 16 B of indices; the cache is argument 4, so those 16 B are KV bytes
    assert (gather.bytes_read, gather.kv_bytes_read, gather.bytes_written) == (32, 16, 16)
    # the matmul: 4x16 f16 + 16x8 f16 read (the weight global: 256 B), 4x8 f32 written
    assert (mm.bytes_read, mm.weight_bytes_read, mm.bytes_written) == (128 + 256, 256, 128)
    assert (mm.flops, mm.dtype) == (2 * 4 * 8 * 16, "f16")
    # the pages' count only sizes the binding: the same 2 pages are read from a larger cache
    assert _snippet_cost(pages=1000).dispatch_records[0].bytes_read == 32


def test_snippet_estimate_is_the_model_over_its_records():
    e = _snippet_cost()
    gpu = GPUS["mi300x"]
    expected = step_time.estimate(
        e.dispatch_records, [step_time.Copy(1, 16, peer=0, count=3)], gpu,
        dependent_steps=1, host_waits=1)
    assert e.estimate.seconds == pytest.approx(expected.seconds)
    assert e.estimate.device == 1  # 3 matmuls + 3 copies beat 1 gather
    assert e.estimate.host_wait_s == gpu.host_wait_s
    assert e.estimate.step_s == gpu.transfer_latency_s


def test_evaluator_index_arithmetic():
    from iree.compiler import ir

    text = """
    func.func @f(%a: index) -> index {
      %c7 = arith.constant 7 : index
      %c2 = arith.constant 2 : index
      %0 = arith.ceildivui %a, %c7 : index
      %1 = arith.muli %0, %c2 : index
      %2 = arith.maxui %1, %c7 : index
      %3 = arith.cmpi ugt, %2, %c7 : index
      %4 = arith.select %3, %2, %c2 : index
      %5 = arith.index_castui %4 : index to i32
      %6 = arith.extui %5 : i32 to i64
      %c32 = arith.constant 32 : i64
      %7 = arith.shli %6, %c32 : i64
      %8 = arith.shrui %7, %c32 : i64
      %9 = arith.index_castui %8 : i64 to index
      return %9 : index
    }"""
    with ir.Context() as ctx:
        m = ir.Module.parse(text, ctx)
        f = m.body.operations[0]
        block = f.regions[0].blocks[0]
        env = {block.arguments[0]: 50}
        for op in block.operations:
            stream_ir.fold(op.operation, env)
        ret = list(block.operations)[-1].operation
        assert env[ret.operands[0]] == 16  # ceil(50/7)=8, *2=16, max(16,7)=16 > 7


# ---- the command on compiled toy modules --------------------------------------------

def _halo(*args, check=True):
    proc = subprocess.run([sys.executable, "-m", "halo_mlir", *map(str, args)],
                          capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(proc.stderr)
    return proc


def _stream_dispatches(mlir, tp, tmp_path, entry="decode_bs4$async"):
    """`stream.cmd.dispatch` ops in the entry's text (no loop: each runs once)."""
    out = tmp_path / "x.stream.mlir"
    _halo("compile", mlir, "--target", "gfx942", "--tp", tp, "--flag=--compile-to=stream",
          "-o", out)
    text = out.read_text()
    start = text.index(f"util.func public @{entry}(")
    body = text[start:text.index("\n  }\n", start)]
    return len(re.findall(r"stream\.cmd\.dispatch @", body))


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    d = tmp_path_factory.mktemp("toy")
    for tp in (1, 2):
        for layers in (2, 3):
            _halo("emit", "--model", "toy", "--layers", layers, "--tp", tp,
                  "-o", d / f"toy{layers}-tp{tp}.mlir")
    _halo("emit", "--model", "toy", "--layers", 2, "--layer-loop", "-o", d / "loop2.mlir")
    return d


@pytest.mark.parametrize("tp", [1, 2])
def test_cost_counts_the_compiled_dispatches(toy, tmp_path, tp):
    mlir = toy / f"toy2-tp{tp}.mlir"
    d = json.loads(_halo("cost", mlir, "--tp", tp, "--json").stdout)
    assert d["devices"] == tp
    dec = next(e for e in d["entries"] if e["entry"] == "decode_bs4$async")
    assert dec["total"]["dispatches"] == _stream_dispatches(mlir, tp, tmp_path)
    assert dec["loop_trips"] == 0 and "per_layer" not in dec
    if tp == 1:
        assert dec["total"]["cross_copies"] == 0 and dec["total"]["dependent_steps"] == 0
    else:
        assert dec["total"]["cross_copies"] > 0 and dec["total"]["dependent_steps"] > 0
    # KV bytes: the toy's 2 layers x 4 sequences x 2,048 tokens x K and V (8 heads x 64 x
    # f16), read at least once
    assert dec["total"]["kv_bytes_read"] >= 2 * 4 * 2048 * 2 * 8 * 64 * 2


def test_per_layer_by_difference(toy):
    big = json.loads(_halo("cost", toy / "toy3-tp2.mlir", "--tp", 2, "--json").stdout)
    d = json.loads(_halo("cost", toy / "toy3-tp2.mlir", "--minus", toy / "toy2-tp2.mlir",
                         "--json").stdout)
    small = json.loads(_halo("cost", toy / "toy2-tp2.mlir", "--json").stdout)
    for e, b, s in zip(d["entries"], big["entries"], small["entries"]):
        assert e["per_layer_source"] == "difference of 3 and 2 layers"
        for key in ("dispatches", "cross_copies", "submissions", "host_waits"):
            assert e["per_layer"][key] == b["total"][key] - s["total"][key]
            assert e["per_layer_per_device"][key] == e["per_layer"][key] / 2
    assert d["entries"][0]["per_layer"]["dispatches"] > 0


def test_layer_loop_body_is_counted_once(toy, tmp_path):
    d = json.loads(_halo("cost", toy / "loop2.mlir", "--json").stdout)
    dec = next(e for e in d["entries"] if e["entry"] == "decode_bs4$async")
    assert dec["loop_trips"] == 2
    assert dec["per_layer_source"] == "loop body (2 iterations)"
    # the loop body's dispatches appear once in the program and run twice
    static = _stream_dispatches(toy / "loop2.mlir", 1, tmp_path)
    body = dec["per_layer"]["dispatches"]
    assert dec["total"]["dispatches"] == static + body
    text = _halo("cost", toy / "loop2.mlir").stdout
    assert "per layer: loop body (2 iterations)" in text and "estimated" in text


# ---- plan and cost: one model ---------------------------------------------------------

def test_plan_agrees_with_cost_on_the_405b_loop(tmp_path):
    """The 405B decode step (one device, bs 1) as `plan` builds it from the config and as
    `cost` reads it from the compiled `--layer-loop` program: within 10%. The plan counts
    the kernels the emitter builds (13 a decode layer); where the compiler makes more, the
    cost report shows them."""
    mlir = tmp_path / "405b.mlir"
    _halo("emit", "--model", "405b", "--layer-loop", "--bs-prefill", "1", "--bs-decode", "1",
          "-o", mlir)
    d = json.loads(_halo("cost", mlir, "--context", 4096, "--json").stdout)
    dec = next(e for e in d["entries"] if e["kind"] == "decode")
    p = plan(preset("405b"), max_seq_len=4096, batch=1)
    assert dec["loop_trips"] == 126
    # the same weights are read (the embedding only looked up) and KV pages once
    assert dec["total"]["weight_bytes_read"] == pytest.approx(p.decode.bytes_read
                                                              - 4096 * p.kv_token_bytes,
                                                              rel=0.01)
    assert p.decode.seconds == pytest.approx(dec["estimate"]["seconds"], rel=0.10)


@pytest.mark.parametrize("tp", [1, 2])
def test_plan_counts_the_kernels_cost_reads(toy, tp):
    """`plan` builds a decode layer's kernels as the emitter builds them: as many per layer
    (per device) as `cost` reads from the compiled program (toy, bs 4, 3 layers minus 2)."""
    d = json.loads(_halo("cost", toy / f"toy3-tp{tp}.mlir", "--minus", toy / f"toy2-tp{tp}.mlir",
                         "--json").stdout)
    dec = next(e for e in d["entries"] if e["kind"] == "decode")
    compiled = dec["per_layer_per_device"]["dispatches"]
    planned = [plan(preset("toy").with_layers(n), tp=tp, max_seq_len=2048, batch=4)
               .decode.dispatches for n in (2, 3)]
    assert compiled == planned[1] - planned[0], (compiled, planned)


# ---- bad input ----------------------------------------------------------------------------

def _one_line_error(proc, pattern):
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert re.search(pattern, lines[0]), lines[0]


def test_bad_inputs(toy, tmp_path):
    other = tmp_path / "other.mlir"
    other.write_text("module {\n  func.func @main() {\n    return\n  }\n}\n")
    _one_line_error(_halo("cost", other, check=False), r"no decode_bs\* entry")
    _one_line_error(_halo("cost", toy / "toy2-tp1.mlir", "--gpu", "b200", check=False),
                    r"unknown GPU 'b200'")
    _one_line_error(_halo("cost", toy / "toy2-tp2.mlir", "--tp", 4, check=False),
                    r"places work on 2 device\(s\) but --tp is 4")


def test_each_dispatch_names_the_op_that_emitted_it(toy):
    """From the stream IR's locations: every decode dispatch of a 2-layer toy names its layer
    and op, in program order, the FFN's three linears apart."""
    m = cost.cost_file(toy / "toy2-tp1.mlir", target="cpu", echo=lambda s: None)
    dec = next(e for e in m.entries if e.name == "decode_bs4$async")
    where = [d.where for d in dec.dispatch_records]
    assert all(where), where
    for layer in (0, 1):
        ops = [w.split(".", 2)[2] for w in where if w.startswith(f"blk.{layer}.")]
        assert [o for o in ops if o.startswith(("attn_", "ffn_"))] == [
            "attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_up",
            "ffn_gate", "ffn_down"], ops
        assert "attention" in ops and "kv_cache" in ops
    assert where[-1] == "output" and "token_embd" in where


def test_emitted_at_reads_the_emitter_locations():
    assert stream_ir.emitted_at('loc(callsite("blk.*.attn_q" at callsite("blk.3" at '
                                '"decode_bs4")))') == "blk.3.attn_q"
    assert stream_ir.emitted_at('loc(callsite("-":51:11 at callsite("blk.*.attention" at '
                                'callsite("blk.0" at "decode_bs4"))))') == "blk.0.attention"
    assert stream_ir.emitted_at('loc(callsite("output" at "decode_bs4"))') == "output"
    assert stream_ir.emitted_at('loc(callsite("blk.*.ffn_up" at "blk"))') == "blk.*.ffn_up"
    assert stream_ir.emitted_at("loc(unknown)") == ""
