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
