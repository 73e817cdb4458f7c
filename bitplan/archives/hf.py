"""A Hugging Face checkpoint (``config.json`` + ``*.safetensors``), as a directory or a zip of one, checked
before transformers or torch reads a byte of it. Standard library only.

What is read, and how it is checked:

* ``config.json``: strict JSON (no duplicate keys, NaN or Infinity), an object with a ``model_type`` and at
  most one architecture, both plain names; ``auto_map`` (code shipped with the checkpoint) is refused,
  since bitplan never runs it (transformers is always called with ``trust_remote_code=False``); every
  number bounded;
* ``*.safetensors``: each file's header is parsed here (its length bounded by the file's), every tensor
  name a dotted path of letters, digits and '_', every dtype known, every shape and byte range consistent
  and inside the file, no two tensors overlapping, no name twice across shards;
* ``model.safetensors.index.json``: every weight it maps is in the shard it names, every shard it names
  exists;
* ``tokenizer.json`` (optional): JSON, size-bounded; the Rust ``tokenizers`` library parses it.

Everything else in the directory (README, pickled ``pytorch_model.bin``, ``*.py`` modelling code, other
tokenizer formats) is never opened; :attr:`CheckedCheckpoint.skipped` lists it. A checkpoint whose weights
exist only as pickles is refused. :func:`write_canonical_checkpoint` writes what was checked, and only
that, into a fresh directory: the only one transformers is given.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import shutil
import stat
import struct
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from bitplan.archives.names import check_fqn
from bitplan.archives.zips import PLAIN, Refused, check_unpacked_size, shown
from bitplan.errors import ModelFormatError, UnsafeModelError

HF_HINT = ("send a Hugging Face checkpoint saved with model.save_pretrained(dir, safe_serialization=True): "
           "config.json, model.safetensors (or its shards and model.safetensors.index.json), and tokenizer.json "
           "for text data; zip the folder to upload it")
CONFIG = "config.json"
INDEX = "model.safetensors.index.json"
TOKENIZER = "tokenizer.json"
MAX_CONFIG_BYTES = 1 << 20
MAX_INDEX_BYTES = 64 << 20
MAX_TOKENIZER_BYTES = 256 << 20
MAX_HEADER_BYTES = 100_000_000
MAX_SHARDS = 10_000
MAX_CONFIG_INT = 1 << 40
SHARD_NAME = re.compile(r"[A-Za-z0-9_.-]{1,200}\.safetensors\Z")
TYPE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_-]{0,100}\Z")
#: safetensors dtype -> bytes per element
DTYPES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
          "U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1}
PICKLED = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
#: metadata a checkpoint folder usually holds that bitplan does not need: not read, and not worth a note
BENIGN = frozenset({"generation_config.json", "tokenizer_config.json", "special_tokens_map.json", "README.md",
                    ".gitattributes", "LICENSE", "LICENSE.txt", "vocab.json", "merges.txt", "vocab.txt",
                    "added_tokens.json", "chat_template.jinja", "chat_template.json"})


@dataclass(frozen=True)
class Tensor:
    dtype: str
    shape: tuple[int, ...]


@dataclass
class CheckedCheckpoint:
    """What :func:`check_checkpoint` accepted: the config, each shard's tensors, where to read them from."""

    label: str
    config: dict[str, Any]
    shards: dict[str, dict[str, Tensor]]  # shard file -> tensor name -> dtype, shape
    sha256: str
    tokenizer: bool
    skipped: list[str] = field(default_factory=list)
    _source: _Source | None = None

    @property
    def architecture(self) -> str | None:
        arch = self.config.get("architectures")
        return arch[0] if arch else None

    @property
    def tensors(self) -> dict[str, Tensor]:
        return {name: t for shard in self.shards.values() for name, t in shard.items()}

    def notes(self) -> list[str]:
        """A note naming the files that were not read (pickles, code, others), leaving out common metadata."""
        worth = [rel for rel in self.skipped if rel not in BENIGN]
        if not worth:
            return []
        shown_ = ", ".join(worth[:8]) + (f" and {len(worth) - 8} more" if len(worth) > 8 else "")
        return [f"{self.label}: not read (bitplan reads only config.json, *.safetensors, their index and "
                f"tokenizer.json): {shown_}"]


class _Source:
    """A checkpoint's files: relative name -> size, and a way to open one (a directory or a zip)."""

    def __init__(self, files: dict[str, int], opener: Callable[[str], IO[bytes]], digest: str,
                 folder: Path | None = None) -> None:
        self.files = files
        self._open = opener
        self.digest = digest
        self.folder = folder  # a directory's files can be linked, not copied

    def open(self, rel: str) -> IO[bytes]:
        fh: IO[bytes] = self._open(rel)
        return fh

    def read(self, rel: str, limit: int, what: str, label: str) -> bytes:
        size = self.files[rel]
        if size > limit:
            raise UnsafeModelError(f"{label}: {rel} is {size / 1e6:,.1f} MB, more than the {limit / 1e6:,.0f} MB bitplan "
                                   f"reads for {what}", HF_HINT)
        with self.open(rel) as fh:
            return fh.read(limit + 1)[:limit]


def is_checkpoint_dir(path: str | Path) -> bool:
    return Path(path).is_dir() and (Path(path) / CONFIG).is_file()


def zip_is_checkpoint(names: list[str]) -> bool:
    """A zip whose members look like a checkpoint (a config.json and a .safetensors file, at the top or in one folder)."""
    base = [n.rsplit("/", 1)[-1] for n in names if n.count("/") <= 1]
    return CONFIG in base and any(b.endswith(".safetensors") for b in base)


def _dir_source(path: Path) -> _Source:
    files: dict[str, int] = {}
    for entry in sorted(path.iterdir()):
        try:
            st = entry.stat()  # follows symlinks: a Hugging Face cache snapshot links every file to a blob
        except OSError:
            continue
        if stat.S_ISREG(st.st_mode):
            files[entry.name] = st.st_size
        elif stat.S_ISDIR(st.st_mode):
            files[entry.name + "/"] = 0  # listed as skipped, never read
    digest = hashlib.sha256()
    for rel in sorted(files):
        if _is_read(rel):
            digest.update(rel.encode() + b"\0" + _sha256(path / rel).encode() + b"\n")
    return _Source(files, lambda rel: open(path / rel, "rb"), digest.hexdigest(), folder=path)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _zip_source(path: Path, label: str) -> _Source:
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise ModelFormatError(f"{label} is truncated or corrupt ({exc})", "upload the complete file again") from None
    check_unpacked_size(zf, label, UnsafeModelError)
    infos: dict[str, zipfile.ZipInfo] = {}
    roots = set()
    for info in zf.infolist():
        name = info.filename
        if not name or len(name) > 1000 or not PLAIN.match(name) or name.startswith("/") or "\\" in name \
                or any(part in (".", "..") for part in name.split("/")):
            raise UnsafeModelError(f"{label} holds a member with an unsafe name {shown(name)}", HF_HINT)
        if info.is_dir():
            continue
        parts = name.split("/")
        roots.add(parts[0] if len(parts) > 1 else "")
        if name in infos:
            raise UnsafeModelError(f"{label} holds {shown(name)} twice; readers disagree on which copy counts", HF_HINT)
        infos[name] = info
    # the checkpoint's files are at the top, or inside one folder (``zip -r model.zip model/``)
    root = "" if "" in roots or len(roots) != 1 else next(iter(roots)) + "/"
    files: dict[str, int] = {}
    chosen: dict[str, zipfile.ZipInfo] = {}
    for name, info in infos.items():
        rel = name[len(root):] if name.startswith(root) else name
        if "/" in rel:
            rel = rel.split("/", 1)[0] + "/"  # a subfolder: skipped, never read
            files.setdefault(rel, 0)
            continue
        if rel in chosen:
            raise UnsafeModelError(f"{label} holds {shown(name)} twice; readers disagree on which copy counts", HF_HINT)
        chosen[rel] = info
        files[rel] = info.file_size
    for info in chosen.values():
        if info.flag_bits & 0x1:
            raise ModelFormatError(f"{label}: {info.filename} is encrypted", "zip the checkpoint without a password")
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return _Source(files, lambda rel: zf.open(chosen[rel]), h.hexdigest())


def _is_read(rel: str) -> bool:
    return rel in (CONFIG, INDEX, TOKENIZER) or bool(SHARD_NAME.match(rel))


def check_checkpoint(path: str | Path, label: str | None = None) -> CheckedCheckpoint:
    """Check a checkpoint directory or zip; raise UnsafeModelError / ModelFormatError saying what is wrong."""
    path = Path(path)
    label = label or path.name
    source = _dir_source(path) if path.is_dir() else _zip_source(path, label)
    if CONFIG not in source.files:
        raise ModelFormatError(f"{label} has no config.json: not a Hugging Face checkpoint", HF_HINT)
    config = _strict_json(source.read(CONFIG, MAX_CONFIG_BYTES, "a config", label), f"{label} (config.json)")
    _check_config(config, f"{label} (config.json)")
    shard_names = sorted(rel for rel in source.files if SHARD_NAME.match(rel))
    pickles = sorted(rel for rel in source.files if rel.endswith(PICKLED))
    if not shard_names:
        if pickles:
            raise UnsafeModelError(f"{label} holds its weights only as {', '.join(pickles[:3])}: Python pickles, which "
                                   "bitplan never loads because unpickling can run arbitrary code",
                                   "save the model with model.save_pretrained(dir, safe_serialization=True) to get "
                                   "model.safetensors")
        raise ModelFormatError(f"{label} has no .safetensors weights", HF_HINT)
    weight_map: dict[str, str] | None = None
    if INDEX in source.files:
        index = _strict_json(source.read(INDEX, MAX_INDEX_BYTES, "an index", label), f"{label} ({INDEX})")
        weight_map = _check_index(index, f"{label} ({INDEX})")
        listed = sorted(set(weight_map.values()))
        missing = [s for s in listed if s not in source.files]
        if missing:
            raise ModelFormatError(f"{label}: {INDEX} names shard(s) {missing[:5]} that are not in the checkpoint",
                                   "send every shard the index names")
        shard_names = listed
    elif len(shard_names) > 1:
        raise ModelFormatError(f"{label} holds {len(shard_names)} .safetensors files but no {INDEX} saying which "
                               "weights each holds", HF_HINT)
    if len(shard_names) > MAX_SHARDS:
        raise UnsafeModelError(f"{label} has {len(shard_names):,} shards, more than {MAX_SHARDS:,}", HF_HINT)
    shards: dict[str, dict[str, Tensor]] = {}
    owner: dict[str, str] = {}
    for rel in shard_names:
        with source.open(rel) as fh:
            tensors = _check_safetensors(fh, source.files[rel], f"{label} ({rel})")
        for name in tensors:
            if name in owner:
                raise UnsafeModelError(f"{label}: tensor {shown(name)} is in both {owner[name]} and {rel}", HF_HINT)
            owner[name] = rel
        shards[rel] = tensors
    if weight_map is not None:
        wrong = [(n, s) for n, s in weight_map.items() if owner.get(n) != s]
        if wrong:
            name, shard = wrong[0]
            where = f"is in {owner[name]}" if name in owner else "is in no shard"
            raise ModelFormatError(f"{label}: {INDEX} maps {shown(name)} to {shard}, but it {where} "
                                   f"({len(wrong)} such entries)", "save the checkpoint again; the index is stale")
    tokenizer = TOKENIZER in source.files
    if tokenizer:
        _strict_json(source.read(TOKENIZER, MAX_TOKENIZER_BYTES, "a tokenizer", label), f"{label} ({TOKENIZER})",
                     check_numbers=False)
    read = {CONFIG, INDEX, TOKENIZER, *shard_names}
    skipped = sorted(rel for rel in source.files if rel not in read)
    return CheckedCheckpoint(label, config, shards, source.digest, tokenizer, skipped, source)


def write_canonical_checkpoint(checked: CheckedCheckpoint, dest: str | Path) -> Path:
    """Write the checked files into the empty directory ``dest``: config.json and the index re-serialised from
    what was parsed, the shards and tokenizer.json copied byte for byte from a zip, linked from a local folder.
    Returns ``dest``."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    source = checked._source
    if source is None:
        raise ValueError("checkpoint was not checked from a source")
    (dest / CONFIG).write_text(json.dumps(checked.config))
    if len(checked.shards) > 1:
        weight_map = {name: rel for rel, tensors in checked.shards.items() for name in tensors}
        (dest / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    for rel in [*checked.shards, *([TOKENIZER] if checked.tokenizer else [])]:
        if source.folder is not None:  # a local folder (the CLI's): link its checked files, no copy of the weights
            (dest / rel).symlink_to((source.folder / rel).resolve())
            continue
        with source.open(rel) as src, open(dest / rel, "wb") as out:
            shutil.copyfileobj(src, out, 1 << 20)
    return dest


def _strict_json(raw: bytes, where: str, check_numbers: bool = True) -> Any:
    def no_constants(name: str) -> Any:
        raise Refused(where, f"{name} is not a JSON number", HF_HINT)

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in items:
            if key in out:
                raise Refused(where, f"key {shown(key)} appears twice; readers disagree on which counts", HF_HINT)
            out[key] = value
        return out

    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ModelFormatError(f"{where} is not UTF-8 text", HF_HINT) from None
    try:
        value = json.loads(text, object_pairs_hook=pairs, parse_constant=no_constants)
    except json.JSONDecodeError as exc:
        raise ModelFormatError(f"{where} is not valid JSON ({exc})", HF_HINT) from None
    except RecursionError:
        raise Refused(where, "JSON nested too deeply", HF_HINT) from None
    if check_numbers:
        _check_numbers(value, where)
    return value


def _check_numbers(value: Any, where: str, depth: int = 0) -> None:
    if depth > 32:
        raise Refused(where, "JSON nested deeper than 32 levels", HF_HINT)
    if isinstance(value, dict):
        for v in value.values():
            _check_numbers(v, where, depth + 1)
    elif isinstance(value, list):
        for v in value:
            _check_numbers(v, where, depth + 1)
    elif isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_CONFIG_INT:
        raise Refused(where, f"number {value} is out of range (|n| <= 2^40)", HF_HINT)
    elif isinstance(value, float) and not math.isfinite(value):
        raise Refused(where, f"number {value} is not finite", HF_HINT)


def _check_config(config: Any, where: str) -> None:
    if not isinstance(config, dict):
        raise ModelFormatError(f"{where} is not a JSON object", HF_HINT)
    if "auto_map" in config:
        raise UnsafeModelError(f"{where} names custom code (auto_map: {shown(config['auto_map'])}); bitplan never runs "
                               "code that comes with a checkpoint (transformers' trust_remote_code is always off)",
                               "use an architecture that transformers itself implements")
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or not TYPE_NAME.match(model_type):
        raise ModelFormatError(f"{where} has no valid model_type (got {shown(model_type)})",
                               "save the config with transformers (config.save_pretrained), which writes model_type")
    arch = config.get("architectures")
    if arch is not None:
        if not isinstance(arch, list) or len(arch) > 1 or not all(isinstance(a, str) and TYPE_NAME.match(a) for a in arch):
            raise ModelFormatError(f"{where}: architectures must name one transformers class (got {shown(arch)})",
                                   "keep one entry, e.g. [\"LlamaForCausalLM\"]")


def _check_index(index: Any, where: str) -> dict[str, str]:
    if not isinstance(index, dict) or not isinstance(index.get("weight_map"), dict):
        raise ModelFormatError(f"{where} has no weight_map object", HF_HINT)
    out = {}
    for name, shard in index["weight_map"].items():
        check_fqn(name, where, "weight name")
        if not isinstance(shard, str) or not SHARD_NAME.match(shard):
            raise Refused(where, f"shard name {shown(shard)} is not a plain .safetensors file name", HF_HINT)
        out[name] = shard
    return out


def _check_safetensors(fh: IO[bytes], size: int, where: str) -> dict[str, Tensor]:
    """The header of a safetensors file, checked against the file's size, without reading the tensors."""
    head = fh.read(8)
    if len(head) < 8:
        raise ModelFormatError(f"{where} is truncated (no header)", "send the complete file")
    (length,) = struct.unpack("<Q", head)
    if length > min(MAX_HEADER_BYTES, size - 8):
        raise Refused(where, f"header length {length:,} exceeds the file ({size:,} bytes) or the "
                      f"{MAX_HEADER_BYTES / 1e6:g} MB bitplan reads", HF_HINT)
    header = _strict_json(fh.read(length), where, check_numbers=False)
    if not isinstance(header, dict):
        raise Refused(where, "header is not a JSON object", HF_HINT)
    payload = size - 8 - length
    tensors: dict[str, Tensor] = {}
    spans: list[tuple[int, int, str]] = []
    for name, entry in header.items():
        if name == "__metadata__":
            if not isinstance(entry, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in entry.items()):
                raise Refused(where, "__metadata__ must map strings to strings", HF_HINT)
            continue
        check_fqn(name, where, "tensor name")
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise Refused(where, f"tensor {shown(name)} is not described by dtype, shape and data_offsets", HF_HINT)
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if dtype not in DTYPES:
            raise Refused(where, f"tensor {shown(name)} has unknown dtype {shown(dtype)}", HF_HINT)
        if (not isinstance(shape, list) or len(shape) > 8
                or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < MAX_CONFIG_INT for d in shape)):
            raise Refused(where, f"tensor {shown(name)} has a bad shape {shown(shape)}", HF_HINT)
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)):
            raise Refused(where, f"tensor {shown(name)} has bad data_offsets {shown(offsets)}", HF_HINT)
        start, end = offsets
        nbytes = math.prod(shape) * DTYPES[dtype]
        if not 0 <= start <= end <= payload or end - start != nbytes:
            raise Refused(where, f"tensor {shown(name)} ({dtype} {shape}, {nbytes:,} bytes) has data_offsets {offsets} "
                          f"outside or inconsistent with the {payload:,} bytes of data", HF_HINT)
        tensors[name] = Tensor(dtype, tuple(shape))
        if end > start:
            spans.append((start, end, name))
    spans.sort()
    for (_, end_a, a), (start_b, _, b) in zip(spans, spans[1:]):
        if start_b < end_a:
            raise Refused(where, f"tensors {shown(a)} and {shown(b)} overlap", HF_HINT)
    if not tensors:
        raise ModelFormatError(f"{where} holds no tensors", HF_HINT)
    return tensors

