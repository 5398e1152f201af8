"""The DIMSE statuses the listener returns, and the one place that maps a failure to one.

Named after PS3.4 Annex B (Storage Service Class) and PS3.7 Annex C (general statuses), so a
handler never spells a bare hex code: a typo would still be a valid, wrong status.

Why these codes:
- ``OUT_OF_RESOURCES`` (A700) for ``OSError``/``MemoryError`` and SQLite's operational errors:
  the spool or the state database could not make the instance durable (disk full or below the
  free-space watermark, I/O error, database locked). It is a *refusal*: the sender may try
  again later.
- ``DATASET_DOES_NOT_MATCH_SOP_CLASS`` (A900): the data set's SOP Class UID is not the one the
  presentation context (and the C-STORE command) announced.
- ``CANNOT_UNDERSTAND`` (C000): the data set cannot be decoded, lacks a UID we key on, names
  another instance than its command, or is an instance we cannot use.
- ``PROCESSING_FAILURE`` (0110, PS3.7 C.4): anything else went wrong on our side. pynetdicom's
  own fallback for a handler exception is C211, inside the Cxxx "cannot understand" range,
  which would blame the data for our bug; 0110 says what happened.
"""

from __future__ import annotations

import sqlite3
import struct
import zlib
from enum import IntEnum

from dicom_io.images import UnsupportedInstanceError

__all__ = [
    "DECODE_ERRORS",
    "ImplausibleImageError",
    "InstanceTooLargeError",
    "InconsistentDatasetError",
    "MissingAttributeError",
    "SopClassMismatchError",
    "StoreStatus",
    "StoreWarning",
    "UndecodableDatasetError",
    "status_for",
]


class StoreStatus(IntEnum):
    """Statuses our C-STORE and C-ECHO handlers return."""

    SUCCESS = 0x0000
    PROCESSING_FAILURE = 0x0110
    OUT_OF_RESOURCES = 0xA700
    DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
    CANNOT_UNDERSTAND = 0xC000


class StoreWarning(IntEnum):
    """Storage warning statuses (PS3.4 B.2.3): the peer stored the instance, with a caveat."""

    COERCION_OF_DATA_ELEMENTS = 0xB000
    ELEMENTS_DISCARDED = 0xB006
    DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xB007


class MissingAttributeError(ValueError):
    """A required attribute is absent or empty; the message names the tag, never a value."""

    def __init__(self, keyword: str, tag: str) -> None:
        self.keyword = keyword
        super().__init__(f"{keyword} {tag} is missing")


class InconsistentDatasetError(ValueError):
    """The data set names a different SOP instance than the C-STORE command carrying it."""


class SopClassMismatchError(InconsistentDatasetError):
    """The data set's SOP Class UID is not the presentation context's abstract syntax."""


class UndecodableDatasetError(ValueError):
    """The received bytes do not parse as a data set in the negotiated transfer syntax."""


class InstanceTooLargeError(ValueError):
    """More bytes than the listener takes: refused (0xA700) before anything is decoded."""


class ImplausibleImageError(ValueError):
    """A header claiming more pixels than any photograph we score: refused (0xC000) before
    the pixel data is touched."""


# What pydicom's reader raises on truncated or garbled input (zlib: bad deflate stream).
DECODE_ERRORS: tuple[type[Exception], ...] = (
    EOFError,
    ValueError,
    KeyError,
    IndexError,
    OverflowError,
    NotImplementedError,
    struct.error,
    zlib.error,
)


def status_for(exc: BaseException) -> StoreStatus:
    """The status a C-STORE failure is answered with; the single exception→status table."""
    if isinstance(exc, SopClassMismatchError):
        return StoreStatus.DATASET_DOES_NOT_MATCH_SOP_CLASS
    if isinstance(
        exc,
        MissingAttributeError
        | InconsistentDatasetError
        | UndecodableDatasetError
        | ImplausibleImageError
        | UnsupportedInstanceError,
    ):
        return StoreStatus.CANNOT_UNDERSTAND
    if isinstance(exc, OSError | MemoryError | sqlite3.OperationalError | InstanceTooLargeError):
        return StoreStatus.OUT_OF_RESOURCES
    return StoreStatus.PROCESSING_FAILURE
