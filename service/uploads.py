"""Uploads: stream to a temporary file (hashing, size-limited), describe it in a
separate process, and only then move it into the content-addressed store and
record it. A refused upload leaves nothing behind.

The description runs ``python -m bitplan.core.describe`` in a child process:
the API process never imports torch, and a hostile file can at worst crash or
stall that child, which a timeout ends.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

from service.errors import ApiError

DESCRIBE_TIMEOUT_S = 300
log = logging.getLogger("bitplan.service")


def describe(kind: str, path: Path, name: str, data_path: Path | None = None) -> dict:
    """The model's layer table or the dataset's shape, or an ApiError(422) saying what is wrong."""
    cmd = [sys.executable, "-m", "bitplan.core.describe", kind, str(path), "--name", name]
    if data_path is not None:
        cmd += ["--data", str(data_path)]
    env = dict(os.environ, PYTHONWARNINGS="ignore", TORCH_FORCE_WEIGHTS_ONLY_LOAD="1", OMP_NUM_THREADS="1")
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=DESCRIBE_TIMEOUT_S, env=env,
                             stdin=subprocess.DEVNULL, cwd=path.parent)
    except subprocess.TimeoutExpired:
        raise ApiError(422, f"{name} took longer than {DESCRIBE_TIMEOUT_S} s to read",
                       "send a smaller model, or a torch.export (.pt2) archive", code="unreadable") from None
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if not lines:
        log.warning("upload reader for %s exited %s without an answer: %s", name, out.returncode, out.stderr[-2000:])
        raise ApiError(422, f"{name} could not be read (the reader stopped with exit code {out.returncode})",
                       "send a torch.export (.pt2) archive or TorchScript; data as .npz or .safetensors",
                       code="unreadable")
    result = json.loads(lines[-1])
    if not result.get("ok"):
        raise ApiError(422, result.get("message", f"{name} could not be read"), result.get("hint"),
                       code=result.get("code", "unreadable"))
    return result["result"]
