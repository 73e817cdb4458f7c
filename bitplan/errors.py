"""One error family for every user-facing failure, from the core to the CLI, the API and the web form.

An error carries a stable ``code`` (what went wrong, for programs), a ``message`` (what, for people), a
``hint`` (what to do, in words that suit every front end: no CLI flags, no HTTP routes), the request
``field`` it is about when there is one (``data``, ``pins``, ``budgets``, ``sensitivity``, ...), and any
``extra`` facts a client can use (``minimums`` of an infeasible budget). Front ends route by code and
field, never by the message text: the CLI names the option for the field, the API returns every part as
JSON, and the web form shows the message beside the field. Tracebacks are for bugs only.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar


class BitplanError(Exception):
    """A failure the user can act on: ``message`` says what, ``hint`` what to do."""

    code = "bad_input"
    _by_code: ClassVar[dict[str, type[BitplanError]]] = {}

    def __init__(self, message: str, hint: str | None = None, *, field: str | None = None, code: str | None = None,
                 **extra: Any) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.field = field
        self.extra = extra
        if code is not None:
            self.code = code

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        BitplanError._by_code.setdefault(cls.code, cls)

    def __str__(self) -> str:
        return self.one_line()

    def one_line(self) -> str:
        return self.message if not self.hint else f"{self.message} ({self.hint})"

    def to_dict(self) -> dict[str, Any]:
        """Every part, JSON-ready: what the API answers and what a sandboxed process sends to its parent."""
        out: dict[str, Any] = {"code": self.code, "message": self.message, "hint": self.hint}
        if self.field is not None:
            out["field"] = self.field
        return {**out, **self.extra}

    @staticmethod
    def from_dict(data: dict[str, Any]) -> BitplanError:
        """The error :meth:`to_dict` described, as the class its code belongs to."""
        known = {"code", "message", "hint", "field", "kind"}
        code = str(data.get("code") or "bad_input")
        cls = BitplanError._by_code.get(code, BitplanError)
        extra = {k: v for k, v in data.items() if k not in known}
        message, hint, field = str(data.get("message") or ""), data.get("hint"), data.get("field")
        try:
            return cls._rebuild(message, hint, field, code, dict(extra))
        except TypeError:  # a subclass whose constructor takes other arguments: the base class carries it all
            return BitplanError(message, hint, field=field, code=code, **extra)

    @classmethod
    def _rebuild(cls, message: str, hint: str | None, field: str | None, code: str, extra: dict[str, Any]) -> BitplanError:
        return cls(message, hint, field=field, code=code, **extra)


class UnsafeModelError(BitplanError):
    """The upload would need unpickling arbitrary objects; refused unread."""

    code = "unsafe_model"


class ModelFormatError(BitplanError):
    code = "bad_model"


class DataError(BitplanError):
    code = "bad_data"


class BudgetError(BitplanError):
    code = "bad_budget"


class InfeasibleError(BitplanError):
    """No plan satisfies the budgets; ``minimums`` names the smallest achievable values."""

    code = "infeasible"

    def __init__(self, message: str, hint: str | None = None, minimums: Mapping[str, float] | None = None, *,
                 field: str | None = "budgets", **extra: Any) -> None:
        extra.pop("code", None)
        super().__init__(message, hint, field=field, minimums=dict(minimums or {}), **extra)

    @property
    def minimums(self) -> dict[str, float]:
        minimums: dict[str, float] = self.extra["minimums"]
        return minimums

    @classmethod
    def _rebuild(cls, message: str, hint: str | None, field: str | None, code: str, extra: dict[str, Any]) -> BitplanError:
        return cls(message, hint, extra.pop("minimums", None), field=field, **extra)


class ExportError(BitplanError):
    """A plan that cannot be written in the asked runtime format (the message says why, the hint what would work)."""

    code = "export_unsupported"


class GpuOutOfMemoryError(BitplanError):
    """The run needed more GPU memory than the device had free: the user can ask for less."""

    code = "gpu_out_of_memory"


GPU_OOM_HINT = ("use fewer samples or smaller micro-batches (the sensitivity parameters max_samples and batch_size, "
                "and the plan's batch_size), or dtype bfloat16, or a GPU with more free memory")


def gpu_out_of_memory(exc: BaseException) -> GpuOutOfMemoryError | None:
    """``exc`` as a GpuOutOfMemoryError when it is torch's CUDA out-of-memory error (torch.cuda.OutOfMemoryError, or
    a RuntimeError saying "CUDA out of memory" / a cuBLAS or cuDNN allocation failure), else None. Torch-free, so the
    CLI and the sandbox can classify the error without importing torch."""
    text = str(exc)
    torch_oom = (type(exc).__name__ == "OutOfMemoryError" and type(exc).__module__.startswith("torch")
                 and "can't allocate memory" not in text)  # (the CPU allocator's words: host memory, not the GPU's)
    if not (torch_oom or (isinstance(exc, RuntimeError) and any(
            s in text for s in ("CUDA out of memory", "CUBLAS_STATUS_ALLOC_FAILED", "CUDNN_STATUS_ALLOC_FAILED")))):
        return None
    first = (text.strip().splitlines() or ["CUDA out of memory"])[0]
    # torch says e.g. "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.1 GiB of which
    # 1.2 GiB is free. ..."; the first two sentences say how much and on which device
    shown = ". ".join(first.split(". ")[:3]).rstrip(".")[:400]
    return GpuOutOfMemoryError(f"ran out of GPU memory ({shown})", GPU_OOM_HINT, field="batch_size")


BitplanError._by_code["bad_input"] = BitplanError
