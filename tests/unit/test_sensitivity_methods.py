"""Every sensitivity method against a model whose answer is known in closed form."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bitplan.core.data import POSITIONAL, Dataset
from bitplan.core.loading import load_model
from bitplan.core.quant import WeightBank
from bitplan.core.sensitivity import SensitivityContext, run_sensitivity
from bitplan.errors import BitplanError

BITS = [2, 4, 8]


class Linear(nn.Module):
    """logits = W x: every derivative of the cross-entropy has a closed form."""

    def __init__(self, d=6, c=4):
        super().__init__()
        self.fc = nn.Linear(d, c, bias=False)

    def forward(self, x):
        return self.fc(x)


class TwoLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(6, 5)
        self.fc2 = nn.Linear(5, 3)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def _setup(tmp_path, module, x, targets):
    torch.manual_seed(0)
    module.eval()
    program = torch.export.export(module, (x[:2],), dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(program, str(tmp_path / "m.pt2"))
    model = load_model(str(tmp_path / "m.pt2"))
    bank = WeightBank({g.weight_key: model.weight(g) for g in model.layers})
    data = Dataset({POSITIONAL: x}, targets, "test", "0")
    return model, bank, data


def _run(model, bank, data, method, **params):
    return run_sensitivity(method, params, SensitivityContext(model, data, BITS, bank, seed=0))


@pytest.fixture
def linear_case(tmp_path):
    gen = torch.Generator().manual_seed(1)
    module = Linear()
    with torch.no_grad():
        module.fc.weight.copy_(torch.randn(4, 6, generator=gen))
    x = torch.randn(64, 6, generator=gen)
    y = torch.randint(0, 4, (64,), generator=gen)
    model, bank, data = _setup(tmp_path, module, x, y)
    w = module.fc.weight.detach()
    p = F.softmax(x @ w.T, -1)
    return model, bank, data, w, x, y, p


def test_fisher_is_mean_squared_per_sample_gradient(linear_case):
    model, bank, data, w, x, y, p = linear_case
    residual = p - F.one_hot(y, 4).float()  # d CE / d logits per sample
    fisher = torch.einsum("nc,nd->cd", residual.pow(2), x.pow(2)) / len(x)
    table = _run(model, bank, data, "fisher")
    (layer,) = table.layers
    assert layer.stat == pytest.approx(float(fisher.sum()), rel=1e-4)
    for b in BITS:
        expected = float((fisher * (bank.get("fc.weight", b) - w).pow(2)).sum())
        assert layer.omega[b] == pytest.approx(expected, rel=1e-4)


def test_fisher_without_labels_samples_from_the_model(linear_case):
    model, bank, data, w, x, y, p = linear_case
    # E_y~p[(p - e_y)^2]_c = p_c (1 - p_c)^2 + (1 - p_c) p_c^2 = p_c (1 - p_c)
    expected = float(torch.einsum("nc,nd->cd", p * (1 - p), x.pow(2)).sum() / len(x))
    big = Dataset({POSITIONAL: x.repeat(40, 1)}, None, "test", "0")
    table = _run(model, bank, big, "fisher", max_samples=2560)
    assert table.layers[0].stat == pytest.approx(expected, rel=0.1)
    assert "sampled from the model" in table.notes[0]


def test_taylor_is_mean_gradient_dot_weight_error(linear_case):
    model, bank, data, w, x, y, p = linear_case
    grad = (p - F.one_hot(y, 4).float()).T @ x / len(x)
    table = _run(model, bank, data, "taylor")
    for b in BITS:
        expected = abs(float((grad * (bank.get("fc.weight", b) - w)).sum()))
        assert table.layers[0].omega[b] == pytest.approx(expected, rel=1e-4, abs=1e-9)


def test_taylor_refuses_unlabelled_data(linear_case):
    model, bank, data, *_ = linear_case
    with pytest.raises(BitplanError, match="needs calibration data with 'targets'"):
        _run(model, bank, Dataset(data.inputs, None, "t", "0"), "taylor")


def test_hessian_eigen_matches_the_top_eigenvalue(linear_case):
    model, bank, data, w, x, y, p = linear_case
    # H = mean_n (diag(p_n) - p_n p_n^T) kron x_n x_n^T over vec(W) (row-major)
    hess = sum(torch.kron(torch.diag(pn) - torch.outer(pn, pn), torch.outer(xn, xn)) for pn, xn in zip(p, x)) / len(x)
    top = float(torch.linalg.eigvalsh(hess.double())[-1])
    table = _run(model, bank, data, "hessian_eigen", max_iter=200, tol=1e-6, batch_size=64)
    layer = table.layers[0]
    assert layer.stat == pytest.approx(top, rel=1e-3)
    assert layer.omega[2] == pytest.approx(top * bank.error_sq("fc.weight", 2), rel=1e-3)


def test_hessian_trace_of_activations_matches_closed_form(linear_case):
    model, bank, data, w, x, y, p = linear_case
    # d2 CE / dx2 per sample = W^T (diag(p) - p p^T) W; the method reports the mean per-sample trace
    expected = float(sum(torch.trace(w.T @ (torch.diag(pn) - torch.outer(pn, pn)) @ w) for pn in p) / len(x))
    table = _run(model, bank, data, "hessian_trace", activations=True, max_probes=64, min_probes=64, batch_size=8)
    layer = table.layers[0]
    assert layer.detail["act_trace"] == pytest.approx(expected, rel=0.15)
    assert layer.omega_act[16] == 0.0 and layer.omega_act[4] > layer.omega_act[8] > 0


def test_perturbation_is_the_measured_loss_increase(linear_case):
    model, bank, data, w, x, y, p = linear_case
    base = F.cross_entropy(x @ w.T, y)
    table = _run(model, bank, data, "perturbation")
    for b in BITS:
        expected = float(F.cross_entropy(x @ bank.get("fc.weight", b).T, y) - base)
        assert table.layers[0].omega[b] == pytest.approx(expected, rel=1e-4, abs=1e-7)


def test_lrp_epsilon_rule_relevance_shares(tmp_path):
    gen = torch.Generator().manual_seed(3)
    module = TwoLayer()
    x = torch.randn(32, 6, generator=gen)
    y = torch.randint(0, 3, (32,), generator=gen)
    model, bank, data = _setup(tmp_path, module, x, y)
    w1, b1, w2, b2 = (t.detach() for t in (module.fc1.weight, module.fc1.bias, module.fc2.weight, module.fc2.bias))
    eps = 1e-6

    def stab(z):
        return z + eps * torch.where(z >= 0, 1.0, -1.0)

    # LRP-epsilon by hand: relevance starts as the target logit's one-hot selector
    z1 = x @ w1.T + b1
    h = torch.relu(z1)
    z2 = h @ w2.T + b2
    r_out = F.one_hot(y, 3).float()
    r_h = h * ((r_out / stab(z2)) @ w2)  # relevance entering fc2
    r_x = x * (((r_h * (z1 > 0)) / stab(z1)) @ w1)  # relevance entering fc1
    share1 = float(r_x.abs().sum()) / float(r_x.abs().sum() + r_h.abs().sum())
    table = _run(model, bank, data, "lrp", composite="epsilon_plus")
    stats = {layer.name: layer.stat for layer in table.layers}
    assert stats["fc1"] == pytest.approx(share1, rel=1e-3)
    assert stats["fc1"] + stats["fc2"] == pytest.approx(1.0)
    w_energy = float(w1.pow(2).sum())
    assert table.layers[0].omega[2] == pytest.approx(share1 * bank.error_sq("fc1.weight", 2) / w_energy, rel=1e-3)
    # the graph runs its own ops again afterwards
    assert all(p.as_module is None for g in model.layers for p in g.probes)


def test_every_method_is_deterministic_for_a_seed(linear_case):
    model, bank, data, *_ = linear_case
    for method in ("hessian_trace", "hessian_eigen", "fisher", "taylor", "lrp", "perturbation"):
        first = _run(model, bank, data, method)
        second = _run(model, bank, data, method)
        assert [la.omega for la in first.layers] == [la.omega for la in second.layers], method
