"""Shared fixtures: the digits reference model exported once per session in
every format a user could send, with its calibration and held-out data."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def digits_files(tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("digits")
    subprocess.run([sys.executable, "-m", "bitplan.cli", "catalog", "export", "digits_cnn", "--out", str(out)],
                   check=True, capture_output=True)
    return {
        "pt2": out / "digits_cnn.pt2",
        "ts": out / "digits_cnn.ts",
        "calib": out / "digits_cnn_calib.npz",
        "eval": out / "digits_cnn_eval.npz",
    }


@pytest.fixture(scope="session")
def hf_files(tmp_path_factory) -> dict[str, Path]:
    """A small Llama-architecture Hugging Face checkpoint (tests/hf_checkpoint.py): its folder, the folder zipped,
    and calibration text."""
    from tests.hf_checkpoint import build_checkpoint, write_text, zip_dir

    out = tmp_path_factory.mktemp("hf")
    folder = build_checkpoint(out / "tiny-llama")
    return {"dir": folder, "zip": zip_dir(folder, out / "tiny-llama.zip"), "text": write_text(out / "calib.txt"),
            "jsonl": write_text(out / "calib.jsonl", jsonl=True)}


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bitplan.cli", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=900)


INTEGRATION = Path(__file__).parent / "integration"


def pytest_collection_modifyitems(config, items):
    """Mark what lives in tests/integration `integration`, so that one run can select every tier but the fast one
    (``make test``: -m "integration or slow")."""
    for item in items:
        if INTEGRATION in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.integration)
