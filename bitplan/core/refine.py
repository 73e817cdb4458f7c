"""The plan-versus-uniform guarantee: measure, refine, fall back.

A sensitivity table is a prediction. Before a plan is returned, this module measures it on the
search data (the calibration samples the search may use) against every uniform plan that fits the
budget. When the plan measures worse than the best of them, a measured local search runs within a
time cap, seeded with the plan and the uniform plans:

* each round re-scores every movable layer *in the context of the others' current bits*: the
  measured damage of moving it one bit width down or up with everything else as it is (the
  inter-layer interaction a separable table cannot see);
* from those scores it builds compound moves that stay within the budget (raise one layer and
  repair the budget by lowering the layers whose measured damage per freed cost is least, or lower
  one and spend the freed budget on the layers that gain most), measures the most promising few and
  keeps the best if it improves.

If nothing measures at least as good as the best uniform plan, the best uniform plan is returned,
and the report says so. Damage is the KL divergence to full precision; with targets the task loss
must not be worse either. Only weight bits move here; each layer keeps its activation bits.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from bitplan.core.data import Dataset
from bitplan.core.evaluate import Reference, measure, set_activation_bits
from bitplan.formats import WeightChoice
from bitplan.progress import ProgressFn, no_progress
from bitplan.schemas import Metrics

Assignment = dict[str, tuple[WeightChoice, int]]  # layer -> (INT width or format name, activation bits)

#: Relative slack when comparing measured damage: a plan within this of uniform counts as level with it.
TIE = 1e-6
#: Measured candidates per round of the local search (after the context scores).
TRIES_PER_ROUND = 6


def no_worse(a: Metrics, b: Metrics, has_targets: bool) -> bool:
    """``a`` damages the model no more than ``b``: KL, and the task loss when there are targets."""
    if a.kl > b.kl * (1 + TIE) + 1e-12:
        return False
    return not has_targets or a.loss <= b.loss * (1 + TIE) + 1e-12


@dataclass
class Scorer:
    """Measured metrics of assignments on a fixed data set, each assignment measured once."""

    prep: object  # bitplan.core.pipeline.Prepared (not imported: pipeline imports this module)
    data: Dataset
    batch_size: int
    ref: Reference = field(init=False)
    cache: dict[tuple, Metrics] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.ref = Reference.compute(self.prep.model, self.data, self.batch_size)

    @property
    def evaluations(self) -> int:
        return len(self.cache)

    def __call__(self, assign: Assignment) -> Metrics:
        key = tuple(sorted(assign.items()))
        if key not in self.cache:
            model = self.prep.model
            set_activation_bits(model, {name: a for name, (_, a) in assign.items()})
            try:
                overrides = {g.weight_key: self.prep.bank.get(g.weight_key, assign[g.name][0]) for g in model.layers
                             if assign[g.name][0] != 16}
                self.cache[key] = measure(model, self.ref, overrides)
            finally:
                set_activation_bits(model, {})
        return self.cache[key]


def uniform_plans(prep, w_bits: Sequence[WeightChoice], a_bits: tuple[int, ...], fits,
                  pins: dict[str, int] | None = None) -> list[Assignment]:
    """For each activation width, the uniform plan at the highest INT weight width that fits (the lower ones are
    dominated), and the uniform plan in each number format offered that fits (formats are not ordered by
    quality, so each is a baseline of its own). Pinned layers keep their pinned bits: the user asked for them
    whatever the plan."""
    pins = pins or {}
    plans = []
    for a in sorted(a_bits, reverse=True):
        for w in sorted((b for b in w_bits if not isinstance(b, str)), reverse=True):
            assign = {info.name: (pins.get(info.name, w), a) for info in prep.layers}
            if fits(assign):
                plans.append(assign)
                break
        for f in (b for b in w_bits if isinstance(b, str)):
            assign = {info.name: (pins.get(info.name, f), a) for info in prep.layers}
            if fits(assign):
                plans.append(assign)
    return plans


@dataclass
class SearchResult:
    assignment: Assignment
    metrics: Metrics
    rounds: int
    evaluations: int  # plans the search measured (the seeds' first scores not counted)
    seconds: float
    stopped: str  # "converged" (no tried move improved), "time_cap" or "evaluation_cap"


def local_search(scorer: Scorer, seeds: list[Assignment], levels: list[WeightChoice], movable: Sequence[str | tuple[str, ...]],
                 fits, cost_of,
                 deadline: float, target: Metrics | None = None, has_targets: bool = False,
                 progress: ProgressFn = no_progress, max_evaluations: int | None = None) -> SearchResult:
    """Measured local search from the best of ``seeds`` (see the module's docstring).

    ``cost_of(assign)`` is a scalar cost (the budgets, each divided by its limit, summed) used to rank
    repairs; ``fits(assign)`` decides feasibility. Stops when no tried move improves, at ``deadline``
    (time.perf_counter()) or after ``max_evaluations`` new measurements (the seeds' first scores not counted): the
    evaluation cap makes the search the same on a fast and a loaded machine. ``movable`` names layers, or groups of
    tied layers that move together. With targets, a move that lowers the KL is kept only if the task loss stays at
    most the larger of the current plan's and ``target``'s.
    """
    start = time.perf_counter()
    state = min(seeds, key=lambda s: scorer(s).kl)
    base = scorer(state)
    rounds, stopped = 0, "converged"
    first = scorer.evaluations

    def spent() -> str | None:
        """Why the search must stop now, if it must: the time cap or the evaluation cap."""
        if time.perf_counter() >= deadline:
            return "time_cap"
        if max_evaluations is not None and scorer.evaluations - first >= max_evaluations:
            return "evaluation_cap"
        return None

    def moved(assign: Assignment, unit: str | tuple[str, ...], step: int) -> Assignment | None:
        names = (unit,) if isinstance(unit, str) else unit
        i = levels.index(assign[names[0]][0]) + step  # tied layers have one width
        if not 0 <= i < len(levels):
            return None
        out = dict(assign)
        for name in names:
            out[name] = (levels[i], assign[name][1])
        return out

    while True:
        cap = spent()
        if cap is not None:
            stopped = cap
            break
        rounds += 1
        done = (time.perf_counter() - start) / max(deadline - start, 1e-9)
        if max_evaluations is not None:
            done = max(done, (scorer.evaluations - first) / max_evaluations)
        progress("guarantee", min(0.95, done), f"round {rounds}: measured KL {base.kl:.5g}")
        delta: dict[tuple[str, int], float] = {}
        for name, step in ((name, step) for name in movable for step in (-1, 1)):
            cand = moved(state, name, step)
            if cand is not None:
                delta[name, step] = scorer(cand).kl - base.kl
            if spent() is not None:
                break
        moves: list[tuple[float, Assignment]] = []
        for (name, step), d in delta.items():
            cand = moved(state, name, step)
            pred = d
            if step > 0:  # raise, then lower the cheapest others until the budget holds
                used: set[str | tuple[str, ...]] = {name}
                while cand is not None and not fits(cand):
                    options = [(delta[o, -1] / max(cost_of(cand) - cost_of(low), 1e-12), o, low)
                               for o in movable if o not in used and (o, -1) in delta
                               for low in [moved(cand, o, -1)] if low is not None and cost_of(low) < cost_of(cand)]
                    if not options:
                        cand = None
                        break
                    _, other, cand = min(options, key=lambda t: t[0])
                    used.add(other)
                    pred += delta[other, -1]
            else:  # lower, then spend what it frees on the layers that gain most
                used = {name}
                gains = sorted((delta[o, 1], o) for o in movable if o != name and (o, 1) in delta and delta[o, 1] < 0)
                for gain, other in gains:
                    up = moved(cand, other, 1)
                    if up is not None and fits(up):
                        cand, pred = up, pred + gain
                        used.add(other)
            if cand is not None and fits(cand) and cand != state:
                moves.append((pred, cand))
        moves.sort(key=lambda m: m[0])
        best, best_metrics = None, base
        for _, cand in moves[:TRIES_PER_ROUND]:
            if spent() is not None:
                break
            m = scorer(cand)
            loss_ok = not has_targets or target is None or m.loss <= max(base.loss, target.loss)
            if m.kl < best_metrics.kl * (1 - TIE) and loss_ok:
                best, best_metrics = cand, m
        if best is None:
            cap = spent()
            if cap is not None:  # a cap cut this round short: not a local optimum
                stopped = cap
            break
        state, base = best, best_metrics
    return SearchResult(state, base, rounds, scorer.evaluations - first, time.perf_counter() - start, stopped)
