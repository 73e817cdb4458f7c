"""``bitplan apply``: a plan made real, measured against what it predicted.

A plan of a Hugging Face checkpoint becomes a compressed-tensors checkpoint (``pack-quantized``: the integers packed
into int32 words, one fp32 scale per output channel), which vLLM serves and transformers loads. Its weights are
bitplan's own quantized weights, bit for bit: each planned layer's weight is replaced by Q_b(W) (the same clipping
the plan was measured with) and its scale by the one Q_b used, so compressed-tensors' integers are exactly
Q_b(W) / scale, never re-rounded with another range. Loading the checkpoint back therefore computes what the plan's
measured figures measured (tests/unit/test_apply.py checks the logits).

Layers in a number format (bitplan.formats) are stored in compressed-tensors' format for it (``CT_STORAGE``:
float-quantized fp8, mxfp8/mxfp4, nvfp4; the checkpoint is then "mixed-precision"), their elements and scales those
of ``quantize.format_scales``, whose scale conventions are compressed-tensors' own.

The report puts the real file size beside the plan's prediction, and the same prediction counted the way the file
stores it: each row's integers packed bit after bit into int32 words (a row ends on a word), an fp32 scale per
row, and each layer's shape; the rest is the safetensors header. With
``latency=True`` it also times a forward pass on this machine's CPU at full precision and with the plan applied by
torchao (``bitplan export --to torchao``), median of several runs.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bitplan.errors import BitplanError, ExportError
from bitplan.exports import CT_STORAGE, FULL_PRECISION, export_plan
from bitplan.formats import FORMATS, size_bytes
from bitplan.schemas import PlanFile

SHAPE_BYTES = 16  # weight_shape: two int64


@dataclass
class ApplyReport:
    out: Path
    predicted_bytes: float
    real_bytes: int
    #: the same prediction counted the way the checkpoint stores it (words, not bits; the shape tensors)
    container_bytes: float
    layers: int
    latency_ms: dict[str, float] | None = None
    notes: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        diff = 100 * (self.real_bytes / self.predicted_bytes - 1) if self.predicted_bytes else 0.0
        out = [f"wrote a compressed-tensors checkpoint ({self.layers} layers quantized) to {self.out}",
               f"size: real {self.real_bytes:,} bytes, plan predicted {self.predicted_bytes:,.0f} ({diff:+.2f} %); "
               f"counted as stored (packed elements, scales, shape tensors) {self.container_bytes:,.0f} "
               f"({100 * (self.real_bytes / self.container_bytes - 1):+.2f} %: the safetensors header)"]
        if self.latency_ms:
            fp, q = self.latency_ms["full_precision"], self.latency_ms["torchao"]
            out.append(f"CPU latency per forward ({self.latency_ms['tokens']:.0f} tokens, {torch.get_num_threads()} "
                       f"threads, median): full precision {fp:.2f} ms, torchao {q:.2f} ms ({q / fp:.2f}x)")
        out += [f"note: {n}" for n in self.notes]
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"out": str(self.out), "predicted_bytes": self.predicted_bytes, "real_bytes": self.real_bytes,
                "container_bytes": self.container_bytes, "layers": self.layers, "latency_ms": self.latency_ms,
                "notes": self.notes}


def weight_scale(weight: torch.Tensor, bits: int, clip: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(Q_b(W), the per-output-channel scale Q_b used): Q_b(W) = k * scale with integers |k| <= 2^(b-1) - 1."""
    from bitplan.core.quant import quantize_weight

    q = quantize_weight(weight, bits, clip).float()
    qmax = 2 ** (bits - 1) - 1
    rows = q.reshape(q.shape[0], -1)
    # the largest |k| of a row is qmax (the row's largest weight is clipped or rounded to it), so its scale is
    # max |Q_b(W)| / qmax; an all-zero row keeps a tiny one
    scale = (rows.abs().amax(dim=1, keepdim=True) / qmax).clamp_min(1e-12)
    return q.reshape(weight.shape), scale


def apply_plan(plan: PlanFile, model_path: str | Path, out: str | Path, latency: bool = False,
               clip: str = "mse") -> ApplyReport:
    """Write the compressed-tensors checkpoint of ``plan`` applied to the checkpoint at ``model_path`` into ``out``
    (a new directory; written beside it and renamed into place, so a failure leaves nothing)."""
    from bitplan.archives.hf import TOKENIZER, check_checkpoint

    if plan.model.format != "hf":
        raise ExportError(f"bitplan apply writes compressed-tensors checkpoints of Hugging Face checkpoints; this "
                          f"plan is of a {plan.model.format} model",
                          "write the plan for your runtime with bitplan export --to torchao|modelopt")
    out = Path(out)
    if out.exists():
        raise BitplanError(f"{out} already exists", "give a new directory for the checkpoint", field="out")
    checked = check_checkpoint(model_path)
    if checked.sha256 != plan.model.sha256:
        raise BitplanError(f"the plan was made for another model (sha256 {plan.model.sha256[:12]}..., this checkpoint "
                           f"is {checked.sha256[:12]}...)", "apply the plan to the checkpoint it was made for",
                           field="model")
    formats = sorted({layer.w_format for layer in plan.layers if layer.w_format not in CT_STORAGE})
    if formats:
        raise BitplanError(f"the plan gives layers number formats compressed-tensors does not store "
                           f"({', '.join(formats)}); bitplan apply writes INT, "
                           + ", ".join(f for f in CT_STORAGE if f != "int"),
                           "plan with formats a runtime runs (e.g. --target vllm), or without --formats", field="plan")
    notes: list[str] = []
    if plan.units is not None and plan.units.kept == "mixed":
        notes.append(f"the plan's per-unit bits ({plan.units.granularity}) are not applied: compressed-tensors takes "
                     "one width per layer, so each layer gets its layer width, as in the plan's layers")
    if any(layer.a_bits < FULL_PRECISION for layer in plan.layers):
        notes.append("activation widths are not applied: the plan file holds no calibrated activation ranges "
                     "(the checkpoint quantizes weights only)")
    model, tmp = _load_module(checked)
    try:
        modules = dict(model.named_modules())
        missing = [layer.name for layer in plan.layers if layer.name not in modules]
        if missing:
            raise BitplanError(f"the plan names layers this checkpoint does not have: {', '.join(missing[:5])}",
                               "apply the plan to the checkpoint it was made for", field="model")
        partial = [layer for layer in plan.layers if layer.w_format in ("mxfp8", "mxfp4", "nvfp4")
                   and modules[layer.name].weight[0].numel() % (FORMATS[layer.w_format].block or 1)]
        if partial:  # compressed-tensors' group quantizer and 4-bit packing take whole blocks only
            names = ", ".join(f"{la.name} ({la.w_format}, {modules[la.name].weight[0].numel()} columns)"
                              for la in partial[:5])
            raise BitplanError(f"compressed-tensors stores MX and nvfp4 layers only when their input width is a whole "
                               f"number of blocks (32 for MX, 16 for nvfp4); not {names}",
                               "plan those layers in INT (pin them) or without that format", field="plan")
        untied = _untie(model, plan)
        if untied:
            notes.append(f"{', '.join(untied)} shared its weight with another layer (tied embeddings); the checkpoint "
                         "stores its own quantized copy, as the plan measured it, and unties them in config.json")
        weights_only = plan.model_copy(update={"layers": [layer.model_copy(update={"a_bits": FULL_PRECISION})
                                                          for layer in plan.layers], "units": None})
        config_text = export_plan(weights_only, "compressed-tensors").text
        container, done = _quantize_in_place(model, plan, config_text, clip)
        left = [layer.name for layer in plan.layers if layer.w_bits < FULL_PRECISION and layer.name not in done]
        if left:
            notes.append(f"{len(left)} planned layer(s) left in float: the compressed-tensors config quantizes "
                         f"nn.Linear layers only ({', '.join(left[:5])})")
        replaced = {f"{name}.{p}" for name in done
                    for p in ("weight", "weight_scale", "weight_zero_point", "weight_global_scale")}
        stored = {t.data_ptr(): t.numel() * t.element_size() for name, t in model.state_dict().items()
                  if name not in replaced}  # a tensor tied under two names is stored once
        container += sum(stored.values())
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
        try:
            _save(model, staging)
            if checked.tokenizer:
                shutil.copyfile(tmp / "checkpoint" / TOKENIZER, staging / TOKENIZER)
            os.replace(staging, out)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    real = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    report = ApplyReport(out, plan.cost.size_bytes, real, container, len(done), notes=notes)
    if latency:
        report.latency_ms = measure_latency(checked, plan)
    return report


def _load_module(checked: Any) -> tuple[nn.Module, Path]:
    """The checkpoint as transformers' own module (fp32), and the temporary folder holding the canonical checkpoint
    the checks wrote (``checkpoint/`` inside it; the caller removes it)."""
    from bitplan.archives.hf import write_canonical_checkpoint
    from bitplan.core.hf import compare_with_files, from_canonical, model_class

    config, cls = model_class(checked)
    compare_with_files(checked, config, cls)
    tmp = Path(tempfile.mkdtemp(prefix="bitplan-apply-"))
    try:
        return from_canonical(checked, config, cls, write_canonical_checkpoint(checked, tmp / "checkpoint")), tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _untie(model: nn.Module, plan: PlanFile) -> list[str]:
    """Give each planned layer whose weight is shared (an output head tied to the embeddings) its own copy, as the
    plan measured it (the layer's use quantized, the other use not); returns the layers untied."""
    shared: dict[int, int] = {}
    for _, param in model.named_parameters(remove_duplicate=False):
        shared[id(param)] = shared.get(id(param), 0) + 1
    untied = []
    for layer in plan.layers:
        module = model.get_submodule(layer.name)
        if layer.w_bits < FULL_PRECISION and shared.get(id(module.weight), 0) > 1:
            module.weight = nn.Parameter(module.weight.detach().clone())
            untied.append(layer.name)
    if untied and hasattr(model, "config"):
        model.config.tie_word_embeddings = False
    return untied


def _quantize_in_place(model: nn.Module, plan: PlanFile, config_text: str, clip: str) -> tuple[float, list[str]]:
    """Attach the compressed-tensors schemes, set each planned weight to Q_b(W) (or Q_f(W), a number format) and its
    scales; return the bytes the quantized layers take as stored (their elements, scales and shape tensors) and the
    layers quantized (those the config has a scheme for)."""
    from compressed_tensors.quantization import QuantizationConfig, QuantizationStatus, apply_quantization_config

    from bitplan.core.quant import format_scales

    apply_quantization_config(model, QuantizationConfig.model_validate_json(config_text))
    stored = 0.0
    done = []
    with torch.no_grad():
        for layer in plan.layers:
            module = model.get_submodule(layer.name)
            if layer.w_bits >= FULL_PRECISION or getattr(module, "quantization_scheme", None) is None:
                continue
            done.append(layer.name)
            rows, cols = module.weight.shape[0], module.weight[0].numel()
            if layer.w_format == "int":
                q, scale = weight_scale(module.weight, layer.w_bits, clip)
                # pack-quantized: each row's integers packed bit after bit into int32 words
                stored += rows * 4 * -(-cols * layer.w_bits // 32) + rows * module.weight_scale.element_size() + SHAPE_BYTES
            else:
                q, scale, tensor_scale = format_scales(module.weight, layer.w_format)
                if tensor_scale is not None:
                    module.weight_global_scale.copy_(tensor_scale.to(module.weight_global_scale.dtype))
                # compressed-tensors stores exactly the elements and scales the plan's size counts (whole blocks:
                # apply_plan refuses others; 4-bit elements two to a byte; no shape tensor)
                stored += size_bytes(layer.w_format, rows * cols, rows)
            module.weight.copy_(q.to(module.weight.dtype))
            module.weight_scale.copy_(scale.reshape(module.weight_scale.shape).to(module.weight_scale.dtype))
            if hasattr(module, "weight_zero_point"):
                module.weight_zero_point.zero_()
            module.quantization_scheme.format = CT_STORAGE[layer.w_format]
            module.quantization_status = QuantizationStatus.FROZEN
    return stored, done


def _save(model: nn.Module, dest: Path) -> None:
    from compressed_tensors.compressors import ModelCompressor

    # each module's scheme names its format (pack-quantized for INT): one format, or "mixed-precision"
    compressor = ModelCompressor.from_pretrained_model(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compressor.compress_model(model)
        model.save_pretrained(str(dest), safe_serialization=True)  # type: ignore[operator]
    compressor.update_config(str(dest))
    config = json.loads((dest / "config.json").read_text())
    config.setdefault("quantization_config", {})["bitplan"] = "written by bitplan apply: weights are bitplan's Q_b(W)"
    (dest / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))


def measure_latency(checked: Any, plan: PlanFile, tokens: int = 128, runs: int = 7) -> dict[str, float]:
    """Median CPU milliseconds of one forward pass over ``tokens`` tokens: full precision, then with the plan applied
    by torchao's quantize_ (the torchao export's configs)."""
    from torchao.core.config import config_from_dict
    from torchao.quantization import quantize_

    model, tmp = _load_module(checked)
    shutil.rmtree(tmp, ignore_errors=True)
    vocab = int(getattr(model.config, "vocab_size", 2))
    ids = torch.randint(0, vocab, (1, tokens), generator=torch.Generator().manual_seed(0))

    def median_ms() -> float:
        times = []
        with torch.inference_mode():
            model(input_ids=ids, use_cache=False)  # warm-up
            for _ in range(runs):
                start = time.perf_counter()
                model(input_ids=ids, use_cache=False)
                times.append(1000 * (time.perf_counter() - start))
        return sorted(times)[len(times) // 2]

    fp = median_ms()
    try:
        config = config_from_dict(json.loads(export_plan(plan, "torchao").text))
    except ExportError:
        return {"tokens": float(tokens), "full_precision": fp, "torchao": fp}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize_(model, config, filter_fn=None)
    return {"tokens": float(tokens), "full_precision": fp, "torchao": median_ms()}
