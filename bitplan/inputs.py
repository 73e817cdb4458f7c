"""Does data fit a model's inputs? One rule, torch-free, used by the engine's ``conform`` (on tensors) and
by the API at submit (on stored descriptions), so both refuse the same data with the same words.

The rule, in order: one positional ``inputs`` for a one-input model, else the array names must be the
model's; then each input's rank, every dim the model fixes (N, the samples, is free), and its dtype family
(float, bool, integer: within a family values are cast, across families they are refused).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from bitplan.errors import DataError

POSITIONAL = ""  # the name of the one unnamed input ('inputs' in a file)


def dtype_family(dtype: str) -> str:
    dtype = dtype.removeprefix("torch.")
    if dtype == "bool":
        return "bool"
    return "float" if dtype.startswith("float") or dtype == "bfloat16" else "int"


def shape_text(shape: Sequence[int | None]) -> str:
    return "(" + ", ".join("N" if d is None else str(d) for d in shape) + ")"


def array_name(key: str) -> str:
    return f"'inputs.{key}'" if key else "'inputs'"


def match_inputs(spec: Sequence[tuple[str, Sequence[int | None], str]],
                 given: Mapping[str, tuple[Sequence[int], str]], label: str = "the data",
                 field: str | None = "data", check_shapes: bool = True) -> list[tuple[str, str]]:
    """Check ``given`` (array name -> (shape, dtype)) against ``spec`` ((name, shape, dtype) per model input).

    Returns (array name, the model's dtype) for each input, to cast to; raises a DataError naming ``label``
    and ``field`` otherwise. ``check_shapes=False`` checks names only (TorchScript, traced with the data)."""
    expected = ", ".join(f"{name}: {shape_text(shape)} {dtype}" for name, shape, dtype in spec)
    if POSITIONAL in given:
        if len(spec) != 1:
            raise DataError(f"{label} has one positional 'inputs', but {len(spec)} named inputs are expected: "
                            + ", ".join(name for name, _, _ in spec),
                            f"save them as 'inputs.<name>'; the model expects {expected}", field=field)
        pairs = [(POSITIONAL, spec[0])]
    else:
        names = {name for name, _, _ in spec}
        if set(given) != names:
            raise DataError(f"{label} has inputs {sorted(given)}, but the inputs expected are {sorted(names)}",
                            f"save them as 'inputs.<name>'; the model expects {expected}", field=field)
        pairs = [(s[0], s) for s in spec]
    out = []
    for key, (_, want_shape, want_dtype) in pairs:
        shape, dtype = given[key]
        name = array_name(key)
        if check_shapes:
            if len(shape) != len(want_shape) or any(e is not None and e != g for e, g in zip(want_shape, shape)):
                raise DataError(f"{label}: {name} has shape {shape_text(shape)}, but the expected shape is "
                                f"{shape_text(want_shape)} {want_dtype}",
                                "N is the number of samples; the other dims must match the model's input", field=field)
            if dtype_family(dtype) != dtype_family(want_dtype):
                raise DataError(f"{label}: {name} has dtype {dtype.removeprefix('torch.')}, but the expected dtype is "
                                f"{want_dtype}", f"save {name} as {want_dtype}, the dtype of the model's input",
                                field=field)
        out.append((key, want_dtype))
    return out
