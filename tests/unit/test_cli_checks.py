"""What a newcomer hits first: bare commands show help, checkable mistakes are refused before any work."""

from __future__ import annotations

import numpy as np
import pytest

from bitplan import cli
from bitplan.core import pipeline


def test_bare_commands_print_help(capsys):
    assert cli.main(["inspect"]) == 2
    out = capsys.readouterr().out
    assert out.startswith("usage: bitplan inspect") and "--data" in out
    assert cli.main([]) == 2 and "usage: bitplan" in capsys.readouterr().out
    assert cli.main(["catalog"]) == 0 and "catalog:digits_cnn" in capsys.readouterr().out


def test_help_shows_defaults(capsys):
    with pytest.raises(SystemExit):
        cli.main(["plan", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "(default: 2,3,4,5,6,8; with --target, the target's)" in out and "(default: ilp)" in out and "(default: mse)" in out


def test_missing_model_file_is_named_before_data(tmp_path, capsys):
    assert cli.main(["plan", str(tmp_path / "nosuch.pt2"), "--budget", "avg_weight_bits=3"]) == 2
    err = capsys.readouterr().err
    assert "model file" in err and "nosuch.pt2' not found" in err and "calibration" not in err


def test_infeasible_budget_is_refused_before_sensitivity(monkeypatch, capsys):
    def no_sensitivity(*args, **kwargs):
        raise AssertionError("the sensitivity stage ran for an infeasible budget")

    monkeypatch.setattr(pipeline, "compute_sensitivity", no_sensitivity)
    assert cli.main(["plan", "catalog:digits_cnn", "--budget", "avg_weight_bits=1.5"]) == 2
    err = capsys.readouterr().err
    assert "infeasible" in err and "smallest achievable avg_weight_bits is 2" in err
    assert cli.main(["plan", "catalog:digits_cnn", "--budget", "avg_weight_bits=3", "--param", "nosuch=1"]) == 2
    assert "nosuch" in capsys.readouterr().err


def test_float64_inputs_are_converted_and_said(tmp_path):
    from bitplan.catalog import get_entry

    data = get_entry("digits_cnn").dataset("calib")
    path = tmp_path / "c64.npz"
    np.savez(path, inputs=data.inputs[""].double().numpy(), targets=data.targets.numpy())
    prep = pipeline.prepare("catalog:digits_cnn", str(path))
    assert prep.data.inputs[""].dtype.is_floating_point and str(prep.data.inputs[""].dtype) == "torch.float32"
    assert any("converted to the model's dtypes: inputs float64 -> float32" in n for n in prep.notes)


def test_errors_name_the_option_for_their_field(capsys):
    assert cli.main(["plan", "catalog:digits_cnn", "--budget", "avg_weight_bits=3", "--pin", "nowhere=8"]) == 2
    err = capsys.readouterr().err
    assert "pins name unknown layer(s) ['nowhere']" in err and "conv1" in err and err.rstrip().endswith("[option --pin]")
    assert cli.main(["plan", "catalog:digits_cnn", "--budget", "avg_weight_bits=3", "--solver", "annealing"]) == 2
    assert "[option --solver / --solver-param]" in capsys.readouterr().err
