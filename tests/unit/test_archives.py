"""Hostile model archives never run code: every name, operator, shape expression and guard in a .pt2, and the
members, pickled names and code of a TorchScript archive, are checked before torch reads a byte
(bitplan/archives.py). Each attack in tests/hostile.py writes a marker file if anything executes it; the CLI
verbs and the loader must refuse it, name the bad value, and leave no marker. Real exports still load."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest
import torch

from bitplan import cli
from bitplan.archives import (
    SYMPY_FUNCTIONS,
    Refused,
    check_guard,
    check_operator,
    check_pt2,
    check_sym_expr,
    check_torchscript,
    members,
)
from bitplan.core.data import load_data
from bitplan.core.loading import load_model
from bitplan.errors import BitplanError, UnsafeModelError
from tests.hostile import PT2_ATTACKS, torchscript_attribute


@pytest.fixture(scope="module")
def attacks(digits_files, tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    out = tmp_path_factory.mktemp("hostile")
    built = {}
    for name, (build, _) in PT2_ATTACKS.items():
        marker = out / f"marker-{name}"
        built[name] = (build(digits_files["pt2"], out / f"{name}.pt2", marker), marker)
    marker = out / "marker-torchscript"
    built["torchscript"] = (torchscript_attribute(out / "hostile.ts", marker), marker)
    return built


@pytest.mark.parametrize("name", list(PT2_ATTACKS))
def test_hostile_pt2_is_refused_before_torch_reads_it(attacks, name):
    path, marker = attacks[name]
    with pytest.raises(UnsafeModelError) as refused:
        load_model(str(path))
    assert path.name in refused.value.message
    assert not marker.exists()


def test_the_refusal_names_the_bad_name_escaped(attacks):
    with pytest.raises(UnsafeModelError) as refused:
        check_pt2(attacks["parameter_name"][0])
    message = refused.value.message
    assert "parameter_name 'conv1.w\",0)or exec(" in message and "not a dotted path" in message
    assert "\n" not in message and len(message) < 400


def test_hostile_torchscript_is_refused_before_torch_jit_load(attacks, digits_files):
    path, marker = attacks["torchscript"]
    with pytest.raises(UnsafeModelError, match="quotes, backslashes or control characters"):
        load_model(str(path), sample=load_data(digits_files["calib"]))
    assert not marker.exists()


CLI_ATTACKS = ["parameter_name", "guards_code", "shape_expression", "torchscript"]


@pytest.mark.parametrize("verb", ["inspect", "plan", "sensitivity"])
@pytest.mark.parametrize("name", CLI_ATTACKS)
def test_cli_verbs_refuse_hostile_models_with_exit_2(attacks, digits_files, capsys, verb, name):
    path, marker = attacks[name]
    data = ["--data", str(digits_files["calib"])]
    args = {"inspect": [verb, str(path), *data],
            "plan": [verb, str(path), *data, "--budget", "avg_weight_bits=4", "--no-validate"],
            "sensitivity": [verb, str(path), *data, "--method", "fisher"]}[verb]
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("bitplan: error: ") and path.name in err
    assert not marker.exists()


def test_real_exports_pass_and_load(digits_files, tmp_path):
    """The digits CNN (.pt2, .ts) and a model with keyword inputs, a Sequential and dynamic dims tied by a guard."""
    check_pt2(digits_files["pt2"])
    check_torchscript(digits_files["ts"])
    assert len(load_model(str(digits_files["ts"]), sample=load_data(digits_files["calib"])).layers) == 5

    class Tied(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = torch.nn.Linear(4, 3)
            self.blocks = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.ReLU())

        def forward(self, x, *, mask):
            return self.blocks(self.proj(x)) * mask

    batch = torch.export.Dim("batch", min=2, max=64)
    program = torch.export.export(Tied(), (torch.randn(3, 4),), {"mask": torch.ones(3, 3)},
                                  dynamic_shapes={"x": {0: batch}, "mask": {0: batch}})
    path = tmp_path / "tied.pt2"
    torch.export.save(program, path)
    guards = json.loads(zipfile.ZipFile(path).read("tied/models/model.json"))["guards_code"]
    assert guards == ["L['x'].size()[0] == L['mask'].size()[0]"]  # the check lets torch's own guards through
    model = load_model(str(path))
    assert [layer.name for layer in model.layers] == ["proj", "blocks.0"]
    out = model.call(model.example)
    assert out.shape == (3, 3)


@pytest.mark.parametrize("expr", [
    "Symbol('s77', positive=True, integer=True)", "s0*2 + 1", "FloorDiv(s0, 2)", "Max(1, s3) - Mod(u0, 8)",
    "Eq(s0, 2)", "s0 < 5", "Float('1.5', precision=53)", "-s1", "CeilToInt(IntTrueDiv(s0, 3))",
])
def test_shape_expressions_torch_writes_pass(expr):
    check_sym_expr(expr, "here")


@pytest.mark.parametrize("expr", [
    "__import__('os').system('id')", "s0.__class__", "exec('1')", "S('x')", "Symbol('s0').subs", "(lambda: 1)()",
    "[c for c in ()]", "Symbol('a b')", "sympify('1+1')", "s0[0]", "Symbol(\"s0\")", "open", "x" * 20_000,
])
def test_shape_expressions_that_could_run_code_are_refused(expr):
    with pytest.raises(Refused):
        check_sym_expr(expr, "here")


@pytest.mark.parametrize("guard", [
    "L['x'].size()[0] == L['mask'].size()[0]", "L['x'].size()[1] >= 2", "math.isnan(L['y'])",
    "L['args'][0].stride()[0] == 1", "2*L['x'].size()[0] + 1 == L['z'].size()[0]", "L['n'] == 3 and L['m'] < 7",
])
def test_guards_torch_writes_pass(guard):
    check_guard(guard, "here")


@pytest.mark.parametrize("guard", [
    "exec('x') is None", "L['x'].__class__", "__import__('os')", "L['x'].size.__globals__", "getattr(L, 'x')",
    "L[\"x\"] == 1", "L['x'].size()[0] == eval('1')", "L['x y'] == 1", "math.os", "L['x'].numpy()",
])
def test_guards_that_could_run_code_are_refused(guard):
    with pytest.raises(Refused):
        check_guard(guard, "here")


@pytest.mark.parametrize("target", ["torch.os.system", "torch.ops.mylib.evil.default", "builtins.exec", "#ext.op",
                                    "torch.ops.aten.from_file.default", "torch.ops.load_library", "torch.save",
                                    "_operator.attrgetter", "math.__dict__"])
def test_operators_outside_torch_namespaces_are_refused(target):
    with pytest.raises(Refused):
        check_operator(target, "here")


def test_every_shape_function_torch_knows_is_allowed():
    """The allow-list must keep up with torch's: every function torch's deserializer gives sympify."""
    import inspect

    from torch._export.serde import serialize

    source = inspect.getsource(serialize)
    start = source.index("self.sympy_functions = {")
    names = {line.split('"')[1] for line in source[start:source.index("}", start)].splitlines()[1:] if '"' in line}
    assert names and names <= SYMPY_FUNCTIONS, sorted(names - SYMPY_FUNCTIONS)


def _zip(path: Path, entries: list[tuple[str, bytes]]) -> Path:
    import warnings

    with warnings.catch_warnings(), zipfile.ZipFile(path, "w") as z:
        warnings.simplefilter("ignore")
        for name, data in entries:
            z.writestr(name, data)
    return path


@pytest.mark.parametrize("entries, words", [
    ([("a/x", b""), ("a/x", b"")], "twice"),
    ([("a/x", b""), ("b/y", b"")], "two root folders"),
    ([("a/../x", b"")], "unsafe"),
    ([("/abs", b"")], "unsafe"),
    ([("a/x\nimport os", b"")], "unsafe name"),
    ([("loose", b"")], "root folder"),
])
def test_member_names_are_checked(tmp_path, entries, words):
    with pytest.raises(BitplanError, match=words), zipfile.ZipFile(_zip(tmp_path / "m.zip", entries)) as z:
        members(z, "m.zip")


def test_unknown_text_fields_are_refused(digits_files, tmp_path):
    """A field torch may add later could carry a name into generated code: text under an unknown key is refused."""
    from tests.hostile import _rewrite

    path = _rewrite(digits_files["pt2"], tmp_path / "new.pt2",
                    lambda p: p["graph_module"].__setitem__("future_field", {"x": "anything"}))
    with pytest.raises(UnsafeModelError, match="unknown field 'future_field'"):
        check_pt2(path)


def test_an_empty_argument_name_passes_and_a_named_one_is_still_checked(digits_files, tmp_path):
    """torch 2.11's serializer writes '' as the name of some positional arguments (seen on a Llama export): nothing
    that could become code, so it passes; any other argument name must still be an identifier."""
    from tests.hostile import _rewrite

    def rename(name: str):
        def edit(program: dict) -> None:
            node = next(n for n in program["graph_module"]["graph"]["nodes"] if n["inputs"])
            node["inputs"][0]["name"] = name
        return edit

    check_pt2(_rewrite(digits_files["pt2"], tmp_path / "empty.pt2", rename("")))
    with pytest.raises(UnsafeModelError, match="argument name"):
        check_pt2(_rewrite(digits_files["pt2"], tmp_path / "code.pt2", rename("x=__import__('os')")))
