"""Small inline-SVG charts for the dashboard (no external resources): a line chart and a
grouped bar chart, each with axes, tick labels, axis labels, a title and a legend."""

from __future__ import annotations

import math
from html import escape

COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#17becf",
          "#7f7f7f"]
W, H = 560, 320
LEFT, RIGHT, TOP, BOTTOM = 64, 16, 36, 56


def _ticks(lo: float, hi: float, log: bool) -> list[float]:
    if log:
        return [10.0 ** e for e in range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1)]
    if hi <= lo:
        hi = lo + 1
    step = 10 ** math.floor(math.log10((hi - lo) / 4))
    for m in (1, 2, 5, 10):
        if (hi - lo) / (step * m) <= 6:
            step *= m
            break
    first = math.floor(lo / step) * step
    return [first + i * step for i in range(int((hi - first) / step) + 2)
            if first + i * step <= hi + step * 0.999]


def _fmt(v: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 1000 or abs(v) < 0.01:
        return f"{v:.0e}".replace("e+0", "e").replace("e-0", "e-")
    return f"{v:g}"


class _Axis:
    """Maps data to pixels along one axis (linear or log10)."""

    def __init__(self, lo, hi, p0, p1, log=False):
        self.log = log
        if log:
            lo, hi = 10 ** math.floor(math.log10(lo)), 10 ** math.ceil(math.log10(hi))
        self.ticks = _ticks(lo, hi, log)
        self.lo, self.hi = min(self.ticks[0], lo), max(self.ticks[-1], hi)
        self.p0, self.p1 = p0, p1

    def __call__(self, v: float) -> float:
        f = (lambda x: math.log10(x)) if self.log else (lambda x: x)
        span = f(self.hi) - f(self.lo) or 1.0
        return self.p0 + (f(v) - f(self.lo)) / span * (self.p1 - self.p0)


def _frame(title, x_label, y_label, xa: _Axis | None, ya: _Axis, legend: list[str],
           markers: list[str] | None = None, W: int = W) -> list[str]:
    out = [f'<svg width="{W}" height="{H}" '
           f'viewBox="0 0 {W} {H}" role="img" aria-label="{escape(title)}">',
           f'<text x="{W / 2}" y="18" text-anchor="middle" font-weight="bold">{escape(title)}</text>',
           f'<line x1="{LEFT}" y1="{H - BOTTOM}" x2="{W - RIGHT}" y2="{H - BOTTOM}" stroke="#333"/>',
           f'<line x1="{LEFT}" y1="{TOP}" x2="{LEFT}" y2="{H - BOTTOM}" stroke="#333"/>',
           f'<text x="{(LEFT + W - RIGHT) / 2}" y="{H - 8}" text-anchor="middle">'
           f'{escape(x_label)}</text>',
           f'<text transform="translate(14,{(TOP + H - BOTTOM) / 2}) rotate(-90)" '
           f'text-anchor="middle">{escape(y_label)}</text>']
    for t in ya.ticks:
        y = ya(t)
        out.append(f'<line x1="{LEFT - 4}" y1="{y:.1f}" x2="{W - RIGHT}" y2="{y:.1f}" '
                   'stroke="#ddd"/>')
        out.append(f'<text x="{LEFT - 6}" y="{y + 4:.1f}" text-anchor="end" '
                   f'font-size="11">{_fmt(t)}</text>')
    if xa is not None:
        for t in xa.ticks:
            x = xa(t)
            out.append(f'<line x1="{x:.1f}" y1="{H - BOTTOM}" x2="{x:.1f}" '
                       f'y2="{H - BOTTOM + 4}" stroke="#333"/>')
            out.append(f'<text x="{x:.1f}" y="{H - BOTTOM + 16}" text-anchor="middle" '
                       f'font-size="11">{_fmt(t)}</text>')
    for i, label in enumerate(legend):  # top-left, one line per series
        y = TOP + 6 + 15 * i
        color = COLORS[i % len(COLORS)]
        if markers and markers[i] == "line":
            out.append(f'<line x1="{LEFT + 10}" y1="{y}" x2="{LEFT + 26}" y2="{y}" '
                       f'stroke="{color}" stroke-width="2"/>')
        else:
            out.append(f'<rect x="{LEFT + 12}" y="{y - 5}" width="10" height="10" '
                       f'fill="{color}"/>')
        out.append(f'<text x="{LEFT + 32}" y="{y + 4}" font-size="11">{escape(label)}</text>')
    return out


def line_chart(series: dict[str, list[tuple[float, float]]], *, title: str, x_label: str,
               y_label: str, log_x=False, log_y=False,
               open_points: dict[str, list[tuple[float, float, str]]] | None = None) -> str:
    """One polyline with dots per series. `open_points`: per series, points drawn hollow
    with a label (a measurement that was stopped: the value is a lower bound)."""
    open_points = open_points or {}
    pts = [p for s in series.values() for p in s] + [(x, y) for s in open_points.values()
                                                      for x, y, _ in s]
    if not pts:
        return ""
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    xa = _Axis(min(xs), max(xs), LEFT + 10, W - RIGHT - 10, log_x)
    ya = _Axis(0 if not log_y else min(ys), max(ys) * (1.0 if log_y else 1.1),
               H - BOTTOM, TOP + 10, log_y)
    out = _frame(title, x_label, y_label, xa, ya, list(series), ["line"] * len(series))
    for i, (name, s) in enumerate(series.items()):
        color = COLORS[i % len(COLORS)]
        s = sorted(s)
        if len(s) > 1:
            path = " ".join(f"{xa(x):.1f},{ya(y):.1f}" for x, y in s)
            out.append(f'<polyline points="{path}" fill="none" stroke="{color}" '
                       'stroke-width="2"/>')
        for x, y in s:
            out.append(f'<circle cx="{xa(x):.1f}" cy="{ya(y):.1f}" r="3.5" fill="{color}">'
                       f'<title>{escape(name)}: {_fmt(x)}, {_fmt(y)}</title></circle>')
        for x, y, text in open_points.get(name, []):
            out.append(f'<circle cx="{xa(x):.1f}" cy="{ya(y):.1f}" r="4.5" fill="white" '
                       f'stroke="{color}" stroke-width="2"/>')
            out.append(f'<text x="{xa(x) - 6:.1f}" y="{ya(y) - 8:.1f}" text-anchor="end" '
                       f'font-size="11" fill="{color}">{escape(text)}</text>')
    out.append("</svg>")
    return "\n".join(out)


def bar_chart(categories: list[str], series: dict[str, list[float | None]], *, title: str,
              y_label: str, x_label: str = "", log_y=False, value_fmt="{:g}",
              width: int = W) -> str:
    """Grouped vertical bars: one group per category, one bar per series (None: no bar).
    Each bar carries its value above it."""
    vals = [v for s in series.values() for v in s if v is not None]
    if not vals or not categories:
        return ""
    ya = _Axis(min(vals) if log_y else 0, max(vals) * (1.0 if log_y else 1.15),
               H - BOTTOM, TOP + 12 + 15 * len(series), log_y)
    W = width  # noqa: N806 (the frame's width)
    out = _frame(title, x_label, y_label, None, ya, list(series), W=W)
    group_w = (W - LEFT - RIGHT) / len(categories)
    bar_w = min(28.0, group_w * 0.8 / max(len(series), 1))
    base = ya(ya.lo)
    for c, cat in enumerate(categories):
        x0 = LEFT + c * group_w + (group_w - bar_w * len(series)) / 2
        for i, (name, s) in enumerate(series.items()):
            v = s[c]
            if v is None:
                continue
            x, y = x0 + i * bar_w, ya(v)
            out.append(f'<rect x="{x:.1f}" y="{y:.1f}" width="{bar_w - 1:.1f}" '
                       f'height="{max(base - y, 0.5):.1f}" fill="{COLORS[i % len(COLORS)]}">'
                       f'<title>{escape(cat.replace(chr(10), " "))} {escape(name)}: {value_fmt.format(v)}</title></rect>')
            out.append(f'<text x="{x + bar_w / 2:.1f}" y="{y - 3:.1f}" text-anchor="middle" '
                       f'font-size="9">{escape(value_fmt.format(v))}</text>')
        cx = LEFT + (c + 0.5) * group_w
        lines = "".join(f'<tspan x="{cx:.1f}" dy="{0 if j == 0 else 11}">{escape(part)}</tspan>'
                        for j, part in enumerate(cat.split("\n")))
        out.append(f'<text x="{cx:.1f}" y="{H - BOTTOM + 14}" text-anchor="middle" '
                   f'font-size="10">{lines}</text>')
    out.append("</svg>")
    return "\n".join(out)
