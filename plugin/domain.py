"""Plain domain types shared by dicom_io, fhir_io, the bundle's code and the service.

From the project it imports only the bundle's site vocabulary (``monai_bundle.scripts.sites``,
plain Python): it is the one thing the I/O packages may import from ``plugin``.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from enum import StrEnum

from monai_bundle.scripts.sites import (
    NAMED_SITES,
    SITE_CATEGORIES,
    UNKNOWN_SITE_NAMES,
    UnknownSiteError,
    normalise_site_term,
    site_from_name,
)

__all__ = [
    "NAMED_SITES",
    "SITE_CATEGORIES",
    "UNKNOWN_SITE_NAMES",
    "UnknownSiteError",
    "normalise_site_term",
    "site_from_name",
]

SNOMED = "SCT"
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")


def is_uid(value: str) -> bool:
    """Digits and dots, at most 64 characters: safe as a path component, and the form the
    listener accepts (so an operator command accepts every UID the state database holds)."""
    return len(value) <= 64 and _UID.match(value) is not None


@dataclass(frozen=True)
class SiteCode:
    """A coded anatomic site (SNOMED CT)."""

    value: str
    meaning: str
    scheme: str = SNOMED


# One table for every vocabulary a site arrives in (keys normalised by ``normalise_site_term``).
# SNOMED CT body structures (DICOM AnatomicRegionSequence, CID 4029/4031).
SNOMED_SITES: dict[str, tuple[str, str]] = {
    "22943007": ("Trunk", "torso"),
    "77568009": ("Back", "torso"),
    "51185008": ("Thorax", "torso"),
    "818983003": ("Abdomen", "torso"),
    "113345001": ("Abdomen", "torso"),
    "61685007": ("Lower limb", "lower extremity"),
    "68367000": ("Thigh", "lower extremity"),
    "30021000": ("Lower leg", "lower extremity"),
    "56459004": ("Foot", "lower extremity"),
    "53120007": ("Upper limb", "upper extremity"),
    "40983000": ("Upper arm", "upper extremity"),
    "14975008": ("Forearm", "upper extremity"),
    "85562004": ("Hand", "upper extremity"),
    "774007": ("Head and Neck", "head/neck"),
    "69536005": ("Head", "head/neck"),
    "45048000": ("Neck", "head/neck"),
    "89545001": ("Face", "head/neck"),
    "41695006": ("Scalp", "head/neck"),
    "117590005": ("Ear", "head/neck"),
    "21547004": ("Palm", "palms/soles"),
    "57999000": ("Sole of foot", "palms/soles"),
    "74262004": ("Oral cavity", "oral/genital"),
    "123851003": ("Mouth region", "oral/genital"),
}
# DICOM BodyPartExamined defined terms (PS3.16 Annex L), upper case without spaces.
BODY_PART_SITES: dict[str, str] = {
    **{
        t: "torso"
        for t in ("CHEST", "ABDOMEN", "BACK", "TRUNK", "THORAX", "BREAST", "CHESTABDOMEN")
    },
    **{
        t: "lower extremity"
        for t in (
            "LEG",
            "LOWERLIMB",
            "LOWEREXTREMITY",
            "THIGH",
            "KNEE",
            "ANKLE",
            "FOOT",
            "TOE",
            "HIP",
            "LOWERLEG",
        )
    },
    **{
        t: "upper extremity"
        for t in (
            "ARM",
            "UPPERLIMB",
            "UPPEREXTREMITY",
            "UPRLIMB",
            "ELBOW",
            "FOREARM",
            "WRIST",
            "HAND",
            "FINGER",
            "SHOULDER",
            "UPPERARM",
        )
    },
    **{
        t: "head/neck"
        for t in (
            "HEAD",
            "SKULL",
            "FACE",
            "SCALP",
            "EAR",
            "NECK",
            "HEADNECK",
            "NOSE",
            "CHEEK",
            "LIP",
        )
    },
    **{t: "palms/soles" for t in ("PALM", "SOLE", "ACRAL")},
    **{t: "oral/genital" for t in ("ORAL", "MOUTH", "GENITAL", "PENIS", "VULVA", "SCROTUM")},
}
# The code written for each category when the source gave no code of its own.
CATEGORY_CODES: dict[str, SiteCode] = {
    "torso": SiteCode("22943007", "Trunk"),
    "lower extremity": SiteCode("61685007", "Lower limb"),
    "upper extremity": SiteCode("53120007", "Upper limb"),
    "head/neck": SiteCode("774007", "Head and Neck"),
    "palms/soles": SiteCode("21547004", "Palm"),
    "oral/genital": SiteCode("74262004", "Oral cavity"),
}


def site_from_body_part(term: str) -> str | None:
    """DICOM BodyPartExamined → model category; None where unmapped (the tag is free-ish text)."""
    return BODY_PART_SITES.get(term.upper().replace(" ", "").replace("_", ""))


def site_from_snomed(code: str) -> str | None:
    entry = SNOMED_SITES.get(code.strip())
    return entry[1] if entry else None


class Source(StrEnum):
    """Where a demographic value came from."""

    DICOM = "dicom"
    FHIR = "fhir"
    CSV = "csv"
    MISSING = "missing"


@dataclass(frozen=True)
class Sourced:
    """A value and where it came from; ``detail`` names the tag or element (never the value)."""

    value: float | str | None
    source: Source
    detail: str = ""

    @classmethod
    def missing(cls) -> Sourced:
        return cls(None, Source.MISSING, "")


@dataclass(frozen=True)
class Demographics:
    """Age in years, sex ('male'/'female', None for other/unknown), site as a model category."""

    age: Sourced
    sex: Sourced
    site: Sourced
    site_code: SiteCode | None = None

    @classmethod
    def unknown(cls) -> Demographics:
        return cls(Sourced.missing(), Sourced.missing(), Sourced.missing())

    def finding_site_code(self) -> SiteCode | None:
        if self.site_code is not None:
            return self.site_code
        return CATEGORY_CODES.get(str(self.site.value)) if self.site.value else None


UID_PREFIX = "2.25."


def derived_uid(*parts: str) -> str:
    """A UID that is a pure function of ``parts``: a 128-bit hash under the 2.25 (UUID) root.

    pydicom's ``generate_uid(prefix=None)`` ignores its entropy sources and is random, which
    would make every resend a new instance.
    """
    digest = hashlib.sha256("\x00".join(parts).encode()).digest()[:16]
    return UID_PREFIX + str(int.from_bytes(digest, "big"))


@dataclass(frozen=True)
class ModelIdentity:
    """The algorithm as results name it. ``weights_digest`` (sha256 of the weights and the
    operating point) makes ``device_uid`` change whenever what scores changes, even under an
    unchanged version number (IHE AIR asks for that of the Contributing Equipment's Device UID)."""

    name: str
    version: str
    weights_digest: str = ""

    @property
    def device_uid(self) -> str:
        return derived_uid("device", self.name, self.version, self.weights_digest)


@dataclass(frozen=True)
class LesionSize:
    """Lesion extent from a segmentation; mm values only where the image has a pixel spacing."""

    area_fraction: float
    area_mm2: float | None = None
    diameter_mm: float | None = None


@dataclass(frozen=True)
class Finding:
    """The model's result for one image.

    ``attributions`` says, per metadata field the model had, how much that field moved this
    probability: probability with it minus probability with it withheld (marked missing).
    """

    probability: float
    threshold: float
    model: ModelIdentity
    attributions: tuple[tuple[str, float], ...] = ()
    lesion: LesionSize | None = None

    @property
    def melanoma_suspected(self) -> bool:
        return self.probability >= self.threshold


@dataclass(frozen=True)
class ImageRef:
    """The DICOM identity of a source image and its study."""

    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    sop_class_uid: str
