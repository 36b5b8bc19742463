"""Plumbing every layer may use: atomic file writes, progress lines."""
