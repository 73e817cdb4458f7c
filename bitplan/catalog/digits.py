"""``catalog:digits_cnn`` — a small CNN with BatchNorm trained on scikit-learn's
bundled 8x8 digits. The trained weights ship as ``digits_cnn.safetensors``;
``python -m bitplan.catalog.digits`` retrains them deterministically.

Split (fixed permutation, seed 0): 1,200 training images, of which the first
256 are the calibration set, and 597 held-out images for evaluation.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch import nn

from bitplan.catalog import CatalogEntry
from bitplan.core.data import POSITIONAL, Dataset

WEIGHTS = Path(__file__).with_name("digits_cnn.safetensors")
N_TRAIN, N_CALIB = 1200, 256


class DigitsCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(32)
        self.conv3 = nn.Conv2d(32, 64, 3, padding=1)
        self.bn3 = nn.BatchNorm2d(64)
        self.fc1 = nn.Linear(64 * 2 * 2, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.max_pool2d(torch.relu(self.bn2(self.conv2(x))), 2)
        x = torch.max_pool2d(torch.relu(self.bn3(self.conv3(x))), 2)
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


@lru_cache(maxsize=1)
def _arrays() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)
    y = digits.target.astype(np.int64)
    order = np.random.default_rng(0).permutation(len(x))
    return x[order], y[order]


def split(name: str) -> Dataset:
    x, y = _arrays()
    parts = {"train": slice(0, N_TRAIN), "calib": slice(0, N_CALIB), "eval": slice(N_TRAIN, None)}
    if name not in parts:
        raise ValueError(f"unknown split {name}")
    xs, ys = x[parts[name]], y[parts[name]]
    digest = hashlib.sha256(b"digits:" + name.encode() + xs.tobytes() + ys.tobytes()).hexdigest()
    return Dataset({POSITIONAL: torch.from_numpy(xs.copy())}, torch.from_numpy(ys.copy()), f"catalog:digits_cnn/{name}", digest)


def build() -> DigitsCNN:
    from safetensors.torch import load_file

    model = DigitsCNN()
    model.load_state_dict(load_file(str(WEIGHTS)))
    return model.eval()


def train(epochs: int = 40, seed: int = 0) -> DigitsCNN:
    """Deterministic training run that produced the shipped weights."""
    torch.manual_seed(seed)
    data = split("train")
    x, y = data.inputs[POSITIONAL], data.targets
    model = DigitsCNN()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(len(x), generator=gen).split(64):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return model.eval()


def _fingerprint() -> bytes:
    return WEIGHTS.read_bytes()


ENTRY = CatalogEntry(
    name="digits_cnn",
    summary="3-conv + 2-linear CNN with BatchNorm on scikit-learn digits (8x8, 10 classes)",
    build=build,
    dataset=split,
    dynamic=lambda: ({0: torch.export.Dim("batch")},),
    fingerprint=_fingerprint,
)


if __name__ == "__main__":
    from safetensors.torch import save_file

    trained = train()
    evaluation = split("eval")
    with torch.no_grad():
        acc = (trained(evaluation.inputs[POSITIONAL]).argmax(1) == evaluation.targets).float().mean().item()
    save_file({k: v.contiguous() for k, v in trained.state_dict().items()}, str(WEIGHTS))
    print(f"saved {WEIGHTS} (held-out accuracy {acc:.4f})")
