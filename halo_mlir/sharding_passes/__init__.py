"""Tensor-parallel placement: a plan (which weight splits how) and passes over the TP1 IR
that place ops on devices and insert `flow.tensor.transfer`s. Not built yet (issue 4)."""
