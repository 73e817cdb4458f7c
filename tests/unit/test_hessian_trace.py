"""hessian_trace against exact Hessians of small exported models."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bitplan.core.data import POSITIONAL, Dataset
from bitplan.core.evaluate import logits_of
from bitplan.core.loading import load_model
from bitplan.core.quant import WeightBank
from bitplan.core.sensitivity import SensitivityContext, run_sensitivity

torch.manual_seed(0)


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(6, 5)
        self.fc2 = nn.Linear(5, 3)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


class TinyAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.q = nn.Linear(4, 4)
        self.k = nn.Linear(4, 4)
        self.v = nn.Linear(4, 4)
        self.out = nn.Linear(4, 3)

    def forward(self, x):
        a = F.scaled_dot_product_attention(self.q(x)[:, None], self.k(x)[:, None], self.v(x)[:, None])[:, 0]
        return self.out(a.mean(1))


def _export(module: nn.Module, example: torch.Tensor, path) -> str:
    module.eval()
    program = torch.export.export(module, (example,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(program, str(path))
    return str(path)


def _setup(tmp_path, module, x, targets):
    model = load_model(_export(module, x[:2], tmp_path / "m.pt2"))
    data = Dataset({POSITIONAL: x}, targets, "test", "0")
    bank = WeightBank({g.weight_key: model.weight(g) for g in model.layers})
    return model, data, bank


def _exact_block_traces(module: nn.Module, x, targets) -> dict[str, float]:
    names = [n for n, _ in module.named_parameters() if n.endswith("weight")]
    base = dict(module.named_parameters())
    with torch.no_grad():
        ref = F.log_softmax(module(x), -1)

    def loss(*ws):
        out = torch.func.functional_call(module, {**base, **dict(zip(names, ws))}, (x,))
        if targets is not None:
            return F.cross_entropy(out, targets)
        logp = F.log_softmax(out, -1)
        return (ref.exp() * (ref - logp)).sum(-1).mean()

    weights = tuple(base[n].detach() for n in names)
    hess = torch.autograd.functional.hessian(loss, weights)
    return {n[: -len(".weight")]: float(hess[i][i].reshape(w.numel(), w.numel()).trace())
            for i, (n, w) in enumerate(zip(names, weights))}


def _table(model, data, bank, **params):
    ctx = SensitivityContext(model, data, [2, 4, 8], bank, seed=0)
    return run_sensitivity("hessian_trace", params, ctx)


@pytest.mark.parametrize("hvp", ["exact", pytest.param("finite_difference", marks=pytest.mark.slow)])
@pytest.mark.parametrize("labelled", [True, False])
def test_trace_matches_exact_hessian_within_its_standard_error(tmp_path, hvp, labelled):
    module = MLP()
    x = torch.randn(64, 6)
    targets = torch.randint(0, 3, (64,)) if labelled else None
    model, data, bank = _setup(tmp_path, module, x, targets)
    exact = _exact_block_traces(module, x, targets)
    # finite differences cost a forward and backward pass per probe: a looser target, the same 4-SE check
    fd = hvp == "finite_difference"
    table = _table(model, data, bank, hvp=hvp, max_probes=600 if fd else 2000, min_probes=100 if fd else 200,
                   tol=0.05 if fd else 0.02, batch_size=16, probes_per_pass=50)
    for layer in table.layers:
        se = layer.detail["trace_se"]
        assert abs(layer.stat - exact[layer.name]) <= 4 * se + 0.02 * abs(exact[layer.name]), layer.name
    assert any(("finite differences" if hvp == "finite_difference" else "exact") in n for n in table.notes)


def _exact_block_diagonals(module: nn.Module, x) -> dict[str, torch.Tensor]:
    """diag of each weight's Hessian block of the KL to full precision, exactly."""
    names = [n for n, _ in module.named_parameters() if n.endswith("weight")]
    base = dict(module.named_parameters())
    with torch.no_grad():
        ref = F.log_softmax(module(x), -1)

    def loss(*ws):
        logp = F.log_softmax(torch.func.functional_call(module, {**base, **dict(zip(names, ws))}, (x,)), -1)
        return (ref.exp() * (ref - logp)).sum(-1).mean()

    weights = tuple(base[n].detach() for n in names)
    hess = torch.autograd.functional.hessian(loss, weights)
    return {n[: -len(".weight")]: hess[i][i].reshape(w.numel(), w.numel()).diagonal().reshape(w.shape)
            for i, (n, w) in enumerate(zip(names, weights))}


def test_default_omega_is_the_hessian_diagonal_weighted_by_each_weights_error(tmp_path):
    """Omega(l, b) = sum_i H_ii (Q_b(W) - W)_i^2: the Hutchinson diagonal estimate converges to the exact one."""
    module = MLP()
    x = torch.randn(64, 6)
    model, data, bank = _setup(tmp_path, module, x, None)
    diag = _exact_block_diagonals(module, x)
    table = _table(model, data, bank, max_probes=3000, min_probes=3000, probes_per_pass=100, batch_size=64)
    for layer, g in zip(table.layers, model.layers):
        for b in (2, 4, 8):
            exact = float((diag[layer.name] * (bank.get(g.weight_key, b) - model.weight(g)).pow(2)).sum())
            assert layer.omega[b] == pytest.approx(exact, rel=0.1), (layer.name, b)
    assert any("diag(H)" in n for n in table.notes)


def test_diagonal_omega_ignores_a_per_channel_rescaling_that_fools_the_trace(tmp_path):
    """A BatchNorm folded into a layer scales its output channels. Scaling fc1's rows by s and fc2's
    columns by 1/s (a purely linear model, so the function is unchanged) changes Tr(H)/n x ||dW||^2
    fourfold here but not sum_i H_ii dW_i^2: per-row quantization error scales with s, H_ii with 1/s^2."""

    class Lin2(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = nn.Linear(6, 5, bias=False)
            self.fc2 = nn.Linear(5, 3, bias=False)

        def forward(self, x):
            return self.fc2(self.fc1(x))

    x = torch.randn(64, 6)
    plain = Lin2()
    scaled = Lin2()
    s = torch.tensor([2.0, 0.5, 1.0, 2.0, 0.5])
    with torch.no_grad():
        scaled.fc1.weight.copy_(plain.fc1.weight * s[:, None])
        scaled.fc2.weight.copy_(plain.fc2.weight / s[None, :])
    tables = {}
    for label, module in (("plain", plain), ("scaled", scaled)):
        (tmp_path / label).mkdir()
        model, data, bank = _setup(tmp_path / label, module, x, None)
        for omega in ("diagonal", "trace"):
            probes = 4000 if omega == "diagonal" else 400  # the trace's change is fourfold: few probes show it
            tables[label, omega] = _table(model, data, bank, omega=omega, max_probes=probes, min_probes=probes,
                                          probes_per_pass=100, batch_size=64).omega()["fc1"][2]
    # fc1's per-row quantization error scales with s and its Hessian diagonal with 1/s^2: the product is invariant
    assert tables["scaled", "diagonal"] == pytest.approx(tables["plain", "diagonal"], rel=0.15)
    assert abs(tables["scaled", "trace"] / tables["plain", "trace"] - 1) > 0.5


def test_omega_is_trace_per_weight_times_quantization_error(tmp_path):
    module = MLP()
    x = torch.randn(32, 6)
    model, data, bank = _setup(tmp_path, module, x, None)
    table = _table(model, data, bank, max_probes=16, omega="trace")
    for layer, g in zip(table.layers, model.layers):
        n = model.weight(g).numel()
        for b in (2, 4, 8):
            assert layer.omega[b] == pytest.approx(max(layer.stat, 0) / n * bank.error_sq(g.weight_key, b))
        assert layer.omega[2] >= layer.omega[4] >= layer.omega[8]
    assert all(layer.stat >= 0 for layer in table.layers)  # KL Hessian at full precision is PSD


def test_same_seed_same_table(tmp_path):
    module = MLP()
    x = torch.randn(32, 6)
    model, data, bank = _setup(tmp_path, module, x, torch.randint(0, 3, (32,)))
    first = _table(model, data, bank, max_probes=12)
    second = _table(model, data, bank, max_probes=12)
    assert [la.omega for la in first.layers] == [la.omega for la in second.layers]


def test_attention_without_double_backward_still_gets_exact_traces(tmp_path):
    module = TinyAttention()
    x = torch.randn(24, 5, 4)
    targets = torch.randint(0, 3, (24,))
    model, data, bank = _setup(tmp_path, module, x, targets)
    with pytest.raises(RuntimeError, match="derivative for"):  # the trap the method must survive
        w = model.weight(model.layers[0]).clone().requires_grad_(True)
        out = logits_of(model.call(data.slice(0, 4), {model.layers[0].weight_key: w}))
        (g,) = torch.autograd.grad(F.cross_entropy(out, targets[:4]), w, create_graph=True)
        torch.autograd.grad(g.sum(), w)
    table = _table(model, data, bank, max_probes=600, min_probes=200, tol=0.02, probes_per_pass=50, batch_size=24)
    assert any("math form" in n for n in table.notes)
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        exact = _exact_block_traces(module, x, targets)
    for layer in table.layers:
        assert abs(layer.stat - exact[layer.name]) <= 4 * layer.detail["trace_se"] + 1e-3 * abs(exact[layer.name])
    # the graph is left as it was found
    targets_after = {n.target for n in model.gm.graph.nodes if n.op == "call_function"}
    assert torch.ops.aten.scaled_dot_product_attention.default in targets_after


class Hard(nn.Module):
    """hardsigmoid has no double backward in torch (MobileNetV3's trap for HAWQ tools)."""

    def __init__(self, twice_differentiable: bool = False):
        super().__init__()
        self.fc1 = nn.Linear(4, 6)
        self.fc2 = nn.Linear(6, 3)
        self.twice_differentiable = twice_differentiable

    def forward(self, x):
        h = self.fc1(x)
        h = torch.clamp(h / 6 + 0.5, 0, 1) if self.twice_differentiable else F.hardsigmoid(h)
        return self.fc2(h * 4)


@pytest.mark.slow
def test_op_without_second_derivative_falls_back_to_finite_differences(tmp_path):
    from bitplan.errors import BitplanError

    module = Hard()
    x = torch.randn(48, 4)
    targets = torch.randint(0, 3, (48,))
    model, data, bank = _setup(tmp_path, module, x, targets)
    with pytest.raises(BitplanError) as err:
        _table(model, data, bank, hvp="exact", max_probes=4, min_probes=2)
    assert "hardsigmoid" in err.value.message and "hvp=auto" in err.value.hint

    table = _table(model, data, bank, max_probes=1500, min_probes=200, tol=0.02, probes_per_pass=50, batch_size=48)
    assert any("fell back to finite differences" in n and "hardsigmoid" in n for n in table.notes)
    twin = Hard(twice_differentiable=True)
    twin.load_state_dict(module.state_dict())
    exact = _exact_block_traces(twin, x, targets)
    for layer in table.layers:
        assert abs(layer.stat - exact[layer.name]) <= 4 * layer.detail["trace_se"] + 0.02 * abs(exact[layer.name])


def test_forward_differences_keep_fused_attention_and_match_the_exact_trace(tmp_path, monkeypatch):
    """hvp=forward_difference: one gradient per probe (plus one per batch) on the fused kernels, no math swap; the
    same probes give central differences' traces (two gradients per probe) to 0.1 %, and the exact products' to
    the same tolerance as central differences do. auto picks it on a GPU only."""
    from bitplan.core.sensitivity import hvp as hvp_module

    torch.manual_seed(0)  # the data, not whichever tests ran before: finite differences' error depends on it
    module = TinyAttention()
    x = torch.randn(24, 5, 4)
    targets = torch.randint(0, 3, (24,))
    model, data, bank = _setup(tmp_path, module, x, targets)
    params = {"max_probes": 16, "min_probes": 16, "probes_per_pass": 8, "batch_size": 24}
    exact = _table(model, data, bank, hvp="auto", **params)
    calls = []
    monkeypatch.setattr(hvp_module, "replace_sdpa_with_math", lambda gm: calls.append(gm) or 0)
    forward = _table(model, data, bank, hvp="forward_difference", **params)
    assert not calls and any("forward differences" in n for n in forward.notes)
    central = _table(model, data, bank, hvp="finite_difference", **params)
    for a, b, c in zip(exact.layers, forward.layers, central.layers):
        assert b.stat == pytest.approx(c.stat, rel=1e-3), a.name
        assert abs(b.stat - a.stat) <= abs(c.stat - a.stat) + 1e-3 * abs(a.stat), a.name
    # auto: exact (math form) on a CPU; forward differences when the weights live on a GPU
    assert any("math form" in n for n in exact.notes)
    monkeypatch.setattr(hvp_module, "_on_cuda", lambda weights: True)
    on_gpu = _table(model, data, bank, hvp="auto", **params)
    assert any("forward differences" in n for n in on_gpu.notes)
    assert [layer.stat for layer in on_gpu.layers] == [layer.stat for layer in forward.layers]
