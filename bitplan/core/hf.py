"""Hugging Face checkpoints as models: a causal language model that ``transformers`` implements, read from
``config.json`` + ``*.safetensors`` after :mod:`bitplan.archives.hf` checked every file, and exported to the
graph the rest of bitplan works on (inputs ``input_ids``, output the next-token logits).

Never run: code shipped with the checkpoint (``trust_remote_code=False``; a config with ``auto_map`` is
refused before this module sees it), pickles (only safetensors are read), or anything transformers would
fetch from the hub (offline, local files only). Before the real load, the architecture is built on torch's
``meta`` device (no memory) and its weights compared, name and shape, with the safetensors headers: a
config that asks for more than the files hold is refused instead of allocating it.

Text calibration data (``.txt``, ``.jsonl``) is tokenised with the checkpoint's ``tokenizer.json``
(the Rust ``tokenizers`` library) into windows of ``seq_len + 1`` tokens: inputs are the first ``seq_len``,
targets the next-token ids.
"""

from __future__ import annotations

import logging
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bitplan.archives.hf import HF_HINT, TOKENIZER, CheckedCheckpoint, check_checkpoint, write_canonical_checkpoint
from bitplan.core.data import Batch
from bitplan.errors import ModelFormatError

#: tokens per sample of the example inputs (MACs per sample are measured on these when no data is given)
EXAMPLE_TOKENS = 128


class CausalLMLogits(nn.Module):
    """The checkpoint's model as ``input_ids -> logits`` (no cache, no other outputs)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.model(input_ids=input_ids, use_cache=False).logits
        return logits


def _transformers():
    from bitplan.core import load_transformers

    return load_transformers()


def model_class(checked: CheckedCheckpoint) -> tuple[Any, Any]:
    """(config object, model class) for a checked checkpoint; refuses what transformers does not implement
    as a causal language model."""
    transformers = _transformers()
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    model_type = checked.config["model_type"]
    if model_type not in CONFIG_MAPPING:
        raise ModelFormatError(f"{checked.label}: model_type '{model_type}' is not one that transformers "
                               f"{transformers.__version__} implements", "bitplan runs no code shipped with a checkpoint; "
                               "use a model type transformers knows (llama, qwen2, mistral, gpt_neox, ...)")
    arch = checked.architecture or MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type)
    causal = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    if arch not in causal or not hasattr(transformers, arch):
        raise ModelFormatError(f"{checked.label}: architecture '{arch}' is not a causal language model that transformers "
                               "implements; bitplan plans checkpoints of *ForCausalLM classes",
                               "export other models with torch.export and send the .pt2")
    try:
        config = CONFIG_MAPPING[model_type].from_dict(dict(checked.config))
    except Exception as exc:  # transformers validates the config its own way
        raise ModelFormatError(f"{checked.label}: config.json is not a valid {model_type} config ({_first_line(exc)})",
                               HF_HINT) from None
    config._attn_implementation = "sdpa"
    return config, getattr(transformers, arch)


def compare_with_files(checked: CheckedCheckpoint, config: Any, cls: Any) -> list[str]:
    """Build the architecture on the meta device and compare its weights with the files' (name and shape).

    Refuses missing or mis-shaped weights, so what transformers then allocates is what the files hold; returns
    notes (weights in the files the architecture does not use are ignored, and said so)."""
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            skeleton = cls(config)
        except Exception as exc:
            raise ModelFormatError(f"{checked.label}: transformers could not build {cls.__name__} from config.json "
                                   f"({_first_line(exc)})", HF_HINT) from None
    tied: dict[int, list[str]] = {}
    for name, tensor in list(skeleton.named_parameters(remove_duplicate=False)) + list(
            skeleton.named_buffers(remove_duplicate=False)):
        tied.setdefault(id(tensor), []).append(name)
    expected = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    given = checked.tensors
    group_of = {name: names for names in tied.values() for name in names}
    missing = [k for k in expected if k not in given and not any(n in given for n in group_of.get(k, []))]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise ModelFormatError(f"{checked.label}: the weights lack {shown}, which {cls.__name__} with this config.json "
                               "needs", "send every shard, saved with model.save_pretrained(dir, safe_serialization=True)")
    wrong = [(k, given[k].shape, shape) for k, shape in expected.items() if k in given and given[k].shape != shape]
    if wrong:
        name, got, want = wrong[0]
        raise ModelFormatError(f"{checked.label}: weight {name} has shape {list(got)}, but config.json makes it {list(want)} "
                               f"({len(wrong)} such weights)", "send the config.json that belongs to these weights")
    unused = sorted(set(given) - set(expected))
    return [f"{checked.label}: {len(unused)} weight(s) the architecture does not use were ignored: "
            + ", ".join(unused[:5])] if unused else []


def load_checkpoint(path: str | Path, label: str | None = None):
    """A checkpoint directory or zip as a LoadedModel (bitplan.core.loading)."""
    from bitplan.core.loading import _finish
    from bitplan.schemas import ModelInfo

    checked = check_checkpoint(path, label)
    config, cls = model_class(checked)
    notes = checked.notes() + compare_with_files(checked, config, cls)
    tokenizer = None
    with tempfile.TemporaryDirectory(prefix="bitplan-hf-") as tmp:
        canonical = write_canonical_checkpoint(checked, Path(tmp) / "checkpoint")
        model = from_canonical(checked, config, cls, canonical)
        if checked.tokenizer:
            tokenizer = load_tokenizer(canonical / TOKENIZER, checked.label)
    wrapper = CausalLMLogits(model).eval()
    gm, example = _export(wrapper, config, checked.label)
    info = ModelInfo(sha256=checked.sha256, format="hf", name=checked.label, model_type=checked.config["model_type"])
    loaded = _finish(gm, info, positional=False)
    for layer in loaded.layers:  # the names the checkpoint uses (model.layers.0.mlp.up_proj, lm_head), not the wrapper's
        layer.name = layer.name.removeprefix("model.")
    loaded.example = example
    loaded.tokenizer = tokenizer
    loaded.vocab_size = int(getattr(config, "vocab_size", 0) or 0) or None
    loaded.notes = notes
    return loaded


def from_canonical(checked: CheckedCheckpoint, config: Any, cls: Any, canonical: Path) -> nn.Module:
    """transformers' own module (float32, eval mode) for a checked checkpoint, read from the canonical folder that
    :func:`write_canonical_checkpoint` wrote."""
    try:
        with warnings.catch_warnings(), _quiet():
            warnings.simplefilter("ignore")
            # Safe: the directory holds only what check_checkpoint accepted (config.json re-serialised, the
            # safetensors shards, their index, tokenizer.json); trust_remote_code is off, files are local, and
            # compare_with_files matched every weight's name and shape to the config beforehand.
            model = cls.from_pretrained(str(canonical), config=config, dtype=torch.float32, local_files_only=True,
                                        trust_remote_code=False, use_safetensors=True)
    except Exception as exc:
        raise ModelFormatError(f"{checked.label}: transformers could not load the weights ({_first_line(exc)})",
                               HF_HINT) from None
    model.eval()
    return model


def _export(wrapper: nn.Module, config: Any, label: str) -> tuple[torch.fx.GraphModule, Batch]:
    max_pos = int(getattr(config, "max_position_embeddings", 0) or 0) or 4096
    vocab = int(getattr(config, "vocab_size", 2) or 2)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (2, min(16, max_pos)), generator=gen)
    batch = torch.export.Dim("batch", min=1, max=1 << 20)
    seq = torch.export.Dim("seq", min=2, max=max(max_pos, 3))
    shapes: Any = {"input_ids": {0: batch, 1: seq}}
    for attempt in range(2):
        try:
            with torch.no_grad(), warnings.catch_warnings(), _quiet():
                warnings.simplefilter("ignore")
                program = torch.export.export(wrapper, (), {"input_ids": ids}, dynamic_shapes=shapes, strict=False)
                gm = program.module()
            break
        except Exception as exc:
            # some transformers/torch pairs bound the lengths more narrowly than the config says (seen: torch 2.11,
            # transformers 5.17, "Constraints violated (seq)"); torch says how in its suggested fixes: take them once
            refined = _refined(exc, shapes) if attempt == 0 else None
            if refined is None:
                raise ModelFormatError(f"{label}: torch.export could not trace {type(wrapper.model).__name__} "
                                       f"({_first_line(exc)})",
                                       "send the model as a torch.export program (.pt2) instead") from None
            shapes = refined
    example = torch.randint(0, vocab, (1, min(EXAMPLE_TOKENS, max_pos)), generator=gen)
    return gm, Batch((), {"input_ids": example}, None, 1)


def _refined(exc: Exception, shapes: Any) -> Any:
    """``shapes`` with torch.export's suggested fixes for ``exc`` applied, or None when it suggests none."""
    if "Suggested fixes" not in str(exc):
        return None
    try:
        from torch.export.dynamic_shapes import refine_dynamic_shapes_from_suggested_fixes

        return refine_dynamic_shapes_from_suggested_fixes(str(exc), shapes)
    except Exception:
        return None


def load_tokenizer(path: Path, label: str):
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:  # the Rust parser's errors
        raise ModelFormatError(f"{label}: tokenizer.json could not be read by the tokenizers library "
                               f"({_first_line(exc)})", "save it with tokenizer.save_pretrained(dir)") from None


class _quiet:
    def __enter__(self) -> None:
        self.loggers = [logging.getLogger(n) for n in ("torch._export", "torch.export", "torch._dynamo")]
        self.levels = [lg.level for lg in self.loggers]
        for lg in self.loggers:
            lg.setLevel(logging.ERROR)

    def __exit__(self, *exc: object) -> None:
        for lg, level in zip(self.loggers, self.levels):
            lg.setLevel(level)


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return (lines[0] if lines else type(exc).__name__)[:300]
