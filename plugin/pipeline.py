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
from plugin.domain import Demographics, Finding, LesionSize
from plugin.model import FusionModel

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ImageReport:
    image: DermoscopyImage
    demographics: Demographics
    finding: Finding
    sr: Comprehensive3DSR
    bundle: dict[str, Any]
    saliency: np.ndarray  # 224x224 in [0, 1], the network's view of the image
    capture: Dataset | None = None  # the overlay as a Secondary Capture, when configured

    def write_files(self, folder: Path) -> ReportFiles:
        """SR, Bundle and saliency overlay as ``<SR UID>.dcm/.json/_saliency.png``, fsync'd;
        the Secondary Capture, if any, as ``<SR UID>_saliency.dcm``."""
        private_directory(folder)
        uid = self.sr.SOPInstanceUID
        files = ReportFiles(
            sr=folder / f"{uid}.dcm",
            bundle=folder / f"{uid}.json",
            saliency=folder / f"{uid}_saliency.png",
            capture=None if self.capture is None else folder / f"{uid}_saliency.dcm",
        )
        _write_dicom(self.sr, files.sr)
        write_bytes_durably((json.dumps(self.bundle, indent=2) + "\n").encode(), files.bundle)
        png = io.BytesIO()  # through write_bytes_durably, so the overlay is 0600 too
        Image.fromarray(overlay_rgb(self.image.rgb, self.saliency)).save(png, format="PNG")
        write_bytes_durably(png.getvalue(), files.saliency)
        if self.capture is not None and files.capture is not None:
            _write_dicom(self.capture, files.capture)
        return files


def _write_dicom(dataset: Dataset, path: Path) -> None:
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, dataset, enforce_file_format=True)
    write_bytes_durably(buffer.getvalue(), path)


@dataclass(frozen=True)
class ReportFiles:
    sr: Path
    bundle: Path
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
        findings = self.model.score([i.rgb for i in images], demographics)
        issued = datetime.now(UTC)
        reports = []
        for image, demo, scored in zip(images, demographics, findings, strict=True):
            finding = replace(scored, lesion=lesion_size(image))
            saliency = self.model.saliency(image.rgb, demo)
            capture = None
            if self.capture_writer is not None:
                capture = self.capture_writer.build(
                    source=image.dataset,
                    ref=image.ref,
                    overlay=overlay_rgb(image.rgb, saliency),
                    model=finding.model,
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
            reports.append(ImageReport(image, demo, finding, sr, bundle, saliency, capture))
        return reports


def capture_writer(settings: Settings) -> SaliencyCaptureWriter | None:
    """The Secondary Capture writer when ``[saliency] secondary_capture`` asks for one."""
    return SaliencyCaptureWriter() if settings.saliency.secondary_capture else None


def report_pipeline(settings: Settings) -> ReportPipeline:
    """The pipeline as configured: the bundle's model, the SC when asked, the card's place."""
    return ReportPipeline(
        model=FusionModel.load(settings.model.bundle_dir),
        patient_identifier_system=settings.patient_identifier_system,
        capture_writer=capture_writer(settings),
        model_card=settings.model.model_card,
    )
