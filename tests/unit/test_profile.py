"""bitplan profile: every layer timed at every width on this machine, as the table a latency_ms budget reads."""

from __future__ import annotations

import json

from bitplan.cli import main
from bitplan.core.pipeline import prepare
from bitplan.core.profile import profile_layers
from bitplan.costs import load_latency_table


def test_profile_times_every_layer_at_every_width():
    prep = prepare("catalog:digits_cnn", None)
    calls = []
    table, notes = profile_layers(prep, [4, 8], runs=2, progress=lambda done, total: calls.append((done, total)))
    assert list(table) == [layer.name for layer in prep.model.layers]
    assert all(set(row) == {4, 8, 16} and all(ms > 0 for ms in row.values()) for row in table.values())
    assert calls[-1] == (len(table), len(table))
    assert any("3 conv layer(s) timed in float" in n for n in notes)


def test_cli_profile_writes_the_table_a_latency_budget_uses(tmp_path, capsys):
    out = tmp_path / "latency.json"
    assert main(["profile", "catalog:digits_cnn", "--wbits", "4,8", "--runs", "2", "--out", str(out)]) == 0
    assert "latency table written to" in capsys.readouterr().out
    table = load_latency_table(out)
    assert set(json.loads(out.read_text())["fc1"]) == {"4", "8", "16"}
    # a budget between the fastest and the slowest plan: the solver keeps under it
    fastest = sum(min(row.values()) for row in table.values())
    slowest = sum(max(row.values()) for row in table.values())
    budget = (fastest + slowest) / 2
    plan = tmp_path / "plan.json"
    assert main(["plan", "catalog:digits_cnn", "--latency-table", str(out), "--wbits", "4,8,16",
                 "--budget", f"latency_ms={budget}", "--no-validate", "--out", str(plan)]) == 0
    assert json.loads(plan.read_text())["cost"]["latency_ms"] <= budget + 1e-9


def test_profile_times_formats_with_torchao_where_its_export_has_them(tmp_path, capsys):
    """fp8_e4m3 runs torchao's float8 weight-only kernel (what the torchao export writes for it); nvfp4 has no
    stable torchao config, so it is timed in float and the notes say so. The table then budgets a plan with formats."""
    import torch
    from torch import nn

    from bitplan.core.profile import _quantized, _timed_quantized

    linear = nn.Linear(32, 16)
    assert _timed_quantized(linear, "fp8_e4m3") and _timed_quantized(linear, 4)
    assert not _timed_quantized(linear, "nvfp4") and not _timed_quantized(linear, 16)
    assert not _timed_quantized(nn.Conv2d(3, 4, 3), "fp8_e4m3")
    fp8 = _quantized(linear, "fp8_e4m3")
    assert type(fp8.weight).__name__ == "Float8Tensor" and fp8.weight.qdata.dtype == torch.float8_e4m3fn

    out = tmp_path / "latency.json"
    assert main(["profile", "catalog:digits_cnn", "--wbits", "4", "--formats", "fp8_e4m3,nvfp4", "--runs", "2",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "fp8_e4m3 ms" in printed and "nvfp4 timed in float" in printed and "fp8_e4m3 timed" not in printed
    raw = json.loads(out.read_text())
    assert all(list(row) == ["4", "16", "fp8_e4m3", "nvfp4"] for row in raw.values())
    table = load_latency_table(out)
    budget = sum(max(row.values()) for row in table.values()) * 0.999
    plan = tmp_path / "plan.json"
    assert main(["plan", "catalog:digits_cnn", "--latency-table", str(out), "--wbits", "4,16",
                 "--formats", "fp8_e4m3,nvfp4", "--budget", f"latency_ms={budget}", "--no-validate",
                 "--out", str(plan)]) == 0
    planned = json.loads(plan.read_text())
    assert planned["cost"]["latency_ms"] <= budget + 1e-9
    assert planned["cost"]["latency_ms"] == sum(table[la["name"]][la["w_format"] if la["w_format"] != "int"
                                                                  else la["w_bits"]] for la in planned["layers"])
