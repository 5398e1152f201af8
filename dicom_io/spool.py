"""Durable writes for the spool: a file either exists whole at its final path or not at all
(after a power cut, one case aside that a checksum tells: see ``alongside`` below).

The listener answers 0x0000 only after the instance is on disk, so "written" must survive a
power cut: write to a temporary sibling, fsync it, rename over the final name (atomic on
POSIX), then fsync the directory so the rename itself is durable. Writing the same path again
replaces it atomically, which makes a re-sent instance idempotent.

What is written here holds patient data: files are created 0600 and the folders this module
creates 0700, whatever the process umask (the mode is set explicitly, not left to the umask).

Each flush is a journal commit and a disk cache flush, and an acknowledged instance waited for
three in a row (its bytes, its directory entry, its state row). With ``alongside`` (the caller's
own durable step) a new file is flushed in one round instead: its bytes are complete before its
final name is linked, then the bytes, the folder and the caller's record are flushed together,
so the file system serves them with about one commit. The price is one case: a power cut during
that round can leave the record durable and the file partial. ``alongside`` is told the file's
CRC-32 for its record, and ``is_whole`` tells such a file apart when the service starts (it was
never acknowledged: the sender still has it).
"""

from __future__ import annotations

import errno
import os
import threading
import uuid
import zlib
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from io import BytesIO
from pathlib import Path
from typing import TypeVar

from pydicom import Dataset, dcmwrite

__all__ = [
    "PRIVATE_DIR_MODE",
    "PRIVATE_FILE_MODE",
    "is_whole",
    "private_directory",
    "write_bytes_durably",
    "write_durably",
]

TMP_SUFFIX = ".tmp"
PRIVATE_FILE_MODE = 0o600
PRIVATE_DIR_MODE = 0o700
# Threads that run fsyncs beside the caller's own step. Each waits in the kernel, not on the
# GIL; up to three per instance, for the listener's associations (its default limit is 10).
FLUSH_THREADS = 32
_NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
# link(2) refused because the file system has no hard links: replace by rename instead.
_NO_HARD_LINKS = frozenset({errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK})
_CHUNK = 1024 * 1024
_flushers: ThreadPoolExecutor | None = None
_T = TypeVar("_T")
_flushers_lock = threading.Lock()


def private_directory(path: Path, *, tighten: bool = False) -> Path:
    """Create ``path`` and any missing parents owner-only (0700); returns ``path``.

    Folders that exist already keep their mode (a parent such as /var/lib is not ours),
    except ``path`` itself with ``tighten`` (a folder we own from an older release).
    """
    path = Path(path)
    _make_private(path)
    if tighten:
        os.chmod(path, PRIVATE_DIR_MODE)
    return path


def write_bytes_durably(
    data: bytes,
    path: Path,
    *,
    make_parents: bool = False,
    alongside: Callable[[int | None], None] | None = None,
) -> None:
    """Atomically replace ``path`` with ``data``, fsync'd; a failed write leaves no temp file.

    The temporary name is unique per call (``<name>.<random>.tmp``) so two associations
    delivering the same instance at once cannot interleave their bytes in one temp file.

    ``make_parents``: create missing folders (0700), looked for only when the file cannot be
    created, and flush their new entries with the bytes.

    ``alongside(checksum)``: the caller's durable step, run on a flusher thread while this one
    flushes the file (this thread releases the GIL at once, so the flushes start together);
    both are done when this returns, and an error of either is raised (the file may then stay
    in place, whole). For a new file ``checksum`` is the CRC-32 of ``data``: record it, and
    check the file with ``is_whole`` after a crash. For a file that replaces another it is None
    (the rename comes after the bytes are flushed and after ``alongside``: the file at ``path``
    is whole).
    """
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex[:12]}{TMP_SUFFIX}")
    fd, created = _create(tmp, make_parents)
    linked = False
    try:
        try:
            os.fchmod(fd, PRIVATE_FILE_MODE)  # exactly 0600, whatever the umask
            _write_all(fd, data)
            # a new folder's entry in its parent is flushed with the bytes
            flushes = [_flush(_fsync_directory, folder.parent) for folder in created]
            if alongside is not None and _link_if_new(tmp, path):
                linked = True
                os.unlink(tmp)  # the directory then holds the final name only
                flushes.append(_flush(_fsync_directory, path.parent))
                _beside(os.fsync, fd, _flush(alongside, zlib.crc32(data)), flushes)
                return
            # record "whole, whatever it holds" before the old file is replaced
            also = None if alongside is None else _flush(alongside, None)
            _beside(os.fsync, fd, also, flushes)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        if not linked:
            tmp.unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)


def is_whole(path: Path, checksum: int | None) -> bool:
    """Does ``path`` hold the file ``write_bytes_durably`` gave ``alongside`` this checksum for
    (None: any file there is whole)? Raises OSError other than a missing file."""
    path = Path(path)
    if checksum is None:
        return path.is_file()
    crc = 0
    try:
        with path.open("rb") as stream:
            while chunk := stream.read(_CHUNK):
                crc = zlib.crc32(chunk, crc)
    except FileNotFoundError:
        return False
    return crc == checksum


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


def _make_private(path: Path) -> list[Path]:
    """Create ``path`` and its missing parents 0700; returns the folders this call created."""
    missing = []
    for folder in (path, *path.parents):
        if folder.is_dir():
            break
        missing.append(folder)
    created = []
    for folder in reversed(missing):
        try:
            folder.mkdir(mode=PRIVATE_DIR_MODE)
        except FileExistsError:
            if not folder.is_dir():
                raise
            continue  # another thread made it first; it set the mode as we would
        os.chmod(folder, PRIVATE_DIR_MODE)  # mkdir's mode is filtered by the umask
        created.append(folder)
    return created


def _create(tmp: Path, make_parents: bool) -> tuple[int, list[Path]]:
    """Open ``tmp`` as a new file; with ``make_parents`` its folders are made when missing."""
    try:
        return os.open(tmp, _NEW_FILE, PRIVATE_FILE_MODE), []
    except FileNotFoundError:
        if not make_parents:
            raise
    created = _make_private(tmp.parent)
    return os.open(tmp, _NEW_FILE, PRIVATE_FILE_MODE), created


def _link_if_new(tmp: Path, path: Path) -> bool:
    """Give the complete ``tmp`` its final name unless a file has it (then it is replaced)."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        return False
    except OSError as error:
        if error.errno in _NO_HARD_LINKS:
            return False
        raise
    return True


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _beside(
    step: Callable[[_T], None], argument: _T, also: Future[None] | None, flushes: list[Future[None]]
) -> None:
    """Run ``step(argument)`` here while ``also`` and ``flushes`` run on flusher threads; wait
    for all of them, then raise the first error (the step's, then ``also``'s)."""
    pending = flushes if also is None else [also, *flushes]
    try:
        step(argument)
    finally:
        errors = [error for flush in pending if (error := flush.exception()) is not None]
    if errors:
        raise errors[0]


def _flush(fsync: Callable[[_T], None], target: _T) -> Future[None]:
    """Run ``fsync(target)`` on a flusher thread (shared, started on first use)."""
    global _flushers
    if _flushers is None:
        with _flushers_lock:
            if _flushers is None:
                _flushers = ThreadPoolExecutor(FLUSH_THREADS, thread_name_prefix="spool-flush")
    return _flushers.submit(fsync, target)


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
