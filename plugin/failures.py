"""One-line, PHI-free descriptions of failures, for the log and the state database.

An exception's text may quote a header value (pydicom: ``Unable to convert '1970…' to 'DA'``),
so only texts written to be logged are kept: ours for PACS and FHIR exchanges (fhir_io redacts
search values), our own ``LoggableError`` texts, SQLite's fixed messages and the OS error
string. Anything else is named by its class and the line that raised it, which says where to
look without quoting the data.
"""

from __future__ import annotations

import errno
import sqlite3
import traceback
from pathlib import Path

from dicom_io.sender import PacsError
from fhir_io import FhirError

_REPO_ROOT = Path(__file__).resolve().parents[1]
# The disk or the machine, not the item: retrying later is right, and it is not the item's fault.
_ENVIRONMENTAL_ERRNOS = frozenset(
    {errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS, errno.ENOMEM}
)


class LoggableError(Exception):
    """An error of ours whose text is written to be logged: it names no patient data."""


def describe(error: BaseException) -> str:
    """``Class: text`` for errors whose text is safe to log, else ``Class at file:line``."""
    kind = type(error)
    # Qualified only where the bare name says nothing ("error" is struct's and zlib's).
    name = kind.__name__ if kind.__name__[:1].isupper() else f"{kind.__module__}.{kind.__name__}"
    if isinstance(error, PacsError | FhirError | LoggableError | sqlite3.Error):
        text = str(error).splitlines()[0].strip() if str(error).strip() else ""
        return f"{name}: {text}" if text else name
    if isinstance(error, OSError):
        code = errno.errorcode.get(error.errno or 0, "")
        text = error.strerror or ""
        return f"{name}: {' '.join(p for p in (code, text) if p)}".rstrip(": ")
    return f"{name} at {_where(error)}"


def is_environmental(error: BaseException) -> bool:
    """A full or failing disk, a locked database, no memory: wait and retry, without counting
    it against the item (every item would fail the same way)."""
    if isinstance(error, MemoryError | sqlite3.OperationalError):
        return True
    return isinstance(error, OSError) and error.errno in _ENVIRONMENTAL_ERRNOS


def _where(error: BaseException) -> str:
    """The innermost frame, as a path inside its installed package or the repository."""
    frames = traceback.extract_tb(error.__traceback__)
    if not frames:
        return "unknown location"
    frame = frames[-1]
    path = Path(frame.filename)
    packages = [i for i, part in enumerate(path.parts) if part.endswith("-packages")]
    if packages:
        shown = "/".join(path.parts[packages[-1] + 1 :])
    elif path.is_relative_to(_REPO_ROOT):
        shown = path.relative_to(_REPO_ROOT).as_posix()
    else:
        shown = path.name
    return f"{shown}:{frame.lineno} ({frame.name})"
