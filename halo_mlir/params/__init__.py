"""Weights: checkpoint readers -> IRPA writer, with docs/ABI.md parameter names."""
