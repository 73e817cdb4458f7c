"""The bookkeeping of ``hessian_trace``'s Hutchinson probes, torch-free, so a worker that only
orchestrates can merge probe shards (``workers/jobs.py``) without importing torch.

Probe ``i`` of a run is drawn from its own generator, seeded from (seed, i), so any worker can
compute any probe. Probes are computed a pass at a time (``probes_per_pass`` of them share one
forward/backward graph per batch, and their products are vmapped together); a pass is the unit of
computation, because a probe's H v computed in a vmapped pass of four differs in the last bits from
the same probe computed alone. So probe shards are whole passes: pass ``p`` is always probes
``[p * probes_per_pass, min((p + 1) * probes_per_pass, max_probes))``, whichever worker computes it,
and a shard returns one row per probe (never a sum), which the merge adds up in probe order.

The stopping rule (every layer's standard error within ``tol`` of its mean, after at least
``min_probes``) is checked at the same pass boundaries by one worker, as it goes, and by the merge,
over the rows of all shards in probe order: both keep the same prefix of probes and both summarise it
with :func:`summarise`, so the merged table is the one-worker table, float for float. A sharded run
computes every one of ``max_probes`` probes; those after the point where the rule stops are discarded.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from bitplan.errors import BitplanError


def probe_seed(seed: int, index: int | str) -> int:
    """The generator seed of probe ``index`` of a run seeded ``seed`` (``"activations"``: the activation probes')."""
    digest = hashlib.sha256(f"hessian_trace:{seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def pass_ends(max_probes: int, probes_per_pass: int) -> list[int]:
    """The probe counts at which passes end (where the stopping rule is checked)."""
    return [min(end, max_probes) for end in range(probes_per_pass, max_probes + probes_per_pass, probes_per_pass)]


def split_probes(max_probes: int, probes_per_pass: int, shards: int) -> list[tuple[int, int]]:
    """``[start, end)`` probe ranges of at most ``shards`` contiguous blocks of whole passes, never empty, each
    cut at the pass boundary nearest to an equal share of the probes (the last pass may be short)."""
    if shards < 1:
        raise BitplanError(f"shards must be at least 1, not {shards}")
    ends = pass_ends(max_probes, probes_per_pass)
    count = min(shards, len(ends))
    cuts = [0]  # in passes
    for i in range(1, count):
        target = i * max_probes / count
        cuts.append(min(range(cuts[-1] + 1, len(ends) - (count - i) + 1), key=lambda j: (abs(ends[j - 1] - target), j)))
    cuts.append(len(ends))
    return [(cuts[i] * probes_per_pass, ends[cuts[i + 1] - 1]) for i in range(count)]


def std(xs: list[float]) -> float:
    if len(xs) < 2:
        return float("inf")
    m = sum(xs) / len(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def worst_relative_se(estimates: list[list[float]]) -> float:
    n = len(estimates)
    if n < 2:
        return float("inf")
    columns: list[tuple[float, ...]] = list(zip(*estimates))
    means = [abs(sum(c) / n) for c in columns]
    floor = 1e-6 * max(means + [1e-30])
    return max(std(list(c)) / math.sqrt(n) / max(m, floor) for c, m in zip(columns, means))


def stops(estimates: list[list[float]], min_probes: int, tol: float) -> tuple[bool, float]:
    """Whether the stopping rule fires after these probes (checked at a pass boundary), and the worst relative SE."""
    worst = worst_relative_se(estimates)
    return len(estimates) >= min_probes and worst <= tol, worst


def stop_point(estimates: list[list[float]], max_probes: int, min_probes: int, probes_per_pass: int, tol: float) -> int:
    """How many of these probes (all ``max_probes`` of a run, in order) one worker would have used."""
    if len(estimates) != max_probes:
        raise BitplanError(f"the stopping rule needs all {max_probes} probes, not {len(estimates)}")
    for end in pass_ends(max_probes, probes_per_pass):
        if stops(estimates[:end], min_probes, tol)[0]:
            return end
    return max_probes


class ProbeShard(BaseModel):
    """Probes ``[start, end)`` of one ``hessian_trace`` run, one row per probe, for :func:`merge`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: str = "hessian_trace"
    params: dict[str, Any] = Field(description="the method's parameters and the seed, as the table records them")
    start: int = Field(ge=0)
    end: int = Field(ge=1)
    layers: list[str] = Field(description="every layer, in model order")
    numel: list[int] = Field(description="weights per layer")
    w_bits: list[int | str] = Field(description="the weight choices scored: INT widths, then format names")
    error_sq: list[list[float]] = Field(description="per layer, per bit width: ||Q_b(W) - W||^2 (omega=trace; else [])")
    estimates: list[list[float]] = Field(description="per probe, per layer: v . (H v)")
    weighted: list[list[list[float]]] = Field(
        description="per probe, per layer, per bit width: sum_i v_i (H v)_i (Q_b(W) - W)_i^2 (omega=diagonal; else [])")
    notes: list[str] = Field(description="how the Hessian-vector products were computed")
    loss: str
    samples: int
    batch_sizes: list[int] = Field(description="the micro-batches' sizes: they set how H v's floats are summed")
    seconds: float

    def check(self) -> None:
        """Refuse rows whose shape does not match the layers and bit widths they claim to cover."""
        count, width, bits = self.end - self.start, len(self.layers), len(self.w_bits)
        diagonal = self.params.get("omega") == "diagonal"
        ok = (len(self.estimates) == count and all(len(row) == width for row in self.estimates)
              and len(self.numel) == width
              and (len(self.weighted) == count and all(len(r) == width and all(len(c) == bits for c in r)
                                                       for r in self.weighted) if diagonal else not self.weighted)
              and (not self.error_sq if diagonal else len(self.error_sq) == width and all(len(c) == bits
                                                                                          for c in self.error_sq)))
        if not ok:
            raise BitplanError(f"the probe shard [{self.start}, {self.end}) has rows of the wrong shape")


def summarise(shard: ProbeShard, n_probes: int) -> tuple[dict[str, float], dict[str, dict[int | str, float]],
                                                          dict[str, dict[str, float]], list[str]]:
    """(stat, omega, detail, notes) per layer from the first ``n_probes`` rows of a run's probes (``shard`` from 0)."""
    if shard.start != 0 or n_probes > shard.end:
        raise BitplanError(f"cannot summarise {n_probes} probes from the rows [{shard.start}, {shard.end})")
    estimates = shard.estimates[:n_probes]
    diagonal = shard.params["omega"] == "diagonal"
    notes = [*shard.notes, f"Hessian of {shard.loss}; {n_probes} probes on {shard.samples} samples; "
                           f"stopping rule: rel. SE <= {shard.params['tol']}"]
    stats, omega, detail, clamped = {}, {}, {}, []
    for j, name in enumerate(shard.layers):
        column = [row[j] for row in estimates]
        mean = sum(column) / n_probes
        if mean < 0:
            clamped.append(name)
        n = shard.numel[j]
        stats[name] = mean
        if diagonal:
            sums = [0.0] * len(shard.w_bits)  # added up in probe order, as one worker's running sums are
            for row in shard.weighted[:n_probes]:
                for i, value in enumerate(row[j]):
                    sums[i] += value
            omega[name] = {b: max(s / n_probes, 0.0) for b, s in zip(shard.w_bits, sums)}
        else:
            omega[name] = {b: max(mean, 0.0) / n * e for b, e in zip(shard.w_bits, shard.error_sq[j])}
        detail[name] = {"trace_se": std(column) / math.sqrt(n_probes), "probes": n_probes, "params": n}
    if diagonal:
        notes.append("Omega = sum_i diag(H)_i (Q_b(W) - W)_i^2, the Hutchinson diagonal weighted by each weight's own "
                     "error (invariant to per-channel scales such as a BatchNorm folded into the conv)")
    elif clamped:
        notes.append("negative trace estimates (non-convex loss) clamped to 0 for: " + ", ".join(clamped))
    return stats, omega, detail, notes


def join(parts: list[ProbeShard]) -> ProbeShard:
    """The shards of one run as one block of rows ``[0, max_probes)``; refuses gaps, overlaps and mixed runs."""
    if not parts:
        raise BitplanError("no sensitivity shards to merge")
    parts = sorted(parts, key=lambda p: p.start)
    first = parts[0]
    same = ("method", "params", "layers", "numel", "w_bits", "error_sq", "loss", "samples", "batch_sizes")
    for p in parts:
        p.check()
        differs = [field for field in same if getattr(p, field) != getattr(first, field)]
        if differs:
            raise BitplanError(f"probe shards disagree on {', '.join(differs)}", "merge only the shards of one run")
        if p.notes != first.notes:
            raise BitplanError(f"probe shards computed their Hessian-vector products differently: {first.notes} vs "
                               f"{p.notes}", "merge only the shards of one run")
    max_probes, ppp = int(first.params["max_probes"]), int(first.params["probes_per_pass"])
    at = 0
    for p in parts:
        if p.start != at:
            what = "overlap" if p.start < at else "a gap"
            raise BitplanError(f"probe shards leave {what} at probe {min(at, p.start)}",
                               "split the probes with split_probes: every probe in exactly one shard")
        if p.start % ppp or (p.end % ppp and p.end != max_probes):
            raise BitplanError(f"the probe shard [{p.start}, {p.end}) does not start and end on passes of {ppp}",
                               "split the probes with split_probes")
        at = p.end
    if at != max_probes:
        raise BitplanError(f"probe shards cover probes [0, {at}), not all {max_probes}", "every probe in exactly one shard")
    return first.model_copy(update={
        "start": 0, "end": max_probes, "seconds": sum(p.seconds for p in parts),
        "estimates": [row for p in parts for row in p.estimates],
        "weighted": [row for p in parts for row in p.weighted]})
