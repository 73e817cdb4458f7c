"""Uploaded files, stored once per content under ``DATA_DIR/blobs/ab/abcdef...``.

A file is streamed to a temporary name beside its destination while its sha256
is computed, then renamed into place: a crash or a refused upload leaves no
half-written blob behind.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import BinaryIO

CHUNK = 1 << 20


class TooLarge(ValueError):
    def __init__(self, limit: int) -> None:
        super().__init__(f"upload is larger than the limit of {limit / 1e6:g} MB")
        self.limit = limit


class Staged:
    """An upload written to a temporary file: ``commit()`` moves it into the store, ``discard()`` drops it."""

    def __init__(self, store: BlobStore, tmp: Path, sha256: str, size: int) -> None:
        self.store, self.tmp, self.sha256, self.size = store, tmp, sha256, size

    def commit(self) -> Path:
        dest = self.store.path(self.sha256)
        dest.parent.mkdir(parents=True, exist_ok=True)
        if dest.exists():
            self.tmp.unlink(missing_ok=True)
        else:
            os.replace(self.tmp, dest)
        return dest

    def discard(self) -> None:
        self.tmp.unlink(missing_ok=True)


class BlobStore:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.tmp_dir = self.root / "tmp"
        self.tmp_dir.mkdir(parents=True, exist_ok=True)

    def path(self, sha256: str) -> Path:
        return self.root / "blobs" / sha256[:2] / sha256

    def stage(self, source: BinaryIO, max_bytes: int) -> Staged:
        """Copy ``source`` to a temporary file, hashing it; raise TooLarge past ``max_bytes``."""
        digest = hashlib.sha256()
        size = 0
        fd, name = tempfile.mkstemp(dir=self.tmp_dir, prefix="upload-")
        tmp = Path(name)
        try:
            with os.fdopen(fd, "wb") as out:
                while chunk := source.read(CHUNK):
                    size += len(chunk)
                    if size > max_bytes:
                        raise TooLarge(max_bytes)
                    digest.update(chunk)
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return Staged(self, tmp, digest.hexdigest(), size)

    def put_file(self, path: Path, sha256: str) -> Path:
        """Move a file this process wrote (e.g. synthetic data) into the store."""
        dest = self.path(sha256)
        dest.parent.mkdir(parents=True, exist_ok=True)
        if dest.exists():
            Path(path).unlink(missing_ok=True)
        else:
            os.replace(path, dest)
        return dest
