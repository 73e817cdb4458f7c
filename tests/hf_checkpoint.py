"""A small Hugging Face checkpoint the tests build: a Llama-architecture causal LM made by ``transformers`` from
a config (random weights, seeded), saved with ``save_pretrained(safe_serialization=True)``, with a byte-level
BPE ``tokenizer.json`` trained by ``tokenizers`` on Python's own help text (``pydoc_data``), which is also
the calibration text."""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

VOCAB = 300


def help_text(chars: int = 60_000) -> str:
    from pydoc_data.topics import topics

    return "\n".join(topics[k] for k in sorted(topics))[:chars]


def build_checkpoint(out: Path, seed: int = 0, layers: int = 2, hidden: int = 32, shards: bool = False,
                     tokenizer: bool = True) -> Path:
    """Write the checkpoint into the directory ``out`` (created); returns it."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    out.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator([help_text()], trainer)
    config = LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, tie_word_embeddings=False, bos_token_id=None, eos_token_id=None,
                         pad_token_id=None)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(str(out), safe_serialization=True, max_shard_size="20KB" if shards else "5GB")
    if tokenizer:
        tok.save(str(out / "tokenizer.json"))
    return out


def zip_dir(folder: Path, dest: Path, root: str | None = None, extra: dict[str, bytes] | None = None) -> Path:
    """Zip ``folder``'s files under ``root/`` (or at the top with root=''), plus ``extra`` members."""
    root = folder.name if root is None else root
    prefix = f"{root}/" if root else ""
    with zipfile.ZipFile(dest, "w", zipfile.ZIP_STORED) as zf:
        for path in sorted(folder.iterdir()):
            if path.is_file():
                zf.write(path, prefix + path.name)
        for name, data in (extra or {}).items():
            zf.writestr(name, data)
    return dest


def write_text(path: Path, chars: int = 60_000, jsonl: bool = False) -> Path:
    text = help_text(chars)
    if jsonl:
        paragraphs = [p for p in text.split("\n\n") if p.strip()]
        path.write_text("\n".join(json.dumps({"text": p}) for p in paragraphs) + "\n")
    else:
        path.write_text(text)
    return path
