"""The text `halo-mlir cost` prints: a module's calls, their counts and estimated time."""

from __future__ import annotations

import re
from collections import Counter

from halo_mlir.analysis.cost import ModuleCost


def _num(x: float) -> str:
    return f"{x:,.0f}" if abs(x - round(x)) < 1e-9 else f"{x:,.2f}"


def _mb(x: float) -> str:
    return f"{x / 1e6:,.3f} MB"


def format_report(m: ModuleCost, top: int = 8) -> str:
    lines = [f"Cost of {m.path} ({m.target}, {m.devices} device(s), {m.gpu}; context "
             f"{m.context:,} tokens, stride {m.block_seq_stride})"]
    for e in m.entries:
        t, est = e.total, e.estimate
        lines.append(f"\n{e.name} (batch {e.batch}):")
        cols = [("whole call", t)]
        if e.per_layer is not None:
            cols += [("per layer", e.per_layer)]
            if e.devices > 1:
                cols += [("per layer per device", e.per_layer.per_device(e.devices))]
        rows = [("dispatches", "dispatches", _num), ("cross-device copies", "cross_copies", _num),
                ("cross-device bytes", "cross_copy_bytes", _mb),
                ("in-device copies", "local_copies", _num),
                ("submissions", "submissions", _num), ("host waits", "host_waits", _num),
                ("dependent cross-device steps", "dependent_steps", _num),
                ("bytes read", "bytes_read", _mb), ("  of which KV pages", "kv_bytes_read", _mb),
                ("  of which weights", "weight_bytes_read", _mb),
                ("bytes written", "bytes_written", _mb),
                ("GFLOP", "flops", lambda x: f"{x / 1e9:,.3f}")]
        w = max(len(r[0]) for r in rows)
        lines.append("  " + " " * w + "".join(f"  {c:>22}" for c, _ in cols))
        for label, field, fmt in rows:
            lines.append(f"  {label:<{w}}" + "".join(f"  {fmt(getattr(c, field)):>22}"
                                                     for _, c in cols))
        if e.per_layer is not None:
            lines.append(f"  (per layer: {e.per_layer_source})")
        # Kernel names carry shapes (the cache's names its depth): by difference, show the
        # whole call's.
        layer = e.per_layer is not None and bool(e.per_layer.names)
        names = Counter(e.per_layer.names if layer else t.names)
        shown = ", ".join(f"{_short(n)} x{_num(c)}" for n, c in names.most_common(top))
        more = len(names) - top
        lines.append(f"  kernels{' per layer' if layer else ''}: {shown}"
                     + (f", and {more} more" if more > 0 else ""))
        lines.append(f"  estimated {est.seconds * 1e3:,.3f} ms on {m.gpu} (device {est.device}: "
                     f"kernels {est.dispatch_s * 1e3:,.3f} ms [bytes {est.memory_s * 1e3:,.3f}, "
                     f"FLOPs {est.compute_s * 1e3:,.3f}] + launches {est.launch_s * 1e3:,.3f} + "
                     f"copies {est.copy_s * 1e3:,.3f}; dependent steps "
                     f"{est.step_s * 1e3:,.3f}; host waits {est.host_wait_s * 1e3:,.3f})")
    return "\n".join(lines)


def _short(name: str) -> str:
    """`decode_bs4$async_dispatch_21_matmul_4x1024x512_f16...` -> `21_matmul_4x1024x512_f16...`."""
    return re.sub(r"^.*?_dispatch_", "", name)
