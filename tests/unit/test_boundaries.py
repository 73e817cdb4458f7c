import subprocess
import sys


def test_contract_solver_and_cli_import_without_torch():
    code = ("import sys, solver, solver.ilp, bitplan.schemas, bitplan.methods, bitplan.costs, bitplan.cli; "
            "sys.exit(1 if 'torch' in sys.modules else 0)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_service_storage_and_task_modules_import_without_torch(tmp_path):
    """The API process enqueues work and reads uploads in a child process; it never loads torch."""
    code = ("import sys\n"
            "from bitplan.settings import load_settings\n"
            f"s = load_settings(data_dir={str(tmp_path)!r})\n"
            "import service.app, service.api, storage, storage.models, workers.tasks, bitplan.client, bitplan.cli_service\n"
            "app = service.app.create_app(s, worker=False)\n"
            "from fastapi.testclient import TestClient\n"
            "with TestClient(app) as c:\n"
            "    assert c.get('/v1/methods').status_code == 200\n"
            "sys.exit(1 if 'torch' in sys.modules else 0)\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr


def test_cli_help_lists_the_verbs():
    out = subprocess.run([sys.executable, "-m", "bitplan.cli", "--help"], capture_output=True, text=True).stdout
    for verb in ("plan", "inspect", "solve", "catalog", "serve", "worker", "keys", "submit", "status", "wait", "fetch"):
        assert verb in out
