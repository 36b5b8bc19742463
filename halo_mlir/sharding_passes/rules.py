"""The sharding pass's rules, one per op kind (`RULES`): each takes the Sharder, the op
and its operands' sharded values, emits the op per device with local shapes, and returns
the results' shardings (replicated, split along a dim, or partial sums)."""

from __future__ import annotations

from typing import Callable

from iree.compiler import ir
from iree.compiler.dialects import flow

from halo_mlir.ir_builder import is_empty_tensor, walk_nested
from halo_mlir.sharding_passes import collectives
from halo_mlir.ops.fp8 import PER_DEVICE  # a reduction each device keeps (LOCAL)
from halo_mlir.sharding_passes.plan import (LOCAL, PARTIAL, REPLICATED, Local, Partial,
                                            Replicated, Split)

from halo_mlir.sharding_passes.shard import DYN, SV, Sharder, ShardError, is_plain, parse_split


def _maps(op) -> list[ir.AffineMap]:
    return [ir.AffineMapAttr(a).value for a in ir.ArrayAttr(op.attributes["indexing_maps"])]


def _uses_index(op, dim: int) -> bool:
    found = []

    def visit(inner):
        if inner.name == "linalg.index" and ir.IntegerAttr(inner.attributes["dim"]).value == dim:
            found.append(inner)
    walk_nested(op, visit)
    return bool(found)


def rule_structured(s: Sharder, op, svs: list[SV]) -> list[SV]:
    """linalg.generic / matmul / fill and iree_linalg_ext.attention: shardings meet on an
    iteration dimension through the indexing maps."""
    maps = _maps(op) if "indexing_maps" in op.attributes else None
    tensor_ops = [k for k, v in enumerate(op.operands) if isinstance(v.type, ir.RankedTensorType)]
    if maps is None:  # linalg.fill: ins scalar, outs tensor
        out = svs[-1]
        return s.per_device(op, svs, [out.sharding if not isinstance(out.sharding, Partial)
                                      else REPLICATED])
    local = any(isinstance(sv.sharding, Local) for sv in svs)
    if (s.payload == "activation" or local) and isinstance(svs[0].sharding, Partial) and \
            (_is_truncation(op) or _is_scaled_rounding(op, svs)):
        # Each device scales and rounds its own partial sum, so the all-reduce (at the
        # consumer) carries the activation dtype: N roundings where TP1 has one. With a
        # device's own scales (LOCAL) this is the only right order: scale, then sum.
        return s.per_device(op, svs, [PARTIAL])
    if local and any(isinstance(sv.sharding, Partial) for sv in svs):
        raise ShardError(f"{op.name}: combines a device's own values (local) with partial "
                         "sums other than by scaling them")
    # maps pair with the tensor operands and scalars (attention's scale has map ()->()).
    svs = [s.materialize(sv) if isinstance(sv.sharding, Partial) else sv for sv in svs]
    n_out = len(op.results)
    chosen = None
    for k, sv in enumerate(svs):
        if isinstance(sv.sharding, Split):
            expr = maps[k].results[sv.sharding.dim]
            if not isinstance(expr, ir.AffineDimExpr) or not is_plain(sv.sharding):
                raise ShardError(f"{op.name}: operand {k} is {sv.sharding}, which the op's "
                                 "indexing map cannot carry")
            it = ir.AffineDimExpr(expr).position
            if chosen is not None and chosen != it:
                sv = svs[k] = s.materialize(sv)  # conflicting split: gather this operand
                continue
            chosen = it
    read = _captured_splits(s, op)
    for it in read:
        if chosen is not None and chosen != it:
            raise ShardError(f"{op.name}: its body reads a tensor split along iteration dim "
                             f"{it}, its operands are split along {chosen}")
        chosen = it
    if chosen is None:
        return s.per_device(op, svs, [LOCAL if local else REPLICATED] * n_out)
    # linalg.index of the split dim is a local index on each device: right where the body
    # reads a captured tensor's shard with it (`read`), wrong anywhere else.
    if _uses_index(op, chosen) and not read:
        raise ShardError(f"{op.name}: its body reads linalg.index {chosen}, which is split")
    out_map = maps[-1]
    out_dims = [ir.AffineDimExpr(e).position if isinstance(e, ir.AffineDimExpr) else None
                for e in out_map.results]
    result = Split(out_dims.index(chosen)) if chosen in out_dims else PARTIAL

    def operands(i):
        vals = []
        for k, sv in enumerate(svs):
            v = sv.values[i]
            if k in tensor_ops and isinstance(sv.sharding, (Replicated, Local)):
                dims = [ir.AffineDimExpr(e).position if isinstance(e, ir.AffineDimExpr) else None
                        for e in maps[k].results]
                if chosen in dims:
                    v = s.slice_local(v, dims.index(chosen), i)
            vals.append(v)
        return vals
    # A reduction over the split dim leaves partial sums: each device accumulates into its
    # own (zero-filled) init; the consumer all-reduces them. A PER_DEVICE reduction's
    # results stay each device's own.
    if result is PARTIAL and PER_DEVICE in op.attributes:
        result = LOCAL
    return s.per_device(op, svs, [result] * n_out, operands)


def _captured_splits(s: Sharder, op) -> list[int]:
    """The iteration dims along which the body of `op` reads split tensors it captures
    (`tensor.extract %w[..., linalg.index d, ...]` with the index at w's split dim: e.g. a
    token's expert rows of stacked MoE weights); each device's copy then reads its shard
    with local indices. Captured partial sums are all-reduced first."""
    dims = []

    def visit(inner):
        if inner.name != "tensor.extract":
            return
        sv = s.env.get(inner.operands[0])
        if sv is None:
            return
        if isinstance(sv.sharding, Partial):
            s.env[inner.operands[0]] = sv = s.materialize(sv)
        if not isinstance(sv.sharding, Split):
            return
        index = inner.operands[1 + sv.sharding.dim].owner
        index = getattr(index, "operation", index)
        if getattr(index, "name", None) != "linalg.index":
            raise ShardError(f"{op.name}: its body reads a {sv.sharding} tensor at an index "
                             "that is not an iteration dim")
        dims.append(ir.IntegerAttr(index.attributes["dim"]).value)
    walk_nested(op, visit)
    return sorted(set(dims))


def _is_truncation(op) -> bool:
    """A linalg.generic that only rounds its one input to a narrower float type (linear's
    f32 accumulator -> the activation dtype)."""
    if op.name != "linalg.generic" or len(op.operands) != 2:
        return False
    maps = _maps(op)
    if any(m != maps[0] or not m.is_permutation for m in maps):
        return False
    body = [inner.operation for inner in op.regions[0].blocks[0].operations]
    return [o.name for o in body] == ["arith.truncf", "linalg.yield"] and \
        body[0].operands[0] == op.regions[0].blocks[0].arguments[0]


def _is_scaled_rounding(op, svs: list[SV]) -> bool:
    """A linalg.generic that multiplies its one tensor input by replicated scales (0-d
    tensors, or one per output column: the per-channel weight scales, replicated whole for
    a weight split by columns) and rounds the product to the output type (the fp8 matmul's
    scale epilogue): linear in the input, so it applies to each device's partial sum
    alike."""
    if op.name != "linalg.generic" or len(op.results) != 1:
        return False
    maps = _maps(op)
    if maps[0] != maps[-1] or not maps[0].is_permutation or \
            any(not all(isinstance(e, ir.AffineDimExpr) for e in m.results)
                for m in maps[1:-1]) or \
            any(not isinstance(sv.sharding, (Replicated, Local)) for sv in svs[1:-1]):
        return False
    # The input (block argument 0) reaches the yield through multiplies by values that do
    # not depend on it and roundings only; the scales are the operands themselves or, as in
    # the dynamic fp8 epilogue (a row's scale from its amax), their products, quotients,
    # maxima and minima with constants.
    block = op.regions[0].blocks[0]
    tainted = {block.arguments[0]}
    for inner in block.operations:
        o = inner.operation
        uses = [v in tainted for v in o.operands]
        if not any(uses):
            if o.name not in ("arith.mulf", "arith.divf", "arith.maximumf", "arith.minimumf",
                              "arith.constant"):
                return False
            continue
        if o.name == "linalg.yield" or (o.name in ("arith.truncf", "arith.bitcast")) or \
                (o.name == "arith.mulf" and uses.count(True) == 1):
            tainted.update(o.results)
            continue
        return False
    return True


def _group_of(groups, dim):
    for g, members in enumerate(groups):
        if dim in members:
            return g, members
    raise AssertionError


def _reassociation(op):
    return [[ir.IntegerAttr(d).value for d in ir.ArrayAttr(g)]
            for g in ir.ArrayAttr(op.attributes["reassociation"])]


def rule_expand(s: Sharder, op, svs: list[SV]) -> list[SV]:
    src = svs[0]
    if not isinstance(src.sharding, Split):  # a reshape of partial sums stays partial
        return s.per_device(op, svs, [src.sharding])
    sp = src.sharding
    groups = _reassociation(op)
    members = groups[sp.dim]
    out_shape = list(ir.RankedTensorType(op.results[0].type).shape)
    sizes = [out_shape[d] for d in members]
    if sp.factors:
        if tuple(sizes) != sp.factors:
            raise ShardError(f"{op.name}: expands {sizes}, the split is of {list(sp.factors)}")
        out = members[sp.at]
    else:
        nontrivial = [d for d in members if out_shape[d] != 1]
        out = nontrivial[0]
    if out_shape[out] == DYN or out_shape[out] % s.tp:
        raise ShardError(f"{op.name}: dim of size {out_shape[out]} does not split {s.tp} ways")
    result = Split(out)
    static = list(out_shape)
    static[out] //= s.tp
    svs_out = s.per_device(op, svs, [result])
    for v in svs_out[0].values:
        v.owner.attributes["static_output_shape"] = ir.DenseI64ArrayAttr.get(static)
    return svs_out


def rule_collapse(s: Sharder, op, svs: list[SV]) -> list[SV]:
    src = svs[0]
    if not isinstance(src.sharding, Split):
        return s.per_device(op, svs, [src.sharding])
    groups = _reassociation(op)
    g, members = _group_of(groups, src.sharding.dim)
    in_shape = list(ir.RankedTensorType(op.operands[0].type).shape)
    at = members.index(src.sharding.dim)
    factors = tuple(in_shape[d] for d in members)
    result = Split(g) if all(f == 1 for f in factors[:at]) else Split(g, factors, at)
    return s.per_device(op, svs, [result])


def rule_transpose(s: Sharder, op, svs: list[SV]) -> list[SV]:
    src = svs[0]
    if isinstance(src.sharding, Split):
        perm = list(ir.DenseI64ArrayAttr(op.attributes["permutation"]))
        result = Split(perm.index(src.sharding.dim))
        init = svs[1]
        svs = [src, init]

        def operands(i):
            out = init.values[i] if isinstance(init.sharding, Split) else \
                s.slice_local(init.values[i], result.dim, i)
            return [src.values[i], out]
        return s.per_device(op, svs, [result], operands)
    return s.per_device(op, svs, [src.sharding])


def rule_extract_slice(s: Sharder, op, svs: list[SV]) -> list[SV]:
    src = svs[0]
    if not isinstance(src.sharding, Split):
        return s.per_device(op, svs, [src.sharding])
    d = src.sharding.dim
    offsets = list(ir.DenseI64ArrayAttr(op.attributes["static_offsets"]))
    sizes = list(ir.DenseI64ArrayAttr(op.attributes["static_sizes"]))
    full = ir.RankedTensorType(op.operands[0].type).shape[d]
    if offsets[d] != 0 or sizes[d] != full:
        raise ShardError("tensor.extract_slice: slices along a split dimension")
    sizes[d] //= s.tp
    out = s.per_device(op, svs, [src.sharding])
    for v in out[0].values:
        v.owner.attributes["static_sizes"] = ir.DenseI64ArrayAttr.get(sizes)
    return out


def rule_insert_slice(s: Sharder, op, svs: list[SV]) -> list[SV]:
    """tensor.insert_slice (same rank): a split piece goes into its device's slice of the
    destination; a replicated destination is cut into per-device slices to receive it."""
    piece, dest = svs[0], svs[1]
    if isinstance(piece.sharding, Partial) and (isinstance(dest.sharding, Partial) or
                                                _is_zero_fill(op.operands[1])):
        # Partial sums into zeros (or into partial sums) stay partial: one all-reduce of
        # the whole result later instead of one per piece (MoE: one per expert).
        return s.per_device(op, svs, [PARTIAL])
    if isinstance(piece.sharding, Partial):
        piece = svs[0] = s.materialize(piece)
    if isinstance(dest.sharding, Partial):
        dest = svs[1] = s.materialize(dest)
    split = dest.sharding if isinstance(dest.sharding, Split) else piece.sharding
    if not isinstance(split, Split):
        return s.per_device(op, svs, [REPLICATED])
    d = split.dim
    if not is_plain(split):
        raise ShardError(f"tensor.insert_slice: cannot insert into a {split} value")
    offsets = list(ir.DenseI64ArrayAttr(op.attributes["static_offsets"]))
    sizes = list(ir.DenseI64ArrayAttr(op.attributes["static_sizes"]))
    full = ir.RankedTensorType(op.operands[1].type).shape[d]
    if offsets[d] != 0 or sizes[d] != full:
        raise ShardError("tensor.insert_slice: inserts part of a split dimension")
    piece = svs[0] = s.reshard(piece, split)
    if not isinstance(dest.sharding, Split):
        dest = svs[1] = SV(split, [s.slice_local(v, d, i) for i, v in enumerate(dest.values)])
    sizes[d] //= s.tp
    out = s.per_device(op, svs, [split])
    for v in out[0].values:
        v.owner.attributes["static_sizes"] = ir.DenseI64ArrayAttr.get(sizes)
    return out


def _is_zero_fill(v) -> bool:
    """`v` is a linalg.fill with the constant 0."""
    op = getattr(v.owner, "operation", v.owner)
    if getattr(op, "name", None) != "linalg.fill":
        return False
    value = getattr(op.operands[0].owner, "operation", op.operands[0].owner)
    if getattr(value, "name", None) != "arith.constant":
        return False
    attr = value.attributes["value"]
    try:
        return ir.FloatAttr(attr).value == 0
    except (ValueError, TypeError):
        return isinstance(attr, ir.IntegerAttr) and ir.IntegerAttr(attr).value == 0


def rule_pin(s: Sharder, op, svs: list[SV]) -> list[SV]:
    """flow.tensor.barrier: device i's copy is pinned to device i."""
    out = s.per_device(op, svs, [svs[0].sharding])
    for i, v in enumerate(out[0].values):
        v.owner.attributes["target"] = s.b.device(i)
    return out


def rule_for(s: Sharder, op, svs: list[SV]) -> list[SV]:
    """scf.for: one loop carrying one value per device for each carried value. A carried
    value's layout is where the body leaves it: shard the body with the initial layouts,
    and if it yields others, start over from those (at most twice)."""
    from iree.compiler.dialects import scf

    bounds = [sv.values[0] for sv in svs[:3]]
    inits = [s.materialize(sv) if isinstance(sv.sharding, Partial) else sv for sv in svs[3:]]
    trips = _constant(op.operands[1]) - _constant(op.operands[0])
    body = op.regions[0].blocks[0]
    for _ in range(3):
        stats, s.stats = s.stats, collectives.Stats()
        new = scf.ForOp(*bounds, [_placed_init(s, v, i) for sv in inits
                                  for i, v in enumerate(sv.values)])
        args = list(new.inner_iter_args)
        s.env[body.arguments[0]] = SV(REPLICATED, [new.induction_variable] * s.tp)
        for k, (old, sv) in enumerate(zip(body.arguments[1:], inits)):
            s.env[old] = SV(sv.sharding, args[k * s.tp:(k + 1) * s.tp])
        with ir.InsertionPoint(new.body):
            yielded = [s.get(v) for v in s.shard_block(body, "scf.for", "scf.yield").operands]
            yielded = [s.materialize(sv) if isinstance(sv.sharding, Partial) else sv
                       for sv in yielded]
            if [sv.sharding for sv in yielded] == [sv.sharding for sv in inits]:
                scf.yield_([v for sv in yielded for v in sv.values])
                stats.add(s.stats, trips)  # the body's transfers run once per iteration
                s.stats = stats
                results = list(new.results)
                return [SV(sv.sharding, results[k * s.tp:(k + 1) * s.tp])
                        for k, sv in enumerate(inits)]
        new.operation.erase()
        s.stats = stats
        inits = [s.reshard(sv, y.sharding) for sv, y in zip(inits, yielded)]
    raise ShardError("scf.for: the carried values' layouts do not settle")


def _placed_init(s: Sharder, v, i: int):
    """Device i's initial loop value. An empty tensor (an accumulator) is one value after
    CSE whatever the device; entering several devices' loops it has no single affinity and
    IREE fails to place it, so each device gets it by a transfer (of no data: IREE
    re-creates the empty tensor on the target)."""
    if not is_empty_tensor(v):
        return v
    dims = [d for d in s.b.dims(v) if not isinstance(d, int)]
    return flow.tensor_transfer(v, dims, s.b.device(i))


def _constant(v) -> int:
    owner = v.owner
    if owner.name != "arith.constant":
        raise ShardError("scf.for: the sharding pass needs constant loop bounds")
    return ir.IntegerAttr(owner.attributes["value"]).value


def rule_same_as_operand(s: Sharder, op, svs: list[SV]) -> list[SV]:
    """tensor.cast, util.optimization_barrier, flow.tensor.tie_shape: results shard like
    operand 0."""
    return s.per_device(op, svs, [svs[0].sharding] * len(op.results))


def rule_replicated(s: Sharder, op, svs: list[SV]) -> list[SV]:
    """Constants, tensor.empty, scalar index math: every device gets its own copy."""
    for sv in svs:
        if not isinstance(sv.sharding, Replicated):
            raise ShardError(f"{op.name}: operand is {sv.sharding}; expected replicated")
    return s.per_device(op, svs, [REPLICATED] * len(op.results))


def rule_dim(s: Sharder, op, svs: list[SV]) -> list[SV]:
    """tensor.dim: the emitter queries only dynamic dims, which are never split."""
    return s.per_device(op, svs, [REPLICATED])


def rule_global_load(s: Sharder, op, svs: list[SV]) -> list[SV]:
    name = ir.FlatSymbolRefAttr(op.attributes["global"]).value
    g = s.globals_by_name[name]
    sharding = parse_split(g.attributes["halo.split"]) if "halo.split" in g.attributes \
        else REPLICATED
    values = []
    for i in s.devices():
        sym, t = s.device_global(g, i, sharding)
        values.append(s.load(sym, t))
    return [SV(sharding, values)]


def _whole(s: Sharder, svs: list[SV]) -> list[SV]:
    """Partial sums all-reduced; other layouts as they are."""
    return [s.materialize(sv) if isinstance(sv.sharding, Partial) else sv for sv in svs]


def _split_slice_dim(op, d: int) -> int:
    """gather/scatter: a split dim `d` of the source/original must be a slice dim (not
    indexed); returns the matching dim of the gathered result / scattered updates."""
    depth = len(list(ir.DenseI64ArrayAttr(op.attributes["dimension_map"])))
    if d < depth:
        raise ShardError(f"{op.name}: the indexed dimension is split")
    batch = len(ir.RankedTensorType(op.operands[1].type).shape) - 1
    return batch + d - depth


def rule_gather(s: Sharder, op, svs: list[SV]) -> list[SV]:
    """iree_linalg_ext.gather: a split slice dim of the source stays split in the result."""
    source, indices, init = svs = _whole(s, svs)
    if not isinstance(source.sharding, Split):
        return s.per_device(op, svs, [REPLICATED])
    result = Split(_split_slice_dim(op, source.sharding.dim))

    def operands(i):
        out = init.values[i] if isinstance(init.sharding, Split) else \
            s.slice_local(init.values[i], result.dim, i)
        return [source.values[i], indices.values[i], out]
    return s.per_device(op, svs, [result], operands)


def rule_scatter(s: Sharder, op, svs: list[SV]) -> list[SV]:
    """iree_linalg_ext.scatter into a cache split along a slice dim."""
    updates, indices, original = svs = _whole(s, svs)
    if not isinstance(original.sharding, Split):
        if isinstance(updates.sharding, Split):
            updates = svs[0] = s.materialize(updates)
        return s.per_device(op, svs, [REPLICATED])
    want = _split_slice_dim(op, original.sharding.dim)
    if isinstance(updates.sharding, Split) and updates.sharding.dim != want:
        raise ShardError(f"iree_linalg_ext.scatter: updates are {updates.sharding}, the cache "
                         f"needs split(dim={want})")

    def operands(i):
        up = updates.values[i] if isinstance(updates.sharding, Split) else \
            s.slice_local(s.materialize(updates).values[i], want, i)
        return [up, indices.values[i], original.values[i]]
    return s.per_device(op, svs, [original.sharding], operands)


def rule_call(s: Sharder, op, svs: list[SV]) -> list[SV]:
    """util.call: shard the callee once per signature of argument shardings (it takes and
    returns one value per device for each original argument and result), then call it."""
    callee = ir.FlatSymbolRefAttr(op.attributes["callee"]).value
    key = (callee, tuple(str(sv.sharding) for sv in svs))
    if key not in s.callees:
        s.callees[key] = s.shard_callee(callee, [sv.sharding for sv in svs])
    name, result_shardings, result_types, stats = s.callees[key]
    s.stats.add(stats)  # the callee's transfers run once per call
    from iree.compiler.dialects import util as util_d
    call = util_d.CallOp(result_types, name, [v for sv in svs for v in sv.values])
    results = list(call.results)
    return [SV(sh, results[k * s.tp:(k + 1) * s.tp]) for k, sh in enumerate(result_shardings)]


RULES: dict[str, Callable] = {
    "util.call": rule_call,
    "linalg.generic": rule_structured,
    "linalg.matmul": rule_structured,
    "linalg.fill": rule_structured,
    "iree_linalg_ext.attention": rule_structured,
    "tensor.expand_shape": rule_expand,
    "tensor.collapse_shape": rule_collapse,
    "linalg.transpose": rule_transpose,
    "tensor.extract_slice": rule_extract_slice,
    "tensor.insert_slice": rule_insert_slice,
    "flow.tensor.barrier": rule_pin,
    "scf.for": rule_for,
    "arith.index_cast": rule_replicated,
    "tensor.extract": rule_replicated,  # a replicated scale (fp8 attention)
    "arith.mulf": rule_replicated,  # scalar math on it
    "tensor.cast": rule_same_as_operand,
    "util.optimization_barrier": rule_same_as_operand,
    "flow.tensor.tie_shape": rule_same_as_operand,  # the tied sizes are never split dims
    "arith.constant": rule_replicated,
    "tensor.empty": rule_replicated,
    "tensor.dim": rule_dim,
    "util.global.load": rule_global_load,
    "iree_linalg_ext.gather": rule_gather,
    "iree_linalg_ext.scatter": rule_scatter,
}
