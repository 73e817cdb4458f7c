"""Calibration / evaluation data: ``.npz`` or ``.safetensors`` holding ``inputs``
(one positional input) or ``inputs.<name>`` (keyword inputs), and optional
integer ``targets``. Never unpickled: npz is read with ``allow_pickle=False``.
Or text (``.txt``, ``.jsonl``) for a Hugging Face checkpoint, tokenised with its
``tokenizer.json`` into windows of next-token targets.
"""

from __future__ import annotations

import hashlib
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from bitplan.archives import check_unpacked_size
from bitplan.errors import DataError
from bitplan.files import sha256_file
from bitplan.inputs import POSITIONAL, match_inputs
from bitplan.schemas import InputSpec

DATA_FORMATS = ("send .npz (numpy.savez) or .safetensors holding 'inputs' (or 'inputs.<name>') and optional integer "
                "'targets'; or, for a Hugging Face checkpoint, text as .txt or .jsonl")
PICKLE_HINT = "bitplan never unpickles uploads, because unpickling can run arbitrary code"


@dataclass
class Batch:
    args: tuple
    kwargs: dict
    targets: torch.Tensor | None
    size: int

    def to(self, device: torch.device | str) -> Batch:
        """This batch with its tensors on ``device`` (itself when they are there already)."""
        device = torch.device(device)
        tensors = [*self.args, *self.kwargs.values(), self.targets]
        if all(not isinstance(t, torch.Tensor) or t.device == device for t in tensors):
            return self
        return Batch(tuple(_moved(a, device) for a in self.args), {k: _moved(v, device) for k, v in self.kwargs.items()},
                     _moved(self.targets, device), self.size)


def _moved(value, device: torch.device):
    return value.to(device) if isinstance(value, torch.Tensor) else value


@dataclass
class Dataset:
    inputs: dict[str, torch.Tensor]  # POSITIONAL key for a single positional input
    targets: torch.Tensor | None
    source: str
    sha256: str

    def __len__(self) -> int:
        return next(iter(self.inputs.values())).shape[0]

    def batches(self, batch_size: int, limit: int | None = None) -> Iterator[Batch]:
        n = len(self) if limit is None else min(limit, len(self))
        for start in range(0, n, batch_size):
            end = min(start + batch_size, n)
            yield self.slice(start, end)

    def take(self, index: torch.Tensor, label: str) -> Dataset:
        """The samples at ``index`` as a data set of their own (``label`` names the part in ``source``)."""
        return Dataset({k: v[index] for k, v in self.inputs.items()},
                       None if self.targets is None else self.targets[index],
                       f"{self.source} [{label}]", hashlib.sha256(f"{self.sha256}:{label}".encode()).hexdigest())

    def to(self, device: torch.device | str) -> Dataset:
        """The same samples with every tensor on ``device`` (moved once, so batches are sliced there)."""
        device = torch.device(device)
        return replace(self, inputs={k: v.to(device) for k, v in self.inputs.items()},
                       targets=None if self.targets is None else self.targets.to(device))

    def slice(self, start: int, end: int) -> Batch:
        parts = {k: v[start:end] for k, v in self.inputs.items()}
        args = (parts.pop(POSITIONAL),) if POSITIONAL in parts else ()
        targets = None if self.targets is None else self.targets[start:end]
        return Batch(args, parts, targets, end - start)


#: Calibration data with at least this many samples keeps every HOLDOUT_EVERY-th sample aside from the
#: search, so that the figures reported for the plan come from data the search did not see.
HOLDOUT_MIN_SAMPLES = 40
HOLDOUT_EVERY = 5


def holdout_split(data: Dataset) -> tuple[Dataset, Dataset | None]:
    """(search part, held-out part): every 5th sample (indices 4, 9, ...) is held out, the rest searched.

    Interleaved rather than a tail, so data sorted by class or length splits evenly. None for the held-out
    part when there are fewer than HOLDOUT_MIN_SAMPLES samples: then everything is searched.
    """
    n = len(data)
    if n < HOLDOUT_MIN_SAMPLES:
        return data, None
    index = torch.arange(n)
    held = index % HOLDOUT_EVERY == HOLDOUT_EVERY - 1
    return data.take(index[~held], "search"), data.take(index[held], f"held out: every {HOLDOUT_EVERY}th sample")


def _data_format(path: Path) -> str:
    """``.npz`` or ``.safetensors`` by suffix, else by content (the service stores uploads under their sha256).

    A pickle is refused whatever its name says: it is the one format whose reading runs code.
    """
    with open(path, "rb") as f:
        head = f.read(9)
    if head[:1] == b"\x80":
        raise DataError(f"{path.name} is a Python pickle; {PICKLE_HINT}", DATA_FORMATS)
    suffix = path.suffix.lower()
    if suffix in (".npz", ".safetensors", ".txt", ".jsonl"):
        return suffix
    if head[:4] == b"PK\x03\x04":
        return ".npz"
    if len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < 100_000_000:
        return ".safetensors"
    text = _text_kind(path)
    if text is not None:
        return text
    raise DataError(f"{path.name} is neither a .npz nor a .safetensors file, nor UTF-8 text", DATA_FORMATS)


def _text_kind(path: Path) -> str | None:
    """'.jsonl' or '.txt' when the file's first 64 KB are UTF-8 text without NUL bytes (the service stores
    uploads without their suffix), else None."""
    with open(path, "rb") as f:
        head = f.read(1 << 16)
    if not head or b"\0" in head:
        return None
    for cut in range(4):  # the 64 KB may end inside a multi-byte character
        try:
            text = head[: len(head) - cut].decode("utf-8")
            break
        except UnicodeDecodeError:
            continue
    else:
        return None
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    return ".jsonl" if first.startswith("{") else ".txt"


def is_text(path: str | Path) -> bool:
    """Is ``path`` text calibration data (tokenised with a checkpoint's tokenizer), rather than arrays?"""
    return Path(path).is_file() and _data_format(Path(path)) in (".txt", ".jsonl")


#: text data bitplan reads at most (calibration needs a few MB: 2,048 windows of 129 tokens are ~1 MB of text)
MAX_TEXT_BYTES = 64 << 20
#: token windows made from text at most
MAX_WINDOWS = 2048
TEXT_HINT = ("text data is a .txt file (one stream) or .jsonl (one {\"text\": ...} object per line), tokenised with "
             "the tokenizer.json of a Hugging Face checkpoint")


@dataclass
class TextData:
    documents: list[str]
    source: str
    sha256: str

    @property
    def characters(self) -> int:
        return sum(len(d) for d in self.documents)


def read_text(path: str | Path) -> TextData:
    """A .txt file as one document, or a .jsonl file's ``text`` fields, checked line by line."""
    path = Path(path)
    size = path.stat().st_size
    if size > MAX_TEXT_BYTES:
        raise DataError(f"{path.name} is {size / 1e6:,.0f} MB of text, more than the {MAX_TEXT_BYTES >> 20} MB bitplan reads",
                        "calibration needs a few MB of text: send a sample of it", field="data")
    try:
        raw = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path.name} is not UTF-8 text ({exc})", TEXT_HINT, field="data") from None
    if _data_format(path) == ".txt":
        documents = [raw] if raw.strip() else []
    else:
        import json

        documents = []
        for number, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path.name}, line {number}: not JSON ({exc.msg})", TEXT_HINT, field="data") from None
            if not isinstance(item, dict) or not isinstance(item.get("text"), str):
                raise DataError(f"{path.name}, line {number}: expected an object with a \"text\" string",
                                TEXT_HINT, field="data")
            documents.append(item["text"])
    if not documents:
        raise DataError(f"{path.name} holds no text", TEXT_HINT, field="data")
    return TextData(documents, str(path), sha256_file(path))


def tokenize_text(text: TextData, tokenizer, seq_len: int, vocab_size: int | None, label: str = "the data") -> Dataset:
    """Windows of ``seq_len + 1`` consecutive tokens of the documents (joined): inputs ``input_ids`` are the first
    ``seq_len`` of each, targets the next-token ids. At most MAX_WINDOWS windows."""
    name = Path(text.source).name
    if tokenizer is None:
        raise DataError(f"{name} is text, and this model has no tokenizer.json to turn it into token ids",
                        "send a Hugging Face checkpoint with its tokenizer.json, or token ids as .npz "
                        "('inputs.input_ids', int64, N x T, with 'targets')", code="needs_tokenizer", field="data")
    ids: list[int] = []
    for enc in tokenizer.encode_batch(text.documents):
        ids.extend(enc.ids)
        if len(ids) >= MAX_WINDOWS * (seq_len + 1):
            break
    windows = min(len(ids) // (seq_len + 1), MAX_WINDOWS)
    if windows < 1:
        raise DataError(f"{label}: {name} gives {len(ids):,} tokens, fewer than one window of seq_len + 1 = "
                        f"{seq_len + 1} tokens", "send more text, or ask for a smaller seq_len", field="data")
    tensor = torch.tensor(ids[: windows * (seq_len + 1)], dtype=torch.int64).view(windows, seq_len + 1)
    if vocab_size is not None and int(tensor.max()) >= vocab_size:
        raise DataError(f"{label}: the tokenizer gives token id {int(tensor.max())}, but the model's vocabulary has "
                        f"{vocab_size} entries: tokenizer.json does not belong to this model",
                        "send the checkpoint's own tokenizer.json", field="data")
    digest = hashlib.sha256(f"{text.sha256}:tokens:{seq_len}".encode()).hexdigest()
    return Dataset({"input_ids": tensor[:, :-1].contiguous()}, tensor[:, 1:].contiguous(),
                   f"{text.source} ({windows} windows of {seq_len} tokens)", digest)


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    """Check the archive's sizes and member names first: only ``.npy`` members are ever read."""
    try:
        with zipfile.ZipFile(path) as zf:
            check_unpacked_size(zf, path.name)
            others = [n for n in zf.namelist() if not n.endswith(".npy")]
        if others:
            raise DataError(f"{path.name} holds '{others[0]}', which is not a numpy array "
                            "(a torch.save() file or another pickle archive?)", DATA_FORMATS)
        with np.load(path, allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    except ValueError as exc:
        raise DataError(f"{path.name}: {exc}", "store plain numeric arrays (no Python objects)") from None
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise DataError(f"{path.name} is truncated or corrupt: not a readable .npz file ({exc})",
                        "upload the complete file again, written with numpy.savez") from None


def _read_arrays(path: Path) -> dict[str, np.ndarray]:
    suffix = _data_format(path)
    if suffix == ".npz":
        return _read_npz(path)
    from safetensors.numpy import load_file

    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types
        raise DataError(f"{path.name} is not a readable .safetensors file ({exc})") from None


def _tensor(path: Path, key: str, arr: np.ndarray) -> torch.Tensor:
    """A model input as a tensor; only bool, integer and float arrays are model inputs (strings, dates,
    records and complex numbers are refused here rather than failing inside torch)."""
    if arr.dtype.kind not in "biuf":
        raise DataError(f"{path.name}: '{key}' has dtype {arr.dtype}, which is not a tensor type",
                        "model inputs are bool, integer or float arrays")
    if arr.dtype.kind == "f" and arr.size and not np.isfinite(arr).all():
        index = tuple(int(i) for i in np.argwhere(~np.isfinite(arr))[0])
        raise DataError(f"{path.name}: '{key}' holds {arr[index]} at index {list(index)}; model inputs must be finite "
                        f"({int((~np.isfinite(arr)).sum()):,} NaN or infinite values in all)",
                        "replace or drop those samples (e.g. numpy.nan_to_num, or keep rows where numpy.isfinite)")
    if not arr.dtype.isnative:  # torch reads native byte order only
        arr = arr.astype(arr.dtype.newbyteorder("="))
    return torch.from_numpy(np.ascontiguousarray(arr))


def load_data(path: str | Path, tokenizer=None, seq_len: int = 128, vocab_size: int | None = None) -> Dataset:
    """Arrays from .npz/.safetensors, or text (.txt/.jsonl) tokenised with ``tokenizer`` into ``seq_len`` windows."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file '{path}' not found")
    if _data_format(path) in (".txt", ".jsonl"):
        return tokenize_text(read_text(path), tokenizer, seq_len, vocab_size)
    arrays = _read_arrays(path)
    inputs: dict[str, torch.Tensor] = {}
    targets = None
    for key, arr in arrays.items():
        if key == "inputs":
            inputs[POSITIONAL] = _tensor(path, key, arr)
        elif key.startswith("inputs."):
            inputs[key[len("inputs."):]] = _tensor(path, key, arr)
        elif key == "targets":
            if not np.issubdtype(arr.dtype, np.integer):
                raise DataError(f"{path.name}: 'targets' has dtype {arr.dtype}", "targets must be integer class ids")
            targets = torch.from_numpy(arr.astype(np.int64))
        else:
            raise DataError(
                f"{path.name}: unexpected array '{key}'",
                "expected 'inputs' or 'inputs.<name>' (keyword inputs), and optional integer 'targets'",
            )
    if not inputs:
        raise DataError(f"{path.name} has no 'inputs' array", "save the model inputs as 'inputs' or 'inputs.<name>'")
    if POSITIONAL in inputs and len(inputs) > 1:
        raise DataError(f"{path.name} mixes 'inputs' with 'inputs.<name>'", "use one form")
    sizes = {k or "inputs": v.shape[0] if v.dim() else 0 for k, v in inputs.items()}
    if targets is not None:
        sizes["targets"] = targets.shape[0] if targets.dim() else 0
    if len(set(sizes.values())) != 1 or 0 in sizes.values():
        raise DataError(f"{path.name}: arrays disagree on the number of samples {sizes}", "the first dimension is the sample")
    return Dataset(inputs, targets, str(path), sha256_file(path))


def conform(data: Dataset, spec: list[InputSpec], label: str = "the data", field: str | None = "data") -> Dataset:
    """Check names, ranks, fixed dims and dtype families against the model (``bitplan.inputs``, the rule the
    API applies at submit too); cast within a family."""
    given = {k: (tuple(v.shape), str(v.dtype)) for k, v in data.inputs.items()}
    pairs = match_inputs([(s.name, s.shape, s.dtype) for s in spec], given, label, field)
    out = dict(data.inputs)
    for key, dtype in pairs:
        out[key] = out[key].to(getattr(torch, dtype))
    return Dataset(out, data.targets, data.source, data.sha256)

