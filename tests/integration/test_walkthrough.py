"""The README's curl walk-through, run as written against the embedded default
(`bitplan serve`: SQLite, in-process worker, no Redis, no PostgreSQL). Only the URL,
the key file and the venv path are pointed at this test's server."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from bitplan.schemas import PlanFile
from tests.devstack import DevStack

README = Path(__file__).resolve().parents[2] / "README.md"


def walkthrough() -> str:
    text = README.read_text()
    block = re.search(r"<!-- walkthrough:start -->\s*```sh\n(.*?)```\s*<!-- walkthrough:end -->", text, re.S)
    assert block, "README lost its walk-through markers"
    return block.group(1)


def test_readme_walkthrough_against_the_embedded_default(tmp_path):
    script = walkthrough()
    assert "http://127.0.0.1:8000" in script and "bitplan-data/local-key" in script
    with DevStack(embedded=True, workdir=tmp_path / "stack") as stack:
        bindir = Path(sys.executable).parent
        script = (script.replace("http://127.0.0.1:8000", stack.url)
                  .replace("bitplan-data/local-key", str(stack.data_dir / "local-key"))
                  .replace(".venv/bin/bitplan", str(bindir / "bitplan")))
        work = tmp_path / "user"
        work.mkdir()
        run = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=work, capture_output=True, text=True,
                             timeout=900)
        assert run.returncode == 0, run.stdout + run.stderr + stack.log("api.log")
    plan = PlanFile.model_validate(json.loads((work / "plan.json").read_text()))
    assert plan.cost.avg_weight_bits <= 3 + 1e-9 and plan.model.name == "digits_cnn.pt2"
    assert "succeeded done 100 %" in run.stdout
    csv = run.stdout.split("succeeded done 100 %", 1)[1].strip().splitlines()
    assert csv[0] == "name,kind,params,macs,w_bits,a_bits,w_format,sensitivity" and len(csv) == 6
