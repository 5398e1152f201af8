"""DICOM in and out: image + tag reading, demographics from tags, JPEG/array -> DICOM.

Re-exports the reading API that the pipeline uses; ``dicom_io.encapsulate`` (building
instances, for tests and the demo) is imported on its own.
"""

from dicom_io.demographics import demographics_from_dataset
from dicom_io.images import (
    DermoscopyImage,
    SopClass,
    UnsupportedInstanceError,
    image_from_dataset,
    read_image,
)

__all__ = [
    "DermoscopyImage",
    "SopClass",
    "UnsupportedInstanceError",
    "demographics_from_dataset",
    "image_from_dataset",
    "read_image",
]
