"""Checks on an untrusted model archive, made before torch reads a byte of it.

torch turns a ``torch.export`` archive back into a module by generating Python
source and executing it: parameter and module names are pasted into that source
(``getattr(self, "<name>")``), shape expressions go through ``sympy.sympify``
(an ``eval``), the program's ``guards_code`` is ``exec``'d, operator names are
resolved with ``getattr`` chains from ``torch``, and some payloads are unpickled
or loaded as shared libraries (AOTInductor). So a crafted name runs code. This
module reads the zip and its JSON with the standard library only and refuses,
naming the offending value, anything outside what ``torch.export.save`` writes
for a plain model:

* members: one root folder, no duplicates, only the files a plain program has
  (no AOTInductor libraries, no pickled weights, custom or opaque objects);
* names (graph nodes, inputs, outputs, keyword arguments, forward arguments):
  Python identifiers; parameter, buffer and module paths: dotted
  ``[A-Za-z0-9_]`` atoms;
* operators: ``torch.ops.<namespace>.<op>.<overload>`` in known namespaces, and
  the few Python operators torch itself records (``_operator.getitem``, ...);
* shape expressions and guards: parsed with :mod:`ast` and allowed only when every
  node is arithmetic, a comparison, a number, a shape symbol or an allow-listed
  function; nothing is evaluated here;
* tensor payloads: raw bytes whose declared sizes, strides and offsets fit.

:func:`write_canonical_pt2` then writes the accepted parts into a new archive
(node metadata such as stack traces dropped: bitplan does not use it), and only
that archive is given to torch. TorchScript archives get the same treatment in
:func:`check_torchscript` (their code is parsed, never run, and their pickles are
scanned opcode by opcode).

Torch-free on purpose: the API process runs these checks too.
"""

from __future__ import annotations

import ast
import io
import json
import keyword
import os
import pickletools
import re
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from bitplan.errors import BitplanError, DataError, ModelFormatError, UnsafeModelError

#: Unpacked size allowed for one archive (all members together), unless BITPLAN_MAX_UNPACKED_MB says otherwise.
DEFAULT_MAX_UNPACKED_MB = 4000
#: A member this large that expands more than MAX_RATIO times is a zip bomb, not data.
RATIO_CHECKED_BYTES = 100_000_000
MAX_RATIO = 200
MAX_MEMBERS = 100_000
MAX_JSON_BYTES = 256 << 20
MAX_NAME = 300
MAX_EXPR = 10_000
MAX_DEPTH = 64
EXPORT_HINT = ("export the model with torch.export.save(torch.export.export(model, example_inputs), 'model.pt2'); "
               "parameter and module names must be Python identifiers or numbers")

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_ATOM = re.compile(r"[A-Za-z0-9_]+\Z")
_SYMBOL = re.compile(r"[a-z]{1,6}[0-9]+\Z")  # shape symbols torch names: s0, u3, zuf0, ps12
_NUMBER_TEXT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?\Z")
_PLAIN = re.compile(r"[^\"'\\\x00-\x1f\x7f]*\Z")  # no quotes, backslashes or control characters

# --- zip members --------------------------------------------------------------------------------------


def max_unpacked_bytes() -> int:
    """The BITPLAN_MAX_UNPACKED_MB limit in bytes: read per call, so a deployment's setting reaches every reader."""
    raw = os.environ.get("BITPLAN_MAX_UNPACKED_MB") or str(DEFAULT_MAX_UNPACKED_MB)
    try:
        mb = float(raw)
    except ValueError:
        raise DataError(f"BITPLAN_MAX_UNPACKED_MB='{raw}' is not a number", "the operator must set it in MB, e.g. 4000") from None
    return int(mb * 1e6)


def check_unpacked_size(zf: zipfile.ZipFile, name: str, error: type[BitplanError] = DataError) -> None:
    """Refuse a zip bomb from its central directory alone, before any member is decompressed.

    The sizes a zip declares bound what ``zipfile`` and torch will produce from it, so their sum is the
    memory and time reading it can cost; a huge member compressed far beyond what real tensors allow
    is refused too, so a few MB upload cannot make the reader unpack gigabytes.
    """
    limit = max_unpacked_bytes()
    members = zf.infolist()
    if len(members) > MAX_MEMBERS:
        raise error(f"{name} has {len(members):,} members, more than the {MAX_MEMBERS:,} bitplan reads", None)
    total = sum(m.file_size for m in members)
    if total > limit:
        raise error(f"{name} would unpack to {total / 1e6:,.0f} MB, more than the limit of {limit / 1e6:,.0f} MB",
                    "send less data, or ask the operator to raise BITPLAN_MAX_UNPACKED_MB")
    for m in members:
        ratio = m.file_size / max(m.compress_size, 1)
        if m.file_size > RATIO_CHECKED_BYTES and ratio > MAX_RATIO:
            raise error(f"{name}: member {shown(m.filename)} would expand {ratio:,.0f} times, to {m.file_size / 1e6:,.0f} MB; "
                        f"bitplan refuses members over {RATIO_CHECKED_BYTES / 1e6:g} MB compressed more than {MAX_RATIO} "
                        "times (a zip bomb)",
                        "store arrays uncompressed (numpy.savez, not savez_compressed); zip models with ZIP_STORED")


def shown(value: object, limit: int = 80) -> str:
    """A value as an error message may quote it: repr (so quotes, NULs and newlines are escaped), shortened."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 5] + "...'" if text[:1] in "'\"" else text[:limit] + "..."


@dataclass
class Members:
    """An archive's members under its one root folder: relative name -> ZipInfo."""

    zf: zipfile.ZipFile
    root: str
    infos: dict[str, zipfile.ZipInfo]

    def read(self, rel: str, limit: int | None = None) -> bytes:
        info = self.infos[rel]
        if limit is not None and info.file_size > limit:
            raise UnsafeModelError(f"{self.root}/{rel} is {info.file_size / 1e6:,.0f} MB, more than the "
                                   f"{limit / 1e6:,.0f} MB bitplan reads for it", EXPORT_HINT)
        return self.zf.read(info)


def members(zf: zipfile.ZipFile, label: str) -> Members:
    """Every member name checked: one shared root folder, no duplicates, no path tricks, no control characters.

    A zip may hold two entries of one name, and readers disagree on which one counts (Python's ``zipfile``
    takes the last, torch's reader the first): refused, so what is checked here is what torch would read.
    """
    check_unpacked_size(zf, label, UnsafeModelError)
    infos: dict[str, zipfile.ZipInfo] = {}
    root = None
    for info in zf.infolist():
        name = info.filename
        if not name or len(name) > 1000 or not _PLAIN.match(name) or name.startswith("/") or "\\" in name:
            raise UnsafeModelError(f"{label} holds a member with an unsafe name {shown(name)}", EXPORT_HINT)
        head, _, rel = name.partition("/")
        if any(part in ("", ".", "..") for part in name.split("/")[:-1]) or ".." in name.split("/"):
            raise UnsafeModelError(f"{label} holds a member with an unsafe path {shown(name)}", EXPORT_HINT)
        if info.is_dir():
            continue
        if not rel or not re.fullmatch(r"[A-Za-z0-9_.-]{1,200}", head):
            raise UnsafeModelError(f"{label}: member {shown(name)} is not inside the archive's root folder", EXPORT_HINT)
        if root is None:
            root = head
        elif head != root:
            raise UnsafeModelError(f"{label} has two root folders ({shown(root)} and {shown(head)}); "
                                   "torch reads one, so the other could hide what bitplan checked", EXPORT_HINT)
        if rel in infos:
            raise UnsafeModelError(f"{label} holds {shown(name)} twice; readers disagree on which copy counts",
                                   EXPORT_HINT)
        infos[rel] = info
    if root is None:
        raise ModelFormatError(f"{label} is an empty archive", EXPORT_HINT)
    return Members(zf, root, infos)


# --- torch.export (.pt2) ------------------------------------------------------------------------------

_PT2_FIXED = {"archive_format", "archive_version", "byteorder", ".data/version", ".data/serialization_id",
              "models/model.json", "data/weights/model_weights_config.json",
              "data/constants/model_constants_config.json", "data/sample_inputs/model.pt"}
_PT2_PATTERNS = (re.compile(r"data/weights/weight_\d{1,9}\Z"), re.compile(r"data/constants/tensor_\d{1,9}\Z"),
                 re.compile(r"extra/[A-Za-z0-9_.-]{1,200}\Z"))
_PT2_COPIED = _PT2_FIXED | {"data/weights/", "data/constants/"}

#: Operator namespaces a plain model's graph uses. Custom namespaces would not be registered here anyway.
OP_NAMESPACES = frozenset({"aten", "prims", "higher_order", "quantized_decomposed", "quantized"})
#: Operators that reach outside the tensors (files), refused although they live in aten.
OP_DENIED = frozenset({"from_file", "_print"})
PY_OPERATORS = frozenset({"getitem", "add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "neg", "pos", "abs",
                          "eq", "ne", "lt", "le", "gt", "ge", "and_", "or_", "xor", "not_", "invert", "lshift",
                          "rshift", "matmul"})
SYM_FUNCTIONS = frozenset({"sym_float", "sym_int", "sym_max", "sym_min", "sym_not", "sym_ite", "sym_sum",
                           "sym_sqrt", "_sym_sqrt", "sym_fresh_size", "sym_constrain_range", "sym_constrain_range_for_size"})
MATH_FUNCTIONS = frozenset({"ceil", "floor", "trunc", "sqrt"})

#: Functions a shape expression may call: sympy's core and torch.utils._sympy.functions (the names torch's
#: deserializer puts in sympify's namespace; tests/unit/test_archives.py checks the two lists agree).
SYMPY_FUNCTIONS = frozenset({
    "Symbol", "Integer", "Float", "Rational", "Add", "Mul", "Pow", "Mod", "Max", "Min", "Abs", "Eq", "Ne", "Lt", "Le",
    "Gt", "Ge", "StrictLessThan", "StrictGreaterThan", "LessThan", "GreaterThan", "Equality", "Unequality", "And", "Or",
    "Not", "floor", "ceiling", "sqrt", "Piecewise", "ITE", "true", "false", "oo", "zoo", "nan",
    "FloorDiv", "ModularIndexing", "Where", "PythonMod", "CleanDiv", "CeilToInt", "FloorToInt", "CeilDiv", "LShift",
    "RShift", "PowByNatural", "FloatPow", "FloatTrueDiv", "IntTrueDiv", "IsNonOverlappingAndDenseIndicator",
    "TruncToFloat", "TruncToInt", "RoundToInt", "RoundDecimal", "ToFloat", "Identity", "BitwiseFn_bitwise_and",
    "BitwiseFn_bitwise_or", "BitwiseFn_bitwise_xor", "OpaqueUnaryFn_sqrt", "OpaqueUnaryFn_exp", "OpaqueUnaryFn_log",
    "OpaqueUnaryFn_cos", "OpaqueUnaryFn_sin", "OpaqueUnaryFn_tan", "OpaqueUnaryFn_cosh", "OpaqueUnaryFn_sinh",
    "OpaqueUnaryFn_tanh", "OpaqueUnaryFn_asin", "OpaqueUnaryFn_acos", "OpaqueUnaryFn_atan", "OpaqueUnaryFn_log2",
})
#: Names a guard may use beside the shape functions: L (the inputs), math, inf.
GUARD_NAMES = frozenset({"L", "math", "inf"}) | SYMPY_FUNCTIONS
GUARD_METHODS = frozenset({"size", "stride", "storage_offset", "dim", "numel"})
MATH_NAMES = frozenset({"inf", "nan", "isnan", "isinf", "floor", "ceil", "trunc", "sqrt", "pi"})

#: Bytes per element of each ScalarType number in tensor metadata (torch/_export/serde/schema.py).
ITEM_BYTES = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 2, 7: 4, 8: 8, 9: 4, 10: 8, 11: 16, 12: 1, 13: 2, 28: 2, 29: 1, 30: 1,
              31: 1, 32: 1, 33: 1, 34: 4, 35: 8}
_SAMPLE_GLOBALS = frozenset({"torch._utils _rebuild_tensor_v2", "torch._utils _rebuild_parameter",
                             "collections OrderedDict", "torch.storage UntypedStorage"})
_STORAGE_GLOBAL = re.compile(r"torch [A-Za-z0-9]+Storage\Z")


class Refused(UnsafeModelError):
    """A value in the archive is outside what bitplan lets torch read; ``where`` says where it was found."""

    def __init__(self, where: str, what: str, hint: str = EXPORT_HINT) -> None:
        super().__init__(f"{where}: {what}", hint)


@dataclass
class CheckedPt2:
    """What :func:`check_pt2` accepted: the program with node metadata dropped, and the members to copy."""

    members: Members
    program: dict
    copy: list[str] = field(default_factory=list)


def check_pt2(path: str | Path, label: str | None = None) -> CheckedPt2:
    """Check a ``torch.export`` archive; raise :class:`UnsafeModelError` (or ModelFormatError) saying what is wrong."""
    path = Path(path)
    label = label or path.name
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise ModelFormatError(f"{label} is truncated or corrupt ({exc})", "upload the complete file again") from None
    m = members(zf, label)
    for rel in m.infos:
        if rel not in _PT2_FIXED and not any(p.match(rel) for p in _PT2_PATTERNS):
            raise Refused(label, f"member {shown(m.root + '/' + rel)} is not part of a plain torch.export program "
                          "(bitplan reads no AOTInductor libraries, pickled or custom objects, or extra models)")
    for required in ("archive_format", "archive_version", "models/model.json", "data/weights/model_weights_config.json"):
        if required not in m.infos:
            raise ModelFormatError(f"{label} lacks {m.root}/{required}: not a torch.export archive", EXPORT_HINT)
    if m.read("archive_format", 64).strip() != b"pt2":
        raise ModelFormatError(f"{label}: archive_format is not 'pt2'", EXPORT_HINT)
    program = _json(m, "models/model.json", label)
    where = f"{label} ({m.root}/models/model.json)"
    checked = ProgramCheck(where).program(program)
    copy = [rel for rel in m.infos if not rel.startswith("extra/")]
    payloads = {"weights": _payload_config(m, "data/weights/model_weights_config.json", "weight_", label)}
    if "data/constants/model_constants_config.json" in m.infos:
        payloads["constants"] = _payload_config(m, "data/constants/model_constants_config.json", "tensor_", label)
    for kind, config in payloads.items():
        _check_payload_files(m, config, f"data/{kind}/", label)
    if "data/sample_inputs/model.pt" in m.infos:
        check_torch_save(m.read("data/sample_inputs/model.pt", MAX_JSON_BYTES), f"{label} (example inputs)")
    return CheckedPt2(m, checked, copy)


def write_canonical_pt2(checked: CheckedPt2, out) -> None:
    """Write the checked archive into ``out`` (a path or binary file): the checked program JSON (node
    metadata dropped) and the payload members copied byte for byte, under a root folder bitplan chose."""
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as zout:
        for rel in checked.copy:
            data = json.dumps(checked.program).encode() if rel == "models/model.json" else checked.members.read(rel)
            zout.writestr(f"model/{rel}", data)
    if hasattr(out, "seek"):
        out.seek(0)


def _json(m: Members, rel: str, label: str):
    try:
        return json.loads(m.read(rel, MAX_JSON_BYTES))
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise ModelFormatError(f"{label}: {rel} is not valid JSON ({str(exc)[:100]})", EXPORT_HINT) from None


def _payload_config(m: Members, rel: str, prefix: str, label: str) -> dict:
    where = f"{label} ({m.root}/{rel})"
    doc = _json(m, rel, label)
    config = doc.get("config") if isinstance(doc, dict) else None
    if not isinstance(config, dict) or set(doc) != {"config"}:
        raise Refused(where, "is not a payload config ({'config': {...}})")
    for fqn, meta in config.items():
        check_fqn(fqn, where)
        if not isinstance(meta, dict):
            raise Refused(where, f"entry {shown(fqn)} is not an object")
        unknown = set(meta) - {"path_name", "is_param", "use_pickle", "tensor_meta"}
        if unknown:
            raise Refused(where, f"entry {shown(fqn)} has unknown field(s) {shown(sorted(unknown))}")
        if meta.get("use_pickle"):
            raise Refused(where, f"stores {shown(fqn)} as a pickled object, which bitplan will not unpickle",
                          "export a model whose weights and constants are plain tensors")
        path_name = meta.get("path_name")
        if not isinstance(path_name, str) or not re.fullmatch(re.escape(prefix) + r"\d{1,9}", path_name):
            raise Refused(where, f"{shown(fqn)} is stored as {shown(path_name)}, not as a plain tensor file "
                          f"({prefix}N): custom and opaque objects are refused",
                          "export a model whose weights and constants are plain tensors")
        TensorMetaCheck(f"{where} {shown(fqn)}").meta(meta.get("tensor_meta"), static=True)
    return config


def _check_payload_files(m: Members, config: dict, folder: str, label: str) -> None:
    """Each tensor's last byte (from its sizes, strides and offset) lies inside its file."""
    for fqn, meta in config.items():
        rel = folder + meta["path_name"]
        if rel not in m.infos:
            raise ModelFormatError(f"{label}: {shown(fqn)} points at {shown(rel)}, which the archive lacks", EXPORT_HINT)
        tm = meta["tensor_meta"]
        sizes = [s["as_int"] for s in tm["sizes"]]
        strides = [s["as_int"] for s in tm["strides"]]
        if 0 in sizes:
            continue
        last = tm.get("storage_offset", {"as_int": 0})["as_int"] + sum((n - 1) * st for n, st in zip(sizes, strides))
        need = (last + 1) * ITEM_BYTES[tm["dtype"]]
        if need > m.infos[rel].file_size:
            raise Refused(f"{label} ({m.root}/{rel})", f"{shown(fqn)} needs {need:,} bytes but its file holds "
                          f"{m.infos[rel].file_size:,}")


def check_torch_save(data: bytes, label: str) -> None:
    """A ``torch.save`` zip (example inputs): its pickle may only rebuild tensors and ordered dicts.

    torch reads it with the weights-only unpickler (TORCH_FORCE_WEIGHTS_ONLY_LOAD), and falls back to full
    unpickling when that fails; this scan makes sure the fallback has nothing else to run."""
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile:
        raise Refused(label, "is not a torch.save archive (a bare pickle?)") from None
    m = members(zf, label)
    for rel in m.infos:
        if rel not in {"data.pkl", "byteorder", "version", ".data/version", ".data/serialization_id", ".format_version",
                       ".storage_alignment"} and not re.fullmatch(r"data/\d{1,9}", rel):
            raise Refused(label, f"holds {shown(rel)}, which a torch.save of tensors does not")
    if "data.pkl" not in m.infos:
        raise Refused(label, "has no data.pkl")
    for op, arg in _pickle_ops(m.read("data.pkl", MAX_JSON_BYTES), label):
        if op in ("STACK_GLOBAL", "INST", "OBJ", "NEWOBJ_EX", "EXT1", "EXT2", "EXT4"):
            raise Refused(label, f"its pickle uses {op}, which rebuilding tensors does not need")
        if op == "GLOBAL" and arg not in _SAMPLE_GLOBALS and not _STORAGE_GLOBAL.match(str(arg)):
            raise Refused(label, f"its pickle calls {shown(arg)}, which rebuilding tensors does not need")


def _pickle_ops(data: bytes, label: str) -> Iterable[tuple[str, object]]:
    """The opcodes of a pickle, read by pickletools (which never builds an object)."""
    try:
        for op, arg, _ in pickletools.genops(data):
            yield op.name, arg
    except (ValueError, EOFError, UnicodeDecodeError) as exc:
        raise Refused(label, f"holds a damaged pickle ({str(exc)[:80]})") from None


# --- names, operators, expressions --------------------------------------------------------------------


def check_identifier(name: object, where: str, what: str = "name") -> str:
    if not isinstance(name, str) or len(name) > MAX_NAME or not _IDENT.match(name) or keyword.iskeyword(name):
        raise Refused(where, f"{what} {shown(name)} is not a Python identifier")
    return name


def check_fqn(name: object, where: str, what: str = "path", empty: bool = False) -> str:
    """A parameter/buffer/module path: dotted atoms of letters, digits and '_' (``layers.0.weight``)."""
    if isinstance(name, str) and name == "" and empty:
        return name
    if (not isinstance(name, str) or len(name) > 1000 or not name
            or not all(_ATOM.match(atom) for atom in name.split("."))):
        raise Refused(where, f"{what} {shown(name)} is not a dotted path of letters, digits and '_'")
    return name


def check_operator(target: object, where: str) -> str:
    if not isinstance(target, str) or len(target) > MAX_NAME:
        raise Refused(where, f"operator {shown(target)} is not a name")
    parts = target.split(".")
    if not all(_IDENT.match(p) for p in parts):
        raise Refused(where, f"operator {shown(target)} is not a dotted name")
    ok = False
    if parts[:2] == ["torch", "ops"] and len(parts) in (4, 5) and parts[2] in OP_NAMESPACES:
        ok = parts[3] not in OP_DENIED and (len(parts) == 5 or parts[2] == "higher_order")
    elif parts[0] == "_operator" and len(parts) == 2:
        ok = parts[1] in PY_OPERATORS
    elif parts[0] == "torch" and len(parts) == 2:
        ok = parts[1] in SYM_FUNCTIONS
    elif parts[0] == "math" and len(parts) == 2:
        ok = parts[1] in MATH_FUNCTIONS
    if not ok:
        raise Refused(where, f"operator {shown(target)} is not one bitplan runs (torch.ops.<aten|prims|...>.<op>.<overload> "
                      "and a few Python operators)")
    return target


def check_plain_text(value: object, where: str, what: str = "text", limit: int = 10_000) -> str:
    """A string that is data, never code, but might be quoted into code: no quotes, backslashes or control characters."""
    if not isinstance(value, str) or len(value) > limit or not _PLAIN.match(value):
        raise Refused(where, f"{what} {shown(value)} holds quotes, backslashes or control characters")
    return value


def check_sym_expr(text: object, where: str) -> str:
    """A shape expression torch hands to ``sympy.sympify`` (an eval): arithmetic over shape symbols only."""
    tree = _parse(text, where, "shape expression")
    _Allowed(where, "shape expression", names=SYMPY_FUNCTIONS, symbols=True).visit(tree)
    return text  # type: ignore[return-value]


def check_guard(text: object, where: str) -> str:
    """A guard torch ``exec``s when it builds the module, e.g. ``L['x'].size()[0] == L['mask'].size()[0]``."""
    tree = _parse(text, where, "guard")
    _Allowed(where, "guard", names=GUARD_NAMES, symbols=False, guard=True).visit(tree)
    return text  # type: ignore[return-value]


def _parse(text: object, where: str, what: str) -> ast.AST:
    if not isinstance(text, str) or len(text) > MAX_EXPR or not _PLAIN.match(text.replace("'", "")):
        raise Refused(where, f"{what} {shown(text)} is not a short expression")
    try:
        return ast.parse(text, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        raise Refused(where, f"{what} {shown(text)} does not parse") from None


_ARITH = (ast.Add, ast.Sub, ast.Mult, ast.Div, ast.FloorDiv, ast.Mod, ast.Pow, ast.BitAnd, ast.BitOr, ast.BitXor,
          ast.LShift, ast.RShift)
_CMP = (ast.Eq, ast.NotEq, ast.Lt, ast.LtE, ast.Gt, ast.GtE)


class _Allowed(ast.NodeVisitor):
    """Walks an expression and refuses any node outside the allow-list (attributes, lambdas, subscripts of
    anything but the guard's inputs, calls of names not listed, strings that are not names or numbers)."""

    def __init__(self, where: str, what: str, names: frozenset[str], symbols: bool, guard: bool = False) -> None:
        self.where, self.what, self.names, self.symbols, self.guard = where, what, names, symbols, guard
        self.depth = 0

    def refuse(self, node: ast.AST, why: str) -> None:
        raise Refused(self.where, f"{self.what} contains {why} ({shown(ast.unparse(node), 60)})")

    def visit(self, node: ast.AST) -> None:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            self.refuse(node, "too deep a nesting")
        try:
            super().visit(node)
        finally:
            self.depth -= 1

    def generic_visit(self, node: ast.AST) -> None:
        if isinstance(node, (ast.Expression, ast.Load)) or isinstance(node, _ARITH + _CMP) or isinstance(
                node, (ast.USub, ast.UAdd, ast.Not, ast.Invert, ast.And, ast.Or, ast.BoolOp, ast.UnaryOp, ast.BinOp,
                       ast.Compare, ast.Tuple)):
            super().generic_visit(node)
            return
        self.refuse(node, f"a {type(node).__name__}")

    def visit_Constant(self, node: ast.Constant) -> None:
        value = node.value
        if isinstance(value, str):
            if not (_IDENT.match(value) or _NUMBER_TEXT.match(value)) or len(value) > MAX_NAME:
                self.refuse(node, "a string that is not a name or a number")
        elif value is not None and not isinstance(value, (bool, int, float)):
            self.refuse(node, "a constant that is not a number")

    def visit_Name(self, node: ast.Name) -> None:
        if node.id not in self.names and not (self.symbols and _SYMBOL.match(node.id)):
            self.refuse(node, f"the name {node.id!r}")

    def visit_Call(self, node: ast.Call) -> None:
        func = node.func
        if isinstance(func, ast.Name):
            if func.id not in self.names or func.id in ("L", "math", "inf"):
                self.refuse(node, f"a call of {func.id!r}")
        elif not (self.guard and isinstance(func, ast.Attribute) and self._guard_attribute(func)):
            self.refuse(node, "a call of something that is not an allowed function")
        for arg in node.args:
            self.visit(arg)
        for kw in node.keywords:
            if kw.arg is None or not _IDENT.match(kw.arg) or not isinstance(kw.value, ast.Constant):
                self.refuse(node, "a keyword argument that is not a constant")
            self.visit(kw.value)

    def visit_Attribute(self, node: ast.Attribute) -> None:
        if not (self.guard and self._guard_attribute(node)):
            self.refuse(node, "an attribute access")

    def _guard_attribute(self, node: ast.Attribute) -> bool:
        """``math.isnan`` and friends, or ``<input>.size`` / ``.stride`` / ... on an input of the guard."""
        if isinstance(node.value, ast.Name) and node.value.id == "math":
            return node.attr in MATH_NAMES
        if node.attr in GUARD_METHODS:
            self.visit_source(node.value)
            return True
        return False

    def visit_Subscript(self, node: ast.Subscript) -> None:
        if not self.guard:
            self.refuse(node, "a subscript")
        self.visit_source(node)

    def visit_source(self, node: ast.AST) -> None:
        """``L['x']``, ``L['x'][0]``, ``L['x'].size()[1]``: an input, indexed by names and numbers."""
        if isinstance(node, ast.Name) and node.id == "L":
            return
        if isinstance(node, ast.Subscript):
            index = node.slice
            if isinstance(index, ast.UnaryOp) and isinstance(index.op, ast.USub):
                index = index.operand
            if not (isinstance(index, ast.Constant) and (isinstance(index.value, int) or (
                    isinstance(index.value, str) and _IDENT.match(index.value)))):
                self.refuse(node, "an index that is not a number or a name")
            self.visit_source(node.value)
            return
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in GUARD_METHODS:
            if node.keywords or any(not isinstance(a, ast.Constant) or not isinstance(a.value, int) for a in node.args):
                self.refuse(node, "a method call with arguments that are not numbers")
            self.visit_source(node.func.value)
            return
        self.refuse(node, "an expression that is not an input of the model")


# --- the program JSON ---------------------------------------------------------------------------------


class TensorMetaCheck:
    def __init__(self, where: str) -> None:
        self.where = where

    def meta(self, tm: object, static: bool = False) -> dict:
        """``static``: sizes, strides and offset must be plain integers (stored payloads)."""
        if not isinstance(tm, dict):
            raise Refused(self.where, "tensor metadata is missing")
        known = {"dtype", "sizes", "requires_grad", "device", "strides", "storage_offset", "layout"}
        if set(tm) - known:
            raise Refused(self.where, f"tensor metadata has unknown field(s) {shown(sorted(set(tm) - known))}")
        if tm.get("dtype") not in ITEM_BYTES:
            raise Refused(self.where, f"dtype {shown(tm.get('dtype'))} is not a tensor type bitplan knows")
        if not isinstance(tm.get("layout", 0), int) or not isinstance(tm.get("requires_grad", False), bool):
            raise Refused(self.where, "tensor metadata has a bad layout or requires_grad")
        for key in ("sizes", "strides"):
            values = tm.get(key)
            if not isinstance(values, list) or len(values) > 16:
                raise Refused(self.where, f"tensor {key} are not a list of at most 16 dims")
            for v in values:
                self.sym_int(v, static)
        self.sym_int(tm.get("storage_offset", {"as_int": 0}), static)
        device(tm.get("device"), self.where)
        return tm

    def sym_int(self, value: object, static: bool = False) -> None:
        if isinstance(value, dict) and set(value) == {"as_int"}:
            n = value["as_int"]
            if not isinstance(n, int) or isinstance(n, bool) or not 0 <= n < 1 << 48:
                raise Refused(self.where, f"size/stride {shown(n)} is not a non-negative integer below 2**48")
            return
        if not static and isinstance(value, dict) and set(value) == {"as_expr"}:
            sym_expr(value["as_expr"], self.where)
            return
        raise Refused(self.where, f"size {shown(value, 60)} is neither an integer nor a shape expression")


def device(value: object, where: str) -> None:
    if value is None:
        return
    if (not isinstance(value, dict) or set(value) - {"type", "index"} or not isinstance(value.get("type"), str)
            or not re.fullmatch(r"[a-z_]{1,20}", value["type"]) or not isinstance(value.get("index"), (int, type(None)))):
        raise Refused(where, f"device {shown(value, 60)} is not a device")


def sym_expr(value: object, where: str) -> None:
    if not isinstance(value, dict) or set(value) - {"expr_str", "hint"}:
        raise Refused(where, f"shape expression {shown(value, 60)} is malformed")
    check_sym_expr(value.get("expr_str"), where)
    hint = value.get("hint")
    if hint is not None and not (isinstance(hint, dict) and len(hint) == 1 and next(iter(hint)) in (
            "as_int", "as_float", "as_bool") and isinstance(next(iter(hint.values())), (int, float, bool))):
        raise Refused(where, f"shape hint {shown(hint, 60)} is not a number")


def no_strings(value: object, where: str, key: str) -> None:
    """A field bitplan does not know may hold numbers, booleans and nulls only: strings are where names hide."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            raise Refused(where, f"unknown field {shown(key)} holds text ({shown(item, 60)}); bitplan checks every name "
                          "torch reads", "export with torch 2.4-2.13, or report the field to bitplan's maintainers")
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


class ProgramCheck:
    """Walks a serialized ExportedProgram (torch/_export/serde/schema.py) field by field."""

    def __init__(self, where: str) -> None:
        self.where = where
        self.tensors = TensorMetaCheck(where)

    def program(self, doc: object) -> dict:
        if not isinstance(doc, dict) or "graph_module" not in doc:
            raise ModelFormatError(f"{self.where} is not a serialized torch.export program", EXPORT_HINT)
        out = {}
        for key, value in doc.items():
            if key == "graph_module":
                out[key] = self.graph_module(value)
            elif key == "range_constraints":
                out[key] = self.range_constraints(value)
            elif key == "guards_code":
                if not isinstance(value, list):
                    raise Refused(self.where, "guards_code is not a list")
                out[key] = [check_guard(g, self.where) for g in value]
            elif key == "verifiers":
                out[key] = [check_identifier(v, self.where, "verifier") for v in _list(value, self.where, key)]
            elif key in ("torch_version", "dialect"):
                out[key] = check_plain_text(value, self.where, key, 100)
            else:  # opset_version ({namespace: int}), schema_version ({major, minor}), ...
                if key == "opset_version" and isinstance(value, dict):
                    for ns in value:
                        check_identifier(ns, self.where, "opset namespace")
                    no_strings(list(value.values()), self.where, key)
                else:
                    no_strings(value, self.where, key)
                out[key] = value
        return out

    def range_constraints(self, value: object) -> dict:
        if not isinstance(value, dict):
            raise Refused(self.where, "range_constraints is not an object")
        for symbol, bounds in value.items():
            check_sym_expr(symbol, self.where)
            no_strings(bounds, self.where, f"range_constraints[{symbol}]")
        return value

    def graph_module(self, gm: object) -> dict:
        if not isinstance(gm, dict):
            raise Refused(self.where, "graph_module is not an object")
        out = {}
        for key, value in gm.items():
            if key == "graph":
                out[key] = self.graph(value)
            elif key == "signature":
                out[key] = self.signature(value)
            elif key == "module_call_graph":
                out[key] = [self.call_entry(e) for e in _list(value, self.where, key)]
            elif key == "metadata":
                out[key] = {}  # free text (stack traces, tracing notes): bitplan does not pass it on
            elif key == "treespec_namedtuple_fields":
                out[key] = self.namedtuples(value)
            else:
                no_strings(value, self.where, key)
                out[key] = value
        return out

    def graph(self, graph: object) -> dict:
        if not isinstance(graph, dict):
            raise Refused(self.where, "graph is not an object")
        out = {}
        for key, value in graph.items():
            if key in ("inputs", "outputs"):
                out[key] = [self.argument(a) for a in _list(value, self.where, key)]
            elif key == "nodes":
                out[key] = [self.node(n) for n in _list(value, self.where, key)]
            elif key == "tensor_values":
                out[key] = {check_identifier(k, self.where, "tensor"): self.tensors.meta(v)
                            for k, v in _dict(value, self.where, key).items()}
            elif key in ("sym_int_values", "sym_bool_values", "sym_float_values"):
                out[key] = {check_identifier(k, self.where, "symbol"): self.sym_value(v)
                            for k, v in _dict(value, self.where, key).items()}
            elif key == "custom_obj_values":
                if value:
                    raise Refused(self.where, "the graph holds custom objects (torchbind), which bitplan does not load")
                out[key] = value
            else:
                no_strings(value, self.where, key)
                out[key] = value
        return out

    def sym_value(self, value: object) -> object:
        if isinstance(value, dict) and len(value) == 1:
            (kind, inner), = value.items()
            if kind == "as_expr":
                sym_expr(inner, self.where)
                return value
            if kind in ("as_int", "as_bool", "as_float") and isinstance(inner, (int, float, bool)):
                return value
        raise Refused(self.where, f"symbolic value {shown(value, 60)} is malformed")

    def node(self, node: object) -> dict:
        if not isinstance(node, dict):
            raise Refused(self.where, "a graph node is not an object")
        known = {"target", "inputs", "outputs", "metadata", "name", "is_hop_single_tensor_return"}
        if set(node) - known:
            raise Refused(self.where, f"a graph node has unknown field(s) {shown(sorted(set(node) - known))}")
        out = dict(node)
        out["target"] = check_operator(node.get("target"), self.where)
        if node.get("name") is not None:
            check_identifier(node["name"], self.where, "node name")
        out["inputs"] = []
        for named in _list(node.get("inputs", []), self.where, "node inputs"):
            if not isinstance(named, dict) or set(named) - {"name", "arg", "kind"}:
                raise Refused(self.where, f"a node argument {shown(named, 60)} is malformed")
            check_identifier(named.get("name"), self.where, "argument name")
            if not isinstance(named.get("kind", 0), (int, type(None))):
                raise Refused(self.where, "an argument kind is not a number")
            out["inputs"].append({**named, "arg": self.argument(named.get("arg"))})
        out["outputs"] = [self.argument(a) for a in _list(node.get("outputs", []), self.where, "node outputs")]
        out["metadata"] = {}  # stack traces and module paths: free text that bitplan does not pass on
        no_strings(node.get("is_hop_single_tensor_return"), self.where, "is_hop_single_tensor_return")
        return out

    def argument(self, arg: object) -> object:
        """One value of the graph (schema ``Argument``, a union written as a one-key object)."""
        if not isinstance(arg, dict) or len(arg) != 1:
            raise Refused(self.where, f"argument {shown(arg, 60)} is malformed")
        (kind, value), = arg.items()
        w = self.where
        if kind in ("as_none", "as_int", "as_float", "as_bool", "as_ints", "as_floats", "as_bools", "as_scalar_type",
                    "as_memory_format", "as_layout", "as_complex", "as_int_lists"):
            no_strings(value, w, kind)
        elif kind in ("as_tensor", "as_token"):
            self.tensor_ref(value)
        elif kind in ("as_tensors",):
            for t in _list(value, w, kind):
                self.tensor_ref(t)
        elif kind in ("as_optional_tensor",):
            self.optional_tensor(value)
        elif kind in ("as_optional_tensors",):
            for t in _list(value, w, kind):
                self.optional_tensor(t)
        elif kind in ("as_sym_int", "as_sym_bool", "as_sym_float"):
            self.sym_argument(value)
        elif kind in ("as_sym_ints", "as_sym_bools", "as_sym_floats"):
            for v in _list(value, w, kind):
                self.sym_argument(v)
        elif kind == "as_string":
            if not isinstance(value, str) or len(value) > 10_000:
                raise Refused(w, "a string argument is too long")  # printed with repr(): data, never code
        elif kind == "as_strings":
            if not all(isinstance(s, str) and len(s) <= 10_000 for s in _list(value, w, kind)):
                raise Refused(w, "a string list argument is malformed")
        elif kind == "as_device":
            device(value, w)
        elif kind == "as_operator":
            check_operator(value, w)
        elif kind == "as_graph":
            if not isinstance(value, dict) or set(value) != {"name", "graph"}:
                raise Refused(w, "a subgraph argument is malformed")
            check_identifier(value["name"], w, "subgraph name")
            return {kind: {"name": value["name"], "graph": self.graph(value["graph"])}}
        elif kind == "as_string_to_argument":
            return {kind: {check_identifier(k, w, "key"): self.argument(v) for k, v in _dict(value, w, kind).items()}}
        elif kind == "as_custom_obj":
            raise Refused(w, "the graph uses a custom object (torchbind), which bitplan does not load")
        else:
            raise Refused(w, f"argument kind {shown(kind)} is not one bitplan knows")
        return arg

    def tensor_ref(self, value: object) -> None:
        if not isinstance(value, dict) or set(value) != {"name"}:
            raise Refused(self.where, f"tensor reference {shown(value, 60)} is malformed")
        check_identifier(value["name"], self.where, "tensor")

    def optional_tensor(self, value: object) -> None:
        if isinstance(value, dict) and set(value) == {"as_tensor"}:
            self.tensor_ref(value["as_tensor"])
        elif not (isinstance(value, dict) and set(value) == {"as_none"}):
            raise Refused(self.where, f"optional tensor {shown(value, 60)} is malformed")

    def sym_argument(self, value: object) -> None:
        if isinstance(value, dict) and len(value) == 1:
            (kind, inner), = value.items()
            if kind == "as_name":
                check_identifier(inner, self.where, "symbol")
                return
            if kind in ("as_int", "as_bool", "as_float") and isinstance(inner, (int, float, bool)):
                return
        raise Refused(self.where, f"symbolic argument {shown(value, 60)} is malformed")

    def signature(self, sig: object) -> dict:
        if not isinstance(sig, dict) or set(sig) - {"input_specs", "output_specs"}:
            raise Refused(self.where, "the graph signature is malformed")
        return {"input_specs": [self.spec(s, "input") for s in _list(sig.get("input_specs", []), self.where, "input_specs")],
                "output_specs": [self.spec(s, "output") for s in _list(sig.get("output_specs", []), self.where, "output_specs")]}

    _SPEC_FIELDS = {
        "input": {"user_input": {}, "parameter": {"parameter_name": "fqn"},
                  "buffer": {"buffer_name": "fqn", "persistent": "bool"}, "tensor_constant": {"tensor_constant_name": "fqn"},
                  "token": {}, "constant_input": {"name": "ident", "value": "constant"}},
        "output": {"user_output": {}, "loss_output": {}, "buffer_mutation": {"buffer_name": "fqn"},
                   "parameter_mutation": {"parameter_name": "fqn"}, "gradient_to_parameter": {"parameter_name": "fqn"},
                   "gradient_to_user_input": {"user_input_name": "ident"}, "user_input_mutation": {"user_input_name": "ident"},
                   "token": {}},
    }

    def spec(self, spec: object, side: str) -> object:
        if not isinstance(spec, dict) or len(spec) != 1:
            raise Refused(self.where, f"an {side} spec is malformed")
        (kind, body), = spec.items()
        fields = self._SPEC_FIELDS[side].get(kind)
        if fields is None:
            raise Refused(self.where, f"{side} spec kind {shown(kind)} is not one bitplan loads (custom objects are refused)")
        if not isinstance(body, dict) or set(body) - set(fields) - {"arg"}:
            raise Refused(self.where, f"an {side} spec ({kind}) is malformed")
        if "arg" in body:
            arg = body["arg"]
            if isinstance(arg, dict) and set(arg) == {"name"}:
                self.tensor_ref(arg)  # parameter, buffer, token: a bare TensorArgument / TokenArgument
            else:
                self.argument(arg)
        for key, rule in fields.items():
            value = body.get(key)
            if rule == "fqn":
                check_fqn(value, self.where, key)
            elif rule == "ident":
                check_identifier(value, self.where, key)
            elif rule == "bool" and not isinstance(value, (bool, type(None))):
                raise Refused(self.where, f"{key} is not a boolean")
            elif rule == "constant":
                self.constant(value)
        return spec

    def constant(self, value: object) -> None:
        """A constant input; torch writes string constants into a guard (``L['mode'] == 'bilinear'``)."""
        if isinstance(value, dict) and len(value) == 1:
            (kind, inner), = value.items()
            if kind == "as_string":
                check_plain_text(inner, self.where, "constant input", 200)
                return
            if kind in ("as_none", "as_int", "as_float", "as_bool") and not isinstance(inner, (str, list, dict)):
                return
        raise Refused(self.where, f"constant input {shown(value, 60)} is malformed")

    def call_entry(self, entry: object) -> dict:
        if not isinstance(entry, dict) or set(entry) - {"fqn", "signature"}:
            raise Refused(self.where, "a module call entry is malformed")
        fqn = entry.get("fqn")
        base = fqn.rsplit("@", 1)[0] if isinstance(fqn, str) and re.search(r"@\d{1,6}\Z", fqn) else fqn
        check_fqn(base, self.where, "module path", empty=True)
        sig = entry.get("signature")
        if sig is None:
            return entry
        known = {"inputs", "outputs", "in_spec", "out_spec", "forward_arg_names"}
        if not isinstance(sig, dict) or set(sig) - known:
            raise Refused(self.where, "a module call signature is malformed")
        for key in ("inputs", "outputs"):
            for arg in _list(sig.get(key, []), self.where, key):
                self.argument(arg)
        for key in ("in_spec", "out_spec"):
            TreeSpecCheck(self.where).spec_text(sig.get(key))
        names = sig.get("forward_arg_names")
        if names is not None:
            for name in _list(names, self.where, "forward_arg_names"):
                check_identifier(name, self.where, "forward argument")
        return entry

    def namedtuples(self, value: object) -> dict:
        for type_name, definition in _dict(value, self.where, "treespec_namedtuple_fields").items():
            check_fqn(type_name, self.where, "namedtuple type")
            if not isinstance(definition, dict) or set(definition) != {"field_names"}:
                raise Refused(self.where, f"namedtuple {shown(type_name)} is malformed")
            for name in _list(definition["field_names"], self.where, "field_names"):
                check_identifier(name, self.where, "namedtuple field")
        return value  # type: ignore[return-value]


class TreeSpecCheck:
    """The pytree spec of a module's inputs/outputs (a JSON string inside the JSON): container types torch
    knows, and keys that are identifiers or numbers (torch pastes keyword names into generated code)."""

    TYPES = frozenset({None, "builtins.tuple", "builtins.list", "builtins.dict", "collections.OrderedDict",
                       "collections.defaultdict", "collections.deque", "collections.namedtuple", "torch.Size",
                       "torch.fx.immutable_collections.immutable_list", "torch.fx.immutable_collections.immutable_dict",
                       "torch.return_types.max", "torch.return_types.min", "torch.return_types.sort",
                       "torch.return_types.topk"})

    def __init__(self, where: str) -> None:
        self.where = where

    def spec_text(self, text: object) -> None:
        if not isinstance(text, str) or len(text) > 1_000_000:
            raise Refused(self.where, "an input/output tree spec is not a string")
        try:
            doc = json.loads(text)
        except (ValueError, RecursionError):
            raise Refused(self.where, "an input/output tree spec is not JSON") from None
        if not (isinstance(doc, list) and len(doc) == 2 and isinstance(doc[0], int)):
            raise Refused(self.where, "an input/output tree spec is malformed")
        self.node(doc[1], 0)

    def node(self, node: object, depth: int) -> None:
        if depth > MAX_DEPTH or not isinstance(node, dict) or set(node) - {"type", "context", "children_spec"}:
            raise Refused(self.where, "an input/output tree spec node is malformed")
        kind = node.get("type")
        if kind not in self.TYPES:
            raise Refused(self.where, f"input/output container type {shown(kind)} is not one bitplan loads")
        context = node.get("context")
        if isinstance(context, str):
            try:
                context = json.loads(context)
            except ValueError:
                raise Refused(self.where, f"tree spec context {shown(context, 60)} is not JSON") from None
        self.context(context)
        for child in _list(node.get("children_spec", []), self.where, "children_spec"):
            self.node(child, depth + 1)

    def context(self, context: object) -> None:
        stack = [context]
        while stack:
            item = stack.pop()
            if isinstance(item, str):  # keyword names, dict keys, namedtuple type names: pasted into generated code
                if not all(_IDENT.match(atom) for atom in item.split(".")) and not _NUMBER_TEXT.match(item):
                    raise Refused(self.where, f"input/output key {shown(item)} is not a Python identifier")
            elif isinstance(item, list):
                stack.extend(item)
            elif isinstance(item, dict):
                stack.extend(item.keys())
                stack.extend(item.values())
            elif item is not None and not isinstance(item, (int, float, bool)):
                raise Refused(self.where, "an input/output tree spec context is malformed")


def _list(value: object, where: str, key: str) -> list:
    if not isinstance(value, list):
        raise Refused(where, f"{key} is not a list")
    return value


def _dict(value: object, where: str, key: str) -> dict:
    if not isinstance(value, dict):
        raise Refused(where, f"{key} is not an object")
    return value


# --- TorchScript --------------------------------------------------------------------------------------

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
    path = Path(path)
    label = label or path.name
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise ModelFormatError(f"{label} is truncated or corrupt ({exc})", "upload the complete file again") from None
    m = members(zf, label)
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
    for op, arg in _pickle_ops(data, where):
        if op in ("STACK_GLOBAL", "INST", "OBJ", "EXT1", "EXT2", "EXT4"):
            raise Refused(where, f"its pickle uses {op}, which TorchScript does not write", hint)
        if op == "GLOBAL" and not _TS_PICKLE_GLOBALS.match(str(arg)):
            raise Refused(where, f"its pickle refers to {shown(arg)}, which TorchScript does not write", hint)
        if names and isinstance(arg, str) and (not _PLAIN.match(arg) or len(arg) > 10_000):
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
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str) and not _ATOM.match(arg.value):
                    raise Refused(where, f"its code reads the attribute {shown(arg.value)}, which is not a plain name", hint)
        elif isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id in ("__parameters__", "__buffers__")
                                                  for t in node.targets):
            for item in ast.walk(node.value):
                if isinstance(item, ast.Constant) and isinstance(item.value, str) and not _ATOM.match(item.value):
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
