import pytest

from monai_bundle.scripts.metadata import SITES
from plugin.domain import (
    BODY_PART_SITES,
    CATEGORY_CODES,
    NAMED_SITES,
    SITE_CATEGORIES,
    SNOMED_SITES,
    UnknownSiteError,
    site_from_body_part,
    site_from_name,
    site_from_snomed,
)


def test_every_vocabulary_maps_onto_the_model_categories() -> None:
    assert SITES == SITE_CATEGORIES
    targets = (
        {category for _, category in SNOMED_SITES.values()}
        | set(BODY_PART_SITES.values())
        | set(NAMED_SITES.values())
    )
    assert targets == set(SITE_CATEGORIES)
    assert set(CATEGORY_CODES) == set(SITE_CATEGORIES)
    for code in CATEGORY_CODES.values():
        assert site_from_snomed(code.value) in SITE_CATEGORIES


@pytest.mark.parametrize(
    ("name", "category"),
    [
        ("torso", "torso"),
        ("head/neck", "head/neck"),
        ("palms/soles", "palms/soles"),
        ("oral/genital", "oral/genital"),
        ("lower extremity", "lower extremity"),
        ("back", "torso"),
        ("abdomen", "torso"),
        ("chest", "torso"),
        ("trunk", "torso"),
        ("face", "head/neck"),
        ("scalp", "head/neck"),
        ("ear", "head/neck"),
        ("neck", "head/neck"),
        ("foot", "lower extremity"),
        ("hand", "upper extremity"),
        ("acral", "palms/soles"),
        ("genital", "oral/genital"),
        ("Anterior Torso", "torso"),
        ("unknown", None),
        ("", None),
        (None, None),
    ],
)
def test_isic_and_ham_site_names(name: str | None, category: str | None) -> None:
    assert site_from_name(name) == category


def test_unmapped_site_name_is_an_error_not_a_silent_missing() -> None:
    with pytest.raises(UnknownSiteError, match="'elbow pit'"):
        site_from_name("elbow pit")


def test_dicom_vocabularies() -> None:
    assert site_from_snomed("22943007") == "torso"
    assert site_from_snomed("77568009") == "torso"
    assert site_from_snomed("61685007") == "lower extremity"
    assert site_from_snomed("53120007") == "upper extremity"
    assert site_from_snomed("774007") == "head/neck"
    assert site_from_snomed("999999") is None
    assert site_from_body_part("BACK") == "torso"
    assert site_from_body_part("upper limb") == "upper extremity"
    assert site_from_body_part("HEAD_NECK") == "head/neck"
    assert site_from_body_part("PELVIS") is None
