"""What the sensitivity methods share: calibration batches, the loss they
differentiate, and the table they return."""

from __future__ import annotations

import time
from dataclasses import replace

import torch
import torch.nn.functional as F

from bitplan.core.data import Batch
from bitplan.core.evaluate import batch_loss, flat, logits_of
from bitplan.core.sensitivity import SensitivityContext
from bitplan.schemas import SensitivityLayer, SensitivityTable


def calibration_batches(ctx: SensitivityContext, batch_size: int, max_samples: int, use_kl: bool = False) -> list[Batch]:
    """Micro-batches of at most ``max_samples`` calibration samples (targets dropped when ``use_kl``); on a GPU
    at most ``model.max_batch`` samples each, what fits its free memory (bitplan.core.device)."""
    cap = ctx.model.max_batch
    batches = list(ctx.data.batches(batch_size if cap is None else max(1, min(batch_size, cap)), max_samples))
    return [replace(b, targets=None) for b in batches] if use_kl else batches


def reference_logp(ctx: SensitivityContext, batches: list[Batch]) -> list[torch.Tensor | None]:
    """Full-precision log-probabilities, the KL target for batches without labels."""
    with torch.no_grad():
        return [None if b.targets is not None else F.log_softmax(flat(logits_of(ctx.model.call(b))), -1) for b in batches]


def loss_of(ctx: SensitivityContext, batch: Batch, ref, overrides: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """Cross-entropy on the batch's targets, else KL(full precision || model)."""
    return batch_loss(logits_of(ctx.model.call(batch, overrides)), batch, ref)


def loss_name(batches: list[Batch]) -> str:
    return "cross-entropy on the targets" if batches and batches[0].targets is not None else "KL(full precision || model)"


def weights_of(ctx: SensitivityContext) -> dict[str, torch.Tensor]:
    return {layer.weight_key: ctx.bank.weights[layer.weight_key] for layer in ctx.model.layers}


class Clock:
    def __init__(self) -> None:
        self.start = time.perf_counter()

    def seconds(self) -> float:
        return time.perf_counter() - self.start


def table(method: str, params, ctx: SensitivityContext, clock: Clock, stats: dict[str, float],
          omega: dict[str, dict], notes: list[str], detail: dict[str, dict[str, float]] | None = None,
          omega_act: dict[str, dict[int, float]] | None = None) -> SensitivityTable:
    """The method's table over the layers it scored (every layer, or the shard in ``ctx.only``), in model order."""
    layers = [
        SensitivityLayer(name=g.name, stat=stats[g.name],
                         omega={b: v for b, v in omega[g.name].items() if not isinstance(b, str)},
                         omega_format={b: v for b, v in omega[g.name].items() if isinstance(b, str)},
                         omega_act=(omega_act or {}).get(g.name, {}), detail=(detail or {}).get(g.name, {}))
        for g in ctx.scored_layers()
    ]
    return SensitivityTable(method=method, params=params.model_dump() | {"seed": ctx.seed}, seconds=clock.seconds(),
                            layers=layers, notes=notes)
