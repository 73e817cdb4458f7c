"""Layers that read the same value (an attention's q, k and v) are found in the graph, and
``tie_shared_inputs`` gives them one bit width: in the solver, the measured refinement and the API's
submit-time check."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from bitplan.core.loading import load_model
from bitplan.core.pipeline import make_plan
from bitplan.schemas import Budget, LayerInfo, PlanRequest, shared_input_groups


class Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(16)
        self.q, self.k, self.v = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 16)
        self.out = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        weights = torch.softmax(self.q(h) @ self.k(h).transpose(-1, -2) / 4.0, dim=-1)
        return self.out((weights @ self.v(h)).mean(dim=1))


@pytest.fixture(scope="module")
def attention_files(tmp_path_factory):
    out = tmp_path_factory.mktemp("ties")
    torch.manual_seed(0)
    x = torch.randn(80, 6, 16)
    net = Attention().eval()
    with torch.no_grad():  # near-uniform attention: q and k barely matter, v does (so an untied plan splits them)
        net.q.weight.mul_(0.05)
        net.k.weight.mul_(0.05)
    program = torch.export.export(net, (x[:2],), dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(program, str(out / "attn.pt2"))
    np.savez(out / "calib.npz", inputs=x.numpy())
    return out


def test_the_graph_shows_which_layers_read_the_same_value(attention_files):
    model = load_model(str(attention_files / "attn.pt2"))
    infos = [LayerInfo(name=g.name, kind=g.kind, params=1, out_channels=1, reads=g.reads or None) for g in model.layers]
    assert shared_input_groups(infos) == (("q", "k", "v"),)


@pytest.mark.parametrize("tie", [False, True])
def test_tied_layers_get_one_bit_width(attention_files, tie):
    request = PlanRequest(model=str(attention_files / "attn.pt2"), data=str(attention_files / "calib.npz"),
                          budget=Budget(avg_weight_bits=4.5), w_bits=(2, 4, 8), pins={"out": 8}, sensitivity="fisher",
                          tie_shared_inputs=tie, refine_seconds=5)
    plan = make_plan(request)
    bits = {layer.name: layer.w_bits for layer in plan.layers}
    assert plan.cost.avg_weight_bits <= 4.5 + 1e-9 and bits["out"] == 8
    if tie:
        assert plan.ties == [["q", "k", "v"]]
        assert bits["q"] == bits["k"] == bits["v"]
    else:
        assert plan.ties == []
        assert bits["q"] < bits["v"] and bits["k"] < bits["v"]  # what the tie forbids


def test_the_api_refuses_pins_that_split_a_tied_group():
    from service.errors import ApiError
    from service.jobspec import JobCreate, check_against_model

    description = {"layers": [{"name": n, "kind": "linear", "params": 256, "out_channels": 16, "reads": "h"}
                              for n in ("q", "k", "v")], "other_bytes": 0}
    job = JobCreate(model_id="m_x", budgets={"avg_weight_bits": 8}, pins={"q": 8, "v": 2}, tie_shared_inputs=True)
    with pytest.raises(ApiError) as caught:
        check_against_model(job, description)
    assert caught.value.field == "pins" and "different bit widths [2, 8]" in caught.value.message
    check_against_model(job.model_copy(update={"tie_shared_inputs": False}), description)  # untied: fine
    # one pin in a group holds the whole group: q=8 ties k and v to 8, so 4 average bits cannot be met
    tight = JobCreate(model_id="m_x", budgets={"avg_weight_bits": 4}, pins={"q": 8}, tie_shared_inputs=True)
    with pytest.raises(ApiError) as caught:
        check_against_model(tight, description)
    assert caught.value.code == "infeasible"
    check_against_model(tight.model_copy(update={"tie_shared_inputs": False}), description)
