"""DICOM in and out: image + tag reading, demographics from tags, JPEG/array -> DICOM.

Re-exports the reading API that the pipeline uses; ``dicom_io.encapsulate`` (building
instances, for tests and the demo) is imported on its own. The re-exports are resolved on
first use (PEP 562), so that importing one light submodule (``dicom_io.spool``, say) does not
load pydicom's SR dictionaries, PIL and the pixel decoders as well.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # what the names below resolve to, for type checkers and readers
    from dicom_io.demographics import demographics_from_dataset
    from dicom_io.images import (
        DermoscopyImage,
        SopClass,
        UnsupportedInstanceError,
        image_from_dataset,
        read_image,
    )

# exported name -> the submodule that defines it
_EXPORTS = {
    "DermoscopyImage": "dicom_io.images",
    "SopClass": "dicom_io.images",
    "UnsupportedInstanceError": "dicom_io.images",
    "demographics_from_dataset": "dicom_io.demographics",
    "image_from_dataset": "dicom_io.images",
    "read_image": "dicom_io.images",
}
# submodules that ``import dicom_io`` used to load, still reachable as attributes of the package
_SUBMODULES = frozenset({"demographics", "images"})

__all__ = [
    "DermoscopyImage",
    "SopClass",
    "UnsupportedInstanceError",
    "demographics_from_dataset",
    "image_from_dataset",
    "read_image",
]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f"{__name__}.{name}")
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value  # resolved once
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__, *_SUBMODULES})
