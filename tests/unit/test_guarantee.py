"""The plan-versus-uniform guarantee, the held-out split, and the scoring that feeds it.

The key case is a depthwise/BatchNorm CNN on which HAWQ-V3's isotropic score (Tr(H)/n x ||dW||^2)
is known to mislead: its ILP plan measures many times worse than uniform 3-bit precision.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from bitplan.core.data import POSITIONAL, Dataset, holdout_split
from bitplan.core.pipeline import make_plan, prepare
from bitplan.core.refine import Scorer, local_search, no_worse
from bitplan.core.sensitivity import SensitivityContext, run_sensitivity
from bitplan.schemas import Budget, Metrics, PlanRequest, SensitivityLayer, SensitivityTable


class SeparableCNN(nn.Module):
    """conv -> BN -> depthwise conv -> BN -> 1x1 conv -> BN -> linear, as a new user would write it."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.bn0 = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.dw, self.bn1 = nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.BatchNorm2d(16)
        self.pw, self.bn2 = nn.Conv2d(16, 32, 1), nn.BatchNorm2d(32)
        self.head = nn.Linear(32, 4)

    def forward(self, x):
        x = torch.relu(self.bn0(self.stem(x)))
        x = torch.relu(self.bn1(self.dw(x)))
        x = torch.relu(self.bn2(self.pw(x)))
        return self.head(x.mean((2, 3)))


#: SeparableCNN trained 30 epochs (Adam, lr 1e-2, batches of 64) on the images ``_images(5)`` makes: kept as a
#: file because training is not reproducible across CPUs (the same seed gives a different net on another machine,
#: and on some of them HAWQ's score happens not to mislead), and loading takes no time.
WEIGHTS = Path(__file__).resolve().parents[1] / "assets" / "separable_cnn.safetensors"


def _images(seed: int, n: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Synthetic images whose class is the brighter quadrant."""
    torch.manual_seed(seed)
    y = torch.randint(0, 4, (n,))
    x = torch.randn(n, 3, 16, 16) * 0.5
    for i in range(n):
        r, c = divmod(int(y[i]), 2)
        x[i, :, r * 8:(r + 1) * 8, c * 8:(c + 1) * 8] += 1.0
    return x, y


@pytest.fixture(scope="module")
def separable(tmp_path_factory):
    """The trained net and calibration data without targets, so every loss is the KL to full precision."""
    from safetensors.torch import load_file

    x, _ = _images(5)
    model = SeparableCNN()
    model.load_state_dict(load_file(str(WEIGHTS)))
    model.eval()
    out = tmp_path_factory.mktemp("separable")
    program = torch.export.export(model, (x[:2],), dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(program, str(out / "sep.pt2"))
    np.savez(out / "calib.npz", inputs=x[:256].numpy())
    return out


def _plan(folder, **kw):
    request = PlanRequest(model=str(folder / "sep.pt2"), data=str(folder / "calib.npz"),
                          budget=Budget(avg_weight_bits=3), **kw)
    return make_plan(request)


def test_holdout_split_keeps_every_fifth_sample_aside():
    x = torch.arange(50.0)[:, None]
    data = Dataset({POSITIONAL: x}, torch.arange(50), "d.npz", "abc")
    search, held = holdout_split(data)
    assert len(search) == 40 and len(held) == 10
    assert held.inputs[POSITIONAL][:, 0].tolist() == [4, 9, 14, 19, 24, 29, 34, 39, 44, 49]
    assert not set(held.inputs[POSITIONAL][:, 0].tolist()) & set(search.inputs[POSITIONAL][:, 0].tolist())
    assert "held out" in held.source and held.sha256 != search.sha256 != data.sha256
    small = Dataset({POSITIONAL: x[:39]}, None, "s.npz", "def")
    assert holdout_split(small) == (small, None)


@pytest.mark.slow
def test_hawq_trace_score_misleads_here_and_the_guarantee_returns_uniform(separable):
    plan = _plan(separable, sensitivity="hessian_trace", sensitivity_params={"omega": "trace"})
    check, m = plan.uniform_check, plan.measured
    # the ILP's plan from the isotropic score was measured worse than uniform 3-bit on the search data ...
    first = check.search["solver plan"]
    assert first.kl > 3 * check.search["uniform 3-bit"].kl
    assert check.solver_plan is not None and len(set(check.solver_plan.values())) > 1
    # ... so it was not returned: refined, or replaced by uniform precision, and the report says which
    assert check.outcome in ("refined", "uniform_returned") and "worse than uniform 3-bit" in check.message
    assert check.refine is not None and check.refine["evaluations"] > 0
    assert m.held_out == "split" and m.samples == 51 and "held out" in m.data
    assert m.plan.kl <= m.uniform.kl * (1 + 1e-6)
    assert plan.cost.avg_weight_bits <= 3 + 1e-9


@pytest.mark.slow
def test_refinement_cap_zero_returns_the_best_uniform_plan_at_once(separable):
    plan = _plan(separable, sensitivity="hessian_trace", sensitivity_params={"omega": "trace"}, refine_seconds=0)
    assert plan.uniform_check.outcome == "uniform_returned" and plan.uniform_check.refine is None
    assert {layer.w_bits for layer in plan.layers} == {3}
    assert plan.measured.plan == plan.measured.uniform


@pytest.mark.slow
@pytest.mark.parametrize("sensitivity,params", [("auto", {}), pytest.param("hessian_trace", {}, marks=pytest.mark.xfail(
    strict=True, reason="the diagonal score's Hutchinson estimate misleads the ILP on this model at most seeds (old "
                        "probe draws: 9 of 12 seeds; per-probe draws: 5 of 12, seed 0 among them; 192 probes do not "
                        "fix it); the uniform check refines it (KL 0.0021 vs uniform 0.0035)"))])
def test_the_default_and_the_diagonal_score_are_not_misled(separable, sensitivity, params):
    plan = _plan(separable, sensitivity=sensitivity, sensitivity_params=params)
    check = plan.uniform_check
    assert check.outcome in ("plan_better", "plan_level"), check.message
    assert check.search["solver plan"].kl <= check.search["uniform 3-bit"].kl * (1 + 1e-6)
    assert plan.measured.plan.kl <= plan.measured.uniform.kl * (1 + 1e-6)
    if sensitivity == "auto":
        assert plan.sensitivity.method == "auto" and plan.sensitivity.notes[0].startswith("auto: measured KL")


def _inverted(prep, ctx) -> SensitivityTable:
    """A table that says more bits hurt more: the ILP then spends nothing and picks the lowest bits."""
    return SensitivityTable(method="inverted", params={}, seconds=0.0, layers=[
        SensitivityLayer(name=info.name, stat=0.0, omega={b: float(b) for b in ctx.w_bits}) for info in prep.layers])


@pytest.mark.slow
def test_a_plan_from_a_wrong_table_is_refined_to_beat_uniform_on_held_out_data():
    request = PlanRequest(model="catalog:digits_cnn", budget=Budget(avg_weight_bits=4), refine_seconds=60)
    plan = make_plan(request, sensitivity=_inverted)
    check, m = plan.uniform_check, plan.measured
    assert set(check.solver_plan.values()) == {2}  # what the wrong table asked for
    assert check.search["solver plan"].kl > check.search["uniform 4-bit"].kl
    assert check.outcome in ("refined", "uniform_returned")
    assert check.search_data.startswith("catalog:digits/calib") and m.data == "catalog:digits/eval"
    assert m.plan.kl <= m.uniform.kl * (1 + 1e-6) and m.plan.loss <= m.uniform.loss * (1 + 1e-6)
    assert "guarantee" in plan.timings


def test_the_uniform_plan_keeps_the_pinned_layers_pins():
    request = PlanRequest(model="catalog:digits_cnn", budget=Budget(avg_weight_bits=4.1), pins={"fc2": 8},
                          refine_seconds=0)
    plan = make_plan(request, sensitivity=_inverted)
    assert plan.uniform_check.outcome == "uniform_returned" and plan.uniform_check.uniform == "uniform 4-bit"
    assert {layer.name: layer.w_bits for layer in plan.layers} == {"conv1": 4, "conv2": 4, "conv3": 4, "fc1": 4, "fc2": 8}
    assert plan.measured.uniform_w_bits == 4 and plan.cost.avg_weight_bits <= 4.1 + 1e-9


@pytest.mark.slow
def test_local_search_improves_a_bad_start_within_the_budget():
    prep = prepare("catalog:digits_cnn", None)
    names = [info.name for info in prep.layers]
    scorer = Scorer(prep, prep.data, 64)
    start = {name: (2, 16) for name in names}

    def fits(assign):
        return prep.costs.plan_cost(assign).avg_weight_bits <= 3.5 + 1e-9

    def cost_of(assign):
        return prep.costs.plan_cost(assign).avg_weight_bits / 3.5

    import time

    result = local_search(scorer, [start], [2, 3, 4, 5, 6, 8], names, fits, cost_of, time.perf_counter() + 60)
    assert fits(result.assignment) and result.rounds >= 2
    assert result.metrics.kl < 0.5 * scorer(start).kl
    assert result.stopped == "converged"
    # an evaluation cap stops it after that many measurements, whatever the clock says, and the same cap gives the
    # same plan
    cap = result.evaluations // 2
    capped = [local_search(Scorer(prep, prep.data, 64), [start], [2, 3, 4, 5, 6, 8], names, fits, cost_of,
                           time.perf_counter() + 600, max_evaluations=cap) for _ in range(2)]
    assert capped[0].stopped == "evaluation_cap" and capped[0].evaluations == cap
    assert capped[0].assignment == capped[1].assignment and fits(capped[0].assignment)
    assert result.metrics.kl <= capped[0].metrics.kl < scorer(start).kl


def test_no_worse_needs_both_kl_and_loss_when_there_are_targets():
    a = Metrics(loss=0.10, kl=0.01, top1_agreement=1.0)
    b = Metrics(loss=0.09, kl=0.02, top1_agreement=1.0)
    assert no_worse(a, b, has_targets=False) and not no_worse(a, b, has_targets=True)
    assert no_worse(a, a, has_targets=True)


def test_perturbation_screen_scales_small_damages_instead_of_measuring_them():
    prep = prepare("catalog:digits_cnn", None)
    ctx = SensitivityContext(prep.model, prep.data, [2, 3, 4, 5, 6, 8], prep.bank, 0)
    full = run_sensitivity("perturbation", {"loss": "kl", "max_samples": 64}, ctx)
    screened = run_sensitivity("perturbation", {"loss": "kl", "max_samples": 64, "screen": 1e-4}, ctx)
    assert any("scaled from a measured damage below the screen" in n for n in screened.notes)
    for a, b in zip(full.layers, screened.layers):
        assert a.omega[2] == b.omega[2]  # the lowest width is always measured
        for bits in (5, 6, 8):  # small either way: measured or scaled
            assert abs(a.omega[bits] - b.omega[bits]) < 1e-4


@pytest.mark.slow
def test_auto_falls_back_to_the_kl_hessian_when_measuring_would_take_too_long():
    prep = prepare("catalog:digits_cnn", None)
    ctx = SensitivityContext(prep.model, prep.data, [2, 4, 8], prep.bank, 0)
    table = run_sensitivity("auto", {"measure_gmacs": 0}, ctx)
    assert table.method == "auto" and table.params["chose"] == "hessian_trace"
    assert "exceeds measure_gmacs=0" in table.notes[0]
    measured = run_sensitivity("auto", {}, ctx)
    assert measured.params["chose"] == "perturbation" and "within measure_gmacs" in measured.notes[0]
