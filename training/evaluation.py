"""Metrics that mean something at 2% prevalence: AUC with intervals, sensitivity/specificity."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from sklearn.metrics import roc_auc_score, roc_curve


def auc_with_interval(
    labels: np.ndarray,
    scores: np.ndarray,
    weights: np.ndarray | None = None,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, float]:
    """ROC AUC and a 95% bootstrap interval (resampling cases)."""
    auc = float(roc_auc_score(labels, scores, sample_weight=weights))
    boots = [
        roc_auc_score(
            labels[idx], scores[idx], sample_weight=None if weights is None else weights[idx]
        )
        for idx in _resamples(labels, n_boot, seed)
    ]
    low, high = np.percentile(boots, [2.5, 97.5])
    return {
        "auc": auc,
        "auc_low": float(low),
        "auc_high": float(high),
        "n": len(labels),
        "n_melanoma": int(labels.sum()),
    }


def _resamples(labels: np.ndarray, n_boot: int, seed: int) -> Iterator[np.ndarray]:
    """Bootstrap index sets (cases drawn with replacement) that hold both classes."""
    rng = np.random.default_rng(seed)
    n = len(labels)
    for _ in range(n_boot):
        idx = rng.integers(0, n, n)
        if labels[idx].min() != labels[idx].max():
            yield idx


def auc_difference_with_interval(
    labels: np.ndarray,
    scores_a: np.ndarray,
    scores_b: np.ndarray,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, float]:
    """AUC(a) - AUC(b) on the same cases, with a paired 95% bootstrap interval.

    Two models scored on one set share most of their error, so comparing their separate
    intervals hides a consistent difference; resampling cases once for both does not.
    """
    diff = float(roc_auc_score(labels, scores_a) - roc_auc_score(labels, scores_b))
    boots = [
        roc_auc_score(labels[idx], scores_a[idx]) - roc_auc_score(labels[idx], scores_b[idx])
        for idx in _resamples(labels, n_boot, seed)
    ]
    return difference_with_interval(diff, np.asarray(boots))


def difference_with_interval(difference: float, replicates: np.ndarray) -> dict[str, float]:
    """A difference with the 95% interval and the share of its bootstrap replicates above 0."""
    low, high = np.percentile(replicates, [2.5, 97.5])
    return {
        "difference": difference,
        "low": float(low),
        "high": float(high),
        "share_positive": float(np.mean(replicates > 0)),
    }


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def threshold_for_sensitivity(
    labels: np.ndarray, probabilities: np.ndarray, target: float
) -> float:
    """The highest threshold whose sensitivity on these cases is at least ``target``."""
    fpr, tpr, thresholds = roc_curve(labels, probabilities)
    ok = np.flatnonzero(tpr >= target)
    return float(min(thresholds[ok[0]], 1.0))


def operating_point(
    labels: np.ndarray,
    probabilities: np.ndarray,
    threshold: float,
    weights: np.ndarray | None = None,
) -> dict[str, float]:
    w = np.ones(len(labels)) if weights is None else weights
    positive = probabilities >= threshold
    tp = float(w[(labels == 1) & positive].sum())
    fn = float(w[(labels == 1) & ~positive].sum())
    tn = float(w[(labels == 0) & ~positive].sum())
    fp = float(w[(labels == 0) & positive].sum())
    return {
        "threshold": threshold,
        "sensitivity": tp / (tp + fn) if tp + fn else float("nan"),
        "specificity": tn / (tn + fp) if tn + fp else float("nan"),
        "ppv": tp / (tp + fp) if tp + fp else float("nan"),
    }


def specificity_by_diagnosis(
    diagnoses: np.ndarray, labels: np.ndarray, probabilities: np.ndarray, threshold: float
) -> dict[str, dict[str, float]]:
    """Per benign diagnosis (by name): n, how many the threshold flags, and the specificity left.

    A single specificity hides which look-alikes a case mix adds to the false positives.
    """
    out: dict[str, dict[str, float]] = {}
    benign = labels == 0
    for diagnosis in sorted(set(diagnoses[benign])):
        mask = benign & (diagnoses == diagnosis)
        flagged = int((probabilities[mask] >= threshold).sum())
        out[str(diagnosis)] = {
            "n": int(mask.sum()),
            "flagged": flagged,
            "specificity": 1.0 - flagged / int(mask.sum()),
        }
    return out


def expected_calibration_error(
    labels: np.ndarray, probabilities: np.ndarray, weights: np.ndarray | None = None, bins: int = 10
) -> float:
    w = np.ones(len(labels)) if weights is None else weights
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(probabilities, edges) - 1, 0, bins - 1)
    total = w.sum()
    ece = 0.0
    for b in range(bins):
        m = which == b
        if w[m].sum() > 0:
            ece += (
                w[m].sum()
                / total
                * abs(
                    np.average(labels[m], weights=w[m]) - np.average(probabilities[m], weights=w[m])
                )
            )
    return float(ece)
