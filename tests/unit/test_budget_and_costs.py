import pytest

from bitplan.costs import CostModel
from bitplan.errors import BudgetError
from bitplan.schemas import Budget, LayerInfo


def test_unknown_budget_key_lists_valid_keys():
    with pytest.raises(BudgetError) as err:
        Budget.parse_items(["avg_bits=4"])
    assert "unknown budget key 'avg_bits'" in err.value.message
    assert "avg_weight_bits" in err.value.hint


@pytest.mark.parametrize("item", ["avg_weight_bits=-1", "avg_weight_bits=0", "size_bytes=nan", "bops=abc", "bops"])
def test_bad_budget_values_are_refused(item):
    with pytest.raises(BudgetError):
        Budget.parse_items([item])


def test_budget_units():
    assert Budget.parse_items(["size_bytes=2MB"]).size_bytes == 2e6


def test_costs_by_hand():
    layers = (
        LayerInfo(name="a", kind="conv2d", params=1000, out_channels=10, macs=50_000),
        LayerInfo(name="b", kind="linear", params=3000, out_channels=30, macs=3000),
    )
    model = CostModel(layers, fixed_bytes=400.0, latency={"a": {4: 1.0, 8: 2.0}, "b": {4: 0.5, 16: 3.0}})
    cost = model.plan_cost({"a": (4, 8), "b": (16, 16)})
    assert cost.size_bytes == 1000 * 4 / 8 + 10 * 4 + 3000 * 2 + 400
    assert cost.avg_weight_bits == pytest.approx((1000 * 4 + 3000 * 16) / 4000)
    assert cost.bops == 50_000 * 4 * 8 + 3000 * 16 * 16
    assert cost.latency_ms == 4.0


def test_missing_latency_entry_is_named():
    layers = (LayerInfo(name="a", kind="linear", params=10, out_channels=2, macs=10),)
    with pytest.raises(BudgetError, match="'a' at 2 bits"):
        CostModel(layers, latency={"a": {4: 1.0}}).plan_cost({"a": (2, 16)})
