"""A plan as the file a deployment runtime reads (torch-free: the API serves these from its own process).

==================  ==========================================================================================
torchao             ``FqnToConfig`` in torchao's JSON form (``torchao.core.config.config_from_dict``), for
                    ``quantize_(model, config, filter_fn=None)``: IntxWeightOnlyConfig per Linear layer, or
                    Int8DynamicActivationIntxWeightConfig where the plan quantizes its input to 8 bits
compressed-tensors  a checkpoint's ``quantization_config`` (vLLM; llm-compressor takes its ``config_groups`` and
                    ``ignore`` as a QuantizationModifier recipe): one config group per (weight, input) width,
                    the layers named exactly
gguf                a ``llama-quantize --tensor-type-file``: one ``^tensor$=type`` line per planned tensor, in
                    the names llama.cpp's converter writes (gguf's own tensor map, by the config's model_type)
modelopt            a ModelOpt quantization config, YAML (``mtq.quantize(model, config, forward_loop)``): every
                    quantizer off, then each planned layer's weight (and input) quantizer by name
==================  ==========================================================================================

Each export carries the widths the plan measured: symmetric integer weights per output channel (or per group of
input columns when the plan was solved at ``group:N``), activations per tensor, and the number formats a layer was
given (bitplan.formats) where the runtime has them:

==============  =========================  ===============================  ==================  ======================
format          torchao                    compressed-tensors               gguf                modelopt
==============  =========================  ===============================  ==================  ======================
fp8_e4m3        Float8WeightOnlyConfig     float 8 per channel              q8_0 (nearest)      (4, 3) per channel
fp8_e5m2        --                         --                               q8_0 (nearest)      --
mxfp8           --                         MXFP8A16's weights               q8_0 (nearest)      (4, 3), E8M0 per 32
mxfp4           --                         MXFP4A16's weights               mxfp4               (2, 1), E8M0 per 32
nvfp4           --                         NVFP4A16's weights               nvfp4               (2, 1), E4M3 per 16
nf4             --                         --                               q4_K (nearest)      --
==============  =========================  ===============================  ==================  ======================

"--" leaves the layer in float, and says so. What a runtime cannot express is said in the export's notes and in
its per-layer descriptions, never rounded silently.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Any

from bitplan.errors import ExportError
from bitplan.schemas import PlanFile, PlanLayer

FULL_PRECISION = 16
FORMATS: dict[str, str] = {
    "torchao": "torchao FqnToConfig JSON for quantize_ (Linear layers)",
    "compressed-tensors": "compressed-tensors quantization_config (vLLM, llm-compressor)",
    "gguf": "llama-quantize --tensor-type-file (llama.cpp GGUF; Hugging Face decoder checkpoints)",
    "modelopt": "NVIDIA ModelOpt quantization config for mtq.quantize (Linear and conv layers)",
}
EXPORT_HINT = "bitplan export PLAN --to " + "|".join(FORMATS)
#: torchao's config versions this writes (torchao 0.18); config_from_dict warns if its own differ.
TORCHAO_VERSIONS = {"FqnToConfig": 1, "IntxWeightOnlyConfig": 2, "Int8DynamicActivationIntxWeightConfig": 2,
                    "Float8WeightOnlyConfig": 2}
#: llama.cpp types by weight bits (the K-quants; 7 bits has no type and takes q8_0), and their bits per weight
#: with the block scales (ggml's block sizes: 32 for q8_0, 256 for the K-quants).
GGML_TYPES = {2: "q2_K", 3: "q3_K", 4: "q4_K", 5: "q5_K", 6: "q6_K", 7: "q8_0", 8: "q8_0", FULL_PRECISION: "f16"}
GGML_BPW = {"q2_K": 2.625, "q3_K": 3.4375, "q4_K": 4.5, "q5_K": 5.5, "q6_K": 6.5625, "q8_0": 8.5, "f16": 16.0,
            "mxfp4": 4.25, "nvfp4": 4.5}
#: number formats in GGUF: the same type where ggml has it, else the nearest (said in the notes)
GGML_FORMATS = {"mxfp4": "mxfp4", "nvfp4": "nvfp4", "fp8_e4m3": "q8_0", "fp8_e5m2": "q8_0", "mxfp8": "q8_0",
                "nf4": "q4_K"}
#: compressed-tensors weight arguments per number format (its presets FP8's type, MXFP4A16, MXFP8A16, NVFP4A16)
CT_FORMATS: dict[str, dict[str, Any]] = {
    "fp8_e4m3": {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": False, "strategy": "channel"},
    "mxfp8": {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": False, "strategy": "group",
              "group_size": 32, "scale_dtype": "torch.uint8"},
    "mxfp4": {"num_bits": 4, "type": "float", "symmetric": True, "dynamic": False, "strategy": "group",
              "group_size": 32, "scale_dtype": "torch.uint8"},
    "nvfp4": {"num_bits": 4, "type": "float", "symmetric": True, "dynamic": False, "strategy": "tensor_group",
              "group_size": 16, "scale_dtype": "torch.float8_e4m3fn"},
}
#: the compressed-tensors format ``bitplan apply`` stores each weight choice in (a checkpoint mixing them is
#: "mixed-precision"); fp8_e5m2 and nf4 have none
CT_STORAGE = {"int": "pack-quantized", "fp8_e4m3": "float-quantized", "mxfp8": "mxfp8-quantized",
              "mxfp4": "mxfp4-pack-quantized", "nvfp4": "nvfp4-pack-quantized"}
#: ModelOpt weight quantizer configs per number format ((exponent, mantissa) bits; block_sizes as its presets
#: FP8_PER_CHANNEL_PER_TOKEN_CFG, MXFP8/MXFP4/NVFP4_DEFAULT_CFG write them; ModelOpt 0.47 refuses static E5M2:
#: "Only blockwise dynamic quantization is supported with quantization formats E5M2")
MODELOPT_FORMATS: dict[str, dict[str, Any]] = {
    "fp8_e4m3": {"num_bits": [4, 3], "axis": 0},
    "mxfp8": {"num_bits": [4, 3], "block_sizes": {"-1": 32, "type": "dynamic", "scale_bits": [8, 0]}},
    "mxfp4": {"num_bits": [2, 1], "block_sizes": {"-1": 32, "type": "dynamic", "scale_bits": [8, 0]}},
    "nvfp4": {"num_bits": [2, 1], "block_sizes": {"-1": 16, "type": "dynamic", "scale_bits": [4, 3]}},
}
#: Hugging Face model_type -> llama.cpp architecture, where the two names differ.
GGUF_ARCH_ALIASES = {"mistral": "llama", "mixtral": "llama"}


@dataclass(frozen=True)
class Export:
    format: str
    filename: str
    media_type: str
    text: str
    #: plan layer -> what the runtime is told (e.g. "int4 per channel", "q4_K", "skipped: ...")
    layers: dict[str, str]
    notes: list[str] = field(default_factory=list)
    #: how to use it (one line), for the CLI and the docs
    usage: str = ""


def export_plan(plan: PlanFile | dict[str, Any], to: str, stem: str = "plan") -> Export:
    """Write ``plan`` in runtime format ``to`` (one of FORMATS)."""
    if to not in FORMATS:
        raise ExportError(f"unknown export format '{to}'", f"choose one of: {', '.join(FORMATS)}")
    if not isinstance(plan, PlanFile):
        plan = PlanFile.model_validate(plan)
    notes: list[str] = []
    group = _group_size(plan, notes)
    writer = {"torchao": _torchao, "compressed-tensors": _compressed_tensors, "gguf": _gguf,
              "modelopt": _modelopt}[to]
    export = writer(plan, group, notes, stem)
    export = replace(export, layers={la.name: export.layers[la.name] for la in plan.layers if la.name in export.layers})
    quantized = [layer for layer in plan.layers if layer.w_bits < FULL_PRECISION]
    if quantized:
        notes.append("bitplan measured the plan with its own weight ranges (clipped to the lowest error by default); "
                     "the runtime picks its own (absmax unless told otherwise), so its accuracy can differ slightly "
                     "from the plan's measured figures")
    if any(layer.w_bits == 2 and layer.w_format == "int" for layer in quantized):
        notes.append("bitplan measured 2-bit weights as ternary (-1, 0, +1 times the scale); 2-bit runtime types "
                     "use four levels")
    if not any(not d.startswith(("full precision", "skipped")) for d in export.layers.values()):
        raise ExportError(f"nothing to export to {to}: no layer of this plan is quantized in a way {to} takes "
                          f"({_kinds(plan)})", f"{FORMATS[to]}; try another format")
    return export


def _kinds(plan: PlanFile) -> str:
    counts = Counter(f"{layer.kind} in {layer.w_format}" if layer.w_format != "int" else
                     f"{layer.kind} at {layer.w_bits} bits" for layer in plan.layers)
    return ", ".join(f"{n} {k}" for k, n in counts.most_common())


def _group_size(plan: PlanFile, notes: list[str]) -> int | None:
    units = plan.units
    if units is None:
        return None
    if units.kept == "mixed":
        notes.append(f"the plan's per-unit bits ({units.granularity}) measured better than one width per layer, but "
                     "runtimes take one width per layer: this export gives each layer its layer width "
                     "(the plan's 'layers'), not the per-unit bits")
    if units.granularity.startswith("group:"):
        return int(units.granularity.split(":", 1)[1])
    return None


def _granularity(group: int | None) -> str:
    return f"group {group}" if group else "per channel"


def _act_note(layer: PlanLayer) -> str:
    return "" if layer.a_bits >= FULL_PRECISION else f", a{layer.a_bits}"


# ---------------------------------------------------------------------------------------------- torchao

def _quantized_linear(plan: PlanFile, layers: dict[str, str], skipped: Counter[str], full: str,
                      why_not: str) -> list[PlanLayer]:
    """The plan's quantized Linear layers; describes the others in ``layers`` (16-bit: ``full``; other kinds:
    skipped, ``why_not``) and counts the skipped kinds."""
    out = []
    for layer in plan.layers:
        if layer.w_bits >= FULL_PRECISION:
            layers[layer.name] = full
        elif layer.kind != "linear":
            layers[layer.name] = f"skipped: {why_not}, not {layer.kind}"
            skipped[layer.kind] += 1
        else:
            out.append(layer)
    return out


def _ao(type_: str, **data: Any) -> dict[str, Any]:
    return {"_type": type_, "_version": TORCHAO_VERSIONS[type_], "_data": data}


def _ao_granularity(group: int | None) -> dict[str, Any]:
    if group:
        return {"_type": "PerGroup", "_version": 1, "_data": {"group_size": group}}
    return {"_type": "PerAxis", "_version": 1, "_data": {"axis": 0}}


def _torchao(plan: PlanFile, group: int | None, notes: list[str], stem: str) -> Export:
    configs: dict[str, Any] = {}
    layers: dict[str, str] = {}
    skipped_kinds: Counter[str] = Counter()
    dropped_acts: Counter[int] = Counter()
    no_format: Counter[str] = Counter()
    for layer in _quantized_linear(plan, layers, skipped_kinds, "full precision (not listed)",
                                   "torchao's integer configs quantize nn.Linear"):
        if layer.w_format == "fp8_e4m3":
            configs[layer.name] = _ao("Float8WeightOnlyConfig",
                                      weight_dtype={"_type": "torch.dtype", "_data": "float8_e4m3fn"})
            layers[layer.name] = "fp8_e4m3 per row, weight only"
            continue
        if layer.w_format != "int":
            layers[layer.name] = f"skipped: torchao has no CPU-loadable config for {layer.w_format}"
            no_format[layer.w_format] += 1
            continue
        dtype = {"_type": "torch.dtype", "_data": f"int{layer.w_bits}"}
        gran = _ao_granularity(group)
        if layer.a_bits == 8:
            configs[layer.name] = _ao("Int8DynamicActivationIntxWeightConfig", weight_dtype=dtype,
                                      weight_granularity=gran)
            layers[layer.name] = f"int{layer.w_bits} {_granularity(group)}, int8 dynamic activations"
        else:
            configs[layer.name] = _ao("IntxWeightOnlyConfig", weight_dtype=dtype, granularity=gran)
            layers[layer.name] = f"int{layer.w_bits} {_granularity(group)}, weight only"
            if layer.a_bits < FULL_PRECISION:
                dropped_acts[layer.a_bits] += 1
    if no_format:
        notes.append("torchao's stable configs have no " + ", ".join(sorted(no_format)) + " (its MX/NVFP4 configs are "
                     "prototypes for CUDA); these layers stay in float: "
                     + ", ".join(f"{n} in {f}" for f, n in sorted(no_format.items())))
    if skipped_kinds:
        notes.append("torchao's integer configs quantize nn.Linear only; these stay in float: "
                     + ", ".join(f"{n} {k}" for k, n in skipped_kinds.items()))
    if dropped_acts:
        notes.append("torchao quantizes activations to 8 bits only (dynamic, per token); the plan's "
                     + ", ".join(f"{n} layer(s) at a{a}" for a, n in sorted(dropped_acts.items()))
                     + " are exported weight only")
    doc = _ao("FqnToConfig", fqn_to_config=configs)
    return Export("torchao", f"{stem}.torchao.json", "application/json", json.dumps(doc, indent=2) + "\n", layers,
                  notes, "from torchao.core.config import config_from_dict; from torchao.quantization import quantize_; "
                         f"quantize_(model, config_from_dict(json.load(open('{stem}.torchao.json'))), filter_fn=None)")


# ----------------------------------------------------------------------------------- compressed-tensors

def _ct_weights(bits: int, group: int | None) -> dict[str, Any]:
    args: dict[str, Any] = {"num_bits": bits, "type": "int", "symmetric": True, "dynamic": False}
    if group:
        args.update(strategy="group", group_size=group)
    else:
        args["strategy"] = "channel"
    return args


def _compressed_tensors(plan: PlanFile, group: int | None, notes: list[str], stem: str) -> Export:
    by_widths: dict[tuple[int, str, int], list[str]] = {}
    layers: dict[str, str] = {}
    skipped: Counter[str] = Counter()
    no_format: list[str] = []
    for layer in _quantized_linear(plan, layers, skipped, "full precision (ignore)",
                                   "compressed-tensors schemes are for Linear layers"):
        if layer.w_format != "int" and layer.w_format not in CT_FORMATS:
            layers[layer.name] = f"full precision (ignore): compressed-tensors has no {layer.w_format}"
            no_format.append(layer.name)
            continue
        by_widths.setdefault((layer.w_bits, layer.w_format, layer.a_bits), []).append(layer.name)
    groups: dict[str, Any] = {}
    for i, ((w, fmt, a), names) in enumerate(sorted(by_widths.items())):
        weights = dict(CT_FORMATS[fmt]) if fmt != "int" else _ct_weights(w, group)
        scheme: dict[str, Any] = {"targets": names, "weights": weights}
        if a < FULL_PRECISION:
            # the plan's activations: asymmetric, per tensor, ranges calibrated on data (static)
            scheme["input_activations"] = {"num_bits": a, "type": "int", "symmetric": False, "strategy": "tensor",
                                           "dynamic": False}
        groups[f"group_{i}"] = scheme
        what = f"int{w} {_granularity(group)}" if fmt == "int" else fmt
        for name in names:
            layers[name] = f"group_{i}: {what}{_act_note_bits(a)}"
    if no_format:
        notes.append(f"compressed-tensors has no format for {len(no_format)} layer(s), left in float (ignore): "
                     + ", ".join(no_format[:5]) + ("..." if len(no_format) > 5 else ""))
    if skipped:
        notes.append("compressed-tensors (and vLLM) quantize Linear layers; these stay in float: "
                     + ", ".join(f"{n} {k}" for k, n in skipped.items()))
    ignore = [layer.name for layer in plan.layers if layer.w_bits >= FULL_PRECISION or layer.name in no_format]
    doc = {"quant_method": "compressed-tensors", "config_groups": groups, "ignore": ignore}
    return Export("compressed-tensors", f"{stem}.compressed-tensors.json", "application/json",
                  json.dumps(doc, indent=2) + "\n", layers, notes,
                  "the quantization_config of config.json; or llm-compressor: oneshot(model=..., "
                  "recipe=QuantizationModifier(config_groups=cfg['config_groups'], ignore=cfg['ignore']))")


def _act_note_bits(a: int) -> str:
    return "" if a >= FULL_PRECISION else f", a{a} per tensor"


# ---------------------------------------------------------------------------------------------- gguf

def _gguf_map(plan: PlanFile) -> Any:
    model = plan.model
    if model.format != "hf" or not model.model_type:
        raise ExportError(f"the GGUF export needs a plan of a Hugging Face checkpoint (this one is {model.format}"
                          f"{'' if model.model_type else ', with no model_type'})",
                          "plan the checkpoint directory (config.json + *.safetensors), then export; llama.cpp "
                          "converts Hugging Face checkpoints, not .pt2 programs")
    try:
        import gguf
    except ImportError:  # pragma: no cover - a core dependency
        raise ExportError("the gguf package is not installed", "pip install gguf") from None
    arch_name = GGUF_ARCH_ALIASES.get(model.model_type, model.model_type)
    archs = {name: arch for arch, name in gguf.MODEL_ARCH_NAMES.items()}
    if arch_name not in archs:
        raise ExportError(f"llama.cpp has no architecture for model_type '{model.model_type}'",
                          "the GGUF export covers the architectures gguf's tensor map knows, e.g. llama, qwen2, "
                          "gemma, phi3, gpt2")
    blocks = [int(n) for layer in plan.layers for n in re.findall(r"\.(\d+)\.", f".{layer.name}.")]
    return gguf.get_tensor_name_map(archs[arch_name], max(blocks, default=-1) + 1)


def _gguf(plan: PlanFile, group: int | None, notes: list[str], stem: str) -> Export:
    names = _gguf_map(plan)
    lines: list[str] = []
    layers: dict[str, str] = {}
    unmapped: list[str] = []
    nearest: dict[str, str] = {}
    gguf_bytes = plan_bytes = 0.0
    for layer in plan.layers:
        tensor = names.get_name(layer.name + ".weight", try_suffixes=(".weight",))
        if tensor is None:
            layers[layer.name] = "skipped: not in llama.cpp's tensor map for this architecture"
            unmapped.append(layer.name)
            continue
        kind = GGML_FORMATS[layer.w_format] if layer.w_format != "int" else GGML_TYPES.get(layer.w_bits, "q8_0")
        if layer.w_format != "int" and kind != layer.w_format:
            nearest[layer.w_format] = kind
        lines.append(f"^{re.escape(tensor)}$={kind}")
        layers[layer.name] = f"{kind} ({tensor})"
        gguf_bytes += layer.params * GGML_BPW[kind] / 8
        plan_bytes += layer.params * layer.w_bits / 8
    if unmapped:
        notes.append(f"{len(unmapped)} layer(s) have no llama.cpp tensor name and keep the base type: "
                     + ", ".join(unmapped[:5]) + ("..." if len(unmapped) > 5 else ""))
    if nearest:
        notes.append("ggml has no " + ", ".join(sorted(nearest)) + ": written as the nearest type ("
                     + ", ".join(f"{f} -> {t}" for f, t in sorted(nearest.items())) + ")")
    if any(layer.w_bits == 7 for layer in plan.layers):
        notes.append("llama.cpp has no 7-bit type: 7-bit layers are written q8_0")
    if group:
        notes.append(f"GGUF types have fixed blocks (32 weights for q8_0, 256 for the K-quants), not group:{group}")
    if any(layer.a_bits < FULL_PRECISION for layer in plan.layers):
        notes.append("llama.cpp chooses its own activation precision; the plan's activation widths are not exported")
    notes.append(f"the planned layers take {gguf_bytes / 2**20:.2f} MiB in these GGUF types (block scales "
                 f"included) against {plan_bytes / 2**20:.2f} MiB of plain weight bits; a tensor whose rows do not "
                 "fill 256-weight blocks falls back to a 32-block type in llama-quantize, and its override is "
                 "then not applied")
    return Export("gguf", f"{stem}.gguf-types.txt", "text/plain", "\n".join(lines) + "\n", layers, notes,
                  f"llama-quantize --tensor-type-file {stem}.gguf-types.txt model-f16.gguf model-bitplan.gguf q8_0 "
                  "(the last argument is the type of every tensor not listed: embeddings, and layers the plan kept)")


# ---------------------------------------------------------------------------------------------- modelopt

def _modelopt(plan: PlanFile, group: int | None, notes: list[str], stem: str) -> Export:
    # ModelOpt's list form of quant_cfg: entries apply in order, so every quantizer off first, then each planned one
    cfg: list[dict[str, Any]] = [{"quantizer_name": "*", "enable": False}]
    layers: dict[str, str] = {}
    no_format: list[str] = []
    for layer in plan.layers:
        if layer.w_bits >= FULL_PRECISION:
            layers[layer.name] = "full precision (quantizers off)"
            continue
        if layer.w_format != "int" and layer.w_format not in MODELOPT_FORMATS:
            layers[layer.name] = f"full precision (quantizers off): ModelOpt has no {layer.w_format}"
            no_format.append(layer.name)
            continue
        weight: dict[str, Any] = {"num_bits": layer.w_bits}
        if layer.w_format != "int":
            weight = json.loads(json.dumps(MODELOPT_FORMATS[layer.w_format]))
        elif group:
            weight["block_sizes"] = {"-1": group}
        else:
            weight["axis"] = 0
        cfg.append({"quantizer_name": f"{layer.name}.weight_quantizer", "cfg": weight})
        if layer.a_bits < FULL_PRECISION:
            cfg.append({"quantizer_name": f"{layer.name}.input_quantizer",
                        "cfg": {"num_bits": layer.a_bits, "axis": None}})
        what = f"int{layer.w_bits} {_granularity(group)}" if layer.w_format == "int" else layer.w_format
        layers[layer.name] = f"{what}{_act_note(layer)}"
    if no_format:
        notes.append(f"ModelOpt has no format for {len(no_format)} layer(s), left in float: " + ", ".join(no_format[:5]))
    if any(layer.a_bits < FULL_PRECISION for layer in plan.layers):
        notes.append("ModelOpt's integer activation quantizers are symmetric per tensor; the plan measured "
                     "asymmetric per-tensor activations")
    doc = {"quant_cfg": cfg, "algorithm": "max"}
    # YAML (JSON's flow style, which YAML reads) because ModelOpt's block_sizes needs the integer key -1, which
    # JSON cannot hold; the only "-1" keys in the document are block_sizes' axes
    text = json.dumps(doc, indent=2).replace('"-1":', "-1:") + "\n"
    return Export("modelopt", f"{stem}.modelopt.yaml", "application/yaml", text, layers, notes,
                  f"import yaml, modelopt.torch.quantization as mtq; mtq.quantize(model, "
                  f"yaml.safe_load(open('{stem}.modelopt.yaml')), forward_loop)")


def export_choices(plan: PlanFile | dict[str, Any], stem: str = "plan") -> list[dict[str, Any]]:
    """Every format with what it would write for ``plan``: filename, per-layer descriptions and notes, or why not."""
    if not isinstance(plan, PlanFile):
        plan = PlanFile.model_validate(plan)
    out: list[dict[str, Any]] = []
    for name, label in FORMATS.items():
        try:
            export = export_plan(plan, name, stem)
        except ExportError as exc:
            out.append({"format": name, "label": label, "available": False, "reason": exc.message, "hint": exc.hint})
            continue
        out.append({"format": name, "label": label, "available": True, "filename": export.filename,
                    "media_type": export.media_type, "usage": export.usage, "notes": export.notes,
                    "layers": export.layers})
    return out
