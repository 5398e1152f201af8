"""From decoded images and their demographics to the two reports: DICOM SR and FHIR Bundle."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from highdicom.sr import Comprehensive3DSR

from dicom_io.images import DermoscopyImage
from dicom_io.sr import MeasurementReportWriter
from fhir_io import report_bundle
from plugin.domain import Demographics, Finding
from plugin.model import FusionModel

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ImageReport:
    image: DermoscopyImage
    demographics: Demographics
    finding: Finding
    sr: Comprehensive3DSR
    bundle: dict[str, Any]


@dataclass
class ReportPipeline:
    """Scores a batch of images (one study, or a list of files) and builds both reports each."""

    model: FusionModel
    patient_identifier_system: str
    sr_writer: MeasurementReportWriter = MeasurementReportWriter()

    def run(
        self, images: Sequence[DermoscopyImage], demographics: Sequence[Demographics]
    ) -> list[ImageReport]:
        findings = self.model.score([i.rgb for i in images], demographics)
        issued = datetime.now(UTC)
        reports = []
        for image, demo, finding in zip(images, demographics, findings, strict=True):
            sr = self.sr_writer.build(
                source=image.dataset, ref=image.ref, finding=finding, demographics=demo
            )
            patient_id = str(image.dataset.get("PatientID", "") or "") or None
            bundle = report_bundle(
                finding=finding,
                demographics=demo,
                image=image.ref,
                patient_id=patient_id,
                patient_identifier_system=self.patient_identifier_system,
                issued=issued,
            )
            log.info(
                "scored sop=%s probability=%.4f suspected=%s age=%s sex=%s site=%s",
                image.ref.sop_instance_uid,
                finding.probability,
                finding.melanoma_suspected,
                demo.age.source.value,
                demo.sex.source.value,
                demo.site.source.value,
            )
            reports.append(ImageReport(image, demo, finding, sr, bundle))
        return reports
