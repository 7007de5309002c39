"""Unpacking uploaded dataset archives (zip, tar, tar.gz) without trusting them.

Member names are checked (no absolute paths, no `..`, no links), and the unpacked size and
member count are capped while copying, whatever the archive's headers claim.
"""

import lzma
import os
import shutil
import tarfile
import zipfile
import zlib
from pathlib import Path, PurePosixPath
from typing import IO, BinaryIO

from service.errors import InvalidArchive, PayloadTooLarge

_CHUNK = 1024 * 1024
_IGNORED = ("__MACOSX",)


def _safe_relative(name: str) -> PurePosixPath | None:
    """The member's path inside the archive, or None for members to skip."""
    path = PurePosixPath(name.replace("\\", "/"))
    if path.is_absolute() or ".." in path.parts or (path.parts and ":" in path.parts[0]):
        raise InvalidArchive(f"archive member {name!r} points outside the archive")
    if not path.parts or path.parts[0] in _IGNORED:
        return None
    return path


class _Budget:
    def __init__(self, max_bytes: int, max_members: int) -> None:
        self.bytes_left = max_bytes
        self.members_left = max_members
        self.max_bytes = max_bytes
        self.max_members = max_members

    def member(self) -> None:
        self.members_left -= 1
        if self.members_left < 0:
            raise PayloadTooLarge(f"the archive has more than {self.max_members} files")

    def copy(self, source: IO[bytes], target: Path) -> None:
        target.parent.mkdir(parents=True, exist_ok=True)
        with target.open("wb") as out:
            while chunk := source.read(_CHUNK):
                self.bytes_left -= len(chunk)
                if self.bytes_left < 0:
                    raise PayloadTooLarge(
                        f"the archive unpacks to more than {self.max_bytes} bytes"
                    )
                out.write(chunk)


def _unzip(archive: zipfile.ZipFile, dest: Path, budget: _Budget) -> None:
    for info in archive.infolist():
        path = _safe_relative(info.filename)
        if path is None or info.is_dir():
            continue
        # The top 4 bits of a zip member's Unix mode say whether it is a symbolic link.
        if (info.external_attr >> 28) == 0xA:
            raise InvalidArchive(f"archive member {info.filename!r} is a link")
        budget.member()
        with archive.open(info) as source:
            budget.copy(source, dest.joinpath(*path.parts))


def _untar(archive: tarfile.TarFile, dest: Path, budget: _Budget) -> None:
    for member in archive:
        path = _safe_relative(member.name)
        if path is None or member.isdir():
            continue
        if not member.isfile():
            raise InvalidArchive(f"archive member {member.name!r} is not a regular file")
        budget.member()
        source = archive.extractfile(member)
        assert source is not None
        with source:
            budget.copy(source, dest.joinpath(*path.parts))


def extract(fileobj: BinaryIO, dest: Path, *, max_bytes: int, max_members: int) -> None:
    """Unpack a zip or (compressed) tar archive into the empty folder `dest`."""
    budget = _Budget(max_bytes, max_members)
    if fileobj.seek(0, os.SEEK_END) == 0:
        raise InvalidArchive("the archive is an empty file (0 bytes)")
    fileobj.seek(0)
    try:
        if zipfile.is_zipfile(fileobj):
            fileobj.seek(0)
            with zipfile.ZipFile(fileobj) as archive:
                _unzip(archive, dest, budget)
            return
        fileobj.seek(0)
        with tarfile.open(fileobj=fileobj, mode="r:*") as archive:
            _untar(archive, dest, budget)
    # Corrupt compressed data surfaces from the decompressors while copying (zlib.error,
    # LZMAError, EOFError); encrypted zip members raise RuntimeError, unknown methods
    # NotImplementedError.
    except (
        zipfile.BadZipFile,
        tarfile.TarError,
        zlib.error,
        lzma.LZMAError,
        EOFError,
        OSError,
        RuntimeError,
        NotImplementedError,
    ) as e:
        shutil.rmtree(dest, ignore_errors=True)
        raise InvalidArchive(f"not a readable zip or tar archive ({e})") from e
