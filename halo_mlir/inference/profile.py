"""`halo-mlir profile`: run a compiled module's prefill and decode steps with IREE's HAL
profiling on, and say what ran and what it took.

The calls are made by IREE's own `iree-benchmark-module` with `--device_profiling_mode`
(`host-execution` on the CPU: each dispatch's time on a worker; `dispatch-events` on GPUs:
device timestamps) and read back with `iree-profile --format=jsonl`. Each measured dispatch
is named by the op that emitted it (`blk.3.attn_q`): `cost` reads the same module's stream IR
and lists its dispatches in program order with their locations; the k-th measured run of an
executable on a device is the k-th listed one. Parameters come from files or, with
`random_params`, from splats of the module's parameter shapes (no storage: a 405B-shaped
program profiles before any checkpoint is at hand).
"""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import tempfile
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

from halo_mlir.errors import HaloError, lookup

# --device -> (IREE driver, profiling mode that times dispatches there)
DEVICES = {"cpu": ("local-task", "host-execution"), "hip": ("hip", "dispatch-events"),
           "cuda": ("cuda", "dispatch-events")}
# compile target for each device
TARGETS = {"cpu": "cpu", "hip": "gfx942", "cuda": "cuda"}
# config.json kv_cache_dtype -> the element type iree-benchmark-module's --input takes
CACHE_TYPES = {"float32": "f32", "float16": "f16", "bfloat16": "bf16",
               "float8_e4m3fnuz": "f8E4M3FNUZ"}
# What each emitted op is (the op part of its location, blk.N.OP or OP)
KINDS = {"attn_q": "q proj", "attn_k": "k proj", "attn_v": "v proj", "attn_output": "o proj",
         "attention": "attention", "kv_cache": "cache write", "rope": "rope",
         "attn_norm": "norm", "ffn_norm": "norm", "attn_output_norm": "norm",
         "layer_output_norm": "norm", "output_norm": "norm", "ffn_gate": "gate/up",
         "ffn_up": "gate/up", "ffn_down": "down", "ffn": "ffn act/experts", "ffn_gate_inp": "router",
         "output": "lm_head", "token_embd": "embedding"}
# ops outside the blocks that compute the step's tables (positions, RoPE angles, page rows)
STEP_TABLES = {"rope", "kv_cache", "positions"}
_PARAM = re.compile(r'util\.global private @\S+ \{[^}]*\} = #flow\.parameter\.named<"(\w+)"::'
                    r'"([^"]+)"> : tensor<([0-9x]+)x(\w+)>|util\.global private @\S+ = '
                    r'#flow\.parameter\.named<"(\w+)"::"([^"]+)"> : tensor<([0-9x]+)x(\w+)>')


def kind_of(where: str, export: str = "") -> tuple[int | None, str]:
    """(layer or None, kind) of an emitter location name (`blk.3.attn_q`, `output`); a
    dispatch IREE made itself (a strided copy: `..._slow_memcpy`) is a `copy kernel`."""
    if not where and export.endswith("_slow_memcpy"):
        return None, "copy kernel"
    m = re.match(r"^blk\.(\d+|\*)\.(.+)$", where)
    if m:
        layer = int(m.group(1)) if m.group(1) != "*" else None
        return layer, KINDS.get(m.group(2), m.group(2))
    if where in STEP_TABLES:
        return None, "step tables"
    return None, KINDS.get(where, where or "unnamed")


# ---- parameters --------------------------------------------------------------------
def parameter_globals(text: str) -> list[tuple[str, tuple[int, ...], str]]:
    """(key, shape, element type) of every parameter a module's text reads."""
    out, seen = [], set()
    for m in _PARAM.finditer(text):
        g = [x for x in m.groups() if x is not None]
        key, shape, dtype = g[1], tuple(int(s) for s in g[2].split("x")), g[3]
        if key not in seen:
            seen.add(key)
            out.append((key, shape, dtype))
    return out


def random_parameters(source: Path, out: Path) -> Path:
    """An IRPA of splats with the module's parameter names and sizes (no data on disk):
    floats 0.01, bytes 1 (fp8 and quantized fields), so the numbers stay finite."""
    found = parameter_globals(source.read_text(errors="replace"))
    if not found:
        raise HaloError(f"{source}: no parameters found; pass the module's source .mlir "
                        "(written by `halo-mlir emit`) to --source")
    lines = []
    for key, shape, dtype in found:
        dims = "x".join(map(str, shape))
        if dtype in ("f32", "f16", "bf16"):
            lines.append(f"--splat={key}={dims}x{dtype}=0.01")
        else:  # fp8 and integer fields: their bytes
            width = {"i64": 8, "i32": 4, "i16": 2}.get(dtype, 1)
            lines.append(f"--splat={key}={int(np.prod(shape)) * width}xi8=1")
    flags = out.with_suffix(".flags")
    flags.write_text("\n".join(lines + [f"--output={out}"]) + "\n")
    proc = subprocess.run([runtime_tool("iree-create-parameters"), f"--flagfile={flags}"], capture_output=True, text=True)
    if proc.returncode != 0:
        raise HaloError(f"iree-create-parameters failed: {proc.stderr.strip()[:300]}")
    return out


# ---- running ------------------------------------------------------------------------
@dataclasses.dataclass
class Call:
    """One entry and the inputs of one call of it."""
    function: str
    inputs: list[str]


def calls_for(config: dict, bs: int, prompt_len: int, work: Path) -> tuple[Call, Call]:
    """(prefill, decode) calls per docs/ABI.md: `bs` rows of `prompt_len` tokens in
    distinct pages, then one token each; a zero cache per device."""
    kv = config["paged_kv_cache"]
    stride = kv["block_seq_stride"]
    per_device = kv["paged_kv_block_size_elements_per_device"]
    cache_type = lookup(CACHE_TYPES, kv["kv_cache_dtype"], "kv_cache_dtype")
    for key, what in (("prefill_batch_sizes", "prefill"), ("decode_batch_sizes", "decode")):
        if bs not in config[key]:
            raise HaloError(f"the module has no {what}_bs{bs} (its {what} batch sizes: "
                            f"{config[key]}); pass --bs with one of them")
    prompt_pages = -(-prompt_len // stride)
    decode_pages = -(-(prompt_len + 1) // stride)
    pages = bs * decode_pages
    ids = np.arange(pages, dtype=np.int64).reshape(bs, decode_pages)
    np.save(work / "prefill_pages.npy", np.ascontiguousarray(ids[:, :prompt_pages]))
    np.save(work / "decode_pages.npy", ids)
    caches = [f"--input={pages}x{n}x{cache_type}=0" for n in per_device]
    prefill = Call(f"prefill_bs{bs}", [f"--input={bs}x{prompt_pages * stride}xi64=1",
                                       f"--input={bs}xi64={prompt_len}",
                                       f"--input=@{work / 'prefill_pages.npy'}", *caches])
    decode = Call(f"decode_bs{bs}", [f"--input={bs}x1xi64=1",
                                     f"--input={bs}xi64={prompt_len + 1}",
                                     f"--input={bs}xi64={prompt_len}",
                                     f"--input=@{work / 'decode_pages.npy'}", *caches])
    return prefill, decode


def run_profiled(vmfb: Path, params: list[Path], devices: int, device: str, call: Call,
                 iterations: int, out: Path, threads: int | None = None) -> None:
    """`iterations` calls of `call` in one process, profiled into `out` (.ireeprof);
    `threads`: the CPU's local-task workers (default: one per core)."""
    driver, mode = DEVICES[device]
    tool = runtime_tool("iree-benchmark-module")
    cmd = [tool, f"--module={vmfb}", *(f"--parameters=model={p}" for p in params),
           *([f"--task_topology_max_group_count={threads}"] if threads else []),
           *([f"--device={driver}"] * devices), f"--function={call.function}", *call.inputs,
           f"--device_profiling_mode={mode}", f"--device_profiling_output={out}",
           f"--benchmark_min_time={iterations}x", "--benchmark_format=json"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0 or not out.exists():
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        raise HaloError(f"profiling {call.function} on {device} failed: "
                        f"{(lines[-1] if lines else 'no output').strip()[:300]}")


def read_events(prof: Path) -> tuple[list[dict], Counter]:
    """(dispatch events in order, command operations by kind over the executed command
    buffers) of a profile bundle."""
    tool = runtime_tool("iree-profile")
    proc = subprocess.run([tool, "dispatch", "--format=jsonl", "--dispatch_events", str(prof)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise HaloError(f"iree-profile cannot read {prof}: {proc.stderr.strip()[:300]}")
    events = [e for e in map(json.loads, proc.stdout.splitlines())
              if e.get("type") in ("host_dispatch_event", "dispatch_event") and e.get("valid")]
    # program order on each device (submission ids count per device)
    events.sort(key=lambda e: (e.get("physical_device_ordinal", 0), e.get("submission_id", 0),
                               e.get("command_buffer_id", 0), e.get("command_index", 0),
                               e.get("event_id", 0)))
    proc = subprocess.run([tool, "command", "--format=jsonl", str(prof)], capture_output=True,
                          text=True)
    ops: dict[int, Counter] = defaultdict(Counter)
    runs: Counter = Counter()
    for e in map(json.loads, proc.stdout.splitlines()):
        if e.get("type") == "command_operation":
            ops[e["command_buffer_id"]][e.get("op", "?")] += 1
        elif e.get("type") in ("command_host_execution", "command_execution"):
            runs[e["command_buffer_id"]] += 1
    executed: Counter = Counter()
    for cb, n in runs.items():
        for op, count in ops[cb].items():
            executed[op] += n * count
    return events, executed


def runtime_tool(name: str) -> str:
    """A tool of the installed iree-base-runtime (iree-benchmark-module, iree-profile, ...)."""
    import shutil

    import iree._runtime_libs as libs

    path = Path(libs.__file__).parent / name
    found = str(path) if path.exists() else shutil.which(name)
    if found is None:
        raise HaloError(f"{name} not found: it comes with iree-base-runtime "
                        "(pip install iree-base-runtime)")
    return found


# ---- naming and the report ----------------------------------------------------------
def name_events(events: list[dict], records) -> list[dict]:
    """Each event of one call with the location of the dispatch it is: the k-th event of an
    executable on a device is the k-th such dispatch `cost` lists (a layer loop's body once
    per iteration, its layer the iteration)."""
    listed: dict[tuple[int, str], list] = defaultdict(list)
    for r in records:
        listed[(r.device, r.name)].append(r)
    taken: Counter = Counter()
    out = []
    for e in events:
        key = (e.get("physical_device_ordinal", 0), e["key"])
        k = taken[key]
        taken[key] += 1
        where = listed[key][k].where if k < len(listed[key]) else ""
        layer, kind = kind_of(where, e["key"])
        out.append({"layer": layer, "kind": kind, "name": where or e["key"],
                    "export": e["key"], "device": key[0], "time_ns": int(e["duration_ns"]),
                    "start_ns": int(e.get("start_host_time_ns", e.get("start_time_ns", 0))),
                    "end_ns": int(e.get("end_host_time_ns", e.get("end_time_ns", 0)))})
    return out


def split_calls(events: list, calls: int) -> list[list]:
    """The events of each call: on every device equal consecutive slices of its events in
    program order (every call runs the same dispatches)."""
    by_device: dict[int, list] = defaultdict(list)
    for e in events:
        by_device[e.get("physical_device_ordinal", 0)].append(e)
    out: list[list] = [[] for _ in range(calls)]
    for device, evs in sorted(by_device.items()):
        if len(evs) % calls:
            raise HaloError(f"device {device} ran {len(evs)} dispatches, not a whole number "
                            f"for {calls} calls")
        n = len(evs) // calls
        for i in range(calls):
            out[i] += evs[i * n:(i + 1) * n]
    return out


def step_summary(named: list[dict], devices: int, copies_per_call: float) -> dict:
    per_device = [sum(1 for e in named if e["device"] == d) for d in range(devices)]
    start = min(e["start_ns"] for e in named)
    end = max(e["end_ns"] for e in named)
    return {"dispatches_per_step": per_device, "copies_per_step": copies_per_call,
            "step_ms": (end - start) / 1e6,
            "dispatch_ms": sum(e["time_ns"] for e in named) / 1e6}


def by_kind(named: list[dict]) -> dict[str, dict]:
    total = sum(e["time_ns"] for e in named) or 1
    out: dict[str, dict] = {}
    for e in named:
        k = out.setdefault(e["kind"], {"count": 0, "time_ns": 0})
        k["count"] += 1
        k["time_ns"] += e["time_ns"]
    for k in out.values():
        k["share"] = k["time_ns"] / total
    return dict(sorted(out.items(), key=lambda kv: -kv[1]["time_ns"]))


def profile(vmfb: str | Path, *, config: dict, params: list[Path], device: str = "cpu",
            bs: int | None = None, prompt_len: int = 32, steps: int = 4,
            source: str | Path | None = None, random_params: bool = False,
            perfetto: str | Path | None = None, threads: int | None = None,
            echo=print) -> dict:
    """Profile one prefill and `steps` decode steps (each after a warm-up call); the report
    as a dict (format_report prints it). `perfetto`: also write the decode steps as a
    Perfetto trace there. `threads`: on the CPU, the runtime's worker threads (default one
    per core)."""
    from halo_mlir.analysis import cost

    lookup(DEVICES, device, "--device")
    if perfetto is not None:
        check_perfetto()
    if threads is not None and (device != "cpu" or threads < 1):
        raise HaloError(f"--threads {threads}: the CPU's worker count, at least 1 and only "
                        "with --device cpu; drop it or fix it")
    if steps < 1:
        raise HaloError(f"--steps must be at least 1, got {steps}")
    if prompt_len < 1:
        raise HaloError(f"--prompt-len must be at least 1, got {prompt_len}")
    from halo_mlir.support.io import check_parameter_file, check_vmfb

    vmfb = check_vmfb(vmfb)  # before any work: a wrong file is one line
    for p in params:
        check_parameter_file(p)
    devices = len(config["paged_kv_cache"]["paged_kv_block_size_elements_per_device"])
    bs = bs or config["decode_batch_sizes"][0]
    if random_params and source is None:
        raise HaloError("--random-params needs --source MODULE.mlir (its parameter shapes)")
    records = {}
    if source is not None:
        echo(f"reading {source}'s dispatches (the stream IR) ...")
        m = cost.cost_file(source, target=TARGETS[device], tp=devices, echo=lambda s: None,
                           context=prompt_len + 1, stride=config["paged_kv_cache"]
                           ["block_seq_stride"])
        records = {e.name.split("$")[0]: e.dispatch_records for e in m.entries}
    report: dict = {"module": str(vmfb), "device": device, "devices": devices, "bs": bs,
                    "prompt_len": prompt_len, "steps": steps, "threads": threads}
    with tempfile.TemporaryDirectory(prefix="halo-profile-") as tmp:
        work = Path(tmp)
        if random_params:
            echo("parameters: splats of the module's shapes (--random-params)")
            params = [random_parameters(Path(source), work / "random.irpa")]
        prefill, decode = calls_for(config, bs, prompt_len, work)
        for name, call, calls in (("prefill", prefill, 1), ("decode", decode, steps)):
            echo(f"profiling {call.function}: 1 warm-up + {calls} call(s) on {device} ...")
            events, executed = _profiled_events(vmfb, params, devices, device, call,
                                                calls + 1, work / f"{name}.ireeprof", threads)
            per_call = split_calls(events, calls + 1)[1:]
            copies = (executed.get("copy", 0) + executed.get("fill", 0)) / (calls + 1)
            named = [name_events(c, records.get(call.function, [])) for c in per_call]
            steps_ = [step_summary(n, devices, copies) for n in named]
            last = named[-1]
            if name == "decode" and perfetto is not None:
                write_perfetto(work / f"{name}.ireeprof", Path(perfetto))
            report[name] = {
                **{k: steps_[-1][k] for k in ("dispatches_per_step", "copies_per_step")},
                "step_ms": float(np.median([s["step_ms"] for s in steps_])),
                "dispatch_ms": float(np.median([s["dispatch_ms"] for s in steps_])),
                "steps": steps_, "kinds": by_kind(last),
                "per_layer": _per_layer(last),
                "top": sorted(last, key=lambda e: -e["time_ns"])[:10],
                "dispatches": last}
    return report


def check_perfetto() -> None:
    import importlib.util

    if importlib.util.find_spec("perfetto") is None:
        raise HaloError("--perfetto needs the perfetto package: pip install 'halo-mlir[profile]' "
                        "(or pip install perfetto protobuf)")


def write_perfetto(prof: Path, out: Path) -> None:
    """The bundle as a Perfetto trace (`iree-profile export` | `iree-profile-render`)."""
    import sys

    exported = subprocess.run([runtime_tool("iree-profile"), "export", "--format=ireeperf-jsonl",
                               "--output=-", str(prof)], capture_output=True)
    if exported.returncode != 0:
        raise HaloError(f"iree-profile export failed: {exported.stderr.decode()[-300:]}")
    tmp = out.with_name(f".{out.name}.partial")
    render = subprocess.run([sys.executable, "-m", "iree._runtime.scripts.iree_profile_render",
                             "-", "-o", str(tmp)], input=exported.stdout, capture_output=True)
    if render.returncode != 0 or not tmp.exists():
        tmp.unlink(missing_ok=True)
        raise HaloError(f"iree-profile-render failed: {render.stderr.decode().strip()[-300:]}")
    tmp.replace(out)


def _profiled_events(vmfb, params, devices, device, call, calls, out: Path,
                     threads: int | None = None, tries: int = 3):
    """run_profiled + read_events. IREE 3.13 sometimes writes a multi-device bundle that its
    own reader rejects ("DATA_LOSS ... invalid typed record length 0", about one run in
    five at 2 devices here): such a run is made again."""
    for attempt in range(tries):
        out.unlink(missing_ok=True)
        run_profiled(vmfb, params, devices, device, call, calls, out, threads)
        try:
            return read_events(out)
        except HaloError as e:
            if "DATA_LOSS" not in str(e) or attempt == tries - 1:
                raise


def _per_layer(named: list[dict]) -> dict:
    layers: dict = {}
    for e in named:
        if e["layer"] is not None:
            d = layers.setdefault(str(e["layer"]), {"dispatches": 0, "time_ns": 0})
            d["dispatches"] += 1
            d["time_ns"] += e["time_ns"]
    return layers


def format_report(r: dict) -> str:
    lines = [f"Profile of {r['module']} on {r['device']} x{r['devices']} (bs {r['bs']}, prompt "
             f"{r['prompt_len']} tokens, {r['steps']} decode steps after a warm-up"
             + (f", {r['threads']} worker thread(s)" if r.get("threads") else "") + ")"]
    for name in ("prefill", "decode"):
        p = r[name]
        lines.append(f"\n{name}: {p['step_ms']:.3f} ms a call (median), dispatches "
                     f"{p['dispatch_ms']:.3f} ms summed; dispatches per device "
                     f"{p['dispatches_per_step']}, copies {p['copies_per_step']:g}")
        lines.append(f"  {'kind':<14}{'count':>7}{'ms':>10}{'share':>8}")
        for kind, k in p["kinds"].items():
            lines.append(f"  {kind:<14}{k['count']:>7}{k['time_ns'] / 1e6:>10.3f}"
                         f"{k['share']:>8.1%}")
        lines.append("  top dispatches:")
        for e in p["top"]:
            lines.append(f"    {e['time_ns'] / 1e3:9.1f} us  {e['name']:<22} dev {e['device']}  "
                         f"{e['export']}")
    return "\n".join(lines)
