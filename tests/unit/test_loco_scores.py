"""Offline leave-one-clinic-out judgements: they must agree with the run that wrote the scores."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from monai_bundle.scripts.loco_scores import (
    blend,
    ensemble,
    paired_difference,
    per_clinic,
    read_scores,
    stacked,
)
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
    # the ablation's intervals too, from the scores alone, under the run's bootstrap seed
    ablation = paired_difference(
        scores, "fusion", scores, "image_only_model", seed=report["recipe"]["seed"]
    )
    committed = report["ablation"]["fusion_minus_image_only_model"]
    assert ablation["proxy"] == pytest.approx(committed["proxy"], abs=1e-6)
    for clinic, entry in committed["clinics"].items():
        assert ablation["clinics"][clinic] == pytest.approx(entry, abs=1e-6)


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


def test_a_run_compared_with_itself_differs_by_nothing_on_every_replicate() -> None:
    run = _synthetic(3)
    result = paired_difference(run, "fusion", run.sample(frac=1.0, random_state=2), "fusion")
    for entry in [*result["clinics"].values(), result["proxy"]]:
        assert (entry["difference"], entry["low"], entry["high"]) == (0.0, 0.0, 0.0)
        assert entry["share_positive"] == 0.0


def test_paired_difference_is_the_per_clinic_auc_gap_and_finds_a_real_one() -> None:
    rng = np.random.default_rng(5)
    run = _synthetic(4)
    run = run.assign(fusion_logit=3.0 * run.label + rng.normal(0, 1, len(run)))  # AUC about 0.98
    blind = run.assign(image_only_logit=rng.normal(0, 1, len(run)))  # knows nothing
    result = paired_difference(run, "fusion", blind, "image_only", n_boot=300)
    judged_a, judged_b = per_clinic(run)["clinics"], per_clinic(blind)["clinics"]
    for clinic, entry in result["clinics"].items():
        gap = judged_a[clinic]["fusion_auc"] - judged_b[clinic]["image_only_auc"]
        assert entry["difference"] == pytest.approx(gap)
        assert 0.0 < entry["low"] < entry["difference"] < entry["high"]
    assert result["proxy"]["difference"] == pytest.approx(
        np.mean([e["difference"] for e in result["clinics"].values()])
    )
    assert result["proxy"]["low"] > 0.0 and result["proxy"]["share_positive"] == 1.0
    swapped = paired_difference(blind, "image_only", run, "fusion", n_boot=300)
    assert swapped["proxy"]["difference"] == pytest.approx(-result["proxy"]["difference"])
    assert swapped["proxy"]["high"] < 0.0


def test_runs_that_held_out_different_cases_are_refused() -> None:
    run = _synthetic(6)
    fewer = run.drop(index=run.index[run.role == "held_out"][:3])
    with pytest.raises(ValueError, match="different cases"):
        paired_difference(run, "fusion", fewer, "fusion")
    relabelled = run.assign(label=np.where(run.role == "held_out", 1 - run.label, run.label))
    with pytest.raises(ValueError, match="label"):
        paired_difference(run, "fusion", relabelled, "fusion")
    with pytest.raises(ValueError, match="no image_only_model scores"):
        paired_difference(run, "fusion", run, "image_only_model")


def test_blend_of_the_committed_run_at_equal_weights_is_the_shipped_fusion() -> None:
    """The companion's mean is undone exactly: weight 1/2 gives back the run's fusion AUCs,
    weight 0 the image-only model's."""
    report = json.loads((EVALUATION / "leave_one_clinic_out.json").read_text())
    assert report["recipe"]["network_options"]["image_only_companion"]
    result = blend(read_scores(EVALUATION), True, np.array([0.0, 0.5, 1.0]))
    assert result["proxy_by_weight"][1] == pytest.approx(report["proxy_auc"], abs=1e-6)
    for clinic, entry in report["clinics"].items():
        mine = result["clinics"][clinic]
        assert mine["held_out_auc"][1] == pytest.approx(entry["fusion"]["auc"], abs=1e-6)
        assert mine["held_out_auc"][0] == pytest.approx(entry["image_only_model"]["auc"], abs=1e-6)


def test_blend_chooses_on_threshold_rows_the_model_that_knows_the_label() -> None:
    rng = np.random.default_rng(8)
    run = _synthetic(7)
    fusion_model = 3.0 * run.label + rng.normal(0, 1, len(run))
    blind = rng.normal(0, 1, len(run))
    # as a companion run writes it: the mean of the two, and the image-only model's own column
    companion_run = run.assign(
        fusion_logit=(fusion_model + blind) / 2, image_only_model_logit=blind
    )
    result = blend(companion_run, True, np.linspace(0.0, 1.0, 5))
    for clinic, fold in companion_run.groupby("held_out_clinic"):
        held = fold.role == "held_out"
        mine = result["clinics"][clinic]
        assert mine["chosen_weight"] > 0.5
        assert mine["held_out_auc"][-1] == pytest.approx(
            roc_auc_score(fold.label[held], fusion_model[fold.index[held]])
        )
        assert mine["held_out_auc"][0] < 0.65 < 0.9 < mine["chosen_auc"]
    # without the companion the fusion column is the fusion model itself
    plain = run.assign(fusion_logit=fusion_model, image_only_model_logit=blind)
    assert blend(plain, False, np.linspace(0.0, 1.0, 5)) == result
    with pytest.raises(ValueError, match="no image_only_model"):
        blend(run, False, np.array([0.5]))
