"""`halo-mlir cost`: what the compiled program does, read from IREE's stream-level IR.

The module is compiled with `--compile-to=stream` and each entry (`decode_bs{B}$async`,
`prefill_bs{B}$async`, or the plain name when there is no async variant) is *executed
abstractly*: the host function's index arithmetic is evaluated (`arith`, `util.align`, ...,
with `hal.buffer_view.dim` of the arguments taken from the call's shapes, `ABI_DIMS`), its
control flow is followed (`cf.br`/`cf.cond_br`, `util.call`), and every stream command met on
the way is recorded:

- `stream.cmd.execute`: one queue submission, on the device of its `on(...)` affinity;
- `stream.cmd.dispatch` inside it: one kernel launch. Its bytes come from the executable
  (`stream.executable`): each `dispatch.tensor.load`/`store` of a binding, with sizes evaluated
  from the dispatch's push constants; a loaded tensor used only as the source of gathers
  counts the gathered bytes (the KV pages read), one used only as a scatter's destination
  counts nothing (updated in place), a stored scatter counts its updates. FLOPs: 2 per
  multiply-add of contractions (linalg ops with a reduction and a multiply; attention's two
  matmuls); elementwise work is not counted;
- `stream.cmd.copy` inside it: a copy. It is cross-device when the execute marks the queue
  ownership transfer of its source or target: `stream.cmd.invalidate from(<other device>)`
  on the source range, or `stream.cmd.flush to(<other device>)` on the target range (what
  `stream.async.transfer` between devices becomes once scheduled);
- `stream.timepoint.await`: the host waits on the device;
- dependent cross-device steps: the longest chain of submissions in which each step waits
  (through `await(...)` timepoints, joins, allocations) on a submission of another device.

A loop (the `--layer-loop` layer stack) is counted as it runs: its blocks execute once per
iteration; the blocks executed most often (more than once) form its body, reported per
iteration. Per layer of an unrolled program is the difference of two programs of different
depth (`per_layer_by_difference`, `halo-mlir cost A.mlir --minus B.mlir`).
"""

from __future__ import annotations

import dataclasses
import re
import tempfile
from collections import Counter
from pathlib import Path

from halo_mlir.analysis import step_time
from halo_mlir.analysis.step_time import Copy, Dispatch
from halo_mlir.analysis.stream_ir import (analyze_executable, device_of, emitted_at, fold,
                                          segments)
from halo_mlir.errors import HaloError

# The entries' arguments (docs/ABI.md): each dimension by name; the cache arguments follow.
# "ctx_pages" = ceil(context / block_seq_stride), "pages" = the cache's page count.
ABI_DIMS = {
    "decode": [("batch", 1), ("batch",), ("batch",), ("batch", "ctx_pages")],
    "prefill": [("batch", "ctx"), ("batch",), ("batch", "ctx_pages")],
}
CACHE_DIMS = ("pages", None)
ENTRY = re.compile(r"^(decode|prefill)_bs(\d+)(\$async)?$")


# ---------------------------------------------------------------------------------------
# Running an entry abstractly
# ---------------------------------------------------------------------------------------

@dataclasses.dataclass
class Event:
    kind: str          # submission, dispatch, copy, host_wait, step
    block: int         # which block of the entry (or of a callee) it came from
    device: int = 0
    record: object = None
    name: str = ""


class _Runner:
    """Executes one entry's host code abstractly, recording events."""

    def __init__(self, program: "Program", kind: str, dims: dict):
        self.p, self.kind, self.dims = program, kind, dims
        self.events: list[Event] = []
        self.block_runs: Counter = Counter()
        self.max_depth = 0
        self._exe_cache: dict = {}
        self._block_ids: dict = {}

    # --- values with meaning beyond integers: timepoints and resource origins ---------
    def run(self, func, args_env: dict | None = None, depth: int = 0):

        if depth > 16:
            raise HaloError("calls nested too deep in the compiled program")
        env = dict(args_env or {})
        region = func.regions[0]
        blocks = list(region.blocks)
        block = blocks[0]
        if depth == 0:
            for i, a in enumerate(block.arguments):
                env[("origin", a)] = ("arg", i)
        steps = 0
        while True:
            bid = self._block_id(func, blocks, block)
            self.block_runs[bid] += 1
            steps += 1
            if steps > 1_000_000:
                raise HaloError("the compiled program's control flow did not terminate")
            nxt = None
            for o in block.operations:
                op = o.operation
                name = op.name
                if name == "cf.br":
                    nxt = (op.successors[0], list(op.operands))
                elif name == "cf.cond_br":
                    cond, t_ops, f_ops = segments(op)
                    c = env.get(cond[0])
                    if c is None:
                        raise HaloError(f"cannot fold the branch condition at {op.location}")
                    nxt = (op.successors[0], t_ops) if c else (op.successors[1], f_ops)
                elif name in ("util.return", "func.return"):
                    return [self._get(env, v) for v in op.operands]
                elif name in ("scf.for", "scf.if", "scf.while", "cf.switch"):
                    raise HaloError(f"unsupported control flow {name} in the compiled program")
                else:
                    self._op(op, env, bid, depth)
            if nxt is None:
                return []
            dest, operands = nxt
            vals = [self._get(env, v) for v in operands]
            for a, val in zip(dest.arguments, vals):
                self._set(env, a, val)
            block = dest

    def _block_id(self, func, blocks, block):
        key = (str(func.attributes["sym_name"]), [i for i, b in enumerate(blocks)
                                                  if b == block][0])
        return self._block_ids.setdefault(key, len(self._block_ids))

    @staticmethod
    def _get(env, v):
        return (env.get(v), env.get(("origin", v)), env.get(("tp", v)))

    @staticmethod
    def _set(env, v, val):
        for key, x in zip((v, ("origin", v), ("tp", v)), val):
            if x is not None:
                env[key] = x
            else:
                env.pop(key, None)

    def _frontier(self, env, values) -> dict:
        out: dict = {}
        for v in values:
            for dev, d in env.get(("tp", v), {}).items():
                out[dev] = max(out.get(dev, 0), d)
        return out

    def _op(self, op, env, bid, depth):

        name = op.name
        fold(op, env)
        if name == "hal.buffer_view.dim":
            origin = env.get(("origin", op.operands[0]))
            if origin and origin[0] == "arg":
                env[op.results[0]] = self.dims(self.kind, origin[1],
                                               op.attributes["index"].value)
            return
        if name == "util.global.load":
            env[("origin", op.results[0])] = ("weight", str(op.attributes["global"]))
            return
        if name == "stream.tensor.import":
            src = env.get(("origin", op.operands[0]))
            if src and src[0] == "arg":
                cache = src[1] >= len(ABI_DIMS[self.kind])
                env[("origin", op.results[0])] = ("cache" if cache else "input", src[1])
            return
        if name == "util.call":
            callee = self.p.functions.get(str(op.attributes["callee"]).lstrip("@"))
            if callee is None:
                return
            cenv = {}
            for a, v in zip(callee.regions[0].blocks[0].arguments, op.operands):
                self._set(cenv, a, self._get(env, v))
            for r, val in zip(op.results, self.run(callee, cenv, depth + 1)):
                self._set(env, r, val)
            return
        if name == "stream.timepoint.await":
            self.events.append(Event("host_wait", bid, name=str(op.location)))
        if name == "stream.cmd.execute":
            self._execute(op, env, bid)
            return
        # pass resource origins and timepoints through everything else
        tps = [v for v in op.operands if str(v.type) == "!stream.timepoint"]
        res = [v for v in op.operands if str(v.type).startswith("!stream.resource")]
        for r in op.results:
            t = str(r.type)
            if t == "!stream.timepoint":
                env[("tp", r)] = self._frontier(env, tps)
            elif t.startswith("!stream.resource") and res:
                i = list(op.results).index(r)
                src = res[i] if i < len(res) else res[0]
                if ("origin", src) in env:
                    env[("origin", r)] = env[("origin", src)]

    def _execute(self, op, env, bid):
        # no affinity: the module's only (default) device
        dev = device_of(op.attributes["affinity"]) if "affinity" in op.attributes else 0
        resources, sizes, awaits = segments(op)
        front = self._frontier(env, awaits)
        level = max((d + (k != dev) for k, d in front.items()), default=0)
        if level > self.max_depth:
            self.events.append(Event("step", bid, dev, level - self.max_depth))
            self.max_depth = level
        env[("tp", op.results[0])] = {dev: level}
        self.events.append(Event("submission", bid, dev))
        inner = dict(env)
        block = op.regions[0].blocks[0]
        for a, v in zip(block.arguments, resources):
            inner[("origin", a)] = env.get(("origin", v))
        marks = {}
        self._marks(block, inner, dev, marks)
        self._commands(block, inner, dev, bid, marks)

    def _marks(self, block, env, dev, marks):
        """(resource, offset) -> other device, from invalidate from(...)/flush to(...)."""
        for o in block.operations:
            op = o.operation
            if op.name in ("stream.cmd.invalidate", "stream.cmd.flush"):
                # Both print their other device as `source_affinity` (invalidate from(D),
                # flush to(D)) in IREE 3.13; accept either name.
                attr = next((a for a in ("source_affinity", "target_affinity")
                             if a in op.attributes), None)
                if attr:
                    other = device_of(op.attributes[attr])
                    if other != dev:
                        marks[(op.operands[0], env.get(op.operands[2]))] = other
            for r in op.regions:
                for b in r.blocks:
                    self._marks(b, env, dev, marks)

    def _commands(self, block, env, dev, bid, marks):
        for o in block.operations:
            op = o.operation
            name = op.name
            if name in ("stream.cmd.concurrent", "stream.cmd.serial"):
                self._commands(op.regions[0].blocks[0], env, dev, bid, marks)
            elif name == "stream.cmd.dispatch":
                rec = self._dispatch(op, env, dev)
                if rec.where.startswith("blk.*.") and self.block_runs[bid] > 0:
                    # a layer loop's body: its layer is the iteration
                    rec = dataclasses.replace(rec, where=f"blk.{self.block_runs[bid] - 1}."
                                                         f"{rec.where[len('blk.*.'):]}")
                self.events.append(Event("dispatch", bid, dev, rec, rec.name))
            elif name == "stream.cmd.copy":
                src, _, src_off, dst, _, dst_off, length = op.operands
                peer = marks.get((src, env.get(src_off)), marks.get((dst, env.get(dst_off))))
                n = env.get(length) or 0
                self.events.append(Event("copy", bid, dev, Copy(dev, n, peer)))
            elif name == "stream.cmd.fill":
                n = env.get(op.operands[3]) if len(op.operands) > 3 else 0
                self.events.append(Event("fill", bid, dev, Copy(dev, n or 0, None)))
            elif name in ("stream.cmd.collective", "stream.cmd.call"):
                self.events.append(Event(name.split(".")[-1], bid, dev))
            else:
                fold(op, env)

    def _dispatch(self, op, env, dev) -> Dispatch:
        workload, uniform, resources, sizes, offsets, lengths = segments(op)
        entry = str(list(op.attributes["entry_points"])[0])
        exe, fn = [s.lstrip("@") for s in entry.split("::")]
        access = [a.value for a in op.attributes["resource_accesses"]]
        push = tuple(env.get(v) for v in uniform)
        key = (exe, fn, push)
        if key not in self._exe_cache:
            func = self.p.executables.get((exe, fn))
            self._exe_cache[key] = analyze_executable(func, list(push)) if func else None
        cost = self._exe_cache[key]
        read = written = kv = weight = 0
        for i, (res, ln, acc) in enumerate(zip(resources, lengths, access)):
            length = env.get(ln) or 0
            r = length if acc & 1 else 0
            w = length if acc & 2 else 0
            if cost is not None and i < len(cost.read):
                r = min(r, cost.read[i]) if cost.read[i] is not None else r
                w = min(w, cost.written[i]) if cost.written[i] is not None else w
            read, written = read + r, written + w
            origin = env.get(("origin", res)) or ("transient",)
            if origin[0] == "cache":
                kv += r
            elif origin[0] == "weight":
                weight += r
        return Dispatch(name=fn, device=dev, bytes_read=read, bytes_written=written,
                        flops=cost.flops if cost else 0, dtype=cost.dtype if cost else "f16",
                        kv_bytes_read=kv, weight_bytes_read=weight,
                        where=emitted_at(op.location))


# ---------------------------------------------------------------------------------------
# The program and its report
# ---------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Counts:
    """What one call (or one layer) does, summed over devices."""
    dispatches: float
    cross_copies: float
    cross_copy_bytes: float
    local_copies: float
    submissions: float
    host_waits: float
    dependent_steps: float
    bytes_read: float
    bytes_written: float
    kv_bytes_read: float
    weight_bytes_read: float
    flops: float
    names: dict          # dispatch name -> launches

    def __sub__(self, other: "Counts") -> "Counts":
        names = Counter(self.names)
        names.subtract(other.names)
        return Counts(*(getattr(self, f.name) - getattr(other, f.name)
                        for f in dataclasses.fields(self) if f.name != "names"),
                      names={k: v for k, v in names.items() if v})

    def per_device(self, devices: int) -> "Counts":
        """Each device's share (the dependent steps are one chain: not divided)."""
        return dataclasses.replace(self / devices, dependent_steps=self.dependent_steps)

    def __truediv__(self, n: float) -> "Counts":
        return Counts(*(getattr(self, f.name) / n
                        for f in dataclasses.fields(self) if f.name != "names"),
                      names={k: v / n for k, v in self.names.items()})

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def _counts(events) -> Counts:
    ds = [e.record for e in events if e.kind == "dispatch"]
    cs = [e.record for e in events if e.kind == "copy"]
    cross = [c for c in cs if c.cross]
    return Counts(
        dispatches=len(ds), cross_copies=len(cross),
        cross_copy_bytes=sum(c.bytes for c in cross), local_copies=len(cs) - len(cross),
        submissions=sum(e.kind == "submission" for e in events),
        host_waits=sum(e.kind == "host_wait" for e in events),
        dependent_steps=sum(e.record for e in events if e.kind == "step"),
        bytes_read=sum(d.bytes_read for d in ds), bytes_written=sum(d.bytes_written for d in ds),
        kv_bytes_read=sum(d.kv_bytes_read for d in ds),
        weight_bytes_read=sum(d.weight_bytes_read for d in ds),
        flops=sum(d.flops for d in ds), names=dict(Counter(d.name for d in ds)))


@dataclasses.dataclass
class EntryCost:
    """One entry's call: counts, the loop (if any), and the estimate."""
    name: str
    kind: str
    batch: int
    devices: int
    total: Counts
    estimate: step_time.Estimate
    loop_trips: int = 0                 # iterations of the loop, 0 without one
    loop_body: Counts | None = None     # one iteration of the loop
    per_layer: Counts | None = None     # the loop body, or unrolled layers by difference
    per_layer_source: str = ""
    dispatch_records: list = dataclasses.field(default_factory=list, repr=False)

    def to_json(self) -> dict:
        out = {"entry": self.name, "kind": self.kind, "batch": self.batch,
               "devices": self.devices, "total": self.total.to_json(),
               "estimate": self.estimate.to_json(), "loop_trips": self.loop_trips}
        if self.per_layer is not None:
            out["per_layer"] = self.per_layer.to_json()
            out["per_layer_per_device"] = self.per_layer.per_device(self.devices).to_json()
            out["per_layer_source"] = self.per_layer_source
        return out


@dataclasses.dataclass
class ModuleCost:
    path: str
    target: str
    gpu: str
    devices: int
    context: int
    block_seq_stride: int
    pages: int
    layers: int | None
    entries: list

    def entry(self, kind: str) -> EntryCost:
        return next(e for e in self.entries if e.kind == kind)

    def to_json(self) -> dict:
        return {"module": self.path, "target": self.target, "gpu": self.gpu,
                "devices": self.devices, "context": self.context,
                "block_seq_stride": self.block_seq_stride, "pages": self.pages,
                "layers": self.layers, "entries": [e.to_json() for e in self.entries]}


class Program:
    """A parsed stream-level module: its functions and executables."""

    def __init__(self, text: str, where: str = "<stream>"):
        from iree.compiler import ir

        self.context = ir.Context()
        try:
            self.module = ir.Module.parse(text, self.context)
        except Exception as e:  # MLIRError: not stream-level IR we can read
            raise HaloError(f"{where}: cannot parse the compiled program ({e})") from None
        self.functions, self.executables, self.globals = {}, {}, []
        for o in self.module.body.operations:
            op = o.operation
            if op.name in ("util.func", "func.func"):
                self.functions[op.attributes["sym_name"].value] = op
            elif op.name == "util.global":
                self.globals.append(op.attributes["sym_name"].value)
            elif op.name == "stream.executable":
                exe = op.attributes["sym_name"].value
                for inner in op.regions[0].blocks[0].operations:
                    if inner.operation.name == "builtin.module":
                        for f in inner.operation.regions[0].blocks[0].operations:
                            if f.operation.name == "func.func":
                                fn = f.operation.attributes["sym_name"].value
                                self.executables[(exe, fn)] = f.operation

    def entries(self) -> list[tuple[str, str, int]]:
        """(function, kind, batch) of each decode/prefill entry, the async variant preferred."""
        out = {}
        for name in self.functions:
            m = ENTRY.match(name)
            if m and (m.group(3) or (m.group(1), m.group(2)) not in out):
                out[(m.group(1), m.group(2))] = name
        return sorted(((f, k, int(b)) for (k, b), f in out.items()),
                      key=lambda x: (x[1] != "decode", x[2]))

    def devices(self) -> int:
        found = [int(m) for g in self.globals for m in re.findall(r"^__device_(\d+)$", g)]
        return max(found) + 1 if found else 1

    def layers(self) -> int | None:
        """Decoder blocks named in the parameters (blk.N), None for stacked (loop) weights."""
        found = {int(m) for g in self.globals for m in re.findall(r"blk[._](\d+)[._]", g)}
        return max(found) + 1 if found else None


def dims_for(batch: int, context: int, stride: int, pages: int):
    """The `hal.buffer_view.dim` oracle for a call at `context` tokens (ABI_DIMS)."""
    values = {"batch": batch, "ctx": context, "ctx_pages": -(-context // stride),
              "pages": pages}

    def dims(kind: str, arg: int, index: int) -> int:
        shape = ABI_DIMS[kind][arg] if arg < len(ABI_DIMS[kind]) else CACHE_DIMS
        name = shape[index] if index < len(shape) else None
        if not isinstance(name, str):
            raise HaloError(f"{kind} argument {arg} has no dynamic dimension {index} in the "
                            "ABI; is this a halo-mlir/sharktank paged-Llama module?")
        return values[name]
    return dims


def cost_program(program: Program, gpu, *, context: int, stride: int, pages: int | None,
                 path: str = "", target: str = "gfx942") -> ModuleCost:
    """Run every entry of `program` abstractly and estimate its step time on `gpu`."""
    from halo_mlir.toolchain.gpus import gpu_spec

    spec = gpu_spec(gpu) if isinstance(gpu, str) else gpu
    entries = program.entries()
    if not any(k == "decode" for _, k, _ in entries):
        raise HaloError(f"{path or 'the module'} has no decode_bs* entry: not a paged-Llama "
                        "module emitted by halo-mlir (or exported by sharktank)")
    devices = program.devices()
    out = []
    for fn, kind, batch in entries:
        n_pages = pages or batch * -(-context // stride)
        runner = _Runner(program, kind, dims_for(batch, context, stride, n_pages))
        runner.run(program.functions[fn])
        out.append(_entry_cost(fn, kind, batch, devices, runner, spec))
    return ModuleCost(path=path, target=target, gpu=spec.name, devices=devices,
                      context=context, block_seq_stride=stride,
                      pages=pages or 0, layers=program.layers(), entries=out)


def _entry_cost(fn, kind, batch, devices, runner: _Runner, spec) -> EntryCost:
    events = runner.events
    total = _counts(events)
    # A loop's blocks run more than once; its header runs once more than its body, so the
    # trip count is the runs of the blocks that hold commands.
    runs = runner.block_runs
    looped = [e for e in events if runs[e.block] > 1]
    trips = max((runs[e.block] for e in looped), default=1)
    body = _counts(looped) / trips if trips > 1 else None
    ds = [e.record for e in events if e.kind == "dispatch"]
    cs = [e.record for e in events if e.kind in ("copy", "fill")]
    est = step_time.estimate(ds, cs, spec, dependent_steps=total.dependent_steps,
                              host_waits=total.host_waits)
    return EntryCost(name=fn, kind=kind, batch=batch, devices=devices, total=total,
                     estimate=est, loop_trips=trips if trips > 1 else 0, loop_body=body,
                     per_layer=body,
                     per_layer_source=f"loop body ({trips} iterations)" if body else "",
                     dispatch_records=ds)


def per_layer_by_difference(big: ModuleCost, small: ModuleCost) -> ModuleCost:
    """`big` with per_layer = (big - small) / (layers difference), entry by entry."""
    if big.layers is None or small.layers is None or big.layers == small.layers:
        raise HaloError("per layer by difference needs two unrolled programs of different "
                        f"depth (found {big.layers} and {small.layers} layers)")
    n = big.layers - small.layers
    for e in big.entries:
        other = next((s for s in small.entries if s.name == e.name), None)
        if other is None:
            raise HaloError(f"{small.path} has no entry {e.name}")
        e.per_layer = dataclasses.replace((e.total - other.total) / n, names={})
        e.per_layer_source = f"difference of {big.layers} and {small.layers} layers"
    return big


# ---------------------------------------------------------------------------------------
# From a source module
# ---------------------------------------------------------------------------------------

def source_devices(path: Path) -> int:
    """Devices a source module places work on (1 + the highest @__device_N it names)."""
    if path.suffix == ".mlirbc":
        from halo_mlir.api import module_text, read_module

        text = module_text(read_module(path), locations=False)
    else:
        text = path.read_text(errors="replace")
    found = [int(n) for n in re.findall(r"@__device_(\d+)", text)]
    if not re.search(r"@decode_bs\d+\b", text):
        raise HaloError(f"{path} has no decode_bs* entry: not a paged-Llama module emitted by "
                        "halo-mlir (or exported by sharktank)")
    return max(found) + 1 if found else 1


def cost_file(path, *, target: str = "gfx942", tp: int | None = None, gpu: str = "mi300x",
              context: int = 2048, stride: int = 32, pages: int | None = None,
              extra_flags: list | None = None, echo=lambda m: None) -> ModuleCost:
    """Compile `path` to the stream level and cost it (see the module docstring)."""
    from halo_mlir.toolchain.compile import compile_file
    from halo_mlir.toolchain.gpus import gpu_spec

    spec = gpu_spec(gpu)  # an unknown GPU fails before the compile
    path = Path(path)
    if not path.exists():
        raise HaloError(f"{path}: no such file")
    if context < 1 or stride < 1 or (pages is not None and pages < 1):
        raise HaloError("--context, --block-seq-stride and --pages must be at least 1")
    devices = source_devices(path)
    tp = tp or devices
    if tp != devices:
        raise HaloError(f"{path} places work on {devices} device(s) but --tp is {tp}; "
                        f"pass --tp {devices}")
    with tempfile.TemporaryDirectory(prefix="halo-cost-") as tmp:
        out = Path(tmp) / "stream.mlir"
        compile_file(path, out, target=target, tp=tp,
                     extra_flags=["--compile-to=stream", "--mlir-print-debuginfo",
                                  *(extra_flags or [])], echo=echo)
        text = out.read_text()
    return cost_program(Program(text, str(path)), spec, context=context, stride=stride,
                        pages=pages, path=str(path), target=target)
