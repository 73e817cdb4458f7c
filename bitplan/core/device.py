"""Devices and compute dtypes: the one place a run's torch device is chosen, and how large its micro-batches
may be on a GPU.

**Device** (``PlanRequest.device``, ``--device``, a job's ``device``): ``auto`` is ``cuda`` (torch's current
CUDA device) when ``torch.cuda.is_available()``, else ``cpu``; ``cpu``; ``cuda``; ``cuda:N``. Asking for a GPU
that is not there is a :class:`~bitplan.errors.BitplanError` on the field ``device`` (code
``device_unavailable``), never a fallback to the CPU: a run asked to be fast must not silently be slow.

**Dtype** (``dtype``): the *compute* dtype. ``float32`` (default) runs everything in float32, bit for bit as
before devices existed. ``bfloat16`` / ``float16`` run the model's forward under ``torch.autocast``: matmuls,
linear layers, convolutions and attention compute in the half format (tensor cores on a GPU), while

* the stored weights stay float32: Q_b(W), ||Q_b(W) - W||^2 and every Hessian-vector product are taken
  with respect to the float32 weights, so the quantization error is not mixed with bfloat16 rounding;
* logits are upcast (``evaluate.flat``) before log-softmax, KL and cross-entropy, and every sum a
  sensitivity method keeps (traces, Fisher diagonals, relevance) accumulates in float32 or float64;
* finite-difference Hessian products switch autocast off (:func:`float32_compute`): a gradient difference
  at a relative step of 1e-3 is below bfloat16's resolution (2^-8) and would be all rounding.

bfloat16 is allowed on the CPU (torch's CPU autocast supports it; it is correct, and fast only on CPUs with
AVX512-BF16/AMX). float16 is refused on the CPU: several CPU kernels have no float16 form or are far slower
than float32, and float16's range needs the loss scaling a GPU run does not do either; use bfloat16 there.

**Micro-batches on a GPU** (:func:`micro_batch_cap`): the largest batch that fits is

    cap = floor(HEADROOM x free / per_sample)

with ``free`` from ``torch.cuda.mem_get_info`` once the model and data are on the device, and ``per_sample``
the peak allocation growth per sample of the heaviest thing a method does with a batch: one exact
Hessian-vector product (forward, backward with ``create_graph``, second backward), with scaled-dot-product
attention in its math form as the Hessian fallback runs it, measured on ``PROBE_SAMPLES`` samples (where the
model has no double backward, a forward + backward x BACKWARD_FACTOR). HEADROOM = 0.8 leaves room for the
allocator's fragmentation and cuBLAS workspaces. Every batch size (the request's ``batch_size`` and each
method's ``batch_size``) is capped by it, which is conservative for forward-only work (evaluation,
``perturbation``); on the CPU batch sizes are used as given.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from bitplan.errors import BitplanError

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
#: share of the free GPU memory the micro-batches may take
HEADROOM = 0.8
#: where the second backward cannot be measured (no double backward), it may hold about as much again as the first
BACKWARD_FACTOR = 2.0
#: samples in the batch whose memory is measured
PROBE_SAMPLES = 2


@dataclass(frozen=True)
class Placement:
    """Where a run computes and in which dtype."""

    device: torch.device
    dtype: torch.dtype = torch.float32

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

    def describe(self) -> str:
        """For the plan's notes: 'cuda:0 (NVIDIA H200), compute dtype bfloat16 (autocast; weights kept float32)'."""
        where = str(self.device)
        if self.is_cuda:
            where += f" ({torch.cuda.get_device_name(self.device)})"
        dtype = str(self.dtype).removeprefix("torch.")
        how = " (autocast; weights, losses and sensitivity sums kept float32)" if self.dtype != torch.float32 else ""
        return f"ran on {where}, compute dtype {dtype}{how}"


def resolve_device(name: str = "auto") -> torch.device:
    """``auto``/``cpu``/``cuda``/``cuda:N`` as a torch device of this machine, or a BitplanError saying what is missing."""
    from bitplan.schemas import check_device

    try:
        name = check_device(name)
    except ValueError as exc:
        raise BitplanError(str(exc), "use auto, cpu, cuda or cuda:N", field="device") from None
    if name == "cpu":
        return torch.device("cpu")
    available = torch.cuda.is_available()
    if name == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if available else torch.device("cpu")
    if not available:
        build = "this torch is a CPU build" if torch.version.cuda is None else "torch sees no CUDA device"
        raise BitplanError(f"device {name} was asked for, but {build}",
                           "use device auto or cpu, or run on a machine (or worker) with an NVIDIA GPU and a CUDA "
                           "build of torch", field="device", code="device_unavailable")
    count = torch.cuda.device_count()
    index = torch.cuda.current_device() if name == "cuda" else int(name.partition(":")[2])
    if index >= count:
        raise BitplanError(f"device {name} was asked for, but this machine has {count} CUDA device(s) "
                           f"(cuda:0 to cuda:{count - 1})", "use cuda (the current device) or a smaller index",
                           field="device", code="device_unavailable")
    return torch.device("cuda", index)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name not in DTYPES:
        raise BitplanError(f"dtype '{name}' is not one of {', '.join(DTYPES)}", field="dtype")
    if name == "float16" and device.type == "cpu":
        raise BitplanError("dtype float16 needs a GPU: on the CPU several kernels have no float16 form or run far "
                           "slower than float32", "use dtype bfloat16 (or float32) on the CPU, or device cuda",
                           field="dtype")
    return DTYPES[name]


def resolve(device: str = "auto", dtype: str = "float32") -> Placement:
    where = resolve_device(device)
    return Placement(where, resolve_dtype(dtype, where))


@contextmanager
def float32_compute(model) -> Iterator[None]:
    """Autocast off for ``model`` (a LoadedModel) inside the block: what finite-difference products need."""
    saved = model.compute_dtype
    model.compute_dtype = torch.float32
    try:
        yield
    finally:
        model.compute_dtype = saved


def accumulator(like: torch.Tensor) -> torch.Tensor:
    """Zeros shaped like ``like`` in at least float32: what a sum over batches or probes is kept in."""
    return torch.zeros_like(like, dtype=torch.promote_types(like.dtype, torch.float32))


# --- micro-batches from free GPU memory ---------------------------------------------------------------


def fit_batch_size(requested: int, free_bytes: float, per_sample_bytes: float, headroom: float = HEADROOM) -> int:
    """The largest batch size, at most ``requested`` and at least 1, whose estimated memory (``per_sample_bytes``
    per sample) fits in ``headroom`` of ``free_bytes``."""
    if per_sample_bytes <= 0:
        return requested
    fits = int(headroom * max(free_bytes, 0.0) // per_sample_bytes)
    return max(1, min(requested, fits))


def per_sample_bytes(model, data, samples: int = PROBE_SAMPLES) -> float:
    """Peak CUDA allocation growth per sample of one exact Hessian-vector product w.r.t. the quantizable weights,
    attention in its math form, on the first ``samples`` samples of ``data`` (a forward + backward x
    BACKWARD_FACTOR where the model has no double backward)."""
    from bitplan.core.evaluate import flat, logits_of
    from bitplan.core.graph import replace_sdpa_with_math, restore_sdpa

    device = model.device
    n = max(1, min(samples, len(data)))
    batch = data.slice(0, n)
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    leaves = {g.weight_key: model.weight(g).detach().requires_grad_(True) for g in model.layers}
    factor = 1.0
    swapped = replace_sdpa_with_math(model.gm)
    try:
        with torch.enable_grad():
            loss = flat(logits_of(model.call(batch, leaves))).logsumexp(-1).mean()
            try:
                grads = torch.autograd.grad(loss, list(leaves.values()), create_graph=True, allow_unused=True)
                live = [(w, g) for w, g in zip(leaves.values(), grads) if g is not None and g.requires_grad]
                if live:
                    torch.autograd.grad([g for _, g in live], [w for w, _ in live], [torch.ones_like(g) for _, g in live],
                                        allow_unused=True)
            except RuntimeError:  # no double backward: a plain backward, and room for as much again
                factor = BACKWARD_FACTOR
                loss = flat(logits_of(model.call(batch, leaves))).logsumexp(-1).mean()
                torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
    finally:
        if swapped:
            restore_sdpa(model.gm)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    del leaves
    torch.cuda.empty_cache()
    return factor * max(peak - base, 1) / n


def micro_batch_cap(model, data, measure: Callable[..., float] = per_sample_bytes,
                    free: Callable[[torch.device], tuple[int, int]] | None = None,
                    requested: int = 1 << 30) -> tuple[int | None, str | None]:
    """(cap, note) for a model on a GPU; (None, None) on the CPU, where batch sizes are used as given.
    ``measure`` and ``free`` (torch.cuda.mem_get_info) are parameters so the rule can be tested without a GPU."""
    if model.device.type != "cuda":
        return None, None
    per_sample = measure(model, data)
    free_bytes, total = (free or torch.cuda.mem_get_info)(model.device)
    cap = fit_batch_size(requested, free_bytes, per_sample)
    note = (f"micro-batches at most {cap} samples on {model.device}: {free_bytes / 2**30:.1f} of {total / 2**30:.1f} "
            f"GiB free, {per_sample / 2**20:.1f} MiB per sample for an exact Hessian-vector product (attention in "
            f"its math form), {HEADROOM:.0%} of the free memory")
    return cap, note
