"""``catalog:digits_cnn`` — a small CNN with BatchNorm —, ``catalog:digits_resnet`` —
a small CNN with residual connections — and ``catalog:digits_mobilenet`` — depthwise-separable
blocks with BatchNorm — trained on scikit-learn's bundled 8x8
digits. The trained weights ship as ``NAME.safetensors``;
``python -m bitplan.catalog.digits [NAME]`` retrains them deterministically.

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


class Block(nn.Module):
    """conv-bn-relu-conv-bn plus the identity, then relu (a ResNet basic block)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


class DigitsResNet(nn.Module):
    """A small CNN with residual connections: stem, two basic blocks, a strided conv, one more block, head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.block1 = Block(16)
        self.block2 = Block(16)
        self.down = nn.Conv2d(16, 32, 3, stride=2, padding=1)
        self.bn_down = nn.BatchNorm2d(32)
        self.block3 = Block(32)
        self.fc = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block2(self.block1(torch.relu(self.bn(self.stem(x)))))
        x = self.block3(torch.relu(self.bn_down(self.down(x))))
        return self.fc(x.mean((2, 3)))


class DigitsMobileNet(nn.Module):
    """MobileNet-style: a stem conv, then two depthwise-separable blocks (3x3 depthwise conv, BN, ReLU,
    1x1 pointwise conv, BN, ReLU), global average pooling and a linear head. Every conv is followed by
    BatchNorm, and the depthwise kernels hold 9 weights per channel."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 16, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(16)
        self.dw1 = nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.pw1 = nn.Conv2d(16, 32, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(32)
        self.dw2 = nn.Conv2d(32, 32, 3, stride=2, padding=1, groups=32, bias=False)
        self.bn3 = nn.BatchNorm2d(32)
        self.pw2 = nn.Conv2d(32, 64, 1, bias=False)
        self.bn4 = nn.BatchNorm2d(64)
        self.fc = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn0(self.stem(x)))
        x = torch.relu(self.bn2(self.pw1(torch.relu(self.bn1(self.dw1(x))))))
        x = torch.relu(self.bn4(self.pw2(torch.relu(self.bn3(self.dw2(x))))))
        return self.fc(x.mean((2, 3)))


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
    return Dataset({POSITIONAL: torch.from_numpy(xs.copy())}, torch.from_numpy(ys.copy()), f"catalog:digits/{name}", digest)


ARCHITECTURES = {"digits_cnn": DigitsCNN, "digits_resnet": DigitsResNet, "digits_mobilenet": DigitsMobileNet}


def weights_path(name: str) -> Path:
    return Path(__file__).with_name(f"{name}.safetensors")


def build(name: str = "digits_cnn") -> nn.Module:
    from safetensors.torch import load_file

    model = ARCHITECTURES[name]()
    model.load_state_dict(load_file(str(weights_path(name))))
    return model.eval()


def train(name: str = "digits_cnn", epochs: int = 40, seed: int = 0) -> nn.Module:
    """Deterministic training run that produced the shipped weights."""
    torch.manual_seed(seed)
    data = split("train")
    x, y = data.inputs[POSITIONAL], data.targets
    model = ARCHITECTURES[name]()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(len(x), generator=gen).split(64):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return model.eval()


def _entry(name: str, summary: str) -> CatalogEntry:
    return CatalogEntry(
        name=name,
        summary=summary,
        build=lambda: build(name),
        dataset=split,
        dynamic=lambda: ({0: torch.export.Dim("batch")},),
        fingerprint=lambda: weights_path(name).read_bytes(),
    )


ENTRY = _entry("digits_cnn", "3-conv + 2-linear CNN with BatchNorm on scikit-learn digits (8x8, 10 classes)")
RESNET_ENTRY = _entry("digits_resnet", "residual CNN (stem, 3 basic blocks, strided conv, linear head) on the same digits")
MOBILENET_ENTRY = _entry("digits_mobilenet", "MobileNet-style CNN (stem, 2 depthwise-separable blocks, all with "
                                             "BatchNorm, linear head) on the same digits")


if __name__ == "__main__":
    import sys

    from safetensors.torch import save_file

    for arch in sys.argv[1:] or list(ARCHITECTURES):
        trained = train(arch)
        evaluation = split("eval")
        with torch.no_grad():
            acc = (trained(evaluation.inputs[POSITIONAL]).argmax(1) == evaluation.targets).float().mean().item()
        save_file({k: v.contiguous() for k, v in trained.state_dict().items()}, str(weights_path(arch)))
        print(f"saved {weights_path(arch)} (held-out accuracy {acc:.4f})")
