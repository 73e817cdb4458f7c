import subprocess
import sys


def test_contract_solver_and_cli_import_without_torch():
    code = ("import sys, solver, solver.ilp, bitplan.schemas, bitplan.methods, bitplan.costs, bitplan.cli, bitplan.exports; "
            "sys.exit(1 if 'torch' in sys.modules else 0)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_service_storage_and_task_modules_import_without_torch(tmp_path):
    """The API process enqueues work and reads uploads in a child process; it never loads torch."""
    code = ("import sys\n"
            "from bitplan.settings import load_settings\n"
            f"s = load_settings(data_dir={str(tmp_path)!r})\n"
            "import service.app, service.api, storage, storage.models, workers.tasks, bitplan.client, service.commands\n"
            "app = service.app.create_app(s, worker=False)\n"
            "from fastapi.testclient import TestClient\n"
            "with TestClient(app) as c:\n"
            "    assert c.get('/v1/methods').status_code == 200\n"
            "sys.exit(1 if 'torch' in sys.modules else 0)\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr


def test_cli_help_lists_the_verbs():
    out = subprocess.run([sys.executable, "-m", "bitplan.cli", "--help"], capture_output=True, text=True).stdout
    for verb in ("plan", "inspect", "solve", "catalog", "serve", "worker", "keys", "submit", "status", "wait", "fetch",
                 "export", "apply", "profile"):
        assert verb in out


# --- the layers (docs/architecture.md): a module may import its own layer and the ones below it -------------
ROOT = __import__("pathlib").Path(__file__).resolve().parents[2]
CONTRACT = {"bitplan", "bitplan.errors", "bitplan.schemas", "bitplan.methods", "bitplan.hutchinson", "bitplan.params",
            "bitplan.costs", "bitplan.exports", "bitplan.formats",
            "bitplan.settings", "bitplan.files", "bitplan.progress", "bitplan.synthetic", "bitplan.inputs"}
TOP = {"bitplan.cli", "bitplan.client", "service.commands"}


def layer_of(module: str) -> str:
    if module in TOP:
        return "entry points"
    if module in CONTRACT or module.startswith("bitplan.archives"):
        return "contract"
    if module.startswith(("bitplan.core", "bitplan.catalog")):
        return "engine"
    return module.split(".")[0]  # solver, storage, workers, service


#: what each layer may import (besides itself and third-party packages)
MAY_IMPORT = {
    "contract": {"contract"},
    "solver": {"contract"},
    "engine": {"contract", "solver"},
    "storage": {"contract"},
    "workers": {"contract", "solver", "engine", "storage"},
    "service": {"contract", "solver", "storage", "workers"},
    "entry points": {"contract", "solver", "engine", "storage", "workers", "service"},
}
OURS = ("bitplan", "solver", "service", "workers", "storage")


def _imports(path):
    import ast

    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):  # function-level (lazy) imports count too
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module


def test_every_import_points_down_the_layers():
    wrong = []
    for package in OURS:
        for path in sorted((ROOT / package).rglob("*.py")):
            if "migrations" in path.parts:
                continue
            module = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
            mine = layer_of(module)
            if mine not in MAY_IMPORT:
                wrong.append(f"{module} is in no layer: give it one here and in docs/architecture.md")
                continue
            for name in _imports(path):
                if name.split(".")[0] not in OURS:
                    continue
                theirs = layer_of(name)
                if theirs != mine and theirs not in MAY_IMPORT[mine] and theirs in MAY_IMPORT:
                    wrong.append(f"{module} ({mine}) imports {name} ({theirs})")
    assert not wrong, "\n".join(wrong)
