"""Durable writes for the spool: a file either exists whole at its final path or not at all.

The listener answers 0x0000 only after the instance is on disk, so "written" must survive a
power cut: write to a temporary sibling, fsync it, rename over the final name (atomic on
POSIX), then fsync the directory so the rename itself is durable. Writing the same path again
replaces it atomically, which makes a re-sent instance idempotent.
"""

from __future__ import annotations

import os
import uuid
from io import BytesIO
from pathlib import Path

from pydicom import Dataset, dcmwrite

__all__ = ["write_bytes_durably", "write_durably"]

TMP_SUFFIX = ".tmp"


def write_bytes_durably(data: bytes, path: Path) -> None:
    """Atomically replace ``path`` with ``data``, fsync'd; a failed write leaves no temp file.

    The temporary name is unique per call (``<name>.<random>.tmp``) so two associations
    delivering the same instance at once cannot interleave their bytes in one temp file.
    """
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex[:12]}{TMP_SUFFIX}")
    try:
        with open(tmp, "wb") as f:
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
