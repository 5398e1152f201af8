"""The FHIR R4 transaction Bundle that carries one image's result to the EHR.

Built with ``fhir.resources.R4B`` models so that what we send is structurally valid R4. Shape
(entry order; every entry is ``POST`` + ``ifNoneExist`` on a stable identifier, and its
``fullUrl`` is ``urn:uuid:`` uuid5 of that identifier, so re-sending creates nothing new):

No ``Patient``: the EHR owns patient identity and we never create one. ``subject`` (when
``patient_id`` is given) is a logical reference ``{"identifier": {system, value}}``; just before
sending, ``with_subject`` adds ``"reference": "Patient/<id>"`` for the Patient the EHR returns
for that identifier, and a patient it does not know stays referenced by identifier only.
``Device`` — the algorithm
    identifiers ``urn:dicom:uid|urn:oid:{model.device_uid}`` (the conditional-create key; it
    changes with the weights, as the SR's Contributing Equipment Device UID does) and
    ``urn:dermfusion:device|{model.name}-{model.version}``, ``deviceName`` (model-name),
    ``version``, ``manufacturer`` "dermfusion", ``type`` DCM 123110 "Artificial Intelligence",
    ``note`` naming the model card (HL7 AI Transparency on FHIR: model card in Device.note).
``Observation`` — probability
    ``code`` DCM 111047 "Probability of cancer"; ``valueQuantity`` 0..1 in UCUM ``1``;
    ``bodySite`` SNOMED site (when known); ``device``, ``subject``, ``issued``; components:

    - DCM 121071 "Finding" → SNOMED 1162635006 "Malignant melanoma" (what the probability is of;
      R4 ``focus`` is a Reference, so the disorder cannot go there);
    - DCM 121033 "Subject Age" (+ LOINC 30525-0) → ``valueQuantity`` UCUM ``a``;
    - DCM 121032 "Subject Sex" (+ LOINC 46098-0) → ``valueCodeableConcept`` administrative-gender;
    - SNOMED 363698007 "Finding site" → ``valueCodeableConcept`` SNOMED code, text = model category.

    Each demographic component carries the extension ``SOURCE_EXTENSION`` (``valueString``
    ``"dicom:PatientAge"``, ``"fhir:Patient.birthDate"``, ``"missing"``, … — the same strings as
    the SR). A value the model ran without is still listed, with ``dataAbsentReason`` "unknown":
    the reader sees that the model had no age rather than wondering whether we dropped it. An
    extension on the component, rather than a sibling "source" component, keeps each value and
    its provenance in one element (a sibling would have to be paired up by position or code).
``Observation`` — decision at the operating point
    ``code`` SNOMED 1162635006 "Malignant melanoma", text "Suspicion of melanoma at the operating
    point (AI)"; ``valueCodeableConcept`` SNOMED 415684004 "Suspected", text "Suspicious for
    melanoma" (probability ≥ threshold), or 428263003 "NOT suspected", text "Not suspicious for
    melanoma at the operating point"; ``interpretation`` v3 POS/NEG; component "Operating point
    (probability threshold)" → ``valueQuantity`` UCUM ``1``; ``derivedFrom`` → the probability
    Observation. A suspicion, not "Positive" for the disorder: at a high-sensitivity threshold
    many positives are benign (the SR codes the decision the same way).
``DiagnosticReport``
    ``status`` final, ``category`` DCM DMS "Dermoscopy", ``code`` text "Dermoscopy melanoma risk
    (AI)", ``subject``, ``issued``, ``result`` → both Observations, one-line ``conclusion``;
    identifiers ``urn:dermfusion:report|{SOP Instance UID}:{model.name}:{model.version}`` and
    ``urn:dicom:uid|urn:oid:{Study Instance UID}``. No ``performer``: R4 does not allow a Device
    there (the Device hangs off the Observations' ``device``).

``Provenance`` — HL7 AI Transparency on FHIR
    ``target`` the DiagnosticReport and both Observations, ``recorded`` = ``issued``,
    ``activity`` v3 CREATE, ``agent`` (type "author") ``who`` the algorithm's Device, ``entity``
    (role "source") the source image by its SOP Instance UID. R4 Provenance has no identifier, so
    its conditional-create key is a ``meta.tag`` ``urn:dermfusion:provenance|{report value}``.

Both Observations and the DiagnosticReport carry ``meta.security`` AIAST (v3 ObservationValue).
Identity is per source image and model version: the same image re-scored by the same model maps
onto the resources already there, and a new model version gets new ones.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import re
import uuid
from typing import Any

from fhir.resources.R4B.annotation import Annotation
from fhir.resources.R4B.bundle import Bundle, BundleEntry, BundleEntryRequest
from fhir.resources.R4B.codeableconcept import CodeableConcept
from fhir.resources.R4B.coding import Coding
from fhir.resources.R4B.device import Device, DeviceDeviceName, DeviceVersion
from fhir.resources.R4B.diagnosticreport import DiagnosticReport
from fhir.resources.R4B.extension import Extension
from fhir.resources.R4B.identifier import Identifier
from fhir.resources.R4B.meta import Meta
from fhir.resources.R4B.observation import Observation, ObservationComponent
from fhir.resources.R4B.provenance import Provenance, ProvenanceAgent, ProvenanceEntity
from fhir.resources.R4B.quantity import Quantity
from fhir.resources.R4B.reference import Reference
from fhir.resources.R4B.resource import Resource

from fhir_io._search import identifier_query
from plugin.domain import (
    SITE_CATEGORIES,
    SNOMED,
    Demographics,
    Finding,
    ImageRef,
    ModelIdentity,
    Source,
    Sourced,
)

DCM = "http://dicom.nema.org/resources/ontology/DCM"
SCT = "http://snomed.info/sct"
LOINC = "http://loinc.org"
UCUM = "http://unitsofmeasure.org"
ADMINISTRATIVE_GENDER = "http://hl7.org/fhir/administrative-gender"
OBSERVATION_VALUE = "http://terminology.hl7.org/CodeSystem/v3-ObservationValue"
OBSERVATION_INTERPRETATION = "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation"
OBSERVATION_CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"
DATA_ABSENT_REASON = "http://terminology.hl7.org/CodeSystem/data-absent-reason"

DEVICE_IDENTIFIER_SYSTEM = "urn:dermfusion:device"
REPORT_IDENTIFIER_SYSTEM = "urn:dermfusion:report"
OBSERVATION_IDENTIFIER_SYSTEM = "urn:dermfusion:observation"
PROVENANCE_TAG_SYSTEM = "urn:dermfusion:provenance"
PROVENANCE_PARTICIPANT_TYPE = "http://terminology.hl7.org/CodeSystem/provenance-participant-type"
DATA_OPERATION = "http://terminology.hl7.org/CodeSystem/v3-DataOperation"
STUDY_UID_SYSTEM = "urn:dicom:uid"
# Where a demographic input came from (valueString, same vocabulary as the SR's source items).
SOURCE_EXTENSION = "urn:dermfusion:fhir:StructureDefinition:input-source"
REPORT_CODE_TEXT = "Dermoscopy melanoma risk (AI)"
MANUFACTURER = "dermfusion"

_UUID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "urn:dermfusion:fhir")
_DICOM_UID = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
_MAX_AGE_YEARS = 150.0
_SEX_DISPLAY = {"male": "Male", "female": "Female"}


def _coding(system: str, code: str, display: str) -> Coding:
    return Coding(system=system, code=code, display=display)


AIAST = _coding(OBSERVATION_VALUE, "AIAST", "Artificial Intelligence asserted")
PROBABILITY_OF_CANCER = _coding(DCM, "111047", "Probability of cancer")
FINDING = _coding(DCM, "121071", "Finding")
MELANOMA = _coding(SCT, "1162635006", "Malignant melanoma")
# SNOMED CT finding-context qualifiers, as in the SR: the decision is a suspicion, not a diagnosis.
SUSPECTED = _coding(SCT, "415684004", "Suspected")
NOT_SUSPECTED = _coding(SCT, "428263003", "NOT suspected")
SUSPECTED_TEXT = "Suspicious for melanoma"
NOT_SUSPECTED_TEXT = "Not suspicious for melanoma at the operating point"
ARTIFICIAL_INTELLIGENCE = _coding(DCM, "123110", "Artificial Intelligence")
DERMOSCOPY = _coding(DCM, "DMS", "Dermoscopy")
SUBJECT_AGE = (_coding(DCM, "121033", "Subject Age"), _coding(LOINC, "30525-0", "Age"))
SUBJECT_SEX = (_coding(DCM, "121032", "Subject Sex"), _coding(LOINC, "46098-0", "Sex"))
FINDING_SITE = (_coding(SCT, "363698007", "Finding site"),)


def report_identifier(image: ImageRef, model: ModelIdentity) -> tuple[str, str]:
    """(system, value) of the report for one source image and model version; stable on resend."""
    return REPORT_IDENTIFIER_SYSTEM, f"{image.sop_instance_uid}:{model.name}:{model.version}"


def device_identifier(model: ModelIdentity) -> tuple[str, str]:
    """(system, value) the algorithm's Device is created under: its DICOM Device UID."""
    return STUDY_UID_SYSTEM, f"urn:oid:{model.device_uid}"


def report_bundle(
    *,
    finding: Finding,
    demographics: Demographics,
    image: ImageRef,
    patient_id: str | None,
    patient_identifier_system: str,
    issued: dt.datetime,
    model_card: str = "",
) -> dict[str, Any]:
    """A transaction Bundle (JSON-ready dict) with the result of one image; see the module doc.

    ``patient_id`` None (no PatientID in the DICOM header) leaves out the Patient and every
    ``subject``: the report still reaches the server, findable by the Study Instance UID.
    """
    _check_finding(finding)
    _check_demographics(demographics)
    _check_image(image)
    if patient_id is not None and (not patient_id.strip() or patient_id != patient_id.strip()):
        raise ValueError(f"patient_id must be None or a non-blank, trimmed string: {patient_id!r}")
    if patient_id is not None and not patient_identifier_system.strip():
        raise ValueError("patient_identifier_system must be non-empty when patient_id is given")
    if not isinstance(issued, dt.datetime) or issued.utcoffset() is None:
        raise ValueError("issued must be a timezone-aware datetime (FHIR instant)")
    issued = issued.astimezone(dt.UTC)

    model = finding.model
    report_system, report_value = report_identifier(image, model)
    entries: list[BundleEntry] = []
    subject: Reference | None = None
    if patient_id is not None:
        subject = Reference(
            identifier=Identifier(system=patient_identifier_system, value=patient_id),
            type="Patient",
        )

    device = _Entry(*device_identifier(model))
    entries.append(
        device.entry(
            Device(
                identifier=[
                    device.identifier(),
                    Identifier(
                        system=DEVICE_IDENTIFIER_SYSTEM, value=f"{model.name}-{model.version}"
                    ),
                ],
                deviceName=[DeviceDeviceName(name=model.name, type="model-name")],
                version=[DeviceVersion(value=model.version)],
                manufacturer=MANUFACTURER,
                type=CodeableConcept(
                    coding=[ARTIFICIAL_INTELLIGENCE], text="Artificial Intelligence"
                ),
                note=[Annotation(text=f"Model card: {model_card}")] if model_card else None,
            )
        )
    )

    body_site = _site_concept(demographics)
    common: dict[str, Any] = {
        "meta": Meta(security=[AIAST]),
        "status": "final",
        "category": [CodeableConcept(coding=[_coding(OBSERVATION_CATEGORY, "imaging", "Imaging")])],
        "subject": subject,
        "issued": issued,
        "device": device.reference(),
        "bodySite": body_site,
    }

    probability = _Entry(OBSERVATION_IDENTIFIER_SYSTEM, f"{report_value}:probability")
    entries.append(
        probability.entry(
            Observation(
                identifier=[probability.identifier()],
                code=CodeableConcept(
                    coding=[PROBABILITY_OF_CANCER], text="Melanoma probability (AI)"
                ),
                valueQuantity=_unitless(finding.probability),
                component=[
                    ObservationComponent(
                        code=CodeableConcept(coding=[FINDING]),
                        valueCodeableConcept=CodeableConcept(coding=[MELANOMA]),
                    ),
                    *_demographic_components(demographics, body_site),
                    *_explanation_components(finding),
                ],
                **common,
            )
        )
    )

    suspected = finding.melanoma_suspected
    decision = _Entry(OBSERVATION_IDENTIFIER_SYSTEM, f"{report_value}:decision")
    entries.append(
        decision.entry(
            Observation(
                identifier=[decision.identifier()],
                code=CodeableConcept(
                    coding=[MELANOMA], text="Suspicion of melanoma at the operating point (AI)"
                ),
                valueCodeableConcept=CodeableConcept(
                    coding=[SUSPECTED if suspected else NOT_SUSPECTED],
                    text=SUSPECTED_TEXT if suspected else NOT_SUSPECTED_TEXT,
                ),
                interpretation=[
                    CodeableConcept(
                        coding=[
                            _coding(OBSERVATION_INTERPRETATION, "POS", "Positive")
                            if suspected
                            else _coding(OBSERVATION_INTERPRETATION, "NEG", "Negative")
                        ]
                    )
                ],
                component=[
                    ObservationComponent(
                        code=CodeableConcept(text="Operating point (probability threshold)"),
                        valueQuantity=_unitless(finding.threshold),
                    )
                ],
                derivedFrom=[probability.reference()],
                **common,
            )
        )
    )

    report = _Entry(report_system, report_value)
    entries.append(
        report.entry(
            DiagnosticReport(
                identifier=[
                    report.identifier(),
                    Identifier(
                        system=STUDY_UID_SYSTEM, value=f"urn:oid:{image.study_instance_uid}"
                    ),
                ],
                meta=Meta(security=[AIAST]),
                status="final",
                category=[CodeableConcept(coding=[DERMOSCOPY], text="Dermoscopy")],
                code=CodeableConcept(text=REPORT_CODE_TEXT),
                subject=subject,
                issued=issued,
                result=[probability.reference(), decision.reference()],
                conclusion=conclusion_text(finding),
            )
        )
    )
    provenance = _Entry(PROVENANCE_TAG_SYSTEM, report_value, parameter="_tag")
    entries.append(
        provenance.entry(
            Provenance(
                meta=Meta(tag=[_coding(PROVENANCE_TAG_SYSTEM, report_value, "dermfusion result")]),
                target=[report.reference(), probability.reference(), decision.reference()],
                recorded=issued,
                activity=CodeableConcept(coding=[_coding(DATA_OPERATION, "CREATE", "create")]),
                agent=[
                    ProvenanceAgent(
                        type=CodeableConcept(
                            coding=[_coding(PROVENANCE_PARTICIPANT_TYPE, "author", "Author")]
                        ),
                        who=device.reference(),
                    )
                ],
                entity=[
                    ProvenanceEntity(
                        role="source",
                        what=Reference(
                            identifier=Identifier(
                                system=STUDY_UID_SYSTEM,
                                value=f"urn:oid:{image.sop_instance_uid}",
                            ),
                            display="Source dermoscopy image (SOP Instance UID)",
                        ),
                    )
                ],
            )
        )
    )
    bundle = Bundle(type="transaction", entry=entries)
    result: dict[str, Any] = json.loads(bundle.model_dump_json())
    return result


def subject_identifier(bundle: dict[str, Any]) -> tuple[str, str] | None:
    """(system, value) of the patient the Bundle's report is about; None when it has none.

    Also read from a Patient entry, which Bundles written before 0.6 carried as a conditional
    create (``with_subject`` removes it).
    """
    for entry in bundle.get("entry") or []:
        resource = entry.get("resource") or {}
        if resource.get("resourceType") == "Patient":
            for identifier in resource.get("identifier") or []:
                if identifier.get("system") and identifier.get("value"):
                    return str(identifier["system"]), str(identifier["value"])
        identifier = (resource.get("subject") or {}).get("identifier") or {}
        if identifier.get("system") and identifier.get("value"):
            return str(identifier["system"]), str(identifier["value"])
    return None


def with_subject(bundle: dict[str, Any], patient_reference: str | None) -> dict[str, Any]:
    """A copy of ``bundle`` that creates no Patient, whose subjects name the EHR's Patient
    (``Patient/<id>``, found by identifier) or, with None, the identifier alone."""
    identifier = subject_identifier(bundle)
    if identifier is None:
        return bundle
    system, value = identifier
    subject: dict[str, Any] = {"identifier": {"system": system, "value": value}, "type": "Patient"}
    if patient_reference is not None:
        if not re.fullmatch(r"Patient/[A-Za-z0-9\-.]{1,64}", patient_reference):
            raise ValueError(f"not a Patient reference: {patient_reference!r}")
        subject = {"reference": patient_reference, **subject}
    out = json.loads(json.dumps(bundle))
    entries = []
    for entry in out.get("entry") or []:
        resource = entry.get("resource") or {}
        if resource.get("resourceType") == "Patient":
            continue  # a pre-0.6 conditional create: never create a Patient
        if "subject" in resource:
            resource["subject"] = dict(subject)
        entries.append(entry)
    out["entry"] = entries
    return out


def conclusion_text(finding: Finding) -> str:
    """One line for the EHR's result list; says it is the algorithm's output, not a diagnosis."""
    verdict, op = ("Suspicious", ">=") if finding.melanoma_suspected else ("Not suspicious", "<")
    return (
        f"{verdict} for melanoma by AI ({finding.model.name} {finding.model.version}): probability "
        f"{finding.probability:.3f} {op} operating point {finding.threshold:.3f}. "
        "Decision support, not a diagnosis."
    )


class _Entry:
    """One bundle entry's identity: its stable identifier and the urn:uuid derived from it."""

    def __init__(self, system: str, value: str, parameter: str = "identifier") -> None:
        self.system, self.value, self.parameter = system, value, parameter
        self.full_url = f"urn:uuid:{uuid.uuid5(_UUID_NAMESPACE, f'{system}|{value}')}"

    def identifier(self) -> Identifier:
        return Identifier(system=self.system, value=self.value)

    def reference(self) -> Reference:
        return Reference(reference=self.full_url)

    def entry(self, resource: Resource) -> BundleEntry:
        resource_type = resource.get_resource_type()
        return BundleEntry(
            fullUrl=self.full_url,
            resource=resource,
            request=BundleEntryRequest(
                method="POST",
                url=resource_type,
                ifNoneExist=identifier_query(self.system, self.value, self.parameter),
            ),
        )


def _unitless(value: float) -> Quantity:
    return Quantity(value=value, unit="1", system=UCUM, code="1")


def _source_text(sourced: Sourced) -> str:
    if sourced.value is None or sourced.source is Source.MISSING:
        return "missing"
    return f"{sourced.source.value}:{sourced.detail}" if sourced.detail else sourced.source.value


def _demographic_components(
    demographics: Demographics, body_site: CodeableConcept | None
) -> list[ObservationComponent]:
    age, sex = demographics.age, demographics.sex
    values: list[tuple[tuple[Coding, ...], Sourced, dict[str, Any]]] = [
        (
            SUBJECT_AGE,
            age,
            {"valueQuantity": Quantity(value=age.value, unit="year", system=UCUM, code="a")}
            if age.value is not None
            else {},
        ),
        (
            SUBJECT_SEX,
            sex,
            {
                "valueCodeableConcept": CodeableConcept(
                    coding=[
                        _coding(ADMINISTRATIVE_GENDER, str(sex.value), _SEX_DISPLAY[str(sex.value)])
                    ]
                )
            }
            if sex.value is not None
            else {},
        ),
        (
            FINDING_SITE,
            demographics.site,
            {"valueCodeableConcept": body_site} if body_site is not None else {},
        ),
    ]
    components = []
    for codings, sourced, value in values:
        if not value:
            value = {
                "dataAbsentReason": CodeableConcept(
                    coding=[_coding(DATA_ABSENT_REASON, "unknown", "Unknown")]
                )
            }
        components.append(
            ObservationComponent(
                extension=[Extension(url=SOURCE_EXTENSION, valueString=_source_text(sourced))],
                code=CodeableConcept(coding=list(codings)),
                **value,
            )
        )
    return components


_ATTRIBUTION_TEXT = {
    "age": "Change in melanoma probability from the subject's age (AI attribution)",
    "sex": "Change in melanoma probability from the subject's sex (AI attribution)",
    "site": "Change in melanoma probability from the lesion site (AI attribution)",
}


def _explanation_components(finding: Finding) -> list[ObservationComponent]:
    """Per-field attributions (probability with the field minus without it) and lesion size."""
    components = [
        ObservationComponent(
            code=CodeableConcept(text=_ATTRIBUTION_TEXT[name]), valueQuantity=_unitless(change)
        )
        for name, change in finding.attributions
    ]
    lesion = finding.lesion
    if lesion is not None:
        components.append(
            ObservationComponent(
                code=CodeableConcept(text="Lesion area, fraction of the image (segmentation)"),
                valueQuantity=_unitless(lesion.area_fraction),
            )
        )
        if lesion.area_mm2 is not None:
            components.append(
                ObservationComponent(
                    code=CodeableConcept(
                        coding=[_coding(SCT, "42798000", "Area")],
                        text="Lesion area (segmentation)",
                    ),
                    valueQuantity=Quantity(
                        value=lesion.area_mm2, unit="mm2", system=UCUM, code="mm2"
                    ),
                )
            )
    return components


def _site_concept(demographics: Demographics) -> CodeableConcept | None:
    if demographics.site.value is None:
        return None
    code = demographics.finding_site_code()
    text = str(demographics.site.value)
    if code is None or code.scheme != SNOMED:
        return CodeableConcept(text=text)
    return CodeableConcept(coding=[_coding(SCT, code.value, code.meaning)], text=text)


def _check_finding(finding: Finding) -> None:
    for name in ("probability", "threshold"):
        value = getattr(finding, name)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"finding.{name} must be a number, got {type(value).__name__}")
        if not math.isfinite(value) or not 0.0 <= value <= 1.0:
            raise ValueError(f"finding.{name} must be within [0, 1], got {value!r}")
    for name in ("name", "version"):
        value = getattr(finding.model, name)
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"finding.model.{name} must be a non-empty string")


def _check_demographics(demographics: Demographics) -> None:
    age = demographics.age.value
    if age is not None and (
        isinstance(age, bool)
        or not isinstance(age, int | float)
        or not math.isfinite(age)
        or not 0.0 <= age <= _MAX_AGE_YEARS
    ):
        raise ValueError(f"demographics.age must be None or years in [0, 150], got {age!r}")
    if demographics.sex.value not in (None, *_SEX_DISPLAY):
        raise ValueError(
            f"demographics.sex must be None, 'male' or 'female', got {demographics.sex.value!r}"
        )
    if demographics.site.value not in (None, *SITE_CATEGORIES):
        raise ValueError(
            f"demographics.site must be None or one of {SITE_CATEGORIES}, "
            f"got {demographics.site.value!r}"
        )


def _check_image(image: ImageRef) -> None:
    for name in ("study_instance_uid", "sop_instance_uid"):
        uid = getattr(image, name)
        if not isinstance(uid, str) or len(uid) > 64 or not _DICOM_UID.match(uid):
            raise ValueError(f"image.{name} is not a DICOM UID: {uid!r}")
