"""How well does each sensitivity method predict the real damage?

For every (layer, bits) pair, the truth is measured on held-out data with that
layer alone quantized to that many bits, two ways: the increase of the
cross-entropy ("loss"), and the KL divergence from the full-precision outputs
("KL", never negative, so pairs whose loss moves by less than its noise still
rank). Each method's Omega(layer, bits) is compared with both by Spearman and
Kendall rank correlation over all pairs; the method's time is printed beside.

    python bench/sensitivity_fidelity.py                      # digits_cnn, digits_resnet, minilm
    python bench/sensitivity_fidelity.py --models digits_cnn --methods fisher,lrp,hessian_trace:loss=kl
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from scipy.stats import kendalltau, spearmanr

from bitplan.core.evaluate import Reference, measure
from bitplan.core.pipeline import prepare
from bitplan.core.sensitivity import SensitivityContext, run_sensitivity

METHODS = ["hessian_trace", "hessian_eigen", "fisher", "taylor", "lrp", "perturbation"]
#: cheaper settings where a full run would take many minutes on 2 cores
PARAMS = {
    "minilm": {"hessian_eigen": {"max_iter": 8, "max_samples": 64}, "fisher": {"max_samples": 96}},
}


def measured_damage(prep, bits: list[int]) -> tuple[dict, dict]:
    ref = Reference.compute(prep.model, prep.eval_data, 64)
    base = measure(prep.model, ref).loss
    loss, kl = {}, {}
    for g in prep.model.layers:
        for b in bits:
            m = measure(prep.model, ref, {g.weight_key: prep.bank.get(g.weight_key, b)})
            loss[g.name, b], kl[g.name, b] = m.loss - base, m.kl
    return loss, kl


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="digits_cnn,digits_resnet,minilm")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--wbits", default="2,3,4,6,8")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    bits = [int(b) for b in args.wbits.split(",")]
    rows = []
    print("| model | method | Spearman (loss) | Kendall (loss) | Spearman (KL) | Kendall (KL) | seconds |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name in args.models.split(","):
        prep = prepare(f"catalog:{name}", None)
        start = time.perf_counter()
        truth, truth_kl = measured_damage(prep, bits)
        truth_seconds = time.perf_counter() - start
        pairs = sorted(truth)
        for spec in args.methods.split(","):
            method, _, extra = spec.partition(":")  # e.g. hessian_trace:loss=kl
            params = dict(PARAMS.get(name, {}).get(method, {}))
            params.update(dict(item.split("=", 1) for item in extra.split(";") if item))
            ctx = SensitivityContext(prep.model, prep.data, bits, prep.bank, args.seed)
            table = run_sensitivity(method, params, ctx)
            omega = table.omega()
            predicted = [omega[layer][b] for layer, b in pairs]
            row = {"model": name, "method": spec, "seconds": table.seconds, "pairs": len(pairs)}
            for label, target in (("loss", truth), ("kl", truth_kl)):
                actual = [target[p] for p in pairs]
                row[f"spearman_{label}"] = spearmanr(predicted, actual).statistic
                row[f"kendall_{label}"] = kendalltau(predicted, actual).statistic
            rows.append(row)
            print(f"| {name} | {spec} | {row['spearman_loss']:.3f} | {row['kendall_loss']:.3f} | "
                  f"{row['spearman_kl']:.3f} | {row['kendall_kl']:.3f} | {table.seconds:.1f} |", flush=True)
        print(f"| {name} | (truth: {len(pairs)} single-layer evaluations on {len(prep.eval_data)} held-out samples) "
              f"| | | | | {truth_seconds:.1f} |", flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=2)


if __name__ == "__main__":
    main()
