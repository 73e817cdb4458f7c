"""Synthetic calibration data shaped like a model's inputs, written with numpy only.

The REST service plans without a user dataset by feeding random inputs; this
module stays torch-free so the API process can write that file itself. The file
is an ordinary ``.npz`` that :func:`bitplan.core.data.load_data` reads and
``conform`` accepts, without targets (so losses are KL to full precision).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from bitplan.errors import DataError
from bitplan.files import sha256_file

_FLOATS = {"float16": np.float16, "float32": np.float32, "float64": np.float64}
_INTS = ("int8", "int16", "int32", "int64", "uint8")
TOKEN_IDS = 100  # integer inputs are token ids in [0, TOKEN_IDS): inside any real vocabulary


def write_synthetic(inputs: list[dict[str, Any]], samples: int, seed: int, path: str) -> str:
    """Write ``samples`` random samples for the input specs ``inputs`` ({name, dtype, shape}) to ``path``.

    Deterministic for a seed. Returns the file's sha256. Floats are standard normal; integers are
    token ids, except mask-like inputs (all ones: attend everywhere) and segment ids (all zero:
    one segment, which every type vocabulary has); booleans are all true.
    """
    if samples < 1:
        raise DataError(f"synthetic data needs at least one sample, not {samples}")
    if not inputs:
        raise DataError("the model has no inputs to make synthetic data for")
    rng = np.random.default_rng(seed)
    arrays = {_key(inputs, spec): _array(spec, samples, rng) for spec in inputs}
    target = Path(path)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        with tmp.open("wb") as fh:  # a file object, so numpy does not append ".npz" to the name
            np.savez(fh, **arrays)  # type: ignore[arg-type]  # numpy stubs: **kwds are arrays
        tmp.replace(target)
    finally:
        tmp.unlink(missing_ok=True)
    return sha256_file(target)


def _key(inputs: list[dict[str, Any]], spec: dict[str, Any]) -> str:
    """``inputs`` (positional) for a model with one input, else ``inputs.<name>`` (keywords), as load_data reads them.

    One input always goes positionally, named or not: a program exported with ``(x,)`` refuses
    ``x=`` as a keyword, and conform accepts a positional array for any single-input model.
    """
    if len(inputs) == 1:
        return "inputs"
    name = spec.get("name") or ""
    if not name:
        raise DataError("a model with several inputs has one without a name", "name every input of the model")
    return f"inputs.{name}"


def _array(spec: dict[str, Any], samples: int, rng: np.random.Generator) -> np.ndarray:
    name, dtype = str(spec.get("name") or ""), str(spec["dtype"])
    shape = _shape(name, list(spec["shape"]), samples)
    lowered = name.lower()
    if dtype == "bool":
        return np.ones(shape, dtype=bool)
    if dtype in _INTS:
        if "mask" in lowered:
            return np.ones(shape, dtype=np.int64)
        if "token_type" in lowered or "segment" in lowered:
            return np.zeros(shape, dtype=np.int64)
        return rng.integers(0, TOKEN_IDS, size=shape, dtype=np.int64)
    if dtype in _FLOATS or dtype == "bfloat16":  # numpy has no bfloat16: float32, which conform casts
        out = np.ones(shape) if "mask" in lowered else rng.standard_normal(shape)
        return out.astype(_FLOATS.get(dtype, np.float32))
    raise DataError(f"input '{name}' has dtype {dtype}, for which bitplan cannot make synthetic data",
                    "upload a dataset instead")


def _shape(name: str, shape: list[Any], samples: int) -> tuple[int, ...]:
    if not shape:
        raise DataError(f"input '{name}' is a scalar; synthetic data needs a sample dimension", "upload a dataset instead")
    first, rest = shape[0], shape[1:]
    if any(d is None for d in rest):
        raise DataError(f"input '{name}' has a free dimension besides the batch: {shape}",
                        "upload a dataset, whose arrays fix every dimension")
    return (samples if first is None else int(first), *(int(d) for d in rest))
