"""A TorchScript archive, before ``torch.jit.load``: only TorchScript's own members, every string in
its pickles plain (attribute names reach generated Python when bitplan converts the script to a graph),
and its code parsed with :mod:`ast` (never run) for custom operator namespaces, custom classes and
attribute names that are not plain."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from bitplan.archives.names import ATOM
from bitplan.archives.zips import MAX_JSON_BYTES, PLAIN, Refused, open_archive, pickle_ops, shown
from bitplan.errors import ModelFormatError

_TS_FIXED = {"data.pkl", "constants.pkl", "version", ".data/version", "byteorder", ".data/serialization_id"}
_TS_PATTERNS = (re.compile(r"data/\d{1,9}\Z"), re.compile(r"constants/\d{1,9}\Z"),
                re.compile(r"code/(__torch__|__torch__/[A-Za-z0-9_./]+)\.py(\.debug_pkl)?\Z"),
                re.compile(r"code/__torch__\.py(\.debug_pkl)?\Z"))
#: Operator namespaces TorchScript code may call through ``ops.<namespace>``.
TS_NAMESPACES = frozenset({"aten", "prim", "prims", "quantized"})
_TS_PICKLE_GLOBALS = re.compile(r"(__torch__(\.[A-Za-z0-9_]+)* [A-Za-z0-9_]+|torch\.jit\._pickle build_[a-z]+list"
                                r"|torch\.jit\._pickle build_tensor_from_id|torch\.jit\._pickle restore_type_tag"
                                r"|torch\._utils _rebuild_tensor(_v2)?|torch\._utils _rebuild_qtensor"
                                r"|collections OrderedDict|torch [A-Za-z0-9]+Storage|builtins (set|complex))\Z")


def check_torchscript(path: str | Path, label: str | None = None) -> None:
    """Check a TorchScript archive before ``torch.jit.load``: its members, every name its pickles hold,
    and its code (parsed with :mod:`ast`, never run): attribute names reach generated Python later, when
    bitplan converts the script to a graph, so they must be plain; calls through ``ops.<namespace>`` are
    limited to torch's own namespaces, and custom classes (torchbind) are refused."""
    label = label or Path(path).name
    m = open_archive(path, label)
    hint = "save it with torch.jit.save(torch.jit.script(model), 'model.ts'), or send a torch.export (.pt2) archive"
    for rel in m.infos:
        if rel not in _TS_FIXED and not any(p.match(rel) for p in _TS_PATTERNS):
            raise Refused(label, f"member {shown(m.root + '/' + rel)} is not part of a TorchScript module "
                          "(extra files and custom libraries are refused)", hint)
    if "data.pkl" not in m.infos:
        raise ModelFormatError(f"{label} lacks {m.root}/data.pkl: not a TorchScript archive", hint)
    for rel in m.infos:
        if rel.endswith("pkl"):  # data.pkl, constants.pkl, and code/*.py.debug_pkl (source ranges: text, not names)
            _check_ts_pickle(m.read(rel, MAX_JSON_BYTES), f"{label} ({m.root}/{rel})", hint,
                             names=not rel.endswith(".debug_pkl"))
        elif rel.endswith(".py"):
            _check_ts_code(m.read(rel, MAX_JSON_BYTES), f"{label} ({m.root}/{rel})", hint)


def _check_ts_pickle(data: bytes, where: str, hint: str, names: bool = True) -> None:
    """Read by torch's C++ unpickler, which builds tensors and script objects only; the names it holds
    (attribute and class names) must still be plain, since they end up in generated Python."""
    for op, arg in pickle_ops(data, where):
        if op in ("STACK_GLOBAL", "INST", "OBJ", "EXT1", "EXT2", "EXT4"):
            raise Refused(where, f"its pickle uses {op}, which TorchScript does not write", hint)
        if op == "GLOBAL" and not _TS_PICKLE_GLOBALS.match(str(arg)):
            raise Refused(where, f"its pickle refers to {shown(arg)}, which TorchScript does not write", hint)
        if names and isinstance(arg, str) and (not PLAIN.match(arg) or len(arg) > 10_000):
            raise Refused(where, f"its pickle holds the text {shown(arg)}, with quotes, backslashes or control "
                          "characters; bitplan requires plain attribute names", hint)


def _check_ts_code(data: bytes, where: str, hint: str) -> None:
    try:
        tree = ast.parse(data.decode("utf-8"))
    except (SyntaxError, ValueError, UnicodeDecodeError, RecursionError, MemoryError):
        raise Refused(where, "its code does not parse", hint) from None
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            chain = _attribute_chain(node)
            if len(chain) >= 3 and chain[0] == "ops" and chain[1] not in TS_NAMESPACES:
                raise Refused(where, f"its code calls operators of namespace {shown(chain[1])}; bitplan runs torch's own "
                              f"({', '.join(sorted(TS_NAMESPACES))})", hint)
            if chain[:2] == ["__torch__", "torch"] and len(chain) > 2 and chain[2] == "classes":
                raise Refused(where, "its code uses a custom class (torch.classes), which bitplan does not load", hint)
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("getattr", "hasattr"):
            for arg in node.args[1:2]:
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str) and not ATOM.match(arg.value):
                    raise Refused(where, f"its code reads the attribute {shown(arg.value)}, which is not a plain name", hint)
        elif isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id in ("__parameters__", "__buffers__")
                                                  for t in node.targets):
            for item in ast.walk(node.value):
                if isinstance(item, ast.Constant) and isinstance(item.value, str) and not ATOM.match(item.value):
                    raise Refused(where, f"its module stores a tensor named {shown(item.value)}, which is not a plain "
                                  "name", hint)


def _attribute_chain(node: ast.Attribute) -> list[str]:
    parts: list[str] = []
    current: ast.AST = node
    while isinstance(current, ast.Attribute):
        parts.append(current.attr)
        current = current.value
    if isinstance(current, ast.Name):
        parts.append(current.id)
    return parts[::-1]
