"""A Hugging Face checkpoint planned end to end from the CLI: `bitplan inspect` on the folder, `bitplan plan` on
the zip with text calibration data (tokenised with the checkpoint's tokenizer.json), the plan file read back."""

from __future__ import annotations

import json

from tests.conftest import run_cli

FAST = ["--sensitivity", "hessian_trace", "--param", "max_probes=4", "--param", "min_probes=2", "--param",
        "max_samples=32", "--param", "batch_size=16"]


def test_inspect_and_plan_a_checkpoint_from_text(hf_files, tmp_path):
    shown = run_cli("inspect", str(hf_files["dir"]))
    assert shown.returncode == 0, shown.stderr
    assert "tiny-llama (hf)" in shown.stdout and "model.layers.1.mlp.down_proj" in shown.stdout and "lm_head" in shown.stdout
    out = tmp_path / "plan.json"
    r = run_cli("plan", str(hf_files["zip"]), "--data", str(hf_files["jsonl"]), "--seq-len", "32", "--budget",
                "avg_weight_bits=4", "--wbits", "2,4,8", "--tie-shared-inputs", "--refine-seconds", "0", *FAST,
                "--out", str(out))
    assert r.returncode == 0, r.stderr
    plan = json.loads(out.read_text())
    layers = {x["name"]: x["w_bits"] for x in plan["layers"]}
    assert len(layers) == 15 and "lm_head" in layers
    assert plan["cost"]["avg_weight_bits"] <= 4 + 1e-9
    # q, k and v read the same input: tied, one width each
    assert len({layers[f"model.layers.0.self_attn.{p}_proj"] for p in "qkv"}) == 1
    assert "windows of 32 tokens" in plan["measured"]["data"]
