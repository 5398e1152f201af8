"""The metrics the model card quotes: checked on cases where the answer is known."""

from __future__ import annotations

import numpy as np
import pytest

from training.evaluation import (
    auc_difference_with_interval,
    auc_with_interval,
    expected_calibration_error,
    operating_point,
    specificity_by_diagnosis,
    threshold_for_sensitivity,
)


def _cases(n: int = 600, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = (rng.random(n) < 0.2).astype(int)
    informative = labels + rng.normal(0, 0.8, n)
    weaker = labels + rng.normal(0, 2.0, n)
    return labels, informative, weaker


def test_paired_difference_finds_the_better_model_and_none_between_equals() -> None:
    labels, informative, weaker = _cases()
    better = auc_difference_with_interval(labels, informative, weaker, n_boot=300)
    assert better["low"] > 0 and better["share_positive"] > 0.99
    assert better["low"] <= better["difference"] <= better["high"]
    same = auc_difference_with_interval(labels, informative, informative, n_boot=50)
    assert same == {"difference": 0.0, "low": 0.0, "high": 0.0, "share_positive": 0.0}


def test_auc_interval_contains_the_point_estimate() -> None:
    labels, informative, _ = _cases()
    auc = auc_with_interval(labels, informative, n_boot=200)
    assert 0.5 < auc["auc_low"] < auc["auc"] < auc["auc_high"] < 1.0
    assert auc["n_melanoma"] == labels.sum()


def test_threshold_reaches_the_sensitivity_target() -> None:
    labels, informative, _ = _cases()
    threshold = threshold_for_sensitivity(labels, informative, 0.95)
    point = operating_point(labels, informative, threshold)
    assert point["sensitivity"] >= 0.95
    # the highest such threshold: a hair above it, sensitivity falls below the target
    assert operating_point(labels, informative, threshold + 1e-9)["sensitivity"] < 0.95


def test_ece_is_zero_for_calibrated_bins_and_counts_weights() -> None:
    labels = np.array([0, 0, 0, 1] * 25)
    probabilities = np.full(100, 0.25)
    assert expected_calibration_error(labels, probabilities) == pytest.approx(0.0)
    # weighting the negatives 3x moves the bin's observed rate to 1/10: ECE 0.15
    weights = np.where(labels == 0, 3.0, 1.0)
    assert expected_calibration_error(labels, probabilities, weights) == pytest.approx(0.15)


def test_specificity_by_diagnosis_counts_each_benign_diagnosis_apart() -> None:
    diagnoses = np.array(["melanoma", "naevus", "naevus", "naevus", "naevus", "bcc", "bcc"])
    labels = np.array([1, 0, 0, 0, 0, 0, 0])
    probabilities = np.array([0.9, 0.1, 0.2, 0.5, 0.7, 0.6, 0.4])
    by = specificity_by_diagnosis(diagnoses, labels, probabilities, threshold=0.5)
    assert list(by) == ["bcc", "naevus"]  # benign only, by name
    assert by["naevus"] == {"n": 4, "flagged": 2, "specificity": 0.5}  # 0.5 is flagged (>=)
    assert by["bcc"] == {"n": 2, "flagged": 1, "specificity": 0.5}
