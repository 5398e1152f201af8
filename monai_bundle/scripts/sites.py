"""The model's site vocabulary, and the names sites arrive under in ISIC and HAM10000 tables.

It lives in the bundle because scoring needs it (``predict`` reads ISIC 2020 and HAM10000 CSVs)
and the bundle runs without the service's code; the service's DICOM and SNOMED CT mappings build
on it (``plugin.domain``).
"""

from __future__ import annotations

# The model's site categories: SIIM-ISIC 2020's anatom_site_general_challenge vocabulary.
SITE_CATEGORIES: tuple[str, ...] = (
    "torso",
    "lower extremity",
    "upper extremity",
    "head/neck",
    "palms/soles",
    "oral/genital",
)

# Free-text site names: SIIM-ISIC 2020 (and 2019) and HAM10000 localization, lower case.
NAMED_SITES: dict[str, str] = {
    **{s: s for s in SITE_CATEGORIES},
    "anterior torso": "torso",
    "posterior torso": "torso",
    "lateral torso": "torso",
    "back": "torso",
    "trunk": "torso",
    "abdomen": "torso",
    "chest": "torso",
    "foot": "lower extremity",
    "hand": "upper extremity",
    "face": "head/neck",
    "neck": "head/neck",
    "scalp": "head/neck",
    "ear": "head/neck",
    "acral": "palms/soles",
    "genital": "oral/genital",
}
# Sites that say "not known" rather than naming a place we cannot map.
UNKNOWN_SITE_NAMES = frozenset({"", "unknown", "nan", "none"})


class UnknownSiteError(ValueError):
    """A site term that the site table does not know (as opposed to one that says "unknown")."""


def normalise_site_term(term: str) -> str:
    return " ".join(term.strip().lower().replace("_", " ").split())


def site_from_name(name: str | None) -> str | None:
    """ISIC 2020 / HAM10000 site name → model category; None where the name says unknown."""
    if name is None or normalise_site_term(str(name)) in UNKNOWN_SITE_NAMES:
        return None
    try:
        return NAMED_SITES[normalise_site_term(name)]
    except KeyError:
        raise UnknownSiteError(f"site name {name!r} is not in the site table") from None
