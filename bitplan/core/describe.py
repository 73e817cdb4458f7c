"""What an uploaded model or dataset holds, as JSON: its inputs, quantizable
layers, MACs and sizes.

``bitplan inspect`` prints it, the REST service (which never imports torch)
runs it on each upload in a sandboxed child (``workers/untrusted.py``), and
``python -m bitplan.core.describe model|data PATH`` prints one JSON line:
``{"ok": true, "result": {...}}``, or ``{"ok": false, "code", "message", "hint"}``
with exit code 2.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import sys
import warnings
from pathlib import Path

from bitplan.core.data import conform, is_text, load_data, read_text
from bitplan.core.evaluate import measure_macs
from bitplan.core.loading import SEND_INSTEAD, load_model
from bitplan.errors import BitplanError

EXIT_USER_ERROR = 2
DATA_HINT = ("send .npz or .safetensors holding 'inputs' (or 'inputs.<name>') and optional integer 'targets', or text "
             "(.txt, .jsonl) for a Hugging Face checkpoint")


def describe_model(path: str, data_path: str | None = None, name: str | None = None) -> dict:
    """Inputs, quantizable layers (with MACs per sample where inputs exist) and sizes of a model.

    MACs are measured on up to 4 samples of ``data_path`` (a catalog model's own data by default),
    else on the example inputs a .pt2 stores; without either they are None. ``name`` replaces the
    file name shown, for uploads stored under their sha256.
    """
    from bitplan.core.pipeline import resolve_data

    if data_path and is_text(data_path):  # text is tokenised with the model's own tokenizer
        model = load_model(path)
        data = resolve_data(path, data_path, "calib", model)
    else:
        data = resolve_data(path, data_path, "calib") if data_path or path.startswith("catalog:") else None
        model = load_model(path, sample=data)
    batch = None
    if data is not None:
        data = conform(data, model.inputs)
        batch = data.slice(0, min(4, len(data)))
    elif model.example is not None:
        batch = model.example
    macs = measure_macs(model, batch) if batch is not None else {}
    layers = [
        {"name": g.name, "kind": g.kind, "params": model.weight(g).numel(), "out_channels": model.weight(g).shape[0],
         "macs": macs.get(g.name), "reads": g.reads or None}
        for g in model.layers
    ]
    return {
        "sha256": model.info.sha256,
        "name": name or model.info.name,
        "format": model.info.format,
        "size_bytes": None if model.info.format == "catalog" else _size(Path(path)),
        "inputs": [{"name": s.name, "dtype": s.dtype, "shape": list(s.shape)} for s in model.inputs],
        "layers": layers,
        "other_bytes": model.fixed_bytes(),
    }


def _size(path: Path) -> int:
    """A file's size, or a checkpoint directory's (its files, not subfolders)."""
    if path.is_dir():
        return sum(p.stat().st_size for p in path.iterdir() if p.is_file())
    return path.stat().st_size


def describe_data(path: str, name: str | None = None) -> dict:
    """Samples, inputs (full shapes) and whether targets exist, of a calibration/evaluation file. Text (for a
    Hugging Face checkpoint) is read and counted, not tokenised: its samples are made with the model's tokenizer."""
    if is_text(path):
        text = read_text(path)
        return {"sha256": text.sha256, "name": name or Path(path).name, "samples": len(text.documents),
                "has_targets": True, "inputs": [], "text": {"documents": len(text.documents),
                                                            "characters": text.characters},
                "size_bytes": Path(path).stat().st_size}
    data = load_data(path)
    return {
        "sha256": data.sha256,
        "name": name or Path(path).name,
        "samples": len(data),
        "has_targets": data.targets is not None,
        "inputs": [{"name": key, "dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape)}
                   for key, t in data.inputs.items()],
        "size_bytes": Path(path).stat().st_size,
    }


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bitplan.core.describe",
                                     description="Describe a model or dataset as one JSON line.")
    sub = parser.add_subparsers(dest="kind", required=True)
    m = sub.add_parser("model")
    m.add_argument("path")
    m.add_argument("--data", help="inputs to measure MACs with (TorchScript needs them to load at all)")
    m.add_argument("--name", help="file name to report instead of the path's")
    d = sub.add_parser("data")
    d.add_argument("path")
    d.add_argument("--name")
    return parser


def _describe(args: argparse.Namespace) -> dict:
    if args.kind == "model":
        return describe_model(args.path, args.data, args.name)
    return describe_data(args.path, args.name)


def failure(args: argparse.Namespace, exc: Exception) -> dict:
    """The JSON for a failure: a BitplanError as it is, anything else as an unreadable file."""
    if isinstance(exc, BitplanError):
        return {"ok": False, **exc.to_dict(), "message": _as_named(exc.message, args),
                "hint": _as_named(exc.hint, args) if exc.hint else exc.hint}
    lines = str(exc).strip().splitlines()
    first = _as_named(lines[0], args) if lines else type(exc).__name__
    return {"ok": False, "code": "unreadable", "message": f"{args.name or Path(args.path).name} could not be read: {first}",
            "hint": SEND_INSTEAD if args.kind == "model" else DATA_HINT}


def _as_named(text: str, args: argparse.Namespace) -> str:
    """Messages name the file the user sent, not the temporary name the service stored it under."""
    if not args.name:
        return text
    path = Path(args.path)
    return text.replace(str(path.resolve()), args.name).replace(str(path), args.name).replace(path.name, args.name)


def main(argv: list[str] | None = None) -> int:
    """Print exactly one JSON line on stdout; keep stderr quiet (the caller reads stdout only)."""
    args = _parser().parse_args(argv)
    with warnings.catch_warnings(), _logs_off(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")  # stray prints and warnings from model code must not break the line
        try:
            out = {"ok": True, "result": _describe(args)}
        except Exception as exc:  # every failure becomes the JSON answer, never a traceback
            out = failure(args, exc)
    print(json.dumps(out), flush=True)
    return 0 if out["ok"] else EXIT_USER_ERROR


@contextlib.contextmanager
def _logs_off():
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(previous)


if __name__ == "__main__":
    sys.exit(main())
