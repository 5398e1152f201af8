"""The saliency overlay as a DICOM Secondary Capture: valid, in the study, never re-scored."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.uid import ExplicitVRLittleEndian

from dicom_io.capture import SECONDARY_CAPTURE_IMAGE_STORAGE, SaliencyCaptureWriter
from dicom_io.images import DermoscopyImage, UnsupportedInstanceError, read_image
from dicom_io.sr import read_reported_finding
from monai_bundle.scripts.metadata import METADATA_WIDTH
from monai_bundle.scripts.saliency import OVERLAY_ALPHA, jet_colours, overlay_rgb
from plugin.domain import Demographics, Finding, ModelIdentity
from plugin.model import Explanation
from plugin.pipeline import ReportPipeline
from tests.conftest import SAMPLES, dciodvfy_errors

MODEL = ModelIdentity(name="dermfusion-melanoma", version="9.9.9")


def _saliency() -> np.ndarray:
    """A hot square in the middle of the network's 224x224 view."""
    heat = np.zeros((224, 224), np.float32)
    heat[80:144, 80:144] = 1.0
    return heat


def _source_300x400(tmp_path: Path) -> DermoscopyImage:
    """A VL Photographic image of 300 rows by 400 columns (not the network's 224x224)."""
    ds = pydicom.dcmread(SAMPLES / "vlp_img2dcm.dcm")
    r, c = np.mgrid[0:300, 0:400]
    rgb = np.stack([40 + r // 2, 60 + c * 3 // 8, (r + c) % 97 + 80], axis=-1).astype(np.uint8)
    del ds.PixelData  # the encapsulated JPEG, with its undefined length
    ds.Rows, ds.Columns = rgb.shape[:2]
    ds.PhotometricInterpretation = "RGB"
    ds.PlanarConfiguration = 0
    ds.PixelData = rgb.tobytes()
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    path = tmp_path / "source.dcm"
    ds.save_as(path, enforce_file_format=True)
    image = read_image(path)
    assert np.array_equal(image.rgb, rgb)
    return image


def _redness(pixels: np.ndarray) -> np.ndarray:
    pixels = pixels.astype(np.int32)
    return pixels[..., 0] - np.maximum(pixels[..., 1], pixels[..., 2])


@pytest.mark.parametrize("name", ["dms_jpeg_baseline.dcm", "vlp_img2dcm.dcm"])
def test_capture_is_valid_dicom_in_the_source_study(name: str, tmp_path: Path) -> None:
    image = read_image(SAMPLES / name)
    overlay = overlay_rgb(image.rgb, _saliency())
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
    assert np.array_equal(pixels[0, 0], image.rgb[0, 0])


def test_capture_is_the_source_at_its_own_rows_columns_and_colours(tmp_path: Path) -> None:
    image = _source_300x400(tmp_path)
    overlay = overlay_rgb(image.rgb, _saliency())
    capture = SaliencyCaptureWriter().build(
        source=image.dataset, ref=image.ref, overlay=overlay, model=MODEL
    )
    path = tmp_path / "capture.dcm"
    capture.save_as(path, enforce_file_format=True)
    written = pydicom.dcmread(path)
    assert (written.Rows, written.Columns) == (image.dataset.Rows, image.dataset.Columns)
    assert (written.Rows, written.Columns) == (300, 400)
    pixels = written.pixel_array
    assert pixels.shape == image.rgb.shape
    # Away from the hot square (rows 107-193, columns 143-257 once stretched) the map is 0, so
    # the pixels are the source's own; in its core they are the source blended with jet red.
    cold = np.ones((300, 400), bool)
    cold[100:200, 135:265] = False
    assert np.array_equal(pixels[cold], image.rgb[cold])
    core = (slice(115, 185), slice(150, 250))
    red = jet_colours(np.float32(1.0)).astype(np.float32)
    expected = (1 - OVERLAY_ALPHA) * image.rgb[core] + OVERLAY_ALPHA * red
    assert np.abs(pixels[core] - expected).max() <= 1.0
    assert (_redness(pixels[core]) > _redness(image.rgb[core]) + 20).all()


class _StubModel:
    """Scores every image 0.7 with a hot square of saliency: the pipeline without a network."""

    identity = MODEL

    def score(self, rgbs: list[np.ndarray], demographics: list[Demographics]) -> list[Finding]:
        return [Finding(0.7, 0.5, MODEL) for _ in rgbs]

    def score_explainable(
        self, rgbs: list[np.ndarray], demographics: list[Demographics]
    ) -> list[tuple[Finding, Explanation]]:
        scored = self.score(rgbs, demographics)
        return [(f, Explanation(None, np.zeros(METADATA_WIDTH, np.float32))) for f in scored]

    def explain(self, rgb: np.ndarray, explanation: Explanation) -> np.ndarray:
        return _saliency()


def test_pipeline_png_and_capture_are_the_same_overlay_at_the_source_size(
    tmp_path: Path,
) -> None:
    image = _source_300x400(tmp_path)
    pipeline = ReportPipeline(
        _StubModel(),  # type: ignore[arg-type]
        "urn:test",
        capture_writer=SaliencyCaptureWriter(),
    )
    (report,) = pipeline.run([image], [Demographics.unknown()])
    files = report.write_files(tmp_path / "out")
    assert files.capture is not None
    with Image.open(files.saliency) as png:
        assert png.size == (400, 300) and png.mode == "RGB"
        drawn = np.asarray(png)
    assert np.array_equal(drawn, overlay_rgb(image.rgb, _saliency()))
    assert np.array_equal(pydicom.dcmread(files.capture).pixel_array, drawn)


def test_sr_names_the_algorithm_and_points_at_the_capture_as_its_visual_explanation(
    tmp_path: Path,
) -> None:
    """IHE AI Results: Contributing Equipment (Processing Algorithm, device UID) in both
    objects, and the SR's measurement group references the Grad-CAM capture sent with it."""
    model = ModelIdentity(MODEL.name, MODEL.version, weights_digest="f00d")

    class _Model(_StubModel):
        def score(self, rgbs: list[np.ndarray], demographics: list[Demographics]) -> list[Finding]:
            return [Finding(0.7, 0.5, model) for _ in rgbs]

    image = read_image(SAMPLES / "dms_jpeg_baseline.dcm")
    with_capture = ReportPipeline(_Model(), "urn:test", capture_writer=SaliencyCaptureWriter())  # type: ignore[arg-type]
    (report,) = with_capture.run([image], [Demographics.unknown()])
    files = report.write_files(tmp_path / "out")
    assert files.capture is not None
    sr, capture = pydicom.dcmread(files.sr), pydicom.dcmread(files.capture)
    for dataset in (sr, capture):
        (equipment,) = dataset.ContributingEquipmentSequence
        purpose = equipment.PurposeOfReferenceCodeSequence[0]
        assert (purpose.CodeValue, purpose.CodeMeaning) == ("Newcode1", "Processing Algorithm")
        assert equipment.ManufacturerModelName == MODEL.name
        assert equipment.SoftwareVersions == MODEL.version
        assert equipment.DeviceUID == model.device_uid
    reported = read_reported_finding(sr)
    assert reported.device_uid == model.device_uid
    assert reported.visual_explanation_uid == capture.SOPInstanceUID
    assert reported.source_sop_instance_uid == image.ref.sop_instance_uid
    evidence = {
        item.ReferencedSOPInstanceUID
        for study in sr.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for item in series.ReferencedSOPSequence
    }
    assert evidence == {image.ref.sop_instance_uid, capture.SOPInstanceUID}
    series = {
        series.SeriesInstanceUID
        for study in sr.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
    }
    assert series == {image.dataset.SeriesInstanceUID, capture.SeriesInstanceUID}
    assert dciodvfy_errors(files.sr) == []
    assert dciodvfy_errors(files.capture) == []
    # Without a capture nothing is referenced that the PACS will not have.
    (plain,) = ReportPipeline(_Model(), "urn:test").run([image], [Demographics.unknown()])  # type: ignore[arg-type]
    assert read_reported_finding(plain.sr).visual_explanation_uid is None
    # New weights under the same version: a new device UID, the same SR identity.
    assert ModelIdentity(MODEL.name, MODEL.version, "beef").device_uid != model.device_uid


def test_same_source_and_model_give_the_same_uids() -> None:
    image = read_image(SAMPLES / "dms_jpeg_baseline.dcm")
    overlay = overlay_rgb(image.rgb, _saliency())
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
    # what the SR names before the overlay is computed is what build makes later
    named = SaliencyCaptureWriter.reference(image.ref, MODEL)
    identity = ("StudyInstanceUID", "SeriesInstanceUID", "SOPClassUID", "SOPInstanceUID")
    assert [named.get(k) for k in identity] == [first.get(k) for k in identity]


def test_our_own_capture_is_refused_as_input(tmp_path: Path) -> None:
    image = read_image(SAMPLES / "vlp_img2dcm.dcm")
    overlay = overlay_rgb(image.rgb, _saliency())
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
