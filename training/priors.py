"""Metadata priors learned from the full SIIM-ISIC 2020 table (29,559 lesions, 540 melanoma).

Only 1,037 of the table's rows have an image here, at 48% prevalence instead of 1.8%, so
age/sex/site effects learned from the images alone are noise. The table is the honest source:
a logistic regression over the model's metadata encoding, fitted with random fields withheld so
that its missing indicators carry the average effect of an unknown field.
"""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.linear_model import LogisticRegression

from monai_bundle.scripts.metadata import FIELD_SLOTS
from monai_bundle.scripts.sites import site_from_name
from training.data import encode_frame

PRIOR_COPIES = 4  # the table is replicated this often, each copy with its own withheld fields


def isic_table(data_root: str | Path, exclude_patients: Collection[str] = ()) -> pd.DataFrame:
    """The ISIC 2020 table as model vocabulary (age, sex, site, label, patient)."""
    table = pd.read_csv(Path(data_root) / "isic2020" / "metadata.csv")
    table = table[~table.patient_id.isin(set(exclude_patients))]
    site = table.anatom_site_general_challenge
    return pd.DataFrame(
        {
            "age": table.age_approx.to_numpy(),
            "sex": table.sex.where(table.sex.isin(["male", "female"])).to_numpy(),
            "site": [site_from_name(s if isinstance(s, str) else None) for s in site],
            "label": table.target.to_numpy(),
            "patient": table.patient_id.to_numpy(),
        }
    )


def withhold_fields(
    encoded: np.ndarray, p_field: float, p_all: float, rng: np.random.Generator
) -> np.ndarray:
    """numpy twin of ``metadata.drop_fields`` for fitting priors."""
    out = encoded.copy()
    drop_all = rng.random(len(out)) < p_all
    for value_slots, missing_slot in FIELD_SLOTS.values():
        drop = drop_all | (rng.random(len(out)) < p_field)
        out[drop, value_slots] = 0.0
        out[drop, missing_slot] = 1.0
    return out


def fit_metadata_prior(
    table: pd.DataFrame, seed: int, p_field: float = 0.3, p_all: float = 0.2
) -> np.ndarray:
    """Logistic-regression coefficients over the metadata encoding (the intercept is dropped:
    the fusion head learns the base rate of its own training mix)."""
    rng = np.random.default_rng(seed)
    encoded = encode_frame(table)
    x = np.concatenate([withhold_fields(encoded, p_field, p_all, rng) for _ in range(PRIOR_COPIES)])
    y = np.tile(table.label.to_numpy(), PRIOR_COPIES)
    model = LogisticRegression(max_iter=5000, C=1.0)
    model.fit(x, y)
    return model.coef_[0].astype(np.float32)
