"""The zip layer of the archive checks: sizes (zip bombs), member names (one root folder, no duplicates,
no path tricks), the pickles inside (scanned opcode by opcode, never loaded), and the error type every
refusal uses. Standard library only."""

from __future__ import annotations

import io
import os
import pickletools
import re
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass
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

PLAIN = re.compile(r"[^\"'\\\x00-\x1f\x7f]*\Z")  # no quotes, backslashes or control characters
_SAMPLE_GLOBALS = frozenset({"torch._utils _rebuild_tensor_v2", "torch._utils _rebuild_parameter",
                             "collections OrderedDict", "torch.storage UntypedStorage"})
_STORAGE_GLOBAL = re.compile(r"torch [A-Za-z0-9]+Storage\Z")


class Refused(UnsafeModelError):
    """A value in the archive is outside what bitplan lets torch read; ``where`` says where it was found."""

    def __init__(self, where: str, what: str, hint: str = EXPORT_HINT) -> None:
        super().__init__(f"{where}: {what}", hint)


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


def open_archive(path: str | Path, label: str | None = None) -> Members:
    """The zip at ``path`` with its members checked (:func:`members`); ``label`` names it in messages."""
    label = label or Path(path).name
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise ModelFormatError(f"{label} is truncated or corrupt ({exc})", "upload the complete file again") from None
    return members(zf, label)


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
        if not name or len(name) > 1000 or not PLAIN.match(name) or name.startswith("/") or "\\" in name:
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
    for op, arg in pickle_ops(m.read("data.pkl", MAX_JSON_BYTES), label):
        if op in ("STACK_GLOBAL", "INST", "OBJ", "NEWOBJ_EX", "EXT1", "EXT2", "EXT4"):
            raise Refused(label, f"its pickle uses {op}, which rebuilding tensors does not need")
        if op == "GLOBAL" and arg not in _SAMPLE_GLOBALS and not _STORAGE_GLOBAL.match(str(arg)):
            raise Refused(label, f"its pickle calls {shown(arg)}, which rebuilding tensors does not need")


def pickle_ops(data: bytes, label: str) -> Iterable[tuple[str, object]]:
    """The opcodes of a pickle, read by pickletools (which never builds an object)."""
    try:
        for op, arg, _ in pickletools.genops(data):
            yield op.name, arg
    except (ValueError, EOFError, UnicodeDecodeError) as exc:
        raise Refused(label, f"holds a damaged pickle ({str(exc)[:80]})") from None
