"""Per-case attributions, lesion size and saliency: computed once, reported in SR and FHIR."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

from dicom_io.demographics import demographics_from_dataset
from dicom_io.images import read_image
from dicom_io.sr import MeasurementReportWriter, read_reported_finding
from fhir_io import report_bundle
from plugin.domain import Demographics, Finding, LesionSize, ModelIdentity, Sourced
from plugin.pipeline import ReportPipeline, pixel_spacing_mm
from tests.conftest import SAMPLES


def test_attribution_is_the_probability_change_when_the_field_is_withheld(fusion_model) -> None:  # type: ignore[no-untyped-def]
    image = read_image(SAMPLES / "dms_jpeg_baseline.dcm")
    demo = demographics_from_dataset(image.dataset)
    (finding,) = fusion_model.score([image.rgb], [demo])
    assert [name for name, _ in finding.attributions] == ["age", "sex", "site"]
    for name, change in finding.attributions:
        withheld = replace(demo, **{name: Sourced.missing()})
        (without,) = fusion_model.score([image.rgb], [withheld])
        assert change == pytest.approx(finding.probability - without.probability, abs=1e-6)
    (unknown,) = fusion_model.score([image.rgb], [Demographics.unknown()])
    assert unknown.attributions == ()


def test_pipeline_reports_lesion_size_in_mm_when_the_image_has_a_pixel_spacing(
    fusion_model,
    tmp_path: Path,  # type: ignore[no-untyped-def]
) -> None:
    image = read_image(SAMPLES / "dms_jpeg_baseline.dcm")
    assert pixel_spacing_mm(image) is None
    image.dataset.PixelSpacing = [0.02, 0.02]
    (report,) = ReportPipeline(fusion_model, "urn:test").run([image], [Demographics.unknown()])
    lesion = report.finding.lesion
    assert lesion is not None and 0.05 < lesion.area_fraction < 0.9
    rows, columns = image.rgb.shape[:2]
    assert lesion.area_mm2 == pytest.approx(
        lesion.area_fraction * rows * columns * 0.0004, rel=1e-6
    )
    back = read_reported_finding(report.sr)
    assert back.lesion_area_fraction == pytest.approx(lesion.area_fraction, abs=1e-6)
    assert back.lesion_area_mm2 == pytest.approx(lesion.area_mm2, abs=1e-3)
    assert report.saliency.shape == (224, 224)
    files = report.write_files(tmp_path)
    assert read_reported_finding(pydicom.dcmread(files.sr)) == back
    with Image.open(files.saliency) as png:
        assert png.size == (columns, rows) and png.mode == "RGB"  # the source's own


def test_attributions_and_lesion_reach_the_sr_and_the_fhir_observation() -> None:
    image = read_image(SAMPLES / "dms_jpeg_baseline.dcm")
    demo = demographics_from_dataset(image.dataset)
    finding = Finding(
        0.4,
        0.2,
        ModelIdentity("m", "1"),
        attributions=(("age", 0.05), ("sex", -0.01), ("site", 0.002)),
        lesion=LesionSize(area_fraction=0.25, area_mm2=12.5, diameter_mm=4.0),
    )
    sr = MeasurementReportWriter().build(
        source=image.dataset, ref=image.ref, finding=finding, demographics=demo
    )
    back = read_reported_finding(sr)
    assert back.attributions == {"age": 0.05, "sex": -0.01, "site": 0.002}
    assert (back.lesion_area_fraction, back.lesion_area_mm2) == (0.25, 12.5)
    bundle = report_bundle(
        finding=finding,
        demographics=demo,
        image=image.ref,
        patient_id="P",
        patient_identifier_system="urn:test",
        issued=datetime(2026, 1, 1, tzinfo=UTC),
    )
    probability = next(
        e["resource"]
        for e in bundle["entry"]
        if e["resource"]["resourceType"] == "Observation"
        and e["resource"]["code"]["coding"][0]["code"] == "111047"
    )
    values = {
        c["code"].get("text", ""): c.get("valueQuantity", {}).get("value")
        for c in probability["component"]
    }
    assert values["Change in melanoma probability from the subject's sex (AI attribution)"] == -0.01
    assert values["Lesion area (segmentation)"] == 12.5
    assert values["Lesion area, fraction of the image (segmentation)"] == 0.25
    assert np.isfinite(list(v for v in values.values() if v is not None)).all()
