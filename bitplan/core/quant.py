"""Simulated ("fake") quantizers.

Weights: symmetric, per output channel, signed integers in [-(2^(b-1)-1), 2^(b-1)-1]
(2 bits is ternary), with the clipping range per channel either the plain
max |w| ("minmax") or the one minimising the squared error over a grid of
clip ratios ("mse"). 16 bits means full precision (the tensor is returned as is).
Activations: per tensor, asymmetric, b-bit unsigned codes over a range
calibrated on data.
"""

from __future__ import annotations

import torch

FULL_PRECISION = 16
CLIP_METHODS = ("mse", "minmax")
_MSE_GRID = torch.linspace(0.2, 1.0, 81)


def _levels(bits: int) -> int:
    return 2 ** (bits - 1) - 1


def _fake_quant(w2d: torch.Tensor, scale: torch.Tensor, qmax: int) -> torch.Tensor:
    return torch.clamp(torch.round(w2d / scale), -qmax, qmax) * scale


@torch.no_grad()
def quantize_weight(weight: torch.Tensor, bits: int, clip: str = "mse") -> torch.Tensor:
    """Return Q_b(W): ``weight`` fake-quantized per output channel (dim 0)."""
    if bits >= FULL_PRECISION:
        return weight.detach().clone()
    if not 2 <= bits <= 8:
        raise ValueError(f"weight bits must be 2..8 or 16, got {bits}")
    w = weight.detach().float().reshape(weight.shape[0], -1)
    qmax = _levels(bits)
    absmax = w.abs().amax(dim=1, keepdim=True).clamp_min(1e-12)
    if clip == "minmax":
        best = _fake_quant(w, absmax / qmax, qmax)
    elif clip == "mse":
        ratios = _MSE_GRID.to(w)
        best, best_err = None, None
        for r in ratios:
            q = _fake_quant(w, absmax * r / qmax, qmax)
            err = (q - w).pow(2).sum(dim=1, keepdim=True)
            if best is None:
                best, best_err = q, err
            else:
                better = err < best_err
                best = torch.where(better, q, best)
                best_err = torch.where(better, err, best_err)
    else:
        raise ValueError(f"clip must be one of {CLIP_METHODS}")
    return best.reshape(weight.shape).to(weight.dtype)


def fake_quant_activation(x: torch.Tensor, lo: float, hi: float, bits: int) -> torch.Tensor:
    """Asymmetric per-tensor fake quantization with a straight-through gradient."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    levels = 2**bits - 1
    scale = max(hi - lo, 1e-8) / levels
    zero = round(-lo / scale)
    q = torch.clamp(torch.round(x / scale) + zero, 0, levels)
    out = (q - zero) * scale
    return x + (out - x).detach()


class WeightBank:
    """Caches Q_b(W) for every (layer, bits) so each is computed once per run."""

    def __init__(self, weights: dict[str, torch.Tensor], clip: str = "mse") -> None:
        if clip not in CLIP_METHODS:
            raise ValueError(f"clip must be one of {CLIP_METHODS}")
        self.weights = {k: w.detach() for k, w in weights.items()}
        self.clip = clip
        self._cache: dict[tuple[str, int], torch.Tensor] = {}

    def get(self, key: str, bits: int) -> torch.Tensor:
        if bits >= FULL_PRECISION:
            return self.weights[key]
        if (key, bits) not in self._cache:
            self._cache[key, bits] = quantize_weight(self.weights[key], bits, self.clip)
        return self._cache[key, bits]

    def error_sq(self, key: str, bits: int) -> float:
        """||Q_b(W) - W||^2, the quantization perturbation HAWQ-V3 weights by the trace."""
        return float((self.get(key, bits) - self.weights[key]).double().pow(2).sum())
