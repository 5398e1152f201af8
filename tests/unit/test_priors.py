"""The ISIC 2020 metadata prior: a logistic regression that must find real effects."""

from __future__ import annotations

import numpy as np
import pandas as pd

from monai_bundle.scripts.metadata import FIELD_SLOTS, SITES, encode_metadata
from training.priors import fit_metadata_prior, withhold_fields


def _table(n: int, seed: int) -> pd.DataFrame:
    """Synthetic lesions: melanoma risk rises with age and is higher on the head/neck."""
    rng = np.random.default_rng(seed)
    age = rng.integers(20, 90, n).astype(float)
    site = rng.choice(["torso", "head/neck", "lower extremity"], n)
    sex = rng.choice(["male", "female"], n)
    logit = -5.0 + 0.05 * (age - 50) + 1.5 * (site == "head/neck")
    label = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(int)
    return pd.DataFrame({"age": age, "sex": sex, "site": site, "label": label})


def test_prior_recovers_age_and_site_effects_and_ignores_sex() -> None:
    weight = fit_metadata_prior(_table(20000, 0), seed=1)
    head = 5 + SITES.index("head/neck")
    torso = 5 + SITES.index("torso")
    assert weight[0] > 2.0  # per 100 years of age; truth is 5.0, shrunk by withheld ages
    assert weight[head] - weight[torso] > 1.0  # truth is 1.5
    assert abs(weight[2] - weight[3]) < 0.3  # sex has no effect in this table


def test_prior_is_reproducible_from_its_seed() -> None:
    table = _table(3000, 2)
    np.testing.assert_array_equal(fit_metadata_prior(table, 7), fit_metadata_prior(table, 7))


def test_withheld_fields_are_encoded_as_missing() -> None:
    encoded = np.stack([encode_metadata(60.0, "female", "torso")] * 500)
    out = withhold_fields(encoded, 0.5, 0.0, np.random.default_rng(0))
    for values, missing in FIELD_SLOTS.values():
        dropped = out[:, missing] == 1.0
        assert 150 < dropped.sum() < 350
        assert (out[dropped, values] == 0).all()
        np.testing.assert_array_equal(out[~dropped][:, values], encoded[~dropped][:, values])
