"""Parameters of sensitivity methods and solvers: checked against their pydantic models, with errors that
list what is valid (names, choices, ranges, defaults) instead of naming Python classes."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal, TypeVar, get_args, get_origin

from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo

from bitplan.errors import BitplanError

SHOWN = 10

M = TypeVar("M", bound=BaseModel)


def cut(text: str, chars: int = 60) -> str:
    return text if len(text) <= chars else text[: chars - 1] + "…"


def describe_field(name: str, info: FieldInfo) -> str:
    """``name`` with what it accepts: ``backend (cbc|highs, default cbc)``, ``time_limit (>0, default 60)``."""
    parts = []
    if get_origin(info.annotation) is Literal:
        parts.append("|".join(str(c) for c in get_args(info.annotation)))
    for meta in info.metadata:
        for attr, sign in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
            value = getattr(meta, attr, None)
            if value is not None:
                parts.append(f"{sign}{value}")
    if not info.is_required():
        default = info.get_default(call_default_factory=True)
        parts.append(f"default {default}")
    return f"{name} ({', '.join(parts)})" if parts else name


def describe_fields(model: type[BaseModel], skip: tuple[str, ...] = ()) -> str:
    return ", ".join(describe_field(n, f) for n, f in model.model_fields.items() if n not in skip) or "none"


def message_of(error: Mapping[str, Any]) -> str:
    """One pydantic error as people read it: no "Value error, " prefix."""
    return str(error.get("msg", "")).removeprefix("Value error, ")


def parse_model(model: type[M], raw: object, owner: str, field: str, skip: tuple[str, ...] = (),
                extra_hint: str = "") -> M:
    """``raw`` validated by ``model``; a BitplanError (code ``bad_params``, ``field``) names what is wrong and lists
    the valid parameters of ``owner`` (e.g. "solver 'ilp'") with their choices, ranges and defaults."""
    valid = f"valid parameters of {owner}: {describe_fields(model, skip)}"
    if not isinstance(raw, Mapping):
        raise BitplanError(f"{owner} parameters must be an object of name: value, not {type(raw).__name__}", valid,
                           code="bad_params", field=field)
    unknown = sorted(str(k) for k in raw if k not in model.model_fields)
    if unknown:
        shown = ", ".join(cut(k) for k in unknown[:SHOWN]) + (f" and {len(unknown) - SHOWN} more"
                                                             if len(unknown) > SHOWN else "")
        raise BitplanError(f"{owner} has no parameter(s) {shown}", valid + extra_hint, code="bad_params", field=field)
    try:
        return model(**raw)
    except ValidationError as exc:
        errors = exc.errors()
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'value'}: {message_of(e)} (got {cut(repr(e.get('input')))})"
                             for e in errors)
        first = model.model_fields.get(str(errors[0]["loc"][0])) if errors and errors[0]["loc"] else None
        hint = f"{errors[0]['loc'][0]}: {first.description}; {valid}" if first is not None and first.description else valid
        raise BitplanError(f"{owner} parameter {problems}", hint, code="bad_params", field=field) from None
