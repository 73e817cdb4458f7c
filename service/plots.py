"""What the job page shows of a plan: rows for the layer table, the cost summary
against the budget, the measured quality, and the Pareto frontier as inline SVG
(server-rendered: no charting library, nothing to build)."""

from __future__ import annotations

import csv
import io
import math
from html import escape

CSV_COLUMNS = ["name", "kind", "params", "macs", "w_bits", "a_bits", "sensitivity"]
UNITS = {"avg_weight_bits": "bits", "size_bytes": "bytes", "bops": "BOPs", "latency_ms": "ms"}


def plan_csv(plan: dict) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for layer in plan["layers"]:
        writer.writerow(layer)
    return out.getvalue()


def plan_view(plan: dict) -> dict:
    layers = plan["layers"]
    top = max((layer["sensitivity"] for layer in layers), default=0.0) or 1.0
    rows = [{**layer, "bar": round(100 * layer["w_bits"] / 16, 1), "sens_bar": round(100 * layer["sensitivity"] / top, 1)}
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
            measured.append({"label": f"uniform {m['uniform_w_bits']}-bit", **m["uniform"]})
    return {"rows": rows, "costs": costs, "measured": measured, "frontier_svg": frontier_svg(plan),
            "frontier_key": next(iter(plan["budget"]), "avg_weight_bits")}


def _fmt(value: float) -> str:
    if value == 0:
        return "0"
    if abs(value) >= 1e4 or abs(value) < 1e-2:
        return f"{value:.2g}"
    return f"{value:.3g}"


def frontier_svg(plan: dict, width: int = 560, height: int = 320) -> str | None:
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
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys), max(ys)
    x1 = x1 if x1 > x0 else x0 + 1
    y1 = y1 if y1 > y0 else y0 + 1e-12
    span_x, span_y = x1 - x0, y1 - y0
    x0, x1 = x0 - 0.04 * span_x, x1 + 0.04 * span_x
    y0, y1 = (max(0.0, y0 - 0.06 * span_y) if y0 >= 0 else y0 - 0.06 * span_y), y1 + 0.06 * span_y

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
    for i in range(5):
        xv = x0 + (x1 - x0) * i / 4
        yv = y0 + (y1 - y0) * i / 4
        parts.append(f'<text x="{sx(xv):.1f}" y="{height - bottom + 16}" class="tick" text-anchor="middle">{_fmt(xv)}</text>')
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
