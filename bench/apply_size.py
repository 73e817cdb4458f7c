"""Predicted against real: a Hugging Face checkpoint planned at three budgets, each plan applied with ``bitplan apply``
(a compressed-tensors checkpoint, pack-quantized), its real file size beside the plan's predicted size_bytes, and a
forward pass timed on this CPU at full precision and with the plan applied by torchao.

The checkpoint is a Llama-architecture model built from a config by tests/hf_checkpoint.py (random weights: sizes and
times do not depend on the values), planned on its own calibration text with the fisher score (--no-validate: the
bench measures size and time, not accuracy).

Columns: budget (average weight bits), the plan's widths (count per width), predicted MiB (the plan's size_bytes),
as stored MiB (the same counted in int32 words and shape tensors), real MiB (the safetensors files), real/predicted,
full-precision ms, torchao ms (median of 7 forwards of 128 tokens).

    python bench/apply_size.py [--hidden 512] [--layers 4] [--budgets 3,4,6] [--formats fp8_e4m3,mxfp8,mxfp4,nvfp4]

With --formats the plans may take those number formats too (stored in compressed-tensors' fp8/MX/NVFP4 formats);
the widths column then counts each choice.
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.hf_checkpoint: the checkpoint the tests build

from bitplan.core.apply import apply_plan  # noqa: E402
from bitplan.core.pipeline import make_plan  # noqa: E402
from bitplan.schemas import Budget, PlanRequest  # noqa: E402
from solver.ilp import silence_banner  # noqa: E402
from tests.hf_checkpoint import build_checkpoint, write_text  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--budgets", default="3,4,6")
    ap.add_argument("--formats", default="", help="number formats the plans may take besides INT")
    args = ap.parse_args()
    silence_banner()  # HiGHS prints a banner on stdout the first time; this table owns stdout
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        ckpt = build_checkpoint(root / "llama", layers=args.layers, hidden=args.hidden)
        text = write_text(root / "calib.txt")
        params = sum(p.stat().st_size for p in ckpt.glob("*.safetensors")) / 4
        print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} "
              f"threads; Llama {args.layers} layers x hidden {args.hidden}, {params / 1e6:.1f} M parameters (fp32)")
        print("| avg bits | widths | predicted MiB | as stored MiB | real MiB | real / predicted | fp ms | torchao ms |")
        print("| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
        for bits in (float(b) for b in args.budgets.split(",")):
            request = PlanRequest(model=str(ckpt), data=str(text), budget=Budget(avg_weight_bits=bits), seq_len=64,
                                  sensitivity="fisher", sensitivity_params={"max_samples": 16}, validate_plan=False,
                                  formats=tuple(f for f in args.formats.split(",") if f))
            plan = make_plan(request)
            report = apply_plan(plan, ckpt, root / f"q{bits:g}", latency=True, clip=plan.clip)
            counts = Counter(la.w_bits if la.w_format == "int" else la.w_format for la in plan.layers)
            widths = ", ".join(f"{n}x{b}" for b, n in sorted(counts.items(), key=lambda kv: str(kv[0])))
            lat = report.latency_ms or {}
            mib = 2**20
            print(f"| {bits:g} | {widths} | {report.predicted_bytes / mib:.3f} | {report.container_bytes / mib:.3f} | "
                  f"{report.real_bytes / mib:.3f} | {report.real_bytes / report.predicted_bytes:.4f} | "
                  f"{lat.get('full_precision', 0):.1f} | {lat.get('torchao', 0):.1f} |")


if __name__ == "__main__":
    main()
