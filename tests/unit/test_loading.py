"""Model files: every accepted format loads; anything that needs unpickling is refused unread."""

from __future__ import annotations

import json
import os
import pickle
import zipfile

import pytest
import torch
from torch import nn

from bitplan.core.loading import load_model, sniff
from bitplan.errors import ModelFormatError, UnsafeModelError


class _Payload:
    """Unpickling this runs ``touch MARKER``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_raw_pickle_is_refused_and_never_executed(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "model.pt"
    evil.write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(UnsafeModelError) as err:
        load_model(str(evil))
    assert "pickle" in err.value.message and "torch.export" in err.value.hint
    assert not marker.exists()


def test_torch_save_archive_is_refused_and_never_executed(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "model.pth"
    torch.save({"model": _Payload(marker)}, evil)
    with pytest.raises(UnsafeModelError, match="torch.save"):
        load_model(str(evil))
    assert not marker.exists()


def test_pt2_whose_manifest_asks_for_pickle_is_refused(tmp_path, digits_files):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt2"
    with zipfile.ZipFile(digits_files["pt2"]) as src, zipfile.ZipFile(evil, "w") as dst:
        for item in src.infolist():
            data = src.read(item.filename)
            if item.filename.endswith("model_weights_config.json"):
                config = json.loads(data)
                first = next(iter(config["config"]))
                config["config"][first]["use_pickle"] = True
                data = json.dumps(config).encode()
            elif item.filename.endswith("weights/weight_0"):
                data = pickle.dumps(_Payload(marker))
            dst.writestr(item, data)
    with pytest.raises(UnsafeModelError, match="pickled object"):
        load_model(str(evil))
    assert not marker.exists()


def test_truncated_file_is_reported_as_such(tmp_path, digits_files):
    cut = tmp_path / "cut.pt2"
    raw = digits_files["pt2"].read_bytes()
    cut.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ModelFormatError, match="truncated or corrupt"):
        load_model(str(cut))


def test_random_bytes_are_not_a_model(tmp_path):
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"hello world, not a model")
    with pytest.raises(ModelFormatError, match="neither a torch.export"):
        sniff(junk)


def test_missing_file_and_unknown_catalog_name():
    with pytest.raises(ModelFormatError, match="not found"):
        load_model("/nonexistent/model.pt2")
    with pytest.raises(ModelFormatError, match="catalog:digits_cnn"):
        load_model("catalog:nope")


def test_model_without_quantizable_layers_is_refused(tmp_path):
    class NoLayers(nn.Module):
        def forward(self, x):
            return x * 2

    program = torch.export.export(NoLayers(), (torch.randn(2, 3),))
    torch.export.save(program, str(tmp_path / "plain.pt2"))
    with pytest.raises(ModelFormatError, match="no quantizable layer"):
        load_model(str(tmp_path / "plain.pt2"))


def test_layers_found_by_qualified_name_with_params(digits_files):
    from bitplan.core.data import load_data

    for key in ("pt2", "ts"):
        model = load_model(str(digits_files[key]), sample=load_data(digits_files["calib"]))
        names = [(g.name, g.kind, model.weight(g).numel()) for g in model.layers]
        assert names == [("conv1", "conv2d", 144), ("conv2", "conv2d", 4608), ("conv3", "conv2d", 18432),
                         ("fc1", "linear", 16384), ("fc2", "linear", 640)]


def test_torchscript_needs_data_to_be_traced(digits_files):
    with pytest.raises(ModelFormatError, match="give calibration data") as err:
        load_model(str(digits_files["ts"]))
    assert err.value.code == "needs_sample_inputs" and err.value.field == "data"


def test_conv1d_layers_and_their_macs(tmp_path):
    from bitplan.core.data import POSITIONAL, Dataset
    from bitplan.core.evaluate import measure_macs

    class Seq(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv1d(3, 8, 5, padding=2, groups=1)
            self.dw = nn.Conv1d(8, 8, 3, padding=1, groups=8)
            self.head = nn.Linear(8, 4)

        def forward(self, x):
            return self.head(self.dw(torch.relu(self.conv(x))).mean(-1))

    program = torch.export.export(Seq().eval(), (torch.randn(2, 3, 20),),
                                  dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(program, str(tmp_path / "seq.pt2"))
    model = load_model(str(tmp_path / "seq.pt2"))
    assert [(g.name, g.kind) for g in model.layers] == [("conv", "conv1d"), ("dw", "conv1d"), ("head", "linear")]
    data = Dataset({POSITIONAL: torch.randn(3, 3, 20)}, None, "t", "0")
    macs = measure_macs(model, data.slice(0, 3))
    assert macs == {"conv": 8 * 20 * 3 * 5, "dw": 8 * 20 * 3, "head": 8 * 4}


def test_torchscript_inputs_show_the_data_shapes(digits_files):
    from bitplan.core.data import load_data

    model = load_model(str(digits_files["ts"]), sample=load_data(digits_files["calib"]))
    assert [tuple(spec.shape) for spec in model.inputs] == [(None, 1, 8, 8)]
