"""Reference models shipped with bitplan, with deterministic calibration and held-out evaluation
data: CNNs on the digits (``digits_cnn``, ``digits_resnet``, ``digits_mobilenet``), small
transformers trained here (``digits_vit``, ``tiny_gpt``) and the pretrained ``minilm``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass

import torch

from bitplan.core.data import Dataset
from bitplan.errors import ModelFormatError


@dataclass(frozen=True)
class CatalogEntry:
    name: str
    summary: str
    build: Callable[[], torch.nn.Module]
    dataset: Callable[[str], Dataset]  # split: "calib" or "eval"
    dynamic: Callable[[], dict]  # dynamic_shapes for torch.export
    fingerprint: Callable[[], bytes]

    def export(self) -> torch.export.ExportedProgram:
        model = self.build().eval()
        sample = self.dataset("calib").slice(0, 2)
        with torch.no_grad():
            return torch.export.export(model, sample.args, sample.kwargs or None, dynamic_shapes=self.dynamic(), strict=False)

    def sha256(self) -> str:
        return hashlib.sha256(self.name.encode() + b"\0" + self.fingerprint()).hexdigest()


def _entries() -> dict[str, CatalogEntry]:
    from bitplan.catalog import digits, minilm, tiny

    return {e.name: e for e in (digits.ENTRY, digits.RESNET_ENTRY, digits.MOBILENET_ENTRY, tiny.VIT_ENTRY,
                                tiny.GPT_ENTRY, minilm.ENTRY)}


CATALOG_NAMES = ("digits_cnn", "digits_resnet", "digits_mobilenet", "digits_vit", "tiny_gpt", "minilm")


def get_entry(name: str) -> CatalogEntry:
    entries = _entries()
    if name not in entries:
        raise ModelFormatError(f"no catalog model '{name}'", "catalog models: " + ", ".join(f"catalog:{n}" for n in entries))
    return entries[name]
