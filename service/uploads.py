"""Uploads: stream to a temporary file (hashing, size-limited), describe it in the
sandbox, and only then move it into the content-addressed store and record it. A
refused upload leaves nothing behind.

The description runs in a child forked by the sandbox (``workers/sandbox.py``):
the API process never imports torch nor runs anything a model file says, and the
child has a minimal environment (no database URL or keys), its own temporary
directory, CPU and memory limits, and is killed after ``DESCRIBE_TIMEOUT_S``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from bitplan.errors import BitplanError
from service.errors import ApiError

DESCRIBE_TIMEOUT_S = 300
log = logging.getLogger("bitplan.service")
READ_HINT = "send a torch.export (.pt2) archive or TorchScript; data as .npz or .safetensors"


def describe(kind: str, path: Path, name: str, data_path: Path | None = None, memory_mb: int = 0) -> dict[str, Any]:
    """The model's layer table or the dataset's shape, or an ApiError(422) saying what is wrong."""
    from workers.sandbox import InternalError, Limits, SandboxError, SandboxStopped, shared_sandbox

    args = {"kind": kind, "path": str(path), "name": name, "data_path": str(data_path) if data_path else None}
    env = {k: os.environ[k] for k in ("BITPLAN_MAX_UNPACKED_MB",) if os.environ.get(k)}
    try:
        return shared_sandbox().run("describe", args, Limits(wall_s=DESCRIBE_TIMEOUT_S, memory_mb=memory_mb), env=env)
    except SandboxStopped:
        raise ApiError(422, f"{name} took longer than {DESCRIBE_TIMEOUT_S} s to read",
                       "send a smaller model, or a torch.export (.pt2) archive", code="unreadable") from None
    except SandboxError as exc:
        raise ApiError(422, f"{name} could not be read: {exc.message}", READ_HINT, code="unreadable") from None
    except BitplanError as exc:
        message = f"reading {name} {exc.message}" if exc.code == "out_of_memory" else None
        raise ApiError.from_error(exc, message=message) from None
    except InternalError as exc:  # describe turns every failure into a BitplanError; this is a bug
        log.error("upload reader failed on %s:\n%s", name, exc.traceback)
        raise ApiError(422, f"{name} could not be read ({exc.type_name})", READ_HINT, code="unreadable") from None
