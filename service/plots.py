"""What the job page shows of a plan: rows for the layer table, the cost summary
against the budget, the measured quality, and the Pareto frontier as inline SVG
(server-rendered: no charting library, nothing to build)."""

from __future__ import annotations

import csv
import io
import math
from html import escape
from typing import Any

CSV_COLUMNS = ["name", "kind", "params", "macs", "w_bits", "a_bits", "w_format", "sensitivity"]
UNITS = {"avg_weight_bits": "bits", "size_bytes": "bytes", "bops": "BOPs", "latency_ms": "ms"}


def plan_csv(plan: dict[str, Any]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for layer in plan["layers"]:
        writer.writerow(layer)
    return out.getvalue()


def plan_view(plan: dict[str, Any]) -> dict[str, Any]:
    layers = plan["layers"]
    top = max((layer["sensitivity"] for layer in layers), default=0.0) or 1.0
    rows = [{**layer, "bar": round(100 * layer["w_bits"] / 16, 1), "sens_bar": log_bar(layer["sensitivity"], top)}
            for layer in layers]
    cost = plan["cost"]
    costs = []
    for key in ("avg_weight_bits", "size_bytes", "bops", "latency_ms"):
        value = cost.get(key)
        if value is None:
            continue
        limit = plan["budget"].get(key)
        costs.append({"key": key, "value": value, "limit": limit, "unit": UNITS[key],
                      "used": None if not limit else round(100 * value / limit, 1)})
    measured = []
    m = plan.get("measured")
    if m:
        measured.append({"label": "full precision", **m["fp"]})
        check = plan.get("uniform_check") or {}
        label = "this plan" if check.get("outcome") != "uniform_returned" else f"this plan ({check.get('uniform')})"
        measured.append({"label": label, **m["plan"], "chosen": True})
        if m.get("uniform"):
            fmt = m.get("uniform_format", "int")
            measured.append({"label": f"uniform {fmt}" if fmt != "int" else f"uniform {m['uniform_w_bits']}-bit",
                             **m["uniform"]})
    return {"rows": rows, "costs": costs, "measured": measured, "frontier_svg": frontier_svg(plan),
            "frontier_key": next(iter(plan["budget"]), "avg_weight_bits")}


#: decades a sensitivity bar spans: the largest value draws 100, one 10^-4 of it draws 0
BAR_DECADES = 4


def log_bar(value: float, top: float) -> float:
    """A bar length 0..100 on a log scale, so that 0.0009 and 0.0023 draw visibly different lengths."""
    if value <= 0 or top <= 0:
        return 0.0
    return round(max(2.0, 100 * (1 + math.log10(min(value / top, 1.0)) / BAR_DECADES)), 1)


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """About ``count`` round tick values (steps of 1, 2, 2.5 or 5 times a power of ten) covering [lo, hi]."""
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        return [lo]
    raw = (hi - lo) / max(count - 1, 1)
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= raw)
    first = math.floor(lo / step + 1e-9) * step
    ticks: list[float] = []
    value = first
    while value < hi + step * 0.5 and len(ticks) < 50:
        ticks.append(round(value, 12))
        value += step
    if ticks[-1] < hi - 1e-12:
        ticks.append(round(value, 12))
    return ticks


def _fmt(value: float) -> str:
    if value == 0:
        return "0"
    if abs(value) >= 1e4 or abs(value) < 1e-2:
        return f"{value:.2g}"
    return f"{value:.3g}"


def frontier_svg(plan: dict[str, Any], width: int = 560, height: int = 320) -> str | None:
    """Predicted loss increase (sum of Omega) against the budget's cost; the chosen plan marked."""
    points = plan.get("frontier") or []
    key = next(iter(plan["budget"]), "avg_weight_bits")
    pts = [(p["cost"].get(key), p["objective"]) for p in points if p.get("cost", {}).get(key) is not None]
    # the returned plan (the guarantee may have replaced the solver's): its predicted loss from its layers
    chosen = (plan["cost"].get(key), sum(layer["sensitivity"] for layer in plan["layers"]))
    if not pts or chosen[0] is None:
        return None
    xs = [x for x, _ in pts] + [chosen[0], plan["budget"][key]]
    ys = [y for _, y in pts] + [chosen[1]]
    left, right, top, bottom = 70, 20, 20, 50
    xticks = nice_ticks(min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1)
    lo_y = min(ys)
    yticks = nice_ticks(0.0 if lo_y >= 0 else lo_y, max(ys) if max(ys) > lo_y else lo_y + 1e-12)
    x0, x1 = xticks[0], xticks[-1]
    y0, y1 = yticks[0], yticks[-1]

    def sx(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * (width - left - right)

    def sy(y: float) -> float:
        return height - bottom - (y - y0) / (y1 - y0) * (height - top - bottom)

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" role="img" '
             f'aria-labelledby="frontier-title" class="frontier" data-points="{len(pts)}">',
             f'<title id="frontier-title">Pareto frontier: predicted loss increase against {escape(key)}; '
             f'the chosen plan is marked</title>',
             f'<line x1="{left}" y1="{height - bottom}" x2="{width - right}" y2="{height - bottom}" class="axis"/>',
             f'<line x1="{left}" y1="{top}" x2="{left}" y2="{height - bottom}" class="axis"/>']
    for xv in xticks:
        parts.append(f'<text x="{sx(xv):.1f}" y="{height - bottom + 16}" class="tick" text-anchor="middle">{_fmt(xv)}</text>')
    for yv in yticks:
        parts.append(f'<text x="{left - 6}" y="{sy(yv) + 4:.1f}" class="tick" text-anchor="end">{_fmt(yv)}</text>')
    parts.append(f'<text x="{(left + width - right) / 2}" y="{height - 10}" class="label" text-anchor="middle">'
                 f'{escape(key)}</text>')
    parts.append(f'<text x="14" y="{(top + height - bottom) / 2}" class="label" text-anchor="middle" '
                 f'transform="rotate(-90 14 {(top + height - bottom) / 2})">predicted loss increase (Σ Ω)</text>')
    limit = plan["budget"][key]
    parts.append(f'<line x1="{sx(limit):.1f}" y1="{top}" x2="{sx(limit):.1f}" y2="{height - bottom}" class="budget"/>')
    parts.append(f'<text x="{sx(limit) + 4:.1f}" y="{top + 12}" class="tick">budget {_fmt(limit)}</text>')
    ordered = sorted(pts)
    path = " ".join(f"{'M' if i == 0 else 'L'}{sx(x):.1f},{sy(y):.1f}" for i, (x, y) in enumerate(ordered))
    parts.append(f'<path d="{path}" class="line"/>')
    for x, y in ordered:
        parts.append(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3.5" class="point"><title>{escape(key)} '
                     f'{_fmt(x)}, predicted {_fmt(y)}</title></circle>')
    cx, cy = sx(chosen[0]), sy(chosen[1])
    if math.isfinite(cx) and math.isfinite(cy):
        parts.append(f'<circle cx="{cx:.1f}" cy="{cy:.1f}" r="7" class="chosen" data-chosen="1"><title>chosen plan: '
                     f'{escape(key)} {_fmt(chosen[0])}, predicted {_fmt(chosen[1])}</title></circle>')
    parts.append("</svg>")
    return "".join(parts)
