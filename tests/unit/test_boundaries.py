import subprocess
import sys


def test_contract_solver_and_cli_import_without_torch():
    code = ("import sys, solver, solver.ilp, bitplan.schemas, bitplan.methods, bitplan.costs, bitplan.cli; "
            "sys.exit(1 if 'torch' in sys.modules else 0)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_cli_help_lists_the_verbs():
    out = subprocess.run([sys.executable, "-m", "bitplan.cli", "--help"], capture_output=True, text=True).stdout
    for verb in ("plan", "inspect", "solve", "catalog"):
        assert verb in out
