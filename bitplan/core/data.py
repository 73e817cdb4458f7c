"""Calibration / evaluation data: ``.npz`` or ``.safetensors`` holding ``inputs``
(one positional input) or ``inputs.<name>`` (keyword inputs), and optional
integer ``targets``. Never unpickled: npz is read with ``allow_pickle=False``.
"""

from __future__ import annotations

import hashlib
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from bitplan.archives import check_unpacked_size
from bitplan.errors import DataError
from bitplan.files import sha256_file
from bitplan.inputs import POSITIONAL, match_inputs
from bitplan.schemas import InputSpec

DATA_FORMATS = "send .npz (numpy.savez) or .safetensors holding 'inputs' (or 'inputs.<name>') and optional integer 'targets'"
PICKLE_HINT = "bitplan never unpickles uploads, because unpickling can run arbitrary code"


@dataclass
class Batch:
    args: tuple
    kwargs: dict
    targets: torch.Tensor | None
    size: int


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
    if suffix in (".npz", ".safetensors"):
        return suffix
    if head[:4] == b"PK\x03\x04":
        return ".npz"
    if len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < 100_000_000:
        return ".safetensors"
    raise DataError(f"{path.name} is neither a .npz nor a .safetensors file", DATA_FORMATS)


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


def load_data(path: str | Path) -> Dataset:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file '{path}' not found")
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

