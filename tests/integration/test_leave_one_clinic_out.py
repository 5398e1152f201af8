"""Leave-one-clinic-out: no fold sees its clinic, and the committed proxy number adds up.

The smoke run computes features for its ~120 images from scratch (CI has no feature cache).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from monai_bundle.scripts.clinics import HAM_CLINICS, clinic_fold, stratified_subset
from monai_bundle.scripts.data import load_cases
from plugin.cli import main
from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.integration
BUNDLE = REPO_ROOT / "monai_bundle"
COMMITTED = BUNDLE / "docs" / "evaluation" / "leave_one_clinic_out.json"
MAX_IMAGES = 120
SMOKE_SEED = 11


def _train_config() -> dict[str, Any]:
    return json.loads((BUNDLE / "configs" / "train.json").read_text())


def test_committed_proxy_is_the_mean_of_its_clinics_for_the_current_recipe() -> None:
    report = json.loads(COMMITTED.read_text())
    assert report["max_images"] is None
    assert list(report["clinics"]) == list(HAM_CLINICS)
    for mode in ("fusion", "image_only", "image_only_model"):
        aucs = [c[mode]["auc"] for c in report["clinics"].values()]
        assert report["pooled"][f"{mode}_auc"] == pytest.approx(np.mean(aucs), abs=1e-12)
    assert report["proxy_auc"] == report["pooled"]["fusion_auc"]
    # the ablation out of clinic: fusion against a model that never had metadata
    ablation = report["ablation"]["fusion_minus_image_only_model"]
    gap = report["pooled"]["fusion_auc"] - report["pooled"]["image_only_model_auc"]
    assert ablation["proxy"]["difference"] == pytest.approx(gap, abs=1e-6)
    # a recipe change in train.json makes the committed numbers stale: rerun the evaluation
    config = _train_config()
    for name, value in report["recipe"].items():
        top_level = name in ("seed", "network_options")  # the trainer refers to these by @
        expected = config[name] if top_level else config["trainer"][name]
        assert value == expected, name
    card = (BUNDLE / "docs" / "README.md").read_text()
    assert f"{report['proxy_auc']:.3f}" in card
    assert f"{report['pooled']['image_only_model_auc']:.3f}" in card
    assert f"{ablation['proxy']['difference']:+.3f}" in card
    assert "## Leave-one-clinic-out (proxy for another hospital)" in card


def test_seed_and_smoke_options_are_refused_without_leave_one_clinic_out(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["evaluate", "--seed", "7"]) == 2
    assert "need --leave-one-clinic-out" in capsys.readouterr().err


def test_smoke_run_never_trains_or_thresholds_on_the_held_out_clinic(
    tmp_path: Path, shared_data: Path
) -> None:
    config = tmp_path / "smoke.toml"
    config.write_text(f'[storage]\ndir = "{tmp_path / "var"}"\n')
    out = tmp_path / "loco"
    args = ["--config", str(config), "evaluate", "--leave-one-clinic-out"]
    args += ["--data-root", str(shared_data), "--out", str(out)]
    args += ["--max-images", str(MAX_IMAGES), "--epochs", "2", "--seed", str(SMOKE_SEED)]
    assert main(args) == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "leave_one_clinic_out.json",
        "leave_one_clinic_out.md",
        "leave_one_clinic_out_scores.csv",
    ]
    report = json.loads((out / "leave_one_clinic_out.json").read_text())
    scores = pd.read_csv(out / "leave_one_clinic_out_scores.csv")
    table = (out / "leave_one_clinic_out.md").read_text()
    assert "Smoke run" in table
    assert "Ablation: fusion against an image-only model" in table
    # the recipe's trainer options (the loss weighting among them) are stated, not just stored
    weighting = _train_config()["trainer"]["clinic_prevalence_weighting"]
    assert f'"clinic_prevalence_weighting": {json.dumps(weighting)}' in table
    assert report["n_cases"] == MAX_IMAGES
    assert report["recipe"]["epochs"] == 2
    assert report["recipe"]["seed"] == SMOKE_SEED != _train_config()["seed"]
    assert list(report["clinics"]) == list(HAM_CLINICS)

    seed = SMOKE_SEED  # the folds below must be the ones this seed draws
    val_fraction = _train_config()["trainer"]["val_fraction"]
    cases = stratified_subset(load_cases(shared_data), MAX_IMAGES, seed)
    frame = cases.frame
    for clinic, entry in report["clinics"].items():
        trained_on = entry["training_cases_by_clinic"]
        assert clinic not in trained_on
        assert trained_on["isic2020"] > 0
        assert sum(trained_on.values()) == entry["n_train"]
        assert entry["n_train"] + entry["n_threshold"] + entry["n"] == MAX_IMAGES
        assert 0 < entry["n_melanoma"] < entry["n"]
        assert 0 < entry["threshold"] <= 1
        by_diagnosis = entry["fusion_specificity_by_diagnosis"]
        assert "melanoma" not in by_diagnosis
        benign = int((frame.clinic == clinic).sum()) - entry["n_melanoma"]
        assert sum(d["n"] for d in by_diagnosis.values()) == benign
        for mode in ("fusion", "image_only"):
            m = entry[mode]
            assert 0 <= m["auc_low"] <= m["auc"] <= m["auc_high"] <= 1
            assert 0 <= m["sensitivity"] <= 1 and 0 <= m["specificity"] <= 1
        # the masks themselves: what the run used, recomputed from the same function
        is_train, is_threshold = clinic_fold(cases, clinic, val_fraction, seed)
        held_out = (frame.clinic == clinic).to_numpy()
        assert not (is_train & held_out).any() and not (is_threshold & held_out).any()
        assert not (is_train & is_threshold).any()
        assert (is_train | is_threshold | held_out).all()
        assert int(is_train.sum()) == entry["n_train"]
        assert not set(frame.group[is_train]) & set(frame.group[is_threshold])
        # the per-case scores are the ones the fold's numbers were computed from
        fold = scores[scores.held_out_clinic == clinic]
        on_clinic = fold[fold.role == "held_out"]
        assert len(on_clinic) == entry["n"] and on_clinic.label.sum() == entry["n_melanoma"]
        assert (fold.role == "threshold").sum() == entry["n_threshold"]
        assert set(on_clinic.image) == {Path(p).stem for p in frame.image[held_out]}
        for mode in ("fusion", "image_only", "image_only_model"):
            auc = roc_auc_score(on_clinic.label, on_clinic[f"{mode}_logit"])
            assert auc == pytest.approx(entry[mode]["auc"], abs=1e-3)
        if report["recipe"]["network_options"].get("image_only_companion"):
            # the image-only model is the network's companion: with nothing known the network's
            # logit is that model's, and with metadata it is a mean that differs from it
            assert np.allclose(on_clinic.image_only_logit, on_clinic.image_only_model_logit)
            assert not np.allclose(on_clinic.fusion_logit, on_clinic.image_only_model_logit)
        else:
            # the image-only model is a model of its own, not fusion with metadata withheld
            assert not np.allclose(on_clinic.image_only_logit, on_clinic.image_only_model_logit)
        gap = report["ablation"]["fusion_minus_image_only_model"]["clinics"][clinic]
        assert gap["difference"] == pytest.approx(
            entry["fusion"]["auc"] - entry["image_only_model"]["auc"], abs=1e-3
        )
        assert gap["low"] <= gap["difference"] <= gap["high"]
    pooled = [c["fusion"]["auc"] for c in report["clinics"].values()]
    assert report["proxy_auc"] == pytest.approx(np.mean(pooled), abs=1e-12)
