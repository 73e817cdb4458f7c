"""Hessian-vector products of the calibration loss with respect to the
quantizable weights, for every second-order method.

Products are exact (double backward) when the model allows it. Fused
scaled-dot-product attention has no double backward; it is swapped for its math
form (the same function) while the oracle is open. A double backward that fails
under a bfloat16/float16 compute dtype on mismatched gradient types (seen on CUDA:
"expected input and grad types to match") is redone in float32. Any other op
without a second derivative falls back to central finite differences of
gradients. ``notes`` says which happened.
"""

from __future__ import annotations

import contextlib

import torch

from bitplan.core.data import Batch
from bitplan.core.device import accumulator, float32_compute
from bitplan.core.graph import replace_sdpa_with_math, restore_sdpa
from bitplan.core.sensitivity import SensitivityContext
from bitplan.core.sensitivity.common import loss_of
from bitplan.errors import BitplanError

FD_REL_STEP = 1e-3

MODE_NOTES = {
    "exact": "Hessian-vector products: exact (double backward)",
    "exact_sdpa_math": "Hessian-vector products: exact, with scaled_dot_product_attention in its math form",
    "finite_difference": "Hessian-vector products: central finite differences of gradients",
    "forward_difference": "Hessian-vector products: forward differences of gradients on the model's own (fused) "
                          "kernels, (g(w + e.v) - g(w)) / e, one gradient per probe plus one per batch that the "
                          "probes share",
}


class NoDoubleBackward(Exception):
    pass


class NoLowPrecisionDoubleBackward(Exception):
    pass


def float32_redo(model, exc: RuntimeError) -> str | None:
    """Why a failed double backward is worth redoing in float32 (the start of the note to give), or None when float32
    cannot help: a backward op that met gradients of another dtype than its inputs, what autocast's mixed graph gives
    some double-backward kernels (seen on CUDA: "expected input and grad types to match"), under a low compute
    dtype. The weight products (HessianOracle) and the activation traces (hessian_trace) both redo this way."""
    if "types to match" not in str(exc) or model.compute_dtype == torch.float32:
        return None
    dtype = str(model.compute_dtype).removeprefix("torch.")
    return f"double backward under {dtype} compute failed ({str(exc).splitlines()[0]})"


def is_missing_derivative(exc: RuntimeError) -> bool:
    text = str(exc)
    return ("derivative for" in text and "not implemented" in text) or "double backward" in text.lower()


def has_sdpa(gm) -> bool:
    return any(n.op == "call_function" and n.target is torch.ops.aten.scaled_dot_product_attention.default
               for n in gm.graph.nodes)


class HessianOracle(contextlib.AbstractContextManager):
    """H v for the mean loss over ``batches``; use as a context manager (restores the graph)."""

    def __init__(self, ctx: SensitivityContext, batches: list[Batch], refs: list, weights: dict[str, torch.Tensor],
                 requested: str = "auto") -> None:
        self.ctx, self.batches, self.refs, self.weights = ctx, batches, refs, weights
        self.requested = requested
        self.mode = requested if requested in ("finite_difference", "forward_difference") else "exact"
        if requested == "auto" and _on_cuda(weights) and has_sdpa(ctx.model.gm):
            # fused attention has no double backward, and its math form costs 2-3x a gradient per probe on a GPU:
            # forward differences keep the fused kernels at about one gradient per probe
            self.mode = "forward_difference"
        self.fallbacks: list[str] = []
        self.n_samples = sum(b.size for b in batches)
        self.batched: bool | None = None  # whether vmapped (is_grads_batched) products work on this model
        self.exact_float32 = False  # exact products computed with autocast off (the compute dtype's failed)
        self._stack = contextlib.ExitStack()

    def __exit__(self, *exc) -> None:
        self._stack.close()

    @property
    def notes(self) -> list[str]:
        return [MODE_NOTES[self.mode], *self.fallbacks]

    # --- public products -------------------------------------------------------------------------

    def joint(self, probes: list[dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
        """(H v) restricted to every weight, for probes v spanning all weights."""
        return self._retry(lambda: self._accumulate(probes, block=False))

    def blocks(self, requests: list[tuple[str, torch.Tensor]]) -> list[torch.Tensor]:
        """H_kk v for each (weight key k, v): the diagonal block of one layer times v."""
        probes = [{key: v} for key, v in requests]
        out = self._retry(lambda: self._accumulate(probes, block=True))
        return [o[key] for o, (key, _) in zip(out, requests)]

    def settle(self, keys: list[str]) -> None:
        """Fall back now exactly as block products over ``keys`` would, at the cost of one batch.

        A block product meets an op without a second derivative only when the op lies on that
        layer's path, so a subset of the layers could stay exact where a run over all of them fell
        back; settling on every layer first makes a layer shard compute the way the full run does.
        """
        if not self.batches:
            return
        probes = [{k: torch.ones_like(self.weights[k])} for k in keys]
        batch, ref = self.batches[0], self.refs[0]
        self._retry(lambda: None if self.mode in ("finite_difference", "forward_difference")
                    else self._exact(batch, ref, probes, block=True))

    # --- machinery -------------------------------------------------------------------------------

    def _retry(self, compute):
        while True:
            try:
                return compute()
            except NoDoubleBackward as exc:
                self._fall_back(str(exc))
            except NoLowPrecisionDoubleBackward as exc:
                self.exact_float32 = True
                self.fallbacks.append(f"{exc}; the exact products are computed in float32 (autocast off)")

    def _fall_back(self, reason: str) -> None:
        gm = self.ctx.model.gm
        if self.mode == "exact" and has_sdpa(gm):
            count = replace_sdpa_with_math(gm)
            self._stack.callback(restore_sdpa, gm)
            self.mode = "exact_sdpa_math"
            self.fallbacks.append(f"double backward failed ({reason}); {count} scaled_dot_product_attention "
                                  "node(s) computed in their math form while tracing the Hessian")
            return
        if self.requested == "exact":
            raise BitplanError(f"exact Hessian-vector products are impossible for this model: {reason}",
                               "use hvp=auto or hvp=finite_difference")
        self.mode = "finite_difference"
        self.fallbacks.append(f"double backward failed ({reason}); fell back to finite differences")

    def _accumulate(self, probes, block: bool):
        total = [{k: accumulator(self.weights[k]) for k in p} if block else
                 {k: accumulator(w) for k, w in self.weights.items()} for p in probes]
        for batch, ref in zip(self.batches, self.refs):
            if self.mode == "finite_difference":
                part = self._fd(batch, ref, probes, block)
            elif self.mode == "forward_difference":
                part = self._forward(batch, ref, probes, block)
            else:
                part = self._exact(batch, ref, probes, block)
            for acc, hv in zip(total, part):
                for k in acc:
                    acc[k] += hv[k] * (batch.size / self.n_samples)
        return total

    def _exact(self, batch, ref, probes, block):
        if self.exact_float32:
            with float32_compute(self.ctx.model):
                return self._exact_products(batch, ref, probes, block)
        try:
            return self._exact_products(batch, ref, probes, block)
        except RuntimeError as exc:
            reason = float32_redo(self.ctx.model, exc)
            if reason is not None:
                raise NoLowPrecisionDoubleBackward(reason) from None
            raise

    def _exact_products(self, batch, ref, probes, block):
        params = {k: w.clone().requires_grad_(True) for k, w in self.weights.items()}
        keys = list(params)
        loss = loss_of(self.ctx, batch, ref, params)
        try:
            grads = dict(zip(keys, torch.autograd.grad(loss, [params[k] for k in keys], create_graph=True,
                                                       allow_unused=True)))
            if not block and len(probes) > 1 and self.batched is not False:
                out = self._batched(grads, params, probes, keys)
                if out is not None:
                    return out
            out = []
            for v in probes:
                live = [k for k in v if grads[k] is not None and grads[k].requires_grad]
                hv = torch.autograd.grad([grads[k] for k in live], [params[k] for k in live],
                                         grad_outputs=[v[k] for k in live], retain_graph=True, allow_unused=True) \
                    if live else []
                row = {k: torch.zeros_like(self.weights[k]) for k in (v if block else keys)}
                for k, h in zip(live, hv):
                    if h is not None and k in row:
                        row[k] = h.detach()
                out.append(row)
            return out
        except RuntimeError as exc:
            if is_missing_derivative(exc):
                raise NoDoubleBackward(str(exc).splitlines()[0]) from None
            raise

    def _batched(self, grads, params, probes, keys):
        """All probes' products in one vmapped backward pass; None where vmap cannot run the graph."""
        live = [k for k in keys if grads[k] is not None and grads[k].requires_grad]
        try:
            hv = torch.autograd.grad([grads[k] for k in live], [params[k] for k in live],
                                     grad_outputs=[torch.stack([v[k] for v in probes]) for k in live],
                                     retain_graph=True, allow_unused=True, is_grads_batched=True)
        except RuntimeError as exc:
            if is_missing_derivative(exc) or float32_redo(self.ctx.model, exc) is not None:
                raise
            self.batched = False
            return None
        self.batched = True
        out = [{k: torch.zeros_like(self.weights[k]) for k in keys} for _ in probes]
        for k, h in zip(live, hv):
            if h is not None:
                for i, row in enumerate(out):
                    row[k] = h[i].detach()
        return out

    def _grad(self, batch, ref, weights) -> dict[str, torch.Tensor]:
        leaves = {k: w.detach().requires_grad_(True) for k, w in weights.items()}
        loss = loss_of(self.ctx, batch, ref, leaves)
        grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
        return {k: torch.zeros_like(p) if g is None else g for (k, p), g in zip(leaves.items(), grads)}

    def _fd(self, batch, ref, probes, block):
        """(g(w + e.v) - g(w - e.v)) / 2e per weight, with a step e_k relative to each weight's scale.

        In float32 whatever the compute dtype: a gradient difference at a relative step of 1e-3 is below
        bfloat16's resolution."""
        steps = {k: FD_REL_STEP * float(w.pow(2).mean().sqrt().clamp_min(1e-8)) for k, w in self.weights.items()}
        out = []
        with float32_compute(self.ctx.model):
            for v in probes:
                plus = self._grad(batch, ref, {k: w + steps[k] * v[k] if k in v else w for k, w in self.weights.items()})
                minus = self._grad(batch, ref, {k: w - steps[k] * v[k] if k in v else w for k, w in self.weights.items()})
                keys = v if block else self.weights
                out.append({k: (plus[k] - minus[k]) / (2 * steps[k]) for k in keys})
        return out

    def _forward(self, batch, ref, probes, block):
        """(g(w + e.v) - g(w)) / e per weight: the gradient at w is computed once per batch and shared by every
        probe, so k probes cost k + 1 gradients (central differences cost 2k), on whatever kernels the model
        runs (fused attention included). First-order accurate in e, the same relative step as central
        differences; in float32 whatever the compute dtype."""
        steps = {k: FD_REL_STEP * float(w.pow(2).mean().sqrt().clamp_min(1e-8)) for k, w in self.weights.items()}
        out = []
        with float32_compute(self.ctx.model):
            base = self._grad(batch, ref, self.weights)
            for v in probes:
                plus = self._grad(batch, ref, {k: w + steps[k] * v[k] if k in v else w for k, w in self.weights.items()})
                keys = v if block else self.weights
                out.append({k: (plus[k] - base[k]) / steps[k] for k in keys})
        return out


def _on_cuda(weights: dict[str, torch.Tensor]) -> bool:
    return any(w.device.type == "cuda" for w in weights.values())
