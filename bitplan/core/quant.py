"""Simulated ("fake") quantizers.

Weights: symmetric, per output channel, signed integers in [-(2^(b-1)-1), 2^(b-1)-1]
(2 bits is ternary), with the clipping range per channel either the plain
max |w| ("minmax") or the one minimising the squared error over a grid of
clip ratios ("mse"). 16 bits means full precision (the tensor is returned as is).
Activations: per tensor, asymmetric, b-bit unsigned codes over a range
calibrated on data.
Number formats (FP8, MXFP4/8, NVFP4, NF4; bitplan.formats): ``quantize_format``, each with its own scale rule
(``clip`` applies to INT-b only).
"""

from __future__ import annotations

import torch

from bitplan.formats import FORMATS, WeightChoice

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
        self._cache: dict[tuple[str, WeightChoice], torch.Tensor] = {}

    def get(self, key: str, bits: WeightChoice) -> torch.Tensor:
        """Q(W) for an INT width (16: W itself) or a number format's name."""
        if bits == FULL_PRECISION:
            return self.weights[key]
        if (key, bits) not in self._cache:
            self._cache[key, bits] = (quantize_format(self.weights[key], bits) if isinstance(bits, str)
                                      else quantize_weight(self.weights[key], bits, self.clip))
        return self._cache[key, bits]

    def error_sq(self, key: str, bits: WeightChoice) -> float:
        """||Q_b(W) - W||^2, the quantization perturbation HAWQ-V3 weights by the trace."""
        return float((self.get(key, bits) - self.weights[key]).double().pow(2).sum())


# ---- number formats besides INT-b (bitplan.formats) -------------------------------------------------------------

_E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
_FP8 = {"e4m3": (torch.float8_e4m3fn, 448.0, 8), "e5m2": (torch.float8_e5m2, 57344.0, 15)}  # dtype, max, emax


def _nf4_levels() -> torch.Tensor:
    """QLoRA's NormalFloat-4: 8 positive and 7 negative quantiles of N(0, 1) between probability 0.9677 and
    one half, with an exact zero, scaled to [-1, 1] (computed from that definition, not copied)."""
    offset = 0.9677083
    pos = torch.special.ndtri(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])
    neg = -torch.special.ndtri(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])
    levels = torch.cat([pos, torch.zeros(1, dtype=torch.float64), neg]).sort().values
    return (levels / levels.abs().max()).float()


NF4_LEVELS = _nf4_levels()


def _nearest(x: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Each element of ``x`` rounded to the nearest of the sorted ``levels`` (ties to the lower one)."""
    levels = levels.to(x)
    mids = (levels[1:] + levels[:-1]) / 2
    return levels[torch.bucketize(x, mids)]


def _e2m1(x: torch.Tensor) -> torch.Tensor:
    grid = torch.tensor(_E2M1, dtype=x.dtype, device=x.device)
    return torch.sign(x) * _nearest(x.abs().clamp(max=6.0), grid)


def _fp8(x: torch.Tensor, kind: str) -> torch.Tensor:
    dtype, fmax, _ = _FP8[kind]
    return x.clamp(-fmax, fmax).to(dtype).to(x.dtype)


def _rows(weight: torch.Tensor, block: int | None) -> tuple[torch.Tensor, int]:
    """``weight`` as [rows, blocks, block] (zero-padded at each row's end), and the row length."""
    w = weight.detach().float().reshape(weight.shape[0], -1)
    cols = w.shape[1]
    if block is None:
        return w.unsqueeze(1), cols
    pad = -cols % block
    if pad:
        w = torch.nn.functional.pad(w, (0, pad))
    return w.reshape(w.shape[0], -1, block), cols


@torch.no_grad()
def quantize_format(weight: torch.Tensor, name: str) -> torch.Tensor:
    """Q_f(W): ``weight`` rounded to the number format ``name`` (bitplan.formats.FORMATS) with its scales."""
    return format_scales(weight, name)[0]


@torch.no_grad()
def format_scales(weight: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(Q_f(W), each block's scale [rows, blocks], the tensor scale or None), the scales as compressed-tensors stores
    them: an element times its block's scale is the weight, except nvfp4, whose block scales are E4M3 values relative
    to the tensor's: element * scale / tensor scale (tests/unit/test_apply.py checks compressed-tensors' own
    quantize/dequantize against these)."""
    fmt = FORMATS[name]
    blocks, cols = _rows(weight, fmt.block)
    amax = blocks.abs().amax(dim=-1, keepdim=True)
    tensor_scale = None
    if name in ("fp8_e4m3", "fp8_e5m2"):
        kind = name.removeprefix("fp8_")
        scale = amax.clamp_min(1e-12) / _FP8[kind][1]
        q = _fp8(blocks / scale, kind) * scale
    elif name in ("mxfp4", "mxfp8"):  # OCP MX: scale 2^(floor(log2 amax) - emax of the element format)
        emax = 2 if name == "mxfp4" else _FP8["e4m3"][2]
        # E8M0 holds 2^-127 .. 2^127: a block of zeros (or below 2^-119) keeps the least scale, not one that wraps
        scale = torch.exp2((torch.floor(torch.log2(amax.clamp_min(2.0**-126))) - emax).clamp_min(-127.0))
        q = (_e2m1(blocks / scale) if name == "mxfp4" else _fp8(blocks / scale, "e4m3")) * scale
    elif name == "nvfp4":  # fp32 tensor scale, then each block's amax / 6 stored in E4M3 relative to it
        glob = (amax.amax() / (448.0 * 6.0)).clamp_min(1e-12)
        relative = _fp8(amax / 6.0 / glob, "e4m3").clamp_min(2.0**-9)  # E4M3's least: a zero block's scale is not 0
        block_scale = relative * glob
        q = _e2m1(blocks / block_scale.clamp_min(1e-30)) * block_scale
        scale, tensor_scale = relative, (1.0 / glob).reshape(1)
    elif name == "nf4":
        scale = amax.clamp_min(1e-12)
        q = _nearest(blocks / scale, NF4_LEVELS) * scale
    else:
        raise ValueError(f"no quantizer for format '{name}'")
    out = q.reshape(q.shape[0], -1)[:, :cols].reshape(weight.shape).to(weight.dtype)
    return out, scale.squeeze(-1), tensor_scale
