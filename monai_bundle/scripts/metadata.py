"""The model's metadata input: age, sex and site, each with a missing indicator.

Sites are the SIIM-ISIC 2020 ``anatom_site_general_challenge`` categories; callers map other
vocabularies (HAM10000, SNOMED CT, BodyPartExamined) onto them before encoding.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from monai_bundle.scripts.sites import SITE_CATEGORIES

SITES: tuple[str, ...] = SITE_CATEGORIES
SEXES: tuple[str, ...] = ("male", "female")
AGE_SCALE = 100.0

# age, age missing, male, female, sex missing, six sites, site missing
METADATA_CHANNELS: tuple[str, ...] = (
    "age/100",
    "age missing",
    *(f"sex {s}" for s in SEXES),
    "sex missing",
    *(f"site {s}" for s in SITES),
    "site missing",
)
METADATA_WIDTH = len(METADATA_CHANNELS)


def encode_metadata(age: float | None, sex: str | None, site: str | None) -> np.ndarray:
    """Encode one case; ``None`` (or NaN age) marks a field as missing.

    Raises ValueError for a sex or site outside the model's vocabulary, so a mapping gap
    upstream is loud instead of silently becoming "missing".
    """
    vector = np.zeros(METADATA_WIDTH, dtype=np.float32)
    if age is None or (isinstance(age, float) and math.isnan(age)):
        vector[1] = 1.0
    else:
        if not 0 <= age <= 130:
            raise ValueError(f"age {age!r} is outside 0..130 years")
        vector[0] = float(age) / AGE_SCALE
    if sex is None:
        vector[4] = 1.0
    elif sex in SEXES:
        vector[2 + SEXES.index(sex)] = 1.0
    else:
        raise ValueError(f"sex {sex!r} is not one of {SEXES}")
    if site is None:
        vector[5 + len(SITES)] = 1.0
    elif site in SITES:
        vector[5 + SITES.index(site)] = 1.0
    else:
        raise ValueError(f"site {site!r} is not one of {SITES}")
    return vector


def encode_missing(rows: int) -> np.ndarray:
    """``rows`` encodings with every field missing: the image-only input."""
    return np.tile(encode_metadata(None, None, None), (rows, 1))


# Slices of the encoded vector that belong to each field (value slots and missing indicator).
FIELD_SLOTS: dict[str, tuple[slice, int]] = {
    "age": (slice(0, 1), 1),
    "sex": (slice(2, 4), 4),
    "site": (slice(5, 5 + len(SITES)), 5 + len(SITES)),
}


def drop_fields(
    metadata: torch.Tensor, p_field: float, p_all: float, generator: torch.Generator
) -> torch.Tensor:
    """Randomly mark fields as missing, so the model learns to work with any subset of them."""
    out = metadata.clone()
    rows = out.shape[0]
    drop_all = torch.rand(rows, generator=generator) < p_all
    for value_slots, missing_slot in FIELD_SLOTS.values():
        drop = drop_all | (torch.rand(rows, generator=generator) < p_field)
        out[drop, value_slots] = 0.0
        out[drop, missing_slot] = 1.0
    return out
