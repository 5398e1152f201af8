"""Durable writes for the spool: a file either exists whole at its final path or not at all.

The listener answers 0x0000 only after the instance is on disk, so "written" must survive a
power cut: write to a temporary sibling, fsync it, rename over the final name (atomic on
POSIX), then fsync the directory so the rename itself is durable. Writing the same path again
replaces it atomically, which makes a re-sent instance idempotent.

What is written here holds patient data: files are created 0600 and the folders this module
creates 0700, whatever the process umask (the mode is set explicitly, not left to the umask).
"""

from __future__ import annotations

import os
import uuid
from io import BytesIO
from pathlib import Path

from pydicom import Dataset, dcmwrite

__all__ = [
    "PRIVATE_DIR_MODE",
    "PRIVATE_FILE_MODE",
    "private_directory",
    "write_bytes_durably",
    "write_durably",
]

TMP_SUFFIX = ".tmp"
PRIVATE_FILE_MODE = 0o600
PRIVATE_DIR_MODE = 0o700


def private_directory(path: Path, *, tighten: bool = False) -> Path:
    """Create ``path`` and any missing parents owner-only (0700); returns ``path``.

    Folders that exist already keep their mode (a parent such as /var/lib is not ours),
    except ``path`` itself with ``tighten`` (a folder we own from an older release).
    """
    path = Path(path)
    missing = []
    for folder in (path, *path.parents):
        if folder.is_dir():
            break
        missing.append(folder)
    for folder in reversed(missing):
        try:
            folder.mkdir(mode=PRIVATE_DIR_MODE)
        except FileExistsError:
            if not folder.is_dir():
                raise
            continue  # another thread made it first; it set the mode as we would
        os.chmod(folder, PRIVATE_DIR_MODE)  # mkdir's mode is filtered by the umask
    if tighten:
        os.chmod(path, PRIVATE_DIR_MODE)
    return path


def write_bytes_durably(data: bytes, path: Path) -> None:
    """Atomically replace ``path`` with ``data``, fsync'd; a failed write leaves no temp file.

    The temporary name is unique per call (``<name>.<random>.tmp``) so two associations
    delivering the same instance at once cannot interleave their bytes in one temp file.
    """
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex[:12]}{TMP_SUFFIX}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_FILE_MODE)
        with open(fd, "wb") as f:
            os.fchmod(fd, PRIVATE_FILE_MODE)  # exactly 0600, whatever the umask
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)


def write_durably(ds: Dataset, path: Path) -> None:
    """Write ``ds`` as a DICOM file in the transfer syntax of its file meta, durably.

    Pixel data is written as it is held (encapsulated fragments stay as received), so no
    re-encoding happens; ``ds.file_meta`` must carry the Transfer Syntax UID (pynetdicom's
    ``event.file_meta`` does). Prefer ``write_bytes_durably(event.encoded_dataset(), path)``
    where the received bytes are at hand: it skips decoding altogether.
    """
    meta = getattr(ds, "file_meta", None)
    if meta is None or "TransferSyntaxUID" not in meta:
        raise ValueError(f"{path}: dataset has no file meta Transfer Syntax UID (0002,0010)")
    buffer = BytesIO()
    dcmwrite(buffer, ds, enforce_file_format=True)
    write_bytes_durably(buffer.getvalue(), path)


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
