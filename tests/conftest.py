"""Shared fixtures: the digits reference model exported once per session in
every format a user could send, with its calibration and held-out data."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest


def pytest_configure(config):
    """Under pytest-xdist, give each worker its share of the CPUs for torch's threads, inherited by every process
    it starts (the CLI, API and worker subprocesses). Two workers on 2 cores each running torch with 2 threads
    oversubscribe the cores: two MiniLM sensitivity runs side by side took 154 s with 2 threads each and 55 s with
    1 (measured here), and a CI run whose MiniLM plan ran past 900 s failed that way. BITPLAN_TEST_THREADS sets
    another count."""
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if not workers:
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = os.environ.get("BITPLAN_TEST_THREADS") or str(max(1, cores // int(workers)))
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[name] = threads
    if "torch" in sys.modules:  # already started its thread pool: tell it too
        sys.modules["torch"].set_num_threads(int(threads))


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


def pytest_itemcollected(item):
    """Mark what lives in tests/integration `integration`, so that one run can select every tier but the fast one
    (``make test``: -m "integration or slow")."""
    if INTEGRATION in Path(str(item.fspath)).parents:
        item.add_marker(pytest.mark.integration)


@pytest.hookimpl(trylast=True)  # after -m has deselected: the order of what runs
def pytest_collection_modifyitems(config, items):
    _longest_first(items)


#: the longest tests and their seconds on 2 cores, by group (pytest --durations in make test's second run; a group
#: shares a module fixture, so it stays on one worker)
LONGEST = {"test_minilm.py::test_minilm_plan_at_4_bits": 90, "test_guarantee.py::": 200,
           "test_every_method_runs_on_minilm": 150, "test_every_solver_plans_minilm": 130,
           "test_distill.py::test_a_plan_without_data": 40}


def _longest_first(items: list) -> None:
    """Start the longest tests first, split over the two halves of the run. xdist's worksteal scheduler gives each of
    2 workers a contiguous half and balances by stealing from the tail of the longer queue, so a long test that
    starts last is what makes the run long; started first (the largest group first, each group to the half with
    less long work so far), the short ones fill in around them."""
    groups: dict[str, list] = {key: [] for key in LONGEST}
    for item in items:
        key = next((k for k in LONGEST if k in item.nodeid), None)
        if key is not None:
            groups[key].append(item)
    picked = {id(it) for group in groups.values() for it in group}
    if not picked or len(picked) == len(items):
        return
    halves: list[list] = [[], []]
    load = [0, 0]
    for key in sorted(LONGEST, key=LONGEST.get, reverse=True):
        if groups[key]:
            side = load.index(min(load))
            halves[side] += groups[key]
            load[side] += LONGEST[key]
    rest = [it for it in items if id(it) not in picked]
    cut = max(len(items) // 2 - len(halves[0]), 0)
    items[:] = halves[0] + rest[:cut] + halves[1] + rest[cut:]
