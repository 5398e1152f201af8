"""The Grad-CAM overlay as a DICOM Secondary Capture in the source image's study.

A PACS viewer then shows, next to the dermoscopy image and the SR, where the image pushed the
melanoma logit up. Like the SR, the instance UID is derived from the source image and the model
version, so a resend overwrites rather than duplicates.
"""

from __future__ import annotations

import highdicom as hd
import numpy as np
from pydicom import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import ExplicitVRLittleEndian

from dicom_io.images import SALIENCY_IMAGE_TYPE
from dicom_io.sr import MANUFACTURER, algorithm_equipment, copyable_header
from plugin.domain import ImageRef, ModelIdentity, derived_uid

SECONDARY_CAPTURE_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.7"
SERIES_NUMBER = 9902


def capture_instance_uid(source: ImageRef, model: ModelIdentity) -> str:
    return derived_uid("saliency", source.sop_instance_uid, model.name, model.version)


def capture_series_uid(study_instance_uid: str, model: ModelIdentity) -> str:
    return derived_uid("saliency-series", study_instance_uid, model.name, model.version)


class SaliencyCaptureWriter:
    """Builds the Secondary Capture image of one saliency overlay (8-bit RGB)."""

    def __init__(self, series_number: int = SERIES_NUMBER, manufacturer: str = MANUFACTURER):
        self.series_number = series_number
        self.manufacturer = manufacturer

    @staticmethod
    def reference(ref: ImageRef, model: ModelIdentity) -> Dataset:
        """The UIDs of the capture ``build`` will make for this image (they are derived, not
        random): the SR names the capture as its visual explanation before the overlay is
        computed, so the SR need not wait for Grad-CAM."""
        header = Dataset()
        header.StudyInstanceUID = ref.study_instance_uid
        header.SeriesInstanceUID = capture_series_uid(ref.study_instance_uid, model)
        header.SOPClassUID = SECONDARY_CAPTURE_IMAGE_STORAGE
        header.SOPInstanceUID = capture_instance_uid(ref, model)
        return header

    def build(
        self, *, source: Dataset, ref: ImageRef, overlay: np.ndarray, model: ModelIdentity
    ) -> hd.sc.SCImage:
        """``source`` is the image header: patient and study attributes are copied from it."""
        if overlay.ndim != 3 or overlay.shape[2] != 3 or overlay.dtype != np.uint8:
            raise ValueError(f"overlay must be HxWx3 uint8, got {overlay.shape} {overlay.dtype}")
        capture = hd.sc.SCImage.from_ref_dataset(
            ref_dataset=copyable_header(source),
            pixel_array=overlay,
            photometric_interpretation="RGB",
            bits_allocated=8,
            coordinate_system="PATIENT",
            series_instance_uid=capture_series_uid(ref.study_instance_uid, model),
            series_number=self.series_number,
            sop_instance_uid=capture_instance_uid(ref, model),
            instance_number=1,
            manufacturer=self.manufacturer,
            # highdicom insists on a biped orientation; a photograph of skin has none, so the
            # placeholder is replaced below by the source's own value (type 2: may be empty)
            patient_orientation=("A", "F"),
            transfer_syntax_uid=ExplicitVRLittleEndian,
        )
        capture.PatientOrientation = source.get("PatientOrientation", None)
        capture.Laterality = source.get("Laterality", None)  # type 2C, empty when unknown
        capture.SeriesDescription = f"{model.name} {model.version} saliency (Grad-CAM)"
        capture.ImageType = ["DERIVED", "SECONDARY", SALIENCY_IMAGE_TYPE]
        capture.BurnedInAnnotation = "NO"
        capture.ConversionType = "WSD"
        capture.DerivationDescription = (
            f"Grad-CAM of the melanoma logit of {model.name} {model.version}, blended over the "
            "source image (red: pushed the probability up). Decision support, not a diagnosis."
        )
        capture.SourceImageSequence = DicomSequence([_source_reference(ref)])
        capture.ContributingEquipmentSequence = [algorithm_equipment(model, self.manufacturer)]
        return capture


def _source_reference(ref: ImageRef) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = ref.sop_class_uid
    item.ReferencedSOPInstanceUID = ref.sop_instance_uid
    return item
