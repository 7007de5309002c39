"""Content-addressed blob storage: images, arrays and checkpoints, keyed by their sha256.

`BlobStore` is the interface; `FileBlobStore` keeps blobs as files under a directory. An
object store can replace it by implementing the same four methods.
"""

import hashlib
import os
import re
import tempfile
from pathlib import Path
from typing import Protocol

_KEY = re.compile(r"[0-9a-f]{64}")


def blob_key(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class BlobStore(Protocol):
    def put(self, data: bytes) -> str:
        """Store `data` (idempotent) and return its key, the hex sha256 of the bytes."""
        ...

    def get(self, key: str) -> bytes:
        """The bytes stored under `key`; KeyError when there are none."""
        ...

    def exists(self, key: str) -> bool: ...

    def path(self, key: str) -> Path | None:
        """A local file holding the blob, when the store has one (for zero-copy reads)."""
        ...


class FileBlobStore:
    """Blobs as files root/ab/abcd..., written atomically."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._made: set[Path] = set()  # shard folders known to exist (mkdir is a slow syscall)

    def _file(self, key: str) -> Path:
        # Keys come from our own hashes, but a path is never built from anything unchecked.
        if not _KEY.fullmatch(key):
            raise KeyError(f"not a blob key: {key!r}")
        return self.root / key[:2] / key

    def put(self, data: bytes) -> str:
        key = blob_key(data)
        target = self._file(key)
        if target.exists():
            return key
        if target.parent not in self._made:
            target.parent.mkdir(parents=True, exist_ok=True)
            self._made.add(target.parent)
        # Write then rename, so a reader never sees half a blob.
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return key

    def get(self, key: str) -> bytes:
        try:
            return self._file(key).read_bytes()
        except FileNotFoundError:
            raise KeyError(key) from None

    def exists(self, key: str) -> bool:
        return self._file(key).is_file()

    def path(self, key: str) -> Path | None:
        file = self._file(key)
        return file if file.is_file() else None
