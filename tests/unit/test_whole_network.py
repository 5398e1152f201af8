"""The whole-network trainer's parts that need no data: weighting, devices, calibration."""

from __future__ import annotations

from dataclasses import asdict

import numpy as np
import pytest
import torch

from monai_bundle.scripts.network import FusionEnsemble, FusionNet
from training.whole_network import (
    Recipe,
    WholeNetworkTrainer,
    _platt,
    clinic_prevalence_weights,
    network_for,
    validation_split_seed,
)


def test_weighting_gives_every_clinic_the_pooled_prevalence() -> None:
    clinics = np.array(["a"] * 10 + ["b"] * 10 + ["c"] * 4 + ["a"] * 2)
    labels = np.array([1] * 5 + [0] * 5 + [1] + [0] * 9 + [0] * 4 + [1, 0], dtype=np.float32)
    is_train = np.arange(len(labels)) < 24  # the last two rows are validation
    weights = clinic_prevalence_weights(clinics, labels, is_train, max_weight=100.0)
    pooled = labels[is_train].mean()
    for clinic in ("a", "b"):
        rows = (clinics == clinic) & is_train
        weighted = (weights[rows] * labels[rows]).sum() / weights[rows].sum()
        assert weighted == pytest.approx(pooled)
    assert (weights[clinics == "c"] == 1).all()  # benign only: nothing to rebalance
    # validation rows of clinic a weighted as its training rows are
    assert weights[24] == weights[0] and weights[25] == weights[5]
    capped = clinic_prevalence_weights(clinics, labels, is_train, max_weight=2.0)
    assert capped[10] == 2.0 < weights[10]  # clinic b's one melanoma: 0.25 / 0.1
    assert np.array_equal(capped[:10], weights[:10])


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_cuda_without_a_device_is_refused_in_one_line(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(RuntimeError, match="no CUDA device"):
        WholeNetworkTrainer(Recipe(), str(tmp_path), str(tmp_path), device="cuda")


def test_platt_recovers_a_known_scale_and_shift() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 2, 20000)
    labels = (rng.random(20000) < 1 / (1 + np.exp(-(0.5 * logits - 1.0)))).astype(int)
    scale, shift = _platt(logits, labels, np.ones(len(labels)))
    assert scale == pytest.approx(0.5, abs=0.05) and shift == pytest.approx(-1.0, abs=0.08)


def test_a_stored_recipe_names_the_split_its_own_split_seed_drew() -> None:
    """An ensemble's second member trains with seed 20261201 on the split of seed 20261130:
    whatever re-scores its validation split (evaluation report, input-size sweep, the shipped-AUC
    test) must draw that split, not the training seed's."""
    member = Recipe(seed=20261201, split_seed=20261130)
    assert member.drawn_split_seed == 20261130
    assert validation_split_seed(asdict(member)) == 20261130
    assert validation_split_seed(asdict(Recipe(seed=7))) == 7  # split_seed unset
    assert validation_split_seed({"seed": 7}) == 7  # stored before the field existed


def test_a_recipe_builds_one_network_or_one_per_training_seed() -> None:
    views = {"test_time_views": ["identity", "hflip"]}
    one = network_for({"seed": 1, "network": views})  # stored before further_member_seeds
    assert isinstance(one, FusionNet) and one.test_time_views == ("identity", "hflip")
    assert isinstance(network_for(asdict(Recipe(network=views))), FusionNet)
    three = network_for(asdict(Recipe(network=views, further_member_seeds=[2, 3])))
    assert isinstance(three, FusionEnsemble) and len(three.members) == 3
    assert all(m.test_time_views == ("identity", "hflip") for m in three.members)
