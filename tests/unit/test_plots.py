"""What the job page draws: round axis ticks, and sensitivity bars that tell small values apart."""

from __future__ import annotations

import re

from service.plots import frontier_svg, log_bar, nice_ticks, plan_view


def test_ticks_are_round_and_cover_the_data():
    for lo, hi in ((1.76, 16.0), (2.0, 8.0), (0.0, 0.0123), (3.1e6, 9.7e8)):
        ticks = nice_ticks(lo, hi)
        assert ticks[0] <= lo and ticks[-1] >= hi and 3 <= len(ticks) <= 7
        step = ticks[1] - ticks[0]
        mantissa = step / 10 ** int(f"{step:e}".split("e")[1])
        assert round(mantissa, 6) in (1, 2, 2.5, 5), (lo, hi, ticks)


def test_sensitivity_bars_are_logarithmic():
    assert log_bar(0.0023, 0.0023) == 100.0
    assert log_bar(0.0009, 0.0023) < 95 and log_bar(0.0009, 0.0023) > log_bar(0.0001, 0.0023) > 50
    assert log_bar(1e-12, 1.0) == 2.0 and log_bar(0.0, 1.0) == 0.0


def _plan(frontier):
    layers = [{"name": "a", "kind": "linear", "params": 10, "macs": 1, "w_bits": 4, "a_bits": 16, "sensitivity": 0.0023},
              {"name": "b", "kind": "linear", "params": 10, "macs": 1, "w_bits": 2, "a_bits": 16, "sensitivity": 0.0009}]
    return {"layers": layers, "budget": {"avg_weight_bits": 3.0}, "cost": {"avg_weight_bits": 3.0},
            "frontier": frontier}


def test_frontier_ticks_are_round_numbers():
    frontier = [{"cost": {"avg_weight_bits": x}, "objective": 1 / x} for x in (1.76, 2.5, 3.38, 6.0, 16.0)]
    svg = frontier_svg(_plan(frontier))
    labels = re.findall(r'class="tick" text-anchor="middle">([^<]+)<', svg)
    assert labels == ["0", "5", "10", "15", "20"], labels
    rows = plan_view(_plan(frontier))["rows"]
    assert rows[0]["sens_bar"] == 100.0 and 80 < rows[1]["sens_bar"] < 95
