"""Names, operators and expressions found in a model archive, checked without evaluating anything:
identifiers and dotted paths, operator names against torch's own namespaces, and shape expressions and
guards parsed with :mod:`ast` and walked against an allow-list (torch later hands them to
``sympy.sympify`` and ``exec``)."""

from __future__ import annotations

import ast
import keyword
import re
from typing import cast

from bitplan.archives.zips import MAX_DEPTH, MAX_EXPR, MAX_NAME, PLAIN, Refused, shown

IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
ATOM = re.compile(r"[A-Za-z0-9_]+\Z")
SYMBOL = re.compile(r"[a-z]{1,6}[0-9]+\Z")  # shape symbols torch names: s0, u3, zuf0, ps12
NUMBER_TEXT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?\Z")

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


def check_identifier(name: object, where: str, what: str = "name") -> str:
    if not isinstance(name, str) or len(name) > MAX_NAME or not IDENT.match(name) or keyword.iskeyword(name):
        raise Refused(where, f"{what} {shown(name)} is not a Python identifier")
    return name


def check_fqn(name: object, where: str, what: str = "path", empty: bool = False) -> str:
    """A parameter/buffer/module path: dotted atoms of letters, digits and '_' (``layers.0.weight``)."""
    if isinstance(name, str) and name == "" and empty:
        return name
    if (not isinstance(name, str) or len(name) > 1000 or not name
            or not all(ATOM.match(atom) for atom in name.split("."))):
        raise Refused(where, f"{what} {shown(name)} is not a dotted path of letters, digits and '_'")
    return name


def check_operator(target: object, where: str) -> str:
    if not isinstance(target, str) or len(target) > MAX_NAME:
        raise Refused(where, f"operator {shown(target)} is not a name")
    parts = target.split(".")
    if not all(IDENT.match(p) for p in parts):
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
    if not isinstance(value, str) or len(value) > limit or not PLAIN.match(value):
        raise Refused(where, f"{what} {shown(value)} holds quotes, backslashes or control characters")
    return value


def check_sym_expr(text: object, where: str) -> str:
    """A shape expression torch hands to ``sympy.sympify`` (an eval): arithmetic over shape symbols only."""
    tree = _parse(text, where, "shape expression")
    _Allowed(where, "shape expression", names=SYMPY_FUNCTIONS, symbols=True).visit(tree)
    return cast(str, text)  # _parse refused anything but a string


def check_guard(text: object, where: str) -> str:
    """A guard torch ``exec``s when it builds the module, e.g. ``L['x'].size()[0] == L['mask'].size()[0]``."""
    tree = _parse(text, where, "guard")
    _Allowed(where, "guard", names=GUARD_NAMES, symbols=False, guard=True).visit(tree)
    return cast(str, text)  # _parse refused anything but a string


def _parse(text: object, where: str, what: str) -> ast.AST:
    if not isinstance(text, str) or len(text) > MAX_EXPR or not PLAIN.match(text.replace("'", "")):
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
            if not (IDENT.match(value) or NUMBER_TEXT.match(value)) or len(value) > MAX_NAME:
                self.refuse(node, "a string that is not a name or a number")
        elif value is not None and not isinstance(value, (bool, int, float)):
            self.refuse(node, "a constant that is not a number")

    def visit_Name(self, node: ast.Name) -> None:
        if node.id not in self.names and not (self.symbols and SYMBOL.match(node.id)):
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
            if kw.arg is None or not IDENT.match(kw.arg) or not isinstance(kw.value, ast.Constant):
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
                    isinstance(index.value, str) and IDENT.match(index.value)))):
                self.refuse(node, "an index that is not a number or a name")
            self.visit_source(node.value)
            return
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in GUARD_METHODS:
            if node.keywords or any(not isinstance(a, ast.Constant) or not isinstance(a.value, int) for a in node.args):
                self.refuse(node, "a method call with arguments that are not numbers")
            self.visit_source(node.func.value)
            return
        self.refuse(node, "an expression that is not an input of the model")
