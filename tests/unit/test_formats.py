"""Number formats as search options (bitplan.formats): each format's quantizer puts every weight on its grid with
its own scale rule, its size cost counts those scales exactly, the runtime presets narrow the choices, and a plan
chooses formats per layer where they measure better for their size."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from bitplan.costs import CostModel
from bitplan.formats import FORMATS, TARGETS, ladder, size_bytes
from bitplan.schemas import Budget, LayerInfo, PlanRequest

E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


def on_grid(values: torch.Tensor, grid: torch.Tensor, tol: float = 1e-5) -> bool:
    return bool(((values.abs().reshape(-1, 1) - grid.reshape(1, -1)).abs().min(dim=1).values <= tol).all())


@pytest.fixture(scope="module")
def weight():
    torch.manual_seed(0)
    w = torch.randn(24, 80) * torch.linspace(0.1, 3.0, 24).unsqueeze(1)  # rows of different ranges
    w[3, :40] *= 20.0  # one block far larger than the rest of its row
    return w


def test_fp8_rounds_to_fp8_values_under_a_per_row_scale(weight):
    from bitplan.core.quant import quantize_format

    for name, dtype, fmax in (("fp8_e4m3", torch.float8_e4m3fn, 448.0), ("fp8_e5m2", torch.float8_e5m2, 57344.0)):
        q = quantize_format(weight, name)
        scale = weight.abs().amax(dim=1, keepdim=True) / fmax
        codes = q / scale
        assert torch.allclose(codes, codes.to(dtype).float(), rtol=1e-5, atol=1e-6), name  # representable
        assert codes.abs().max() <= fmax * (1 + 1e-6)
        assert (q - weight).abs().max() < weight.abs().max() / 8  # close, not garbage


def test_mx_formats_share_a_power_of_two_per_32_weights(weight):
    from bitplan.core.quant import quantize_format

    for name, emax in (("mxfp4", 2), ("mxfp8", 8)):
        w = torch.nn.functional.pad(weight, (0, 16)).reshape(24, -1, 32)
        q = torch.nn.functional.pad(quantize_format(weight, name), (0, 16)).reshape(24, -1, 32)  # 80: 32, 32, 16
        amax = w.abs().amax(-1, keepdim=True)
        scale = torch.exp2(torch.floor(torch.log2(amax)) - emax)
        codes = q / scale
        if name == "mxfp4":
            assert on_grid(codes, E2M1), name
        else:
            assert torch.allclose(codes, codes.to(torch.float8_e4m3fn).float()), name
    # the big block in row 3 has its own scale: the rest of that row keeps its precision
    q = quantize_format(weight, "mxfp4")
    err_small_block = (q[3, 64:] - weight[3, 64:]).abs().max()
    assert err_small_block < weight[3, 64:].abs().max() / 4


def test_nvfp4_scales_are_e4m3_per_16_and_nf4_levels_are_qloras(weight):
    from bitplan.core.quant import NF4_LEVELS, quantize_format

    q = quantize_format(weight, "nvfp4").reshape(24, 5, 16)
    w = weight.reshape(24, 5, 16)
    amax = w.abs().amax(-1, keepdim=True)
    glob = amax.max() / (448 * 6)
    scale = (amax / 6 / glob).to(torch.float8_e4m3fn).float() * glob
    assert on_grid(q / scale, E2M1, tol=1e-4)
    # QLoRA's published NF4 values (Dettmers et al. 2023, appendix E), which bitplan computes from their definition
    published = [-1.0, -0.6961928, -0.5250731, -0.3949175, -0.2844414, -0.1847734, -0.0910500, 0.0,
                 0.0795803, 0.1609302, 0.2461123, 0.3379152, 0.4407098, 0.5626170, 0.7229568, 1.0]
    assert np.allclose(NF4_LEVELS.numpy(), published, atol=1e-6)
    q = quantize_format(weight, "nf4")
    w = torch.nn.functional.pad(weight, (0, 48)).reshape(24, 2, 64)
    qq = torch.nn.functional.pad(q, (0, 48)).reshape(24, 2, 64)
    assert on_grid(qq / w.abs().amax(-1, keepdim=True), NF4_LEVELS.abs())


def test_conv_weights_and_short_rows_keep_their_shape():
    from bitplan.core.quant import WeightBank, quantize_format

    conv = torch.randn(8, 3, 3, 3)  # rows of 27: one partial block
    for name in FORMATS:
        q = quantize_format(conv, name)
        assert q.shape == conv.shape and torch.isfinite(q).all(), name
    bank = WeightBank({"w": conv})
    assert bank.error_sq("w", "nvfp4") > 0 and bank.get("w", 16) is bank.weights["w"]


def test_size_cost_counts_each_formats_scales():
    # 24 rows of 80 weights
    assert size_bytes("fp8_e4m3", 1920, 24) == 1920 + 24 * 4
    assert size_bytes("mxfp4", 1920, 24) == 1920 / 2 + 24 * 3  # ceil(80 / 32) = 3 one-byte scales per row
    assert size_bytes("nvfp4", 1920, 24) == 1920 / 2 + 24 * 5 + 4  # 5 E4M3 scales per row + one fp32 per tensor
    assert size_bytes("nf4", 1920, 24) == 1920 / 2 + 24 * 2 * 4  # 2 fp32 absmax per row
    assert size_bytes(4, 1920, 24) == 1920 / 2 + 24 * 4 and size_bytes(16, 1920, 24) == 1920 * 2
    layer = LayerInfo(name="fc", kind="linear", params=1920, out_channels=24, macs=1920)
    costs = CostModel((layer,))
    cost = costs.option_cost(layer, "mxfp4", 16)
    assert cost["size_bytes"] == size_bytes("mxfp4", 1920, 24) and cost["bops"] == 1920 * 4 * 16
    assert costs.plan_cost({"fc": ("nvfp4", 16)}).avg_weight_bits == 4  # element bits; the scales are in size
    assert ladder([8, "mxfp4", 4, "nvfp4", "fp8_e4m3", 2]) == [2, 4, "mxfp4", "nvfp4", 8, "fp8_e4m3"]


def test_targets_set_and_narrow_the_choices():
    budget = Budget(avg_weight_bits=4)
    r = PlanRequest(model="m.pt2", budget=budget, target="vllm")
    assert (r.w_bits, r.formats, r.target) == (TARGETS["vllm"][0], TARGETS["vllm"][1], "vllm")
    r = PlanRequest(model="m.pt2", budget=budget, target="VLLM", w_bits=(4, 8), formats="nvfp4")
    assert (r.w_bits, r.formats) == ((4, 8), ("nvfp4",))
    assert PlanRequest(model="m.pt2", budget=budget, target="llamacpp").formats == ()
    with pytest.raises(ValidationError, match="does not run format"):
        PlanRequest(model="m.pt2", budget=budget, target="llamacpp", formats=["nvfp4"])
    with pytest.raises(ValidationError, match="choose from torchao"):
        PlanRequest(model="m.pt2", budget=budget, target="tensorrt-llm")
    with pytest.raises(ValidationError, match="is not one bitplan knows"):
        PlanRequest(model="m.pt2", budget=budget, formats=["fp6"])
    with pytest.raises(ValidationError, match="granularity layer"):
        PlanRequest(model="m.pt2", budget=budget, formats=["nf4"], granularity="group:32")
    r = PlanRequest(model="m.pt2", budget=budget, latency_table={"fc": {"4": 1.0, "NVFP4": 0.5}})
    assert r.latency_table == {"fc": {4: 1.0, "nvfp4": 0.5}}


def test_a_plan_chooses_formats_where_they_measure_better_for_their_size(tmp_path, capsys):
    """digits_cnn at the size of uniform nvfp4: the plan mixes INT and formats, is costed as the layers say, is
    measured with the formats' own quantizers, and is no worse than every uniform plan that fits (INT and each
    format). Also the CLI's --target and the sensitivity table's per-format scores."""
    from bitplan.cli import main
    from bitplan.schemas import PlanFile

    formats = "fp8_e4m3,mxfp4,nvfp4,nf4"
    out = tmp_path / "plan.json"
    assert main(["plan", "catalog:digits_cnn", "--budget", "size_bytes=24000", "--formats", formats,
                 "--sensitivity", "fisher", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    plan = PlanFile.model_validate_json(out.read_text())
    chosen = {layer.name: layer.w_format for layer in plan.layers}
    assert set(chosen.values()) - {"int"}, f"no format chosen: {chosen}"
    assert plan.formats == ["fp8_e4m3", "mxfp4", "nvfp4", "nf4"] and "format" in text
    assert plan.cost.size_bytes <= 24000
    search = plan.uniform_check.search
    assert any(label.startswith("uniform nvfp4") or label.startswith("uniform mxfp4") for label in search), search
    best_uniform = min(v.kl for k, v in search.items() if k.startswith("uniform"))
    assert plan.uniform_check.outcome in ("plan_better", "plan_level", "refined")
    assert min(search["solver plan"].kl, search.get("refined plan", search["solver plan"]).kl) <= best_uniform
    # the frontier keeps each point's formats
    assert any("formats" in point for point in plan.frontier)
    # --target: only what the runtime runs
    out2 = tmp_path / "llamacpp.json"
    assert main(["plan", "catalog:digits_cnn", "--budget", "avg_weight_bits=4", "--target", "llamacpp",
                 "--sensitivity", "fisher", "--no-validate", "--out", str(out2)]) == 0
    plan2 = json.loads(out2.read_text())
    assert plan2["target"] == "llamacpp" and plan2["formats"] == [] and 7 not in plan2["w_bits_options"]
    assert {la["w_format"] for la in plan2["layers"]} == {"int"}
    capsys.readouterr()
    # the sensitivity table scores every format too, and a plan can reuse it only with the formats it scored
    table = tmp_path / "table.json"
    assert main(["sensitivity", "catalog:digits_cnn", "--method", "hessian_trace", "--param", "max_probes=4",
                 "--param", "min_probes=4", "--formats", "nvfp4,mxfp8", "--out", str(table)]) == 0
    rows = json.loads(table.read_text())["layers"]
    assert all(set(r["omega_format"]) == {"nvfp4", "mxfp8"} for r in rows)
    assert sum(r["omega_format"]["mxfp8"] for r in rows) < sum(r["omega_format"]["nvfp4"] for r in rows) / 4
    capsys.readouterr()
    assert main(["plan", "catalog:digits_cnn", "--budget", "avg_weight_bits=4", "--table", str(table),
                 "--formats", "nf4", "--no-validate"]) == 2
    assert "scores no format ['nf4']" in capsys.readouterr().err


def test_solve_takes_and_gives_back_formats(tmp_path, capsys):
    """bitplan solve: an option may name its format; the problem JSON keeps it both ways and the answer says it."""
    from bitplan.cli import main
    from solver import Problem

    raw = {"layers": [{"name": "a", "params": 100, "options": [
        {"w_bits": 4, "objective": 1.0, "cost": {"size_bytes": 50}},
        {"w_bits": 4, "objective": 0.5, "cost": {"size_bytes": 56}, "format": "nvfp4"},
        {"w_bits": 8, "objective": 0.1, "cost": {"size_bytes": 100}}]}], "budgets": {"size_bytes": 60}}
    assert [o.get("format") for o in Problem.from_dict(raw).to_dict()["layers"][0]["options"]] == [None, "nvfp4", None]
    path = tmp_path / "problem.json"
    path.write_text(json.dumps(raw))
    assert main(["solve", str(path)]) == 0
    layer = json.loads(capsys.readouterr().out)["layers"][0]
    assert (layer["w_bits"], layer["format"], layer["objective"]) == (4, "nvfp4", 0.5)
