"""Weights: checkpoint readers -> IRPA writer, with ABI.md parameter names."""
