"""Perplexity over sliding windows of prefill logits (the HF recipe)."""

from __future__ import annotations

from typing import Callable

import numpy as np


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def perplexity(logits_fn: Callable[[list[int]], np.ndarray], ids: list[int], *, window: int,
               stride: int) -> tuple[float, int]:
    """exp(mean NLL) of ids[1:], each token scored once, with up to `window` tokens of
    context: windows start every `stride` tokens and score only their new tokens.
    `logits_fn(ids) -> [len(ids), vocab]`. Returns (perplexity, tokens scored)."""
    if len(ids) < 2:
        raise ValueError("need at least two tokens")
    nll, count, scored_to = 0.0, 0, 1  # token 0 has no context: never scored
    for begin in range(0, len(ids), stride):
        end = min(begin + window, len(ids))
        chunk = ids[begin:end]
        logp = log_softmax(logits_fn(chunk))
        for t in range(max(scored_to, begin + 1), end):
            nll -= logp[t - begin - 1, ids[t]]
            count += 1
        scored_to = end
        if end == len(ids):
            break
    return float(np.exp(nll / count)), count
