"""Two small transformers for the catalog, trained here in under a minute on 2 cores:

* ``catalog:digits_vit`` — a vision transformer on scikit-learn's 8x8 digits (2x2 patches, a class
  token, two pre-norm blocks of SDPA self-attention and a GELU MLP, LayerNorm, linear head);
* ``catalog:tiny_gpt`` — a character-level GPT-style decoder (causal SDPA attention, two blocks)
  trained on the English prose of Python's own reference-manual help topics (``pydoc_data.topics``,
  which ships with CPython), predicting the next character at every position.

The trained weights ship as ``NAME.safetensors``; ``python -m bitplan.catalog.tiny [NAME]`` retrains
them deterministically.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from bitplan.catalog import CatalogEntry
from bitplan.catalog import digits as digits_data
from bitplan.core.data import POSITIONAL, Dataset


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(LN(x)), then x + MLP(LN(x)); attention is PyTorch's SDPA."""

    def __init__(self, dim: int, heads: int, causal: bool) -> None:
        super().__init__()
        self.heads, self.causal = heads, causal
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.fc1 = nn.Linear(dim, 2 * dim)
        self.fc2 = nn.Linear(2 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).reshape(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class DigitsViT(nn.Module):
    def __init__(self, dim: int = 48, heads: int = 4, depth: int = 2) -> None:
        super().__init__()
        self.patch = nn.Linear(4, dim)  # 2x2 patches of the 8x8 image: 16 tokens
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, 17, dim) * 0.02)
        self.blocks = nn.ModuleList(Block(dim, heads, causal=False) for _ in range(depth))
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        patches = x.reshape(b, 4, 2, 4, 2).permute(0, 1, 3, 2, 4).reshape(b, 16, 4)
        h = torch.cat([self.cls.expand(b, -1, -1), self.patch(patches)], 1) + self.pos
        for block in self.blocks:
            h = block(h)
        return self.head(self.ln(h[:, 0]))


#: printable ASCII (32..126) plus newline; anything else becomes '?'
VOCAB = "\n" + "".join(chr(c) for c in range(32, 127))
CONTEXT = 32


class TinyGPT(nn.Module):
    def __init__(self, dim: int = 64, heads: int = 4, depth: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(len(VOCAB), dim)
        self.pos = nn.Parameter(torch.randn(1, CONTEXT, dim) * 0.02)
        self.blocks = nn.ModuleList(Block(dim, heads, causal=True) for _ in range(depth))
        self.ln = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, len(VOCAB))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids) + self.pos[:, : ids.shape[1]]
        for block in self.blocks:
            h = block(h)
        return self.lm_head(self.ln(h))


@lru_cache(maxsize=1)
def _text_ids() -> torch.Tensor:
    """The help topics' text, in sorted topic order, as vocabulary ids."""
    from pydoc_data.topics import topics

    text = "\n".join(topics[k] for k in sorted(topics))
    lookup = {c: i for i, c in enumerate(VOCAB)}
    unknown = lookup["?"]
    return torch.tensor([lookup.get(c, unknown) for c in text], dtype=torch.int64)


def gpt_split(name: str) -> Dataset:
    """Windows of CONTEXT + 1 characters: the first 90 % of the text trains (calibration: 256 windows of it),
    the last 10 % is held out (256 windows)."""
    ids = _text_ids()
    cut = int(0.9 * len(ids))
    gen = torch.Generator().manual_seed({"train": 0, "calib": 1, "eval": 2}[name])
    lo, hi = (0, cut) if name in ("train", "calib") else (cut, len(ids))
    count = {"train": 20_000, "calib": 256, "eval": 256}[name]
    starts = torch.randint(lo, hi - CONTEXT - 1, (count,), generator=gen)
    windows = torch.stack([ids[s:s + CONTEXT + 1] for s in starts.tolist()])
    digest = hashlib.sha256(b"tiny_gpt:" + name.encode() + windows.numpy().tobytes()).hexdigest()
    return Dataset({POSITIONAL: windows[:, :-1].contiguous()}, windows[:, 1:].contiguous(), f"catalog:tiny_gpt/{name}",
                   digest)


ARCHITECTURES = {"digits_vit": DigitsViT, "tiny_gpt": TinyGPT}
SPLITS = {"digits_vit": digits_data.split, "tiny_gpt": gpt_split}


def weights_path(name: str) -> Path:
    return Path(__file__).with_name(f"{name}.safetensors")


def build(name: str) -> nn.Module:
    from safetensors.torch import load_file

    model = ARCHITECTURES[name]()
    model.load_state_dict(load_file(str(weights_path(name))))
    return model.eval()


def train(name: str, seed: int = 0) -> nn.Module:
    """The deterministic training run that produced the shipped weights."""
    torch.manual_seed(seed)
    data = SPLITS[name]("train")
    x, y = data.inputs[POSITIONAL], data.targets
    model = ARCHITECTURES[name]()
    epochs, lr = (60, 2e-3) if name == "digits_vit" else (3, 3e-3)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(len(x), generator=gen).split(64):
            opt.zero_grad()
            out = model(x[idx])
            F.cross_entropy(out.reshape(-1, out.shape[-1]), y[idx].reshape(-1)).backward()
            opt.step()
    return model.eval()


def _entry(name: str, summary: str) -> CatalogEntry:
    return CatalogEntry(name=name, summary=summary, build=lambda: build(name), dataset=SPLITS[name],
                        dynamic=lambda: ({0: torch.export.Dim("batch")},),
                        fingerprint=lambda: weights_path(name).read_bytes())


VIT_ENTRY = _entry("digits_vit", "small vision transformer (2x2 patches, 2 SDPA blocks, 10 Linear layers) on the digits")
GPT_ENTRY = _entry("tiny_gpt", "character-level GPT-style decoder (causal SDPA, 2 blocks, 9 Linear layers) on Python's "
                               "help-topic prose")


if __name__ == "__main__":
    import sys
    import time

    from safetensors.torch import save_file

    for arch in sys.argv[1:] or list(ARCHITECTURES):
        start = time.perf_counter()
        trained = train(arch)
        held = SPLITS[arch]("eval")
        with torch.no_grad():
            out = trained(held.inputs[POSITIONAL])
            acc = (out.argmax(-1) == held.targets).float().mean().item()
            loss = F.cross_entropy(out.reshape(-1, out.shape[-1]), held.targets.reshape(-1)).item()
        save_file({k: v.contiguous() for k, v in trained.state_dict().items()}, str(weights_path(arch)))
        print(f"saved {weights_path(arch)} in {time.perf_counter() - start:.0f} s "
              f"(held-out accuracy {acc:.4f}, cross-entropy {loss:.3f})")
