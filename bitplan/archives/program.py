"""The program JSON of a ``torch.export`` archive (``models/model.json``, schema in
torch/_export/serde/schema.py), walked field by field: every name is checked, every operator, shape
expression and guard goes through :mod:`bitplan.archives.names`, custom objects are refused, text under
fields bitplan does not know is refused, and node metadata (stack traces, module paths) is dropped."""

from __future__ import annotations

import json
import re
from typing import Any

from bitplan.archives.names import (
    IDENT,
    NUMBER_TEXT,
    check_fqn,
    check_guard,
    check_identifier,
    check_operator,
    check_plain_text,
    check_sym_expr,
)
from bitplan.archives.zips import EXPORT_HINT, MAX_DEPTH, Refused, shown
from bitplan.errors import ModelFormatError

#: Bytes per element of each ScalarType number in tensor metadata (torch/_export/serde/schema.py).
ITEM_BYTES = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 2, 7: 4, 8: 8, 9: 4, 10: 8, 11: 16, 12: 1, 13: 2, 28: 2, 29: 1, 30: 1,
              31: 1, 32: 1, 33: 1, 34: 4, 35: 8}


class TensorMetaCheck:
    def __init__(self, where: str) -> None:
        self.where = where

    def meta(self, tm: object, static: bool = False) -> dict[str, Any]:
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

    def program(self, doc: object) -> dict[str, Any]:
        if not isinstance(doc, dict) or "graph_module" not in doc:
            raise ModelFormatError(f"{self.where} is not a serialized torch.export program", EXPORT_HINT)
        out: dict[str, Any] = {}
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

    def range_constraints(self, value: object) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise Refused(self.where, "range_constraints is not an object")
        for symbol, bounds in value.items():
            check_sym_expr(symbol, self.where)
            no_strings(bounds, self.where, f"range_constraints[{symbol}]")
        return value

    def graph_module(self, gm: object) -> dict[str, Any]:
        if not isinstance(gm, dict):
            raise Refused(self.where, "graph_module is not an object")
        out: dict[str, Any] = {}
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

    def graph(self, graph: object) -> dict[str, Any]:
        if not isinstance(graph, dict):
            raise Refused(self.where, "graph is not an object")
        out: dict[str, Any] = {}
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

    def node(self, node: object) -> dict[str, Any]:
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
            if named.get("name") != "":  # torch 2.11 writes '' for some positional arguments: no code to run
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

    def signature(self, sig: object) -> dict[str, Any]:
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

    def call_entry(self, entry: object) -> dict[str, Any]:
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

    def namedtuples(self, value: object) -> dict[str, Any]:
        checked = _dict(value, self.where, "treespec_namedtuple_fields")
        for type_name, definition in checked.items():
            check_fqn(type_name, self.where, "namedtuple type")
            if not isinstance(definition, dict) or set(definition) != {"field_names"}:
                raise Refused(self.where, f"namedtuple {shown(type_name)} is malformed")
            for name in _list(definition["field_names"], self.where, "field_names"):
                check_identifier(name, self.where, "namedtuple field")
        return checked


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
                if not all(IDENT.match(atom) for atom in item.split(".")) and not NUMBER_TEXT.match(item):
                    raise Refused(self.where, f"input/output key {shown(item)} is not a Python identifier")
            elif isinstance(item, list):
                stack.extend(item)
            elif isinstance(item, dict):
                stack.extend(item.keys())
                stack.extend(item.values())
            elif item is not None and not isinstance(item, (int, float, bool)):
                raise Refused(self.where, "an input/output tree spec context is malformed")


def _list(value: object, where: str, key: str) -> list[Any]:
    if not isinstance(value, list):
        raise Refused(where, f"{key} is not a list")
    return value


def _dict(value: object, where: str, key: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise Refused(where, f"{key} is not an object")
    return value
