"""Whole-network training and the committed metrics, on the real data (skipped without it)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import roc_auc_score

from monai_bundle.scripts.network import FusionEnsemble, FusionNet
from monai_bundle.scripts.transforms import load_rgb
from plugin.cli import main
from plugin.domain import Demographics, Source, Sourced
from tests.conftest import REPO_ROOT
from training.data import DIAGNOSES, load_cases

pytestmark = pytest.mark.integration
BUNDLE = REPO_ROOT / "monai_bundle"


def _smoke_train(
    tmp_path: Path, shared_data: Path, name: str, further_member_seeds: list[int] | None = None
) -> Path:
    config = tmp_path / "smoke.toml"
    config.write_text(f'[storage]\ndir = "{tmp_path / "var"}"\n')
    out = tmp_path / name
    args = ["--config", str(config), "train", "--data-root", str(shared_data), "--device", "cpu"]
    args += ["--max-images", "48", "--max-steps", "3", "--output-dir", str(out)]
    args += ["--set", f"further_member_seeds={json.dumps(further_member_seeds or [])}"]
    assert main(args) == 0
    return out


def test_smoke_training_trains_every_block_and_is_reproducible_from_its_seed(
    tmp_path: Path, shared_data: Path
) -> None:
    first_dir = _smoke_train(tmp_path, shared_data, "a")
    first = torch.load(first_dir / "model.pt", weights_only=True)
    second = torch.load(_smoke_train(tmp_path, shared_data, "b") / "model.pt", weights_only=True)
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    # the whole network learns: the stem and the first block moved away from ImageNet's weights
    imagenet = FusionNet(imagenet_init=True).state_dict()
    for name in ("backbone._conv_stem.weight", "backbone._blocks.0._depthwise_conv.weight"):
        assert not torch.equal(first[name], imagenet[name]), name
    shipped = torch.load(BUNDLE / "models" / "model.pt", weights_only=True)
    heads = [v for k, v in shipped.items() if k.endswith("classifier.4.weight")]  # per member
    assert heads and not any(torch.equal(first["classifier.4.weight"], h) for h in heads)
    # what a run leaves: a checkpoint per epoch, the per-epoch log, the recipe and the device
    assert (first_dir / "checkpoints" / "epoch-01.pt").is_file()
    log = [
        json.loads(line)
        for line in (first_dir / "training_log.jsonl").read_text().split("\n")
        if line
    ]
    # 38 training rows in batches of 32: two steps in epoch 1, the third (the last) in epoch 2
    assert [entry["step"] for entry in log] == [2, 3]
    assert all(
        {"all", "ham10000", "isic2020"} <= set(e["validation_auc_identity_view"]) for e in log
    )
    assert (first_dir / "checkpoints" / "epoch-02.pt").is_file()
    metrics = json.loads((first_dir / "validation_metrics.json").read_text())
    assert metrics["device"] == "cpu" and metrics["recipe"]["include_archive"] is True
    assert 0 < metrics["threshold"] < 1


def test_an_ensemble_trains_its_members_on_one_split_and_reuses_them(
    tmp_path: Path, shared_data: Path, caplog: pytest.LogCaptureFixture
) -> None:
    out = _smoke_train(tmp_path, shared_data, "ensemble", further_member_seeds=[7])
    first, second = (out / "members" / name for name in ("seed-20261130", "seed-7"))
    reports = [json.loads((m / "validation_metrics.json").read_text()) for m in (first, second)]
    # the same validation rows, different training draws
    assert reports[0]["n_validation"] == reports[1]["n_validation"]
    assert [r["recipe"]["split_seed"] for r in reports] == [20261130, 20261130]
    weights = [torch.load(m / "model.pt", weights_only=True) for m in (first, second)]
    assert not torch.equal(weights[0]["classifier.4.weight"], weights[1]["classifier.4.weight"])
    ensemble = FusionEnsemble(2, test_time_views=["identity", "hflip", "vflip", "rot90"])
    ensemble.load_state_dict(torch.load(out / "model.pt", weights_only=True))
    for member, trained in zip(ensemble.members, weights, strict=True):
        assert all(torch.equal(member.state_dict()[k], trained[k]) for k in trained)
    metrics = json.loads((out / "validation_metrics.json").read_text())
    assert metrics["recipe"]["further_member_seeds"] == [7]
    assert [m["recipe"]["seed"] for m in metrics["members"]] == [20261130, 7]
    assert metrics["calibration"]["scale"] == pytest.approx(float(ensemble.calibration[0]))
    assert metrics["n_validation"] == reports[0]["n_validation"]
    # a second run reuses both members (no training) and assembles the same ensemble
    before = [(m / "model.pt").stat().st_mtime_ns for m in (first, second)]
    with caplog.at_level("INFO", logger="training.whole_network"):
        _smoke_train(tmp_path, shared_data, "ensemble", further_member_seeds=[7])
    assert [(m / "model.pt").stat().st_mtime_ns for m in (first, second)] == before
    assert sum("trained before, reusing" in r.getMessage() for r in caplog.records) == 2
    again = torch.load(out / "model.pt", weights_only=True)
    assert all(torch.equal(again[k], v) for k, v in ensemble.state_dict().items())


def test_every_diagnosis_of_the_real_tables_has_a_name_and_agrees_with_the_label(
    shared_data: Path,
) -> None:
    frame = load_cases(shared_data).frame
    assert set(frame.diagnosis) <= set(DIAGNOSES.values())
    assert ((frame.diagnosis == "melanoma") == (frame.label == 1)).all()
    assert set(frame.source) == {"ham10000", "isic2020", "isic_archive"}
    assert frame.image_name.is_unique


def _sourced(value: object) -> Sourced:
    known = value is not None and not (isinstance(value, float) and np.isnan(value))
    return Sourced(value, Source.CSV, "metadata.csv") if known else Sourced.missing()


@pytest.fixture(scope="module")
def evaluation(tmp_path_factory: pytest.TempPathFactory, shared_data: Path) -> Path:
    """`dermfusion evaluate` once: the shipped networks over the whole validation split take
    minutes, and both tests below read its folder."""
    out = tmp_path_factory.mktemp("evaluation") / "report"
    assert main(["evaluate", "--data-root", str(shared_data), "--out", str(out)]) == 0
    return out


# Cases per source and class scored through the served path (the whole split would take
# minutes more; the evaluation's per-case probabilities stand for the rest).
SERVED_CASES_PER_GROUP = 16


def test_the_served_path_reproduces_the_model_card_case_by_case(  # type: ignore[no-untyped-def]
    evaluation: Path, shared_data: Path, fusion_model
) -> None:
    """The card's AUC is the evaluation's per-case probabilities; the plugin, scoring as `infer`
    would (the service's runtime, transforms from the source file), gives those same
    probabilities and decisions for cases of every source and class, with metadata and without."""
    metrics = json.loads((BUNDLE / "models" / "validation_metrics.json").read_text())
    predictions = pd.read_csv(evaluation / "predictions.csv")
    assert len(predictions) == metrics["subsets"]["all"]["with_metadata"]["n"]
    auc = roc_auc_score(predictions.melanoma, predictions.melanoma_probability)
    assert auc == pytest.approx(metrics["subsets"]["all"]["with_metadata"]["auc"], abs=1e-4)
    assert f"{auc:.3f}" in (BUNDLE / "docs" / "README.md").read_text()

    drawn = predictions.groupby(["source", "melanoma"]).sample(
        n=SERVED_CASES_PER_GROUP, random_state=0
    )
    assert drawn.source.nunique() == 3 and drawn.melanoma.nunique() == 2
    cases = load_cases(shared_data, metrics["recipe"]["include_archive"]).frame
    rows = list(cases.set_index("image_name").loc[drawn.image_name].itertuples())
    images = [load_rgb(r.image) for r in rows]
    given = fusion_model.score(
        images, [Demographics(_sourced(r.age), _sourced(r.sex), _sourced(r.site)) for r in rows]
    )
    np.testing.assert_allclose(
        [f.probability for f in given], drawn.melanoma_probability, rtol=1e-5, atol=1e-8
    )
    assert [int(f.melanoma_suspected) for f in given] == drawn.melanoma_suspected.tolist()
    withheld = fusion_model.score(images, [Demographics.unknown()] * len(images))
    np.testing.assert_allclose(
        [f.probability for f in withheld], drawn.probability_without_metadata, rtol=1e-5, atol=1e-8
    )


def test_evaluate_writes_the_report_and_agrees_with_training(evaluation: Path) -> None:
    out = evaluation
    metrics = json.loads((out / "metrics.json").read_text())
    trained = json.loads((BUNDLE / "models" / "validation_metrics.json").read_text())
    for subset in ("all", "ham10000", "isic2020", "isic_archive"):
        assert metrics["subsets"][subset]["fusion"]["auc"] == pytest.approx(
            trained["subsets"][subset]["with_metadata"]["auc"], abs=1e-4
        )
        assert metrics["subsets"][subset]["image_only"]["auc"] == pytest.approx(
            trained["subsets"][subset]["no_metadata"]["auc"], abs=1e-4
        )
    assert 0.5 < metrics["subsets"]["isic2020"]["metadata_only"]["auc"] < 0.8
    confusion = json.loads((out / "confusion.json").read_text())["counts"]["all"]
    assert (
        confusion["true_positive"] + confusion["false_negative"]
        == trained["subsets"]["all"]["with_metadata"]["n_melanoma"]
    )
    assert sum(confusion.values()) == trained["subsets"]["all"]["with_metadata"]["n"]
    for png in ("roc.png", "reliability.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    subgroups = (out / "subgroups.csv").read_text().splitlines()
    assert subgroups[0].startswith("variable,value,n,n_melanoma,auc")
    assert any(line.startswith("sex,female,") for line in subgroups)
    # every benign validation case is in exactly one diagnosis row, and the flagged ones are the
    # confusion matrix's false positives
    diagnoses = metrics["diagnoses"]
    assert "melanoma" not in {d["diagnosis"] for d in diagnoses}
    benign = confusion["true_negative"] + confusion["false_positive"]
    assert sum(d["n"] for d in diagnoses) == benign
    assert sum(d["flagged"] for d in diagnoses) == confusion["false_positive"]
    assert all(d["ham10000"] + d["isic2020"] + d["isic_archive"] == d["n"] for d in diagnoses)
    # the per-case file holds the same decisions and both metadata modes
    predictions = pd.read_csv(out / "predictions.csv")
    flagged = predictions.melanoma_suspected == 1
    assert (predictions.melanoma[flagged] == 0).sum() == confusion["false_positive"]
    assert (predictions.melanoma[~flagged] == 1).sum() == confusion["false_negative"]
    assert roc_auc_score(
        predictions.melanoma, predictions.probability_without_metadata
    ) == pytest.approx(trained["subsets"]["all"]["no_metadata"]["auc"], abs=1e-4)
    committed = (BUNDLE / "docs" / "evaluation" / "report.md").read_text()
    assert (out / "report.md").read_text() == committed


def test_a_leave_one_clinic_out_fold_never_trains_on_its_clinic(
    tmp_path: Path, shared_data: Path
) -> None:
    """A smoke fold: two epochs of the shipped recipe with one clinic held out."""
    from training.leave_one_clinic_out import fold_summary, run_fold

    report = run_fold("rosendahl", 2, tmp_path, str(shared_data), max_images=48, max_steps=3)
    assert report["held_out_clinic"] == "rosendahl"
    assert set(report["subsets"]) == {"all", "ham10000"}  # the validation set: one clinic
    summary = fold_summary(report)
    assert summary["n"] == report["n_validation"] > 0
    assert summary["device"] == "cpu" and summary["epochs"] == 2
    assert summary["n"] + report["n_train"] == 48  # the smoke draw: 8 per source and class
    log = [
        json.loads(line)
        for line in (tmp_path / "rosendahl" / "training_log.jsonl").read_text().split("\n")
        if line
    ]
    assert [(e["epoch"], e["image_size"]) for e in log] == [(1, 224), (2, 224)]


def test_a_smoke_run_too_small_for_a_validation_split_says_so(
    tmp_path: Path, shared_data: Path
) -> None:
    from training.whole_network import Recipe, WholeNetworkTrainer

    trainer = WholeNetworkTrainer(Recipe(), str(shared_data), str(tmp_path), max_images=8)
    with pytest.raises(ValueError, match="no validation split: a smoke run needs --max-images 48"):
        trainer.run()
    assert not (tmp_path / "model.pt").exists()
