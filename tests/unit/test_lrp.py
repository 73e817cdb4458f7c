"""AttnLRP's rules: the same function as the graph computes, and relevance that adds up as the rules say."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bitplan.core.data import POSITIONAL, Dataset
from bitplan.core.loading import load_model
from bitplan.core.quant import WeightBank
from bitplan.core.sensitivity import SensitivityContext, run_sensitivity
from bitplan.core.sensitivity.lrp import _attention, _layer_norm, _undo, _with_rules

BITS = [2, 4, 8]


def _load(tmp_path, module, x):
    module.eval()
    program = torch.export.export(module, (x[:2],), dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(program, str(tmp_path / "m.pt2"))
    model = load_model(str(tmp_path / "m.pt2"))
    bank = WeightBank({g.weight_key: model.weight(g) for g in model.layers})
    return model, bank


def _stats(model, bank, x, **params):
    data = Dataset({POSITIONAL: x}, None, "test", "0")
    table = run_sensitivity("lrp", params, SensitivityContext(model, data, BITS, bank, seed=0))
    return {layer.name: layer.stat for layer in table.layers}, table


class Mlp(nn.Module):
    """Positive inputs and weights: every relevance is positive, so shares are exact sums."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(6, 8, bias=False)
        self.fc2 = nn.Linear(8, 3, bias=False)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class Attention(nn.Module):
    def __init__(self, d=8):
        super().__init__()
        self.q = nn.Linear(d, d, bias=False)
        self.k = nn.Linear(d, d, bias=False)
        self.v = nn.Linear(d, d, bias=False)
        self.o = nn.Linear(d, 3, bias=False)

    def forward(self, x):
        q, k, v = (layer(x).unsqueeze(1) for layer in (self.q, self.k, self.v))
        h = F.scaled_dot_product_attention(q, k, v).squeeze(1)
        return self.o(h.mean(1))


def _positive(module, gen):
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.rand(p.shape, generator=gen) + 0.1)


def test_identity_rule_passes_all_relevance_through_gelu(tmp_path):
    gen = torch.Generator().manual_seed(0)
    module = Mlp()
    _positive(module, gen)
    with torch.no_grad():
        module.fc1.weight.mul_(0.02)  # pre-activations near 0, where GELU's slope is about 0.5, not 1
    x = torch.rand(16, 6, generator=gen) + 0.1
    model, bank = _load(tmp_path, module, x)
    stats, table = _stats(model, bank, x, rules="attnlrp")
    # relevance 1 per sample enters fc2; GELU passes it unchanged; fc1 has no bias: 1 per sample too
    assert stats["fc1"] == pytest.approx(0.5, abs=1e-4)
    assert "1 elementwise nonlinearities (identity rule)" in table.notes[0]
    # zennit's composite passes GELU's plain gradient, which halves the relevance here
    plain, _ = _stats(model, bank, x, rules="zennit")
    assert plain["fc1"] < 0.4


def test_attention_splits_relevance_evenly_and_reaches_queries_and_keys(tmp_path):
    gen = torch.Generator().manual_seed(1)
    module = Attention()
    _positive(module, gen)
    x = torch.rand(12, 5, 8, generator=gen) + 0.1
    model, bank = _load(tmp_path, module, x)
    stats, table = _stats(model, bank, x)  # rules=auto picks AttnLRP for a graph with attention
    assert "AttnLRP rules" in table.notes[0] and "rules=auto" in table.notes[0]
    # the uniform rule: half of what leaves attention comes from v, half from the attention weights
    assert stats["v"] / stats["o"] == pytest.approx(0.5, rel=1e-4)
    # the softmax passes its share on to q and k by its gradient (not detached, as in CP-LRP)
    assert stats["q"] > 0 and stats["k"] > 0
    assert sum(stats.values()) == pytest.approx(1.0)


def test_rules_compute_the_same_function(tmp_path):
    gen = torch.Generator().manual_seed(2)
    module = Attention()
    x = torch.randn(4, 5, 8, generator=gen)
    model, _ = _load(tmp_path, module, x)
    before = model.gm(x)
    swapped, counts = _with_rules(model.gm)
    try:
        during = model.gm(x)
    finally:
        _undo(model.gm, swapped)
    assert counts["attention"] == 1
    torch.testing.assert_close(during, before, rtol=1e-5, atol=1e-6)
    assert all(n.target is not _attention for n in model.gm.graph.nodes)


@pytest.mark.parametrize("causal", [False, True])
def test_attention_rule_matches_sdpa_with_masks(causal):
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 3, 5, 4, generator=gen) for _ in range(3))
    bool_mask = torch.rand(2, 1, 5, 5, generator=gen) > 0.3
    bool_mask[..., 0] = True  # every row keeps one key
    for mask in (None, bool_mask, torch.randn(2, 1, 5, 5, generator=gen)):
        expected = F.scaled_dot_product_attention(q, k, v, attn_mask=None if causal else mask, is_causal=causal)
        got = _attention(q, k, v, None if causal else mask, 0.0, causal)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_layer_norm_rule_holds_the_deviation_constant():
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(3, 7, generator=gen, requires_grad=True)
    w, b = torch.randn(7, generator=gen), torch.randn(7, generator=gen)
    y = _layer_norm(x, [7], w, b, 1e-5)
    torch.testing.assert_close(y, F.layer_norm(x, [7], w, b, 1e-5))
    g = torch.randn(3, 7, generator=gen)
    (grad,) = torch.autograd.grad(y, x, g)
    # centring is linear and kept; the deviation is a constant: relevance in = relevance out minus the bias's
    r_out = ((y - b) * g).sum()
    torch.testing.assert_close((x * grad).sum(), r_out.detach(), rtol=1e-4, atol=1e-4)
