"""Offline leave-one-clinic-out judgements: they must agree with the run that wrote the scores."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from monai_bundle.scripts.loco_scores import ensemble, per_clinic, read_scores, stacked
from tests.conftest import REPO_ROOT

EVALUATION = REPO_ROOT / "monai_bundle" / "docs" / "evaluation"


def test_scores_reproduce_the_committed_leave_one_clinic_out_report() -> None:
    """Ensembles and stacked features are judged offline on these: they must not go stale."""
    report = json.loads((EVALUATION / "leave_one_clinic_out.json").read_text())
    scores = read_scores(EVALUATION)
    assert list(scores.held_out_clinic.unique()) == list(report["clinics"])
    judged = per_clinic(scores, report["recipe"]["sensitivity_target"])
    for clinic, entry in report["clinics"].items():
        fold = scores[scores.held_out_clinic == clinic]
        on_clinic = fold[fold.role == "held_out"]
        assert len(on_clinic) == entry["n"] and on_clinic.label.sum() == entry["n_melanoma"]
        assert (fold.role == "threshold").sum() == entry["n_threshold"]
        mine = judged["clinics"][clinic]
        for mode in ("fusion", "image_only"):
            assert mine[f"{mode}_auc"] == pytest.approx(entry[mode]["auc"], abs=1e-6)
        assert mine["fusion_sensitivity"] == pytest.approx(entry["fusion"]["sensitivity"])
        assert mine["fusion_specificity"] == pytest.approx(entry["fusion"]["specificity"])
    assert judged["mean"]["fusion_auc"] == pytest.approx(report["proxy_auc"], abs=1e-6)


def _synthetic(seed: int, n: int = 400) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    label = rng.random(n) < 0.3
    clinic = np.repeat(["a", "b"], n // 2)
    role = np.tile(np.repeat(["held_out", "threshold"], n // 4), 2)
    signal = label + rng.normal(0, 1.5, n)
    return pd.DataFrame(
        {
            "held_out_clinic": clinic,
            "role": role,
            "image": [f"img{i}" for i in range(n)],
            "label": label.astype(int),
            "fusion_logit": signal,
            "image_only_logit": signal + rng.normal(0, 0.5, n),
        }
    )


def test_an_ensemble_of_one_run_is_that_run_whatever_the_row_order() -> None:
    run = _synthetic(0)
    shuffled = run.sample(frac=1.0, random_state=1)
    assert per_clinic(ensemble([run, shuffled])) == per_clinic(run)


def test_an_ensemble_thresholds_on_cases_no_member_trained_on() -> None:
    run = _synthetic(0)
    other = run.copy()
    other["fusion_logit"] = other.fusion_logit[::-1].to_numpy()
    trained_on_by_other = other.index[other.role == "threshold"][:3]
    combined = ensemble([run, other.drop(index=trained_on_by_other)])
    assert (combined.role == "threshold").sum() == (run.role == "threshold").sum() - 3
    assert not set(run.image[trained_on_by_other]) & set(combined.image)
    mean = (run.fusion_logit + other.fusion_logit) / 2
    kept = combined.set_index("image").fusion_logit
    assert np.allclose(kept, mean.set_axis(run.image)[kept.index])
    with pytest.raises(ValueError, match="held out different cases"):
        ensemble([run, run.drop(index=run.index[run.role == "held_out"][:1])])


def test_a_feature_that_carries_the_label_is_stacked_on_and_raises_the_auc() -> None:
    run = _synthetic(0)
    rng = np.random.default_rng(5)
    informative = pd.Series(
        (run.label + rng.normal(0, 1.0, len(run))).to_numpy(), index=run.image.to_numpy(), name="x"
    )
    result = stacked(run, informative)
    assert result["mean_stacked_auc"] > result["mean_logit_auc"] + 0.02
    noise = pd.Series(rng.normal(0, 1.0, len(run)), index=run.image.to_numpy(), name="x")
    assert stacked(run, noise)["mean_stacked_auc"] < result["mean_stacked_auc"]
    with pytest.raises(ValueError, match="have no x"):
        stacked(run, informative.iloc[:-1])
