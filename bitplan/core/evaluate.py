"""Losses and measured quality of a quantized model.

With integer targets the loss is cross-entropy; without, it is KL(full
precision || quantized) over the last output dimension. Metrics always include
KL to full precision and top-1 agreement with it, and accuracy where targets exist.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from bitplan.core.data import Batch, Dataset
from bitplan.core.loading import LoadedModel
from bitplan.errors import DataError
from bitplan.schemas import Metrics


def logits_of(output) -> torch.Tensor:
    """The first tensor in a model's output (a tensor, tuple, list or dict)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, dict):
        output = list(output.values())
    if isinstance(output, (list, tuple)):
        for item in output:
            try:
                return logits_of(item)
            except DataError:
                continue
    raise DataError("the model's output holds no tensor", "return logits (a tensor) from forward")


def flat(logits: torch.Tensor) -> torch.Tensor:
    return logits.reshape(-1, logits.shape[-1]).float()


def kl_divergence(ref_logp: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Mean over positions of KL(p_ref || p), both over the last dimension."""
    logp = F.log_softmax(flat(logits), dim=-1)
    return (ref_logp.exp() * (ref_logp - logp)).sum(-1).mean()


def batch_loss(logits: torch.Tensor, batch: Batch, ref_logp: torch.Tensor | None) -> torch.Tensor:
    if batch.targets is not None:
        return F.cross_entropy(flat(logits), batch.targets.reshape(-1))
    assert ref_logp is not None
    return kl_divergence(ref_logp, logits)


def check_targets(model: LoadedModel, data: Dataset) -> None:
    if data.targets is None:
        return
    with torch.no_grad():
        logits = logits_of(model.call(data.slice(0, 1)))
    classes = logits.shape[-1]
    per_sample = logits[0].numel() // classes
    if data.targets[0].numel() != per_sample:
        raise DataError(
            f"targets have {data.targets[0].numel()} label(s) per sample but the model gives {per_sample}",
            f"targets should have shape (N,) + {tuple(logits.shape[1:-1])}",
        )
    lo, hi = int(data.targets.min()), int(data.targets.max())
    if lo < 0 or hi >= classes:
        raise DataError(f"targets range over [{lo}, {hi}] but the model has {classes} classes", f"use ids 0..{classes - 1}")


@dataclass
class Reference:
    """Full-precision outputs on a data set, computed once and reused for every plan."""

    data: Dataset
    batch_size: int
    logp: list[torch.Tensor]

    @classmethod
    @torch.no_grad()
    def compute(cls, model: LoadedModel, data: Dataset, batch_size: int) -> Reference:
        logp = [F.log_softmax(flat(logits_of(model.call(b))), -1) for b in data.batches(batch_size)]
        return cls(data, batch_size, logp)


@torch.no_grad()
def measure(model: LoadedModel, ref: Reference, overrides: dict[str, torch.Tensor] | None = None) -> Metrics:
    """Loss, KL to full precision, top-1 agreement and accuracy of the model with ``overrides``."""
    n_pos = 0
    loss_sum = kl_sum = agree = correct = 0.0
    for batch, ref_logp in zip(ref.data.batches(ref.batch_size), ref.logp):
        logits = flat(logits_of(model.call(batch, overrides)))
        logp = F.log_softmax(logits, -1)
        positions = logp.shape[0]
        kl_sum += float((ref_logp.exp() * (ref_logp - logp)).sum(-1).sum())
        pred = logp.argmax(-1)
        agree += float((pred == ref_logp.argmax(-1)).sum())
        if batch.targets is not None:
            targets = batch.targets.reshape(-1)
            loss_sum += float(F.cross_entropy(logits, targets, reduction="sum"))
            correct += float((pred == targets).sum())
        n_pos += positions
    kl = kl_sum / n_pos
    has_targets = ref.data.targets is not None
    return Metrics(
        loss=loss_sum / n_pos if has_targets else kl,
        kl=kl,
        top1_agreement=agree / n_pos,
        accuracy=correct / n_pos if has_targets else None,
    )


@torch.no_grad()
def calibrate_activations(model: LoadedModel, data: Dataset, batch_size: int, limit: int = 512) -> None:
    """Record each layer input's range on up to ``limit`` samples at full precision."""
    probes = [p for layer in model.layers for p in layer.probes]
    for p in probes:
        p.act_range, p.observe, p.a_bits = None, True, 16
    try:
        for batch in data.batches(batch_size, limit):
            model.call(batch)
    finally:
        for p in probes:
            p.observe = False


@torch.no_grad()
def measure_macs(model: LoadedModel, batch: Batch) -> dict[str, int]:
    """Multiply-accumulates per sample of every layer, measured on one real batch."""
    probes = [p for layer in model.layers for p in layer.probes]
    for p in probes:
        p.macs_total, p.count_macs = 0, True
    try:
        model.call(batch)
    finally:
        for p in probes:
            p.count_macs = False
    return {layer.name: sum(p.macs_total for p in layer.probes) // batch.size for layer in model.layers}


def set_activation_bits(model: LoadedModel, bits: dict[str, int]) -> None:
    for layer in model.layers:
        for p in layer.probes:
            p.a_bits = bits.get(layer.name, 16)
