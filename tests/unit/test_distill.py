"""ZeroQ's distilled data: inputs optimised to match the model's BatchNorm statistics."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from bitplan.core.data import POSITIONAL, Dataset
from bitplan.core.distill import _Statistics, batchnorm_count, distil
from bitplan.core.loading import load_model
from bitplan.core.pipeline import make_plan
from bitplan.schemas import Budget, PlanRequest


def _mismatch(model, x: torch.Tensor) -> float:
    interp = _Statistics(model.gm)
    with torch.no_grad():
        interp.run(x)
    return float(interp.loss)


def test_distilled_inputs_match_the_batchnorm_statistics_far_better_than_random_ones():
    model = load_model("catalog:digits_mobilenet")
    assert batchnorm_count(model) == 5
    random = Dataset({POSITIONAL: torch.randn(32, 1, 8, 8, generator=torch.Generator().manual_seed(0))}, None, "r", "s")
    distilled, note = distil(model, random, steps=100)
    x = distilled.inputs[POSITIONAL]
    assert x.shape == (32, 1, 8, 8) and distilled.targets is None and not torch.equal(x, random.inputs[POSITIONAL])
    assert _mismatch(model, x) < 0.01 * _mismatch(model, random.inputs[POSITIONAL])
    assert "distilled to the model's BatchNorm statistics" in note and "5 BatchNorm layers" in note
    assert distilled.source.endswith("[distilled]") and distilled.sha256 != random.sha256


def test_a_model_without_batchnorm_keeps_its_random_inputs(tmp_path):
    module = torch.nn.Sequential(torch.nn.Linear(4, 3)).eval()
    program = torch.export.export(module, (torch.randn(2, 4),), dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(program, str(tmp_path / "m.pt2"))
    model = load_model(str(tmp_path / "m.pt2"))
    data = Dataset({POSITIONAL: torch.randn(8, 4)}, None, "r", "s")
    same, note = distil(model, data)
    assert same is data and "not distilled (the model has no BatchNorm layer)" in note


@pytest.mark.slow
def test_a_plan_without_data_distils_its_calibration_inputs(tmp_path):
    subprocess.run([sys.executable, "-m", "bitplan.cli", "catalog", "export", "digits_mobilenet", "--out", str(tmp_path)],
                   check=True, capture_output=True)
    request = PlanRequest(model=str(tmp_path / "digits_mobilenet.pt2"), budget=Budget(avg_weight_bits=4), distill=True,
                          refine_seconds=5)
    plan = make_plan(request)
    assert plan.sensitivity.notes[0].startswith("calibration data: 128 random inputs distilled")
    assert plan.measured.held_out == "split" and "distilled" in plan.measured.data
    assert plan.measured.plan.kl <= plan.measured.uniform.kl * (1 + 1e-6)
