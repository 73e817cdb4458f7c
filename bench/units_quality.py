"""Bits below a layer, measured: each linear layer's bits spread over its units (output channels, or blocks
of N input columns) by activation x weight salience, against every unit at the layer's width, at the same bit
total, on held-out data (KL to full precision; lower is better). Every layer starts at the same width, so the
column isolates what splitting a layer does.

Columns: model, granularity, layer bits, units, KL with one width per layer (same granularity's scales), KL with
bits per unit, their ratio, which plan_units keeps (mixed only when it measures better), and seconds.

    python bench/units_quality.py [--models tiny_gpt,digits_vit,minilm] [--bits 3,4]
"""

from __future__ import annotations

import argparse
import platform
import time

from bitplan.core.pipeline import prepare
from bitplan.core.units import plan_units
from bitplan.schemas import Budget, PlanRequest

GRANULARITIES = {"tiny_gpt": ["channel", "group:16"], "digits_vit": ["channel", "group:16"],
                 "minilm": ["channel", "group:128"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="tiny_gpt,digits_vit,minilm")
    ap.add_argument("--bits", default="3,4")
    args = ap.parse_args()
    print(f"# {platform.processor() or platform.machine()}, python {platform.python_version()}")
    print("| model | granularity | bits | units | KL per layer | KL per unit | ratio | kept | s |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | --- | ---: |")
    for name in args.models.split(","):
        try:
            prep = prepare(f"catalog:{name}", None)
        except Exception as exc:  # minilm needs its optional package
            print(f"| {name} | - | - | - | - | - | - | not run: {exc} | - |")
            continue
        for granularity in GRANULARITIES.get(name, ["channel"]):
            for bits in (int(b) for b in args.bits.split(",")):
                request = PlanRequest(model=f"catalog:{name}", budget=Budget(avg_weight_bits=bits),
                                      w_bits=(2, 3, 4, 5, 6, 8), granularity=granularity)
                start = time.perf_counter()
                units = plan_units(prep, request, {g.name: (bits, 16) for g in prep.layers})
                took = time.perf_counter() - start
                layer, unit = units.measured_uniform.kl, units.measured_mixed.kl
                print(f"| {name} | {granularity} | {bits} | {units.units:,} | {layer:.4g} | {unit:.4g} | "
                      f"{unit / layer:.3f} | {units.kept} | {took:.1f} |", flush=True)


if __name__ == "__main__":
    main()
