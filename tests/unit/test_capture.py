"""The saliency overlay as a DICOM Secondary Capture: valid, in the study, never re-scored."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest

from dicom_io.capture import SECONDARY_CAPTURE_IMAGE_STORAGE, SaliencyCaptureWriter
from dicom_io.images import UnsupportedInstanceError, read_image
from monai_bundle.scripts.saliency import overlay_rgb
from plugin.domain import ModelIdentity
from tests.conftest import SAMPLES, dciodvfy_errors

MODEL = ModelIdentity(name="dermfusion-melanoma", version="9.9.9")


def _saliency() -> np.ndarray:
    """A hot square in the middle of the network's 224x224 view."""
    heat = np.zeros((224, 224), np.float32)
    heat[80:144, 80:144] = 1.0
    return heat


@pytest.mark.parametrize("name", ["dms_jpeg_baseline.dcm", "vlp_img2dcm.dcm"])
def test_capture_is_valid_dicom_in_the_source_study(name: str, tmp_path: Path) -> None:
    image = read_image(SAMPLES / name)
    overlay = overlay_rgb(image.rgb, _saliency(), native_size=True)
    capture = SaliencyCaptureWriter().build(
        source=image.dataset, ref=image.ref, overlay=overlay, model=MODEL
    )
    path = tmp_path / "capture.dcm"
    capture.save_as(path, enforce_file_format=True)
    assert dciodvfy_errors(path) == []
    written = pydicom.dcmread(path)
    assert written.SOPClassUID == SECONDARY_CAPTURE_IMAGE_STORAGE
    assert written.StudyInstanceUID == image.ref.study_instance_uid
    assert written.SeriesInstanceUID != image.ref.series_instance_uid
    assert written.PatientID == image.dataset.PatientID
    assert written.Modality == "OT"  # the Orthanc auto-route only forwards DMS/XC images
    assert written.SourceImageSequence[0].ReferencedSOPInstanceUID == image.ref.sop_instance_uid
    assert (written.Rows, written.Columns) == image.rgb.shape[:2]
    pixels = written.pixel_array
    assert np.array_equal(pixels, overlay)
    # the hot square is red-tinted in the middle and the corner keeps the image's colours
    middle = pixels[pixels.shape[0] // 2, pixels.shape[1] // 2].astype(int)
    assert middle[0] > middle[2]


def test_same_source_and_model_give_the_same_uids() -> None:
    image = read_image(SAMPLES / "dms_jpeg_baseline.dcm")
    overlay = overlay_rgb(image.rgb, _saliency(), native_size=True)
    build = SaliencyCaptureWriter().build
    first = build(source=image.dataset, ref=image.ref, overlay=overlay, model=MODEL)
    again = build(source=image.dataset, ref=image.ref, overlay=overlay, model=MODEL)
    newer = build(
        source=image.dataset,
        ref=image.ref,
        overlay=overlay,
        model=ModelIdentity(MODEL.name, "10.0.0"),
    )
    assert first.SOPInstanceUID == again.SOPInstanceUID != newer.SOPInstanceUID
    assert first.SeriesInstanceUID == again.SeriesInstanceUID


def test_our_own_capture_is_refused_as_input(tmp_path: Path) -> None:
    image = read_image(SAMPLES / "vlp_img2dcm.dcm")
    overlay = overlay_rgb(image.rgb, _saliency(), native_size=True)
    capture = SaliencyCaptureWriter().build(
        source=image.dataset, ref=image.ref, overlay=overlay, model=MODEL
    )
    path = tmp_path / "capture.dcm"
    capture.save_as(path, enforce_file_format=True)
    with pytest.raises(UnsupportedInstanceError, match="saliency map"):
        read_image(path)


def test_overlay_is_refused_unless_rgb_uint8() -> None:
    image = read_image(SAMPLES / "vlp_img2dcm.dcm")
    with pytest.raises(ValueError, match="HxWx3 uint8"):
        SaliencyCaptureWriter().build(
            source=image.dataset,
            ref=image.ref,
            overlay=np.zeros((4, 4), np.uint8),
            model=MODEL,
        )
