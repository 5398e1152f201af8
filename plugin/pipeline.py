"""From decoded images and their demographics to the two reports: DICOM SR and FHIR Bundle."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from highdicom.sr import Comprehensive3DSR
from PIL import Image
from pydicom import Dataset

from dicom_io.capture import SaliencyCaptureWriter
from dicom_io.images import DermoscopyImage
from dicom_io.spool import private_directory, write_bytes_durably
from dicom_io.sr import MeasurementReportWriter
from fhir_io import report_bundle
from monai_bundle.scripts.lesion import measure_lesion
from monai_bundle.scripts.saliency import overlay_rgb
from plugin.config import Settings
from plugin.domain import Demographics, Finding, LesionSize, ModelIdentity
from plugin.model import Explanation, FusionModel

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Overlay:
    """What drawing one scored image's Grad-CAM overlay needs; the SR's UID names the files."""

    image: DermoscopyImage
    explanation: Explanation
    model: ModelIdentity
    sr_sop_instance_uid: str


@dataclass(frozen=True)
class DrawnOverlay:
    overlay: Overlay
    saliency: np.ndarray  # 224x224 in [0, 1], the network's view of the image
    capture: Dataset | None = None  # the overlay as a Secondary Capture, when configured

    def write(self, folder: Path) -> ExplanationFiles:
        """``<SR UID>_saliency.png`` and the Secondary Capture, if any, as
        ``<SR UID>_saliency.dcm``, fsync'd."""
        private_directory(folder)
        uid = self.overlay.sr_sop_instance_uid
        files = ExplanationFiles(
            saliency=folder / f"{uid}_saliency.png",
            capture=None if self.capture is None else folder / f"{uid}_saliency.dcm",
        )
        png = io.BytesIO()  # through write_bytes_durably, so the overlay is 0600 too
        rgb = overlay_rgb(self.overlay.image.rgb, self.saliency)
        Image.fromarray(rgb).save(png, format="PNG", compress_level=1)  # fast; a bit larger
        write_bytes_durably(png.getvalue(), files.saliency)
        if self.capture is not None and files.capture is not None:
            _write_dicom(self.capture, files.capture)
        return files


@dataclass(frozen=True)
class ImageReport:
    """One image's results. The SR and the Bundle exist as soon as the image is scored; the
    Grad-CAM overlay (and its Secondary Capture) is drawn by ``ReportPipeline.explain``, so the
    reports need not wait for it."""

    image: DermoscopyImage
    demographics: Demographics
    finding: Finding
    sr: Comprehensive3DSR
    bundle: dict[str, Any]
    explanation: Explanation  # what Grad-CAM needs of the scoring pass
    drawn: DrawnOverlay | None = None

    @property
    def overlay(self) -> Overlay:
        return Overlay(self.image, self.explanation, self.finding.model, self.sr.SOPInstanceUID)

    @property
    def saliency(self) -> np.ndarray | None:
        return None if self.drawn is None else self.drawn.saliency

    @property
    def capture(self) -> Dataset | None:
        return None if self.drawn is None else self.drawn.capture

    def write_reports(self, folder: Path) -> ReportFiles:
        """SR and Bundle as ``<SR UID>.dcm/.json``, fsync'd."""
        private_directory(folder)
        uid = self.sr.SOPInstanceUID
        files = ReportFiles(sr=folder / f"{uid}.dcm", bundle=folder / f"{uid}.json")
        _write_dicom(self.sr, files.sr)
        write_bytes_durably((json.dumps(self.bundle, indent=2) + "\n").encode(), files.bundle)
        return files

    def write_files(self, folder: Path) -> ReportFiles:
        """Reports and overlay at once, for ``dermfusion infer`` (``ReportPipeline.run``)."""
        if self.drawn is None:
            raise ValueError("no overlay yet: ReportPipeline.explain the report first")
        drawn = self.drawn.write(folder)
        return replace(self.write_reports(folder), saliency=drawn.saliency, capture=drawn.capture)


def _write_dicom(dataset: Dataset, path: Path) -> None:
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, dataset, enforce_file_format=True)
    write_bytes_durably(buffer.getvalue(), path)


@dataclass(frozen=True)
class ReportFiles:
    sr: Path
    bundle: Path
    saliency: Path | None = None  # with the explanation (``write_files``)
    capture: Path | None = None


@dataclass(frozen=True)
class ExplanationFiles:
    saliency: Path
    capture: Path | None = None


def pixel_spacing_mm(image: DermoscopyImage) -> tuple[float, float] | None:
    """(row, column) spacing in mm from PixelSpacing, if the image carries a usable one."""
    spacing = image.dataset.get("PixelSpacing")
    try:
        row, column = (float(v) for v in spacing)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        return None
    return (row, column) if row > 0 and column > 0 else None


def lesion_size(image: DermoscopyImage) -> LesionSize:
    measured = measure_lesion(image.rgb, pixel_spacing_mm(image))
    return LesionSize(
        area_fraction=measured.area_fraction,
        area_mm2=measured.area_mm2,
        diameter_mm=measured.diameter_mm,
    )


@dataclass
class ReportPipeline:
    """Scores a batch of images (one study, or a list of files) and builds both reports each."""

    model: FusionModel
    patient_identifier_system: str
    sr_writer: MeasurementReportWriter = MeasurementReportWriter()
    capture_writer: SaliencyCaptureWriter | None = None  # None: no Secondary Capture
    model_card: str = ""  # where a reader finds the model card (named by the FHIR Device)

    def run(
        self, images: Sequence[DermoscopyImage], demographics: Sequence[Demographics]
    ) -> list[ImageReport]:
        """Reports with their overlays, for callers that want everything at once."""
        return [
            replace(report, drawn=self.explain(report.overlay))
            for report in self.report(images, demographics)
        ]

    def report(
        self, images: Sequence[DermoscopyImage], demographics: Sequence[Demographics]
    ) -> list[ImageReport]:
        """Score the images in one batch and build each one's SR and Bundle (no Grad-CAM)."""
        scored = self.model.score_explainable([i.rgb for i in images], demographics)
        issued = datetime.now(UTC)
        reports = []
        for image, demo, (first, explanation) in zip(images, demographics, scored, strict=True):
            finding = replace(first, lesion=lesion_size(image))
            # the capture's UIDs are derived: the SR can name it before it exists
            capture = (
                None
                if self.capture_writer is None
                else self.capture_writer.reference(image.ref, finding.model)
            )
            sr = self.sr_writer.build(
                source=image.dataset,
                ref=image.ref,
                finding=finding,
                demographics=demo,
                visual_explanation=capture,
            )
            patient_id = str(image.dataset.get("PatientID", "") or "") or None
            bundle = report_bundle(
                finding=finding,
                demographics=demo,
                image=image.ref,
                patient_id=patient_id,
                patient_identifier_system=self.patient_identifier_system,
                issued=issued,
                model_card=self.model_card,
            )
            log.info(
                "scored sop=%s probability=%.4f suspected=%s age=%s sex=%s site=%s lesion=%.1f%%",
                image.ref.sop_instance_uid,
                finding.probability,
                finding.melanoma_suspected,
                demo.age.source.value,
                demo.sex.source.value,
                demo.site.source.value,
                100 * finding.lesion.area_fraction if finding.lesion else float("nan"),
            )
            reports.append(ImageReport(image, demo, finding, sr, bundle, explanation))
        return reports

    def explain(self, overlay: Overlay) -> DrawnOverlay:
        """The Grad-CAM map and, when configured, the Secondary Capture the SR already names
        (its UIDs derive from the source and the model)."""
        saliency = self.model.explain(overlay.image.rgb, overlay.explanation)
        capture = None
        if self.capture_writer is not None:
            capture = self.capture_writer.build(
                source=overlay.image.dataset,
                ref=overlay.image.ref,
                overlay=overlay_rgb(overlay.image.rgb, saliency),
                model=overlay.model,
            )
        return DrawnOverlay(overlay, saliency, capture)


def capture_writer(settings: Settings) -> SaliencyCaptureWriter | None:
    """The Secondary Capture writer when ``[saliency] secondary_capture`` asks for one."""
    return SaliencyCaptureWriter() if settings.saliency.secondary_capture else None


def report_pipeline(settings: Settings) -> ReportPipeline:
    """The pipeline as configured: the bundle's model, the SC when asked, the card's place."""
    return ReportPipeline(
        model=FusionModel.load(
            settings.model.bundle_dir,
            runtime=settings.model.runtime,
            cache_dir=settings.storage.cache,
        ),
        patient_identifier_system=settings.patient_identifier_system,
        capture_writer=capture_writer(settings),
        model_card=settings.model.model_card,
    )
