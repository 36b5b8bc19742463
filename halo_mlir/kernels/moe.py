"""Mixture-of-experts kernels (routing, grouping, the float expert contraction) and their
numpy references (ops/moe.py calls them; docs/kernels.md)."""

from __future__ import annotations

import numpy as np

from halo_mlir.kernels.registry import Arg, Harness, Kernel, Param, positive

DTYPES = ("f16", "bf16", "f32")
TOLERANCE = {"f32": 1e-4, "f16": 5e-3, "bf16": 3e-2}


def _np(dtype: str):
    from halo_mlir.kernels.registry import numpy_dtype

    return numpy_dtype(dtype)


def _flag(v: int) -> str | None:
    return None if v in (0, 1) else "must be 0 or 1"


# ---- moe_topk ------------------------------------------------------------------------
def topk_reference(v: dict, ins: list[np.ndarray]) -> list[np.ndarray]:
    """A stable argsort of -p: largest first, equal values in expert order."""
    (probs,) = ins
    ids = np.argsort(-probs, axis=1, kind="stable")[:, :v["k"]]
    weights = np.take_along_axis(probs, ids, axis=1).astype(np.float64)
    if v["renormalize"]:
        weights = weights / weights.sum(axis=1, keepdims=True)
    return [weights.astype(np.float32), ids.astype(np.int64)]


def _router_probs(v: dict, m: int, rng) -> np.ndarray:
    """Half the rows a softmax of normal logits, half drawn from 4 values (ties)."""
    logits = rng.standard_normal((m, v["e"])).astype(np.float32)
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p = p / p.sum(axis=1, keepdims=True)
    tied = rng.integers(1, 5, (m, v["e"])).astype(np.float32) / 8
    return np.where((np.arange(m) % 2 == 1)[:, None], tied, p).astype(np.float32)


_TOPK = Harness(
    sizes={"m": (9, 256, "rows (tokens)")},
    args=lambda v, z: ([Arg("probs", (z["m"], v["e"]), "f32")],
                       [Arg("weights", (z["m"], v["k"]), "f32"),
                        Arg("ids", (z["m"], v["k"]), "i64")]),
    inputs=lambda v, z, rng: [_router_probs(v, z["m"], rng)],
    reference=topk_reference,
    tolerance=lambda v: 1e-6)  # an id off by one is an error of 1


# ---- moe_group -----------------------------------------------------------------------
def group_reference(v: dict, ins: list[np.ndarray]) -> list[np.ndarray]:
    """perm: a stable argsort of the ids; counts by bincount, offsets their exclusive
    cumulative sum; inv the inverse permutation."""
    (ids,) = ins
    perm = np.argsort(ids, kind="stable")
    inv = np.empty_like(perm)
    inv[perm] = np.arange(len(ids))
    counts = np.bincount(ids, minlength=v["e"])
    offsets = np.concatenate([[0], np.cumsum(counts)[:-1]])
    return [perm.astype(np.int64), inv.astype(np.int64), counts.astype(np.int64),
            offsets.astype(np.int64)]


def _group_ids(v: dict, p: int, rng) -> np.ndarray:
    """Ids that leave the last expert empty (an empty group must work)."""
    return rng.integers(0, max(1, v["e"] - 1), p).astype(np.int64)


_GROUP = Harness(
    sizes={"p": (14, 512, "(token, slot) pairs")},
    args=lambda v, z: ([Arg("ids", (z["p"],), "i64")],
                       [Arg("perm", (z["p"],), "i64"), Arg("inv", (z["p"],), "i64"),
                        Arg("counts", (v["e"],), "i64"), Arg("offsets", (v["e"],), "i64")]),
    inputs=lambda v, z, rng: [_group_ids(v, z["p"], rng)],
    reference=group_reference,
    tolerance=lambda v: 0.0)


# ---- expert_matmul -------------------------------------------------------------------
def expert_matmul_reference(v: dict, ins: list[np.ndarray]) -> list[np.ndarray]:
    """einsum over the gathered experts' weights, in float64."""
    x, ids, w = (a.astype(np.float64) if a.dtype != np.int64 else a for a in ins)
    if v["slots"]:
        out = np.einsum("mk,msnk->msn", x, w[ids])
    else:
        out = np.einsum("mk,mnk->mn", x, w[ids])
    return [out.astype(np.float32)]


def _expert_args(v: dict, z: dict):
    m, dt = z["m"], v["dtype"]
    ids = (m, v["slots"]) if v["slots"] else (m,)
    out = (m, v["slots"], v["n"]) if v["slots"] else (m, v["n"])
    return ([Arg("x", (m, v["k"]), dt), Arg("ids", ids, "i64"),
             Arg("w", (v["e"], v["n"], v["k"]), dt)], [Arg("out", out, dt)])


def _expert_inputs(v: dict, z: dict, rng) -> list[np.ndarray]:
    m, dt = z["m"], _np(v["dtype"])
    ids = (m, v["slots"]) if v["slots"] else (m,)
    return [rng.standard_normal((m, v["k"])).astype(dt),
            rng.integers(0, v["e"], ids).astype(np.int64),
            (rng.standard_normal((v["e"], v["n"], v["k"])) / np.sqrt(v["k"])).astype(dt)]


_EXPERT = Harness(
    sizes={"m": (7, 64, "rows of x (pairs, or tokens with slots)")},
    args=_expert_args,
    inputs=_expert_inputs,
    reference=expert_matmul_reference,
    # The sum is rounded to dtype once; products and sum exact-ish in f32.
    tolerance=lambda v: TOLERANCE[v["dtype"]] * 4)


KERNELS = [
    Kernel("moe_topk", "router probabilities p[M,E] f32 -> the k largest weights [M,K] f32 "
           "and their experts [M,K] i64, largest first, ties to the lower expert; "
           "renormalize=1 divides the k weights by their sum",
           {"e": Param(int, "experts", positive, 8),
            "k": Param(int, "experts picked per row", positive, 2),
            "renormalize": Param(int, "1: divide the k weights by their sum (Mixtral); 0: "
                                 "keep them (Grok-1)", _flag, 1)},
           constraints=lambda v: None if v["k"] <= v["e"] else
           f"k={v['k']} is above e={v['e']}",
           harness=_TOPK),
    Kernel("moe_group", "expert ids[P] i64 -> perm[P], inv[P] (the pairs ordered by expert, "
           "stable), counts[E], offsets[E] (a counting sort)",
           {"e": Param(int, "experts", positive, 8)}, harness=_GROUP),
    Kernel("expert_matmul", "x[M,K] @ w[ids[M]][N,K]^T (E experts; slots=S: ids[M,S], "
           "out[M,S,N], x shared by the S slots), f32 accumulation, out in dtype",
           {"e": Param(int, "experts stacked in the weight", positive, 4),
            "n": Param(int, "rows of each expert (output features)", positive, 96),
            "k": Param(int, "columns (input features)", positive, 64),
            "dtype": Param(str, "x, w and out element type", default="f16", choices=DTYPES),
            "slots": Param(int, "0: one id per row of x; S: S ids per row, x shared by them",
                           lambda v: None if v >= 0 else "must be 0 or more", 0,
                           omit_default=True)},
           harness=_EXPERT),
]
