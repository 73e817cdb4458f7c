"""Model input: a ``torch.export`` program (.pt2), a TorchScript archive, or
``catalog:NAME``. Everything ends up as one instrumented GraphModule.

Untrusted bytes reach torch only after :mod:`bitplan.archives` has checked them:
the file type is sniffed from its bytes (a ``torch.save(model)`` pickle is refused
unread), every member, name, operator, shape expression and guard of a .pt2 is
checked, and torch then reads a canonical copy that bitplan wrote from the checked
parts; a TorchScript archive's members, pickled names and code are checked before
``torch.jit.load``. Each torch call on user bytes below says why it is safe.
"""

from __future__ import annotations

import logging
import os
import tempfile
import warnings
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from bitplan.archives import check_pt2, check_torchscript, check_unpacked_size, write_canonical_pt2
from bitplan.core.data import PICKLE_HINT, Batch, Dataset
from bitplan.core.graph import GraphLayer, get_tensor, instrument
from bitplan.errors import ModelFormatError, UnsafeModelError
from bitplan.files import sha256_file
from bitplan.schemas import InputSpec, ModelInfo

# Any torch.load reached through torch.export.load must not unpickle objects (torch falls back to full
# unpickling for example inputs when the weights-only reader fails; this makes that fallback weights-only too).
os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"

SEND_INSTEAD = (
    "send a torch.export program (torch.export.save(torch.export.export(model, example_inputs), 'model.pt2')), "
    "a TorchScript archive (torch.jit.save(torch.jit.script(model), 'model.ts')) or a zipped Hugging Face checkpoint "
    "(config.json + *.safetensors)"
)


@dataclass
class LoadedModel:
    gm: torch.fx.GraphModule
    info: ModelInfo
    inputs: list[InputSpec]
    layers: list[GraphLayer]
    positional: bool  # call with positional args (TorchScript) rather than keywords
    example: Batch | None = None  # inputs stored in the archive, if any
    tokenizer: Any = None  # a Hugging Face checkpoint's tokenizers.Tokenizer, for text data
    vocab_size: int | None = None  # a language model's: token ids must be below it
    notes: list[str] = field(default_factory=list)  # what loading did that the plan should say
    # where it runs (bitplan.core.device): set by to(); compute_dtype other than float32 runs call() under autocast
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    compute_dtype: torch.dtype = torch.float32
    max_batch: int | None = None  # on a GPU: the most samples a micro-batch may hold (device.micro_batch_cap)

    def weight(self, layer: GraphLayer) -> torch.Tensor:
        return get_tensor(self.gm, layer.weight_key)

    def to(self, device: torch.device | str, dtype: torch.dtype = torch.float32) -> LoadedModel:
        """Move the graph to ``device`` and compute in ``dtype`` from now on (weights stay as stored); returns self."""
        from bitplan.core.graph import move_graph

        device = torch.device(device)
        if device != self.device or dtype != torch.float32:  # (also drops the trace's dtype assertions)
            move_graph(self.gm, device)
            if self.example is not None:
                self.example = self.example.to(device)
        self.device, self.compute_dtype = device, dtype
        return self

    def call(self, batch: Batch, overrides: dict[str, torch.Tensor] | None = None):
        """Run the model on ``batch`` (moved to the model's device), with some stored tensors replaced (e.g. by
        Q_b(W)); under autocast when the compute dtype is not float32."""
        if self.compute_dtype != torch.float32:
            with torch.autocast(self.device.type, dtype=self.compute_dtype):
                return self._call(batch.to(self.device), overrides)
        return self._call(batch.to(self.device), overrides)

    def _call(self, batch: Batch, overrides: dict[str, torch.Tensor] | None = None):
        args, kwargs = batch.args, batch.kwargs
        if self.positional and kwargs:
            args, kwargs = tuple(kwargs[s.name] for s in self.inputs), {}
        if overrides:
            return torch.func.functional_call(self.gm, overrides, args, kwargs, strict=False)
        return self.gm(*args, **kwargs)

    def fixed_bytes(self) -> float:
        """Bytes of every floating tensor that is not a quantizable layer's weight."""
        quantized = {layer.weight_key for layer in self.layers}
        seen: set[int] = set()
        total = 0
        for key, tensor in list(self.gm.named_parameters()) + list(self.gm.named_buffers()):
            if key in quantized or not tensor.is_floating_point() or id(tensor) in seen:
                continue
            seen.add(id(tensor))
            total += tensor.numel() * tensor.element_size()
        return float(total)


def sniff(path: Path) -> str:
    """Return 'pt2', 'torchscript' or 'hf' (a zipped checkpoint), or raise without deserialising anything.

    The zip's declared sizes are checked before ``testzip`` decompresses a byte, so a zip bomb costs nothing.
    """
    with path.open("rb") as fh:
        head = fh.read(4)
    if head[:1] == b"\x80":
        raise UnsafeModelError(
            f"{path.name} is a Python pickle; {PICKLE_HINT}",
            SEND_INSTEAD,
        )
    if head != b"PK\x03\x04":
        # (not named "TorchScript": the service reads that word as "a TorchScript model that needs data")
        raise ModelFormatError(f"{path.name} is neither a torch.export (.pt2) nor a torch.jit.save (.ts) archive", SEND_INSTEAD)
    try:
        with zipfile.ZipFile(path) as zf:
            check_unpacked_size(zf, path.name, ModelFormatError)
            names = zf.namelist()
            bad = zf.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise ModelFormatError(f"{path.name} is truncated or corrupt ({exc})", "upload the complete file again") from None
    if bad is not None:
        raise ModelFormatError(f"{path.name} is corrupt (bad CRC in {bad})", "upload the complete file again")
    if any(n.endswith("archive_format") for n in names) and any("/models/" in n for n in names):
        return "pt2"
    if any("/code/" in n for n in names) and any(n.endswith("constants.pkl") for n in names):
        return "torchscript"
    from bitplan.archives.hf import zip_is_checkpoint

    if zip_is_checkpoint(names):
        return "hf"
    if any(n.endswith("data.pkl") for n in names):
        raise UnsafeModelError(
            f"{path.name} is a torch.save() pickle archive; loading it would unpickle arbitrary Python objects",
            SEND_INSTEAD,
        )
    raise ModelFormatError(f"{path.name} is a zip archive but not a model bitplan can read", SEND_INSTEAD)


def _input_specs(gm: torch.fx.GraphModule) -> list[InputSpec]:
    specs = []
    for node in gm.graph.nodes:
        if node.op != "placeholder":
            continue
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor):
            raise ModelFormatError(f"model input '{node.name}' is not a tensor", "bitplan feeds tensors only")
        shape = tuple(int(d) if isinstance(d, int) else None for d in val.shape)
        specs.append(InputSpec(name=node.target, dtype=str(val.dtype).removeprefix("torch."), shape=shape))
    return specs


def _finish(gm: torch.fx.GraphModule, info: ModelInfo, positional: bool, names: list[str] | None = None) -> LoadedModel:
    # (an unlifted export module refuses .eval(); its graph already fixed the mode at export)
    for p in gm.parameters():
        p.requires_grad_(False)
    inputs = _input_specs(gm)
    if names is not None and len(names) == len(inputs):
        inputs = [spec.model_copy(update={"name": n}) for spec, n in zip(inputs, names)]
    layers = instrument(gm)
    if not layers:
        raise ModelFormatError(
            f"{info.name} has no quantizable layer: bitplan quantizes the stored weights of conv1d, conv2d and linear "
            "layers, and found none",
            "send a model with at least one nn.Conv1d, nn.Conv2d or nn.Linear layer (or F.conv/F.linear on a parameter)",
        )
    loaded = LoadedModel(gm, info, inputs, layers, positional)
    _refuse_non_finite(loaded)
    return loaded


def _refuse_non_finite(model: LoadedModel) -> None:
    """A NaN or infinite weight has no quantization scale: every bit width would score as NaN, so say so now."""
    bad = [layer.name for layer in model.layers if not bool(torch.isfinite(model.weight(layer)).all())]
    if bad:
        shown = ", ".join(bad[:10]) + (f" and {len(bad) - 10} more" if len(bad) > 10 else "")
        raise ModelFormatError(f"{model.info.name} has NaN or infinite weights in layer(s) {shown}",
                               "fix the checkpoint (e.g. retrain or reload the weights) and export it again")


def load_model(ref: str, sample: Dataset | None = None) -> LoadedModel:
    """Load ``ref`` (a file path or ``catalog:NAME``); TorchScript needs ``sample`` data."""
    if ref.startswith("catalog:"):
        from bitplan.catalog import get_entry

        entry = get_entry(ref.removeprefix("catalog:"))
        program = entry.export()
        return _finish(program.module(), ModelInfo(sha256=entry.sha256(), format="catalog", name=ref), positional=False)

    path = Path(ref)
    if path.is_dir():
        from bitplan.archives.hf import is_checkpoint_dir
        from bitplan.core.hf import load_checkpoint

        if not is_checkpoint_dir(path):
            raise ModelFormatError(f"'{ref}' is a directory without a config.json",
                                   "give a Hugging Face checkpoint directory (config.json + *.safetensors), a .pt2 "
                                   "or TorchScript file, or catalog:NAME")
        return load_checkpoint(path)
    if not path.is_file():
        raise ModelFormatError(f"model file '{ref}' not found", "give a .pt2 or TorchScript file, a Hugging Face "
                                                                 "checkpoint directory, or catalog:NAME")
    kind = sniff(path)
    if kind == "hf":
        from bitplan.core.hf import load_checkpoint

        return load_checkpoint(path)
    info = ModelInfo(sha256=sha256_file(path), format=kind, name=path.name)
    if kind == "pt2":
        return _load_pt2(path, info)
    check_torchscript(path, path.name)
    try:
        with warnings.catch_warnings():  # torch marks TorchScript deprecated; users still send it
            warnings.simplefilter("ignore", DeprecationWarning)
            # Safe: check_torchscript allowed only TorchScript's own members; its pickles were scanned (torch's C++
            # unpickler builds tensors and script objects, never Python objects) and its code is compiled by the
            # TorchScript compiler, which runs no Python and may only call torch's own operator namespaces.
            script = torch.jit.load(str(path), map_location="cpu")
    except Exception as exc:
        raise ModelFormatError(f"{path.name} could not be read by torch.jit.load ({exc})", SEND_INSTEAD) from None
    if sample is None:
        raise ModelFormatError(
            f"{path.name} is TorchScript, whose input shapes are not stored",
            "give calibration data with it, so bitplan can trace it with real inputs",
            code="needs_sample_inputs", field="data",
        )
    gm, names = _script_to_graph(script, sample, path.name)
    loaded = _finish(gm, info, positional=True, names=names)
    # TorchScript stores no shapes: the converted graph's are all symbolic. Show the data's, batch left free.
    given = sample.inputs
    tensors = [given.get(spec.name, given.get("")) if len(loaded.inputs) > 1 else next(iter(given.values()))
               for spec in loaded.inputs]
    if all(isinstance(t, torch.Tensor) for t in tensors):
        loaded.inputs = [spec.model_copy(update={"shape": (None, *(int(d) for d in t.shape[1:]))})
                         for spec, t in zip(loaded.inputs, tensors)]
    return loaded


def _load_pt2(path: Path, info: ModelInfo) -> LoadedModel:
    checked = check_pt2(path, path.name)
    with tempfile.TemporaryFile() as canonical:
        write_canonical_pt2(checked, canonical)
        try:
            # Safe: torch reads the canonical copy, which holds only what check_pt2 accepted: the program JSON with
            # every name an identifier or dotted path (so the source torch generates from them is plain), operators
            # in torch's own namespaces, shape expressions and guards of arithmetic over shape symbols only (sympify
            # and exec see nothing else), raw tensor payloads whose sizes fit, and example inputs whose pickle only
            # rebuilds tensors; no AOTInductor library, pickled weight or custom object is in it.
            program = torch.export.load(canonical)
            # Safe for the same reasons: .module() generates Python from those checked names and guards only.
            module = program.module()
        except Exception as exc:  # torch raises many types for a bad archive
            raise ModelFormatError(f"{path.name} could not be read as a torch.export program ({_first_line(exc)})",
                                   SEND_INSTEAD) from None
    loaded = _finish(module, info, positional=False)
    loaded.example = _example(program)
    return loaded


def _first_line(exc: Exception) -> str:
    lines = str(exc).strip().splitlines()
    return (lines[0] if lines else type(exc).__name__)[:300]


def _example(program) -> Batch | None:
    example = getattr(program, "example_inputs", None)
    if not example:
        return None
    args, kwargs = example
    first = next(iter(list(args) + list(kwargs.values())), None)
    if not isinstance(first, torch.Tensor) or first.dim() == 0:
        return None
    return Batch(tuple(args), dict(kwargs), None, first.shape[0])


@contextmanager
def _quiet_torch_logs():
    """TorchScript conversion logs internal notes (specialised dims, unused buffers) at WARNING."""
    logger = logging.getLogger("torch._export")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _script_to_graph(script, sample: Dataset, name: str) -> tuple[torch.fx.GraphModule, list[str]]:
    from torch._export.converter import TS2EPConverter

    names = [a.name for a in script.forward.schema.arguments[1:]]
    batch = sample.slice(0, min(2, len(sample)))
    if batch.kwargs:
        missing = [n for n in names if n not in batch.kwargs]
        if missing:
            raise ModelFormatError(f"{name} takes inputs {names}; the data lacks {missing}", "name data arrays inputs.<name>")
        args = tuple(batch.kwargs[n] for n in names)
    else:
        args = batch.args
    try:
        with warnings.catch_warnings(), _quiet_torch_logs():
            warnings.simplefilter("ignore")
            # Safe: the converter and .module() below generate Python from the script's attribute and argument
            # names, which check_torchscript required to be plain (no quotes, backslashes or control characters).
            program = TS2EPConverter(script, args).convert()
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise ModelFormatError(
            f"{name}: TorchScript could not be converted to a graph bitplan can analyse ({first}); torch's converter "
            "handles straight-line scripts (CNNs, MLPs) but not control flow such as prim::If, which scripted "
            "attention and Hugging Face models contain",
            "export the model instead, from the Python that defines it: program = torch.export.export(model.eval(), "
            "example_inputs); torch.export.save(program, 'model.pt2')",
            code="unsupported_torchscript",
        ) from None
    return program.module(), names
