"""Number formats a layer's weights may take besides bitplan's own INT-b (torch-free).

A layer's weight *choice* is either an ``int`` (INT-b: symmetric signed integers, one fp32 scale per output
channel; 16 keeps full precision) or the name of one of ``FORMATS`` (FLIQS's point: the search picks the format
as well as the width). Each format has a nominal element width (``bits``, what ``avg_weight_bits`` counts) and a
scale layout, which the size cost counts exactly:

=========  ====  =================================  ===================================================
name       bits  elements                           scales
=========  ====  =================================  ===================================================
fp8_e4m3   8     FP8 E4M3 (max 448)                 fp32 per output channel
fp8_e5m2   8     FP8 E5M2 (max 57344)               fp32 per output channel
mxfp8      8     FP8 E4M3                           E8M0 (a power of two) per block of 32 (OCP MX)
mxfp4      4     FP4 E2M1 (0, 0.5, 1, 1.5, 2, 3, 4, 6)  E8M0 per block of 32 (OCP MX)
nvfp4      4     FP4 E2M1                           FP8 E4M3 per block of 16, and one fp32 per tensor
nf4        4     NormalFloat-4 (QLoRA)              fp32 absmax per block of 64 (no double quantization)
=========  ====  =================================  ===================================================

Blocks run along a weight's input dimension (a row of ``[out, in]``, or a conv kernel's flattened row); a row
whose length is not a multiple of the block ends in a shorter block, which still stores a whole scale.

``TARGETS`` are the runtimes' presets (``--target``): the INT widths and formats each can execute.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

FULL_PRECISION = 16
#: a layer's weight choice: INT-b (an int; 16 keeps full precision) or a format's name
WeightChoice = int | str


@dataclass(frozen=True)
class NumberFormat:
    name: str
    bits: int  # element width: what avg_weight_bits counts
    block: int | None  # elements per scale along a row; None: one scale per output channel
    scale_bits: int  # bits each scale takes
    tensor_bytes: int  # bytes stored once per tensor (nvfp4's fp32 global scale)
    description: str

    def scale_bytes(self, params: int, out_channels: int) -> float:
        """Bytes of scales for a weight of ``params`` elements in ``out_channels`` rows."""
        rows = max(out_channels, 1)
        per_row = 1 if self.block is None else math.ceil(params / rows / self.block)
        return rows * per_row * self.scale_bits / 8 + self.tensor_bytes

    def bits_per_weight(self, params: int, out_channels: int) -> float:
        """Element bits plus the scales' share, per weight."""
        return self.bits + 8 * self.scale_bytes(params, out_channels) / max(params, 1)


FORMATS: dict[str, NumberFormat] = {f.name: f for f in (
    NumberFormat("fp8_e4m3", 8, None, 32, 0, "FP8 E4M3, one fp32 scale per output channel"),
    NumberFormat("fp8_e5m2", 8, None, 32, 0, "FP8 E5M2, one fp32 scale per output channel"),
    NumberFormat("mxfp8", 8, 32, 8, 0, "MXFP8: FP8 E4M3 elements, a power-of-two (E8M0) scale per 32"),
    NumberFormat("mxfp4", 4, 32, 8, 0, "MXFP4: FP4 E2M1 elements, a power-of-two (E8M0) scale per 32"),
    NumberFormat("nvfp4", 4, 16, 8, 4, "NVFP4: FP4 E2M1 elements, an FP8 E4M3 scale per 16 and an fp32 per tensor"),
    NumberFormat("nf4", 4, 64, 32, 0, "NF4 (QLoRA's NormalFloat): 16 normal quantiles, fp32 absmax per 64"),
)}

#: Runtimes and what each executes: INT widths (16 = leave in float) and formats. ``--target NAME`` sets a job's
#: weight choices to these (an explicit --w-bits/--formats narrows them further).
TARGETS: dict[str, tuple[tuple[int, ...], tuple[str, ...]]] = {
    # IntxWeightOnlyConfig int1..int8 and Float8WeightOnlyConfig (bitplan export --to torchao)
    "torchao": ((2, 3, 4, 5, 6, 8, 16), ("fp8_e4m3",)),
    # compressed-tensors checkpoints: W4A16/W8A16 pack-quantized, FP8 and NVFP4 (bitplan export --to compressed-tensors)
    "vllm": ((4, 8, 16), ("fp8_e4m3", "nvfp4")),
    # GGUF: K-quants q2_K..q6_K and q8_0; no float formats
    "llamacpp": ((2, 3, 4, 5, 6, 8, 16), ()),
    # TensorRT-LLM through ModelOpt: INT4 blockwise, INT8, FP8, NVFP4, MXFP4/MXFP8
    "modelopt": ((4, 8, 16), ("fp8_e4m3", "nvfp4", "mxfp4", "mxfp8")),
}


def check_formats(names: object) -> tuple[str, ...]:
    """``names`` as a sorted tuple of known format names, else ValueError naming the unknown ones."""
    items = [names] if isinstance(names, str) else list(names or ())  # type: ignore[call-overload]
    out = []
    for item in items:
        for name in str(item).split(","):
            name = name.strip().lower().replace("-", "_")
            if not name:
                continue
            if name not in FORMATS:
                raise ValueError(f"format '{name[:40]}' is not one bitplan knows; choose from {', '.join(FORMATS)} "
                                 f"(INT widths are given as w_bits)")
            out.append(name)
    return tuple(sorted(set(out), key=list(FORMATS).index))


def apply_target(target: str, w_bits: object = None, formats: object = None) -> tuple[str, tuple[int, ...],
                                                                                   tuple[str, ...]]:
    """(target, INT widths, formats) for ``--target``: the runtime's, narrowed by any ``w_bits``/``formats``
    also given; ValueError saying what does not run there."""
    name = str(target).strip().lower()
    if name not in TARGETS:
        raise ValueError(f"target '{name[:40]}' is not a runtime bitplan knows; choose from {', '.join(TARGETS)}")
    widths, fmts = TARGETS[name]
    if w_bits is not None:
        given = {int(b) for b in ([w_bits] if isinstance(w_bits, int) else w_bits)}  # type: ignore[attr-defined]
        widths = tuple(b for b in widths if b in given)
        if not widths:
            raise ValueError(f"none of w_bits {sorted(given)} runs on {name}, which takes INT {list(TARGETS[name][0])}")
    if formats:
        asked = set(check_formats(formats))
        if asked - set(fmts):
            raise ValueError(f"{name} does not run format(s) {sorted(asked - set(fmts))}; it takes "
                             f"{', '.join(fmts) or 'no float formats'}")
        fmts = tuple(f for f in fmts if f in asked)
    return name, widths, fmts


def choice_bits(choice: WeightChoice) -> int:
    """The element width of a choice (what avg_weight_bits counts)."""
    return FORMATS[choice].bits if isinstance(choice, str) else int(choice)


def choice_label(choice: WeightChoice) -> str:
    """'int4', '16-bit' (full precision) or the format's name."""
    if isinstance(choice, str):
        return choice
    return "16-bit" if choice >= FULL_PRECISION else f"int{choice}"


def choice_format(choice: WeightChoice) -> str:
    """'int' for INT-b and full precision, else the format's name (PlanLayer.w_format)."""
    return choice if isinstance(choice, str) else "int"


def weight_choice(w_bits: int, w_format: str = "int") -> WeightChoice:
    """The choice a plan layer's (w_bits, w_format) stands for."""
    return w_bits if w_format == "int" else w_format


def size_bytes(choice: WeightChoice, params: int, out_channels: int, int_scale_bytes: int = 4) -> float:
    """Stored bytes of one weight at ``choice``: elements plus scales (INT-b: one fp32 scale per row)."""
    if isinstance(choice, str):
        fmt = FORMATS[choice]
        return params * fmt.bits / 8 + fmt.scale_bytes(params, out_channels)
    return params * choice / 8 + (out_channels * int_scale_bytes if choice < FULL_PRECISION else 0)


def table_key(key: object) -> WeightChoice:
    """A latency table's column: a bit width (an int, or a string of digits) or a format's name."""
    if isinstance(key, str) and key.strip().lower() in FORMATS:
        return key.strip().lower()
    if isinstance(key, int | str):
        return int(key)
    raise ValueError(f"'{str(key)[:20]}' is not a bit width or a format name")


def table_keys(table: object) -> object:
    """A latency table ``{layer: {column: ms}}`` with its columns as ``table_key`` reads them (anything else as
    given, for the schema to refuse); ValueError for a column that is neither a width nor a format."""
    if not isinstance(table, dict):
        return table
    try:
        return {name: {table_key(k): ms for k, ms in row.items()} if isinstance(row, dict) else row
                for name, row in table.items()}
    except (TypeError, ValueError):
        raise ValueError("latency_table columns must be bit widths or format names") from None


def ladder(choices: list[WeightChoice] | tuple[WeightChoice, ...]) -> list[WeightChoice]:
    """Choices from cheapest to dearest per weight (a 4096-wide row's scale share), INT before a format of equal
    cost: the steps the measured local search moves a layer along."""
    def key(c: WeightChoice) -> tuple[float, int]:
        return size_bytes(c, 4096, 1) / 4096, isinstance(c, str)
    return sorted(choices, key=key)
