"""The placement verifier's device check: every `#hal.device.promise` in the module, found
on any op (globals, transfers, nested ops) and inside array/dictionary attributes
(argument attributes), must name one of the devices compiled for."""

from __future__ import annotations

import pytest
from iree.compiler import ir

from halo_mlir.errors import HaloError
from halo_mlir.sharding_passes.verify import _promised_devices, verify_placement

GLOBALS = """
util.global private @w0 {stream.affinity = #hal.device.promise<@__device_0>} = #flow.parameter.named<"model"::"w"> : tensor<4xf32>
util.global private @w1 {stream.affinity = #hal.device.promise<@__device_1>} = #flow.parameter.named<"model"::"w"> : tensor<4xf32>
"""
ENTRY = """
util.func private @f$impl() -> tensor<4xf32> attributes {halo.entry = "f", halo.inplace = array<i64>, halo.arg_devices = array<i64>, halo.result_devices = array<i64: 0>} {
  %a = util.global.load immutable @w0 : tensor<4xf32>
  %b = util.global.load immutable @w1 : tensor<4xf32>
  %c = flow.tensor.transfer %b : tensor<4xf32> to #hal.device.promise<@__device_0>
  %e = tensor.empty() : tensor<4xf32>
  %s = linalg.generic {indexing_maps = [affine_map<(i) -> (i)>, affine_map<(i) -> (i)>, affine_map<(i) -> (i)>], iterator_types = ["parallel"]} ins(%a, %c : tensor<4xf32>, tensor<4xf32>) outs(%e : tensor<4xf32>) {
  ^bb0(%x: f32, %y: f32, %o: f32):
    %z = arith.addf %x, %y : f32
    linalg.yield %z : f32
  } -> tensor<4xf32>
  util.return %s : tensor<4xf32>
}
"""
# A public function whose argument attributes promise a device (as the entry wrappers'
# `iree.abi.affinity` do): the promise sits inside an array of dictionaries.
WRAPPER = """
util.func public @g(%arg0: tensor<4xf32> {iree.abi.affinity = #hal.device.promise<@__device_@D@>}) -> tensor<4xf32> {
  util.return %arg0 : tensor<4xf32>
}
"""


def parse(text: str):
    return ir.Module.parse(text, ir.Context())


def test_consistent_module_verifies():
    m = parse(GLOBALS + ENTRY + WRAPPER.replace("@D@", "1"))
    assert verify_placement(m, 2) == {"f": 1}
    assert _promised_devices(m) == {"__device_0", "__device_1"}


@pytest.mark.parametrize("where,text", [
    ("a global's affinity", (GLOBALS.replace("@__device_1>", "@__device_5>") + ENTRY
                             + WRAPPER.replace("@D@", "1"))),
    ("a transfer's target", (GLOBALS + ENTRY.replace("to #hal.device.promise<@__device_0>",
                                                     "to #hal.device.promise<@__device_5>")
                             + WRAPPER.replace("@D@", "1"))),
    ("an argument attribute", GLOBALS + ENTRY + WRAPPER.replace("@D@", "5")),
])
def test_undeclared_device_is_an_error(where, text):
    with pytest.raises(HaloError, match=r"promises device @__device_5, but only 2 devices"):
        verify_placement(parse(text), 2)
