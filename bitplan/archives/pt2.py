"""A ``torch.export`` archive (.pt2): only the members a plain program has, its program JSON
checked (:mod:`bitplan.archives.program`), its tensor payloads fitting their declared sizes, its example
inputs rebuilding tensors only; then :func:`write_canonical_pt2` writes the accepted parts into the
archive torch is given."""

from __future__ import annotations

import json
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from bitplan.archives.names import check_fqn
from bitplan.archives.program import ITEM_BYTES, ProgramCheck, TensorMetaCheck
from bitplan.archives.zips import EXPORT_HINT, MAX_JSON_BYTES, Members, Refused, check_torch_save, open_archive, shown
from bitplan.errors import ModelFormatError

_PT2_FIXED = {"archive_format", "archive_version", "byteorder", ".data/version", ".data/serialization_id",
              "models/model.json", "data/weights/model_weights_config.json",
              "data/constants/model_constants_config.json", "data/sample_inputs/model.pt"}
_PT2_PATTERNS = (re.compile(r"data/weights/weight_\d{1,9}\Z"), re.compile(r"data/constants/tensor_\d{1,9}\Z"),
                 re.compile(r"extra/[A-Za-z0-9_.-]{1,200}\Z"))


@dataclass
class CheckedPt2:
    """What :func:`check_pt2` accepted: the program with node metadata dropped, and the members to copy."""

    members: Members
    program: dict[str, Any]
    copy: list[str] = field(default_factory=list)


def check_pt2(path: str | Path, label: str | None = None) -> CheckedPt2:
    """Check a ``torch.export`` archive; raise :class:`UnsafeModelError` (or ModelFormatError) saying what is wrong."""
    label = label or Path(path).name
    m = open_archive(path, label)
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


def write_canonical_pt2(checked: CheckedPt2, out: str | Path | IO[bytes]) -> None:
    """Write the checked archive into ``out`` (a path or binary file): the checked program JSON (node
    metadata dropped) and the payload members copied byte for byte, under a root folder bitplan chose."""
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as zout:
        for rel in checked.copy:
            data = json.dumps(checked.program).encode() if rel == "models/model.json" else checked.members.read(rel)
            zout.writestr(f"model/{rel}", data)
    if hasattr(out, "seek"):
        out.seek(0)


def _json(m: Members, rel: str, label: str) -> Any:
    try:
        return json.loads(m.read(rel, MAX_JSON_BYTES))
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise ModelFormatError(f"{label}: {rel} is not valid JSON ({str(exc)[:100]})", EXPORT_HINT) from None


def _payload_config(m: Members, rel: str, prefix: str, label: str) -> dict[str, Any]:
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


def _check_payload_files(m: Members, config: dict[str, Any], folder: str, label: str) -> None:
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
