"""Bits below a layer: group quantization, the activation x weight salience table, and plan_units, which keeps
each layer's bit total and keeps mixed bits only when they measure better than one width per layer."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bitplan.core.pipeline import prepare
from bitplan.core.quant import quantize_weight
from bitplan.core.units import _Layer, input_energy, parse_granularity, plan_units, quantize_groups, unit_table
from bitplan.errors import BitplanError
from bitplan.schemas import Budget, PlanRequest


def test_granularity_is_parsed_and_bad_ones_say_what_exists():
    assert parse_granularity("layer") == ("layer", None)
    assert parse_granularity("channel") == ("channel", None)
    assert parse_granularity("group:128") == ("group", 128)
    for bad in ("group:4", "group:", "groups:128", "row"):
        with pytest.raises(BitplanError, match="group:N") as err:
            parse_granularity(bad)
        assert err.value.field == "granularity"
    with pytest.raises(ValueError):
        PlanRequest(model="m.pt2", budget=Budget(avg_weight_bits=4), granularity="group:0")


def test_group_scales_quantize_each_block_alone_and_no_worse_than_a_row_scale():
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(0))
    w[:, :16] *= 10  # one loud block: a row scale wastes levels on the others
    q = quantize_groups(w, 3, 16)
    for block in range(4):
        cols = slice(16 * block, 16 * block + 16)
        torch.testing.assert_close(q[:, cols], quantize_weight(w[:, cols], 3))
    assert (q - w).pow(2).sum() < (quantize_weight(w, 3) - w).pow(2).sum()


def test_salience_weights_each_error_by_its_inputs_energy():
    w = torch.randn(6, 32, generator=torch.Generator().manual_seed(1))
    energy = torch.rand(32, generator=torch.Generator().manual_seed(2))
    layer = _Layer("fc", "fc.weight", 3, w, energy)
    objective, params, quantized = unit_table(layer, "group", 8, [2, 3, 4], "mse")
    assert objective.shape == (4, 3) and list(params) == [48] * 4
    expected = float(((quantized[2][:, 8:16] - w[:, 8:16]).pow(2) * energy[8:16]).sum())
    assert objective[1, 0] == pytest.approx(expected, rel=1e-6)
    assert (np.diff(objective, axis=1) < 0).all()  # more bits, less error, unit by unit
    rows, params, _ = unit_table(layer, "channel", None, [2, 3, 4], "mse")
    assert rows.shape == (6, 3) and list(params) == [32] * 6


@pytest.fixture(scope="module")
def gpt():
    return prepare("catalog:tiny_gpt", None)


def test_input_energy_is_the_mean_square_of_each_input_feature(gpt):
    layer = next(g for g in gpt.model.layers if g.kind == "linear")
    energy = input_energy(gpt.model, gpt.data, {layer.name}, 64, limit=64)[layer.name]
    seen = []
    handle = layer.probes[0].register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().reshape(-1, a[0].shape[-1])))
    try:
        for batch in gpt.data.batches(64, 64):
            gpt.model.call(batch)
    finally:
        handle.remove()
    torch.testing.assert_close(energy, torch.cat(seen).pow(2).mean(0))


@pytest.mark.slow
@pytest.mark.parametrize("granularity", ["channel", "group:16"])
def test_plan_units_keeps_bit_totals_and_keeps_mixed_bits_only_when_measured_better(gpt, granularity):
    assignment = {g.name: (3, 16) for g in gpt.layers}
    request = PlanRequest(model="catalog:tiny_gpt", budget=Budget(avg_weight_bits=3), w_bits=(2, 3, 4, 8),
                          granularity=granularity, pins={gpt.layers[0].name: 3})
    units = plan_units(gpt, request, assignment)
    by_name = {info.name: info for info in gpt.layers}
    assert gpt.layers[0].name not in {layer.name for layer in units.layers}  # pinned: left as pinned
    assert units.units == sum(len(layer.bits) for layer in units.layers) > 0
    for layer in units.layers:
        info = by_name[layer.name]
        per_unit = info.params / len(layer.bits)
        assert sum(b * per_unit for b in layer.bits) <= 3 * info.params + 1e-6  # the layer's bit total holds
        assert layer.predicted <= layer.predicted_uniform * (1 + 1e-9)
    if units.kept == "mixed":
        assert units.measured_mixed.kl < units.measured_uniform.kl
        assert any(len(set(layer.bits)) > 1 for layer in units.layers)
    else:
        assert all(set(layer.bits) == {layer.layer_bits} for layer in units.layers)
    assert "measure" in units.message and units.granularity == granularity
