"""Training and the committed metrics, on the real data (skipped on a clone without it)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from monai_bundle.scripts.data import (
    DIAGNOSES,
    DIAGNOSIS_CLASSES,
    NO_DIAGNOSIS_CLASS,
    load_cases,
    split_by_group,
)
from monai_bundle.scripts.network import FusionNet
from monai_bundle.scripts.training import FusionTrainer, _without_metadata
from monai_bundle.scripts.transforms import load_rgb
from plugin.cli import main
from plugin.domain import Demographics, Source, Sourced
from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.integration
BUNDLE = REPO_ROOT / "monai_bundle"


def _smoke_train(tmp_path: Path, shared_data: Path, name: str) -> dict[str, torch.Tensor]:
    config = tmp_path / "smoke.toml"
    config.write_text(f'[storage]\ndir = "{tmp_path / "var"}"\n')
    out = tmp_path / name
    args = ["--config", str(config), "train", "--data-root", str(shared_data)]
    args += ["--max-images", "48", "--epochs", "2", "--output-dir", str(out)]
    assert main(args) == 0
    metrics = json.loads((out / "validation_metrics.json").read_text())
    assert 0 < metrics["threshold"] < 1
    return torch.load(out / "model.pt", weights_only=True)


def test_smoke_training_is_reproducible_from_its_seed(tmp_path: Path, shared_data: Path) -> None:
    first = _smoke_train(tmp_path, shared_data, "a")
    second = _smoke_train(tmp_path, shared_data, "b")
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    shipped = torch.load(BUNDLE / "models" / "model.pt", weights_only=True)
    assert not torch.equal(first["classifier.4.weight"], shipped["classifier.4.weight"])
    _assert_only_the_top_blocks_moved(first)


def _smoke_trainer(
    tmp_path: Path, shared_data: Path, options: dict[str, Any], **trainer_options: Any
) -> FusionTrainer:
    """The shipped recipe with extra network ``options``, on 48 images for 2 epochs."""
    config = json.loads((BUNDLE / "configs" / "train.json").read_text())
    recipe = config["trainer"]
    return FusionTrainer(
        data_root=str(shared_data),
        cache_dir=str(tmp_path / "cache"),
        output_dir=str(tmp_path / "out"),
        seed=config["seed"],
        val_fraction=recipe["val_fraction"],
        epochs=2,
        batch_size=recipe["batch_size"],
        views=recipe["views"],
        max_images=48,
        network={**config["network_options"], **options},
        calibrate_on=config["calibrate_on"],
        **trainer_options,
    )


def test_metadata_residual_trains_the_image_only_model_first(
    tmp_path: Path, shared_data: Path
) -> None:
    """With ``metadata_residual``, fusion with nothing known is the image-only model, bit for bit.

    The image-only model is what the same recipe trains when every field is always missing.
    """
    # the residual is the other way to "never worse without metadata"; the two exclude each other
    options = {"metadata_residual": True, "image_only_companion": False}
    trainer = _smoke_trainer(tmp_path, shared_data, options)
    report = trainer.run()
    fusion = torch.load(tmp_path / "out" / "model.pt", weights_only=True)
    cases = trainer._subsample(load_cases(shared_data))
    is_val = split_by_group(cases, trainer.val_fraction, trainer.seed)
    blind = _without_metadata(trainer.head_inputs(cases))
    image_only = trainer.fit_fresh_head(blind, ~is_val).state_dict()
    image_path = [k for k in fusion if k.startswith(("backbone.", "image_classifier."))]
    assert all(torch.equal(fusion[k], image_only[k]) for k in image_path)
    # the correction on top did learn something from the metadata
    assert not torch.equal(fusion["classifier.4.weight"], image_only["classifier.4.weight"])
    _assert_only_the_top_blocks_moved(fusion)
    for subset in report["image_only_model"].values():
        assert subset["fusion_no_metadata_minus_image_only_model"]["difference"] == 0.0


def test_the_image_only_companion_is_the_image_only_model_trained_beside_fusion(
    tmp_path: Path, shared_data: Path
) -> None:
    """With ``image_only_companion`` the shipped network holds both models, each exactly as the
    recipe trains it alone; with nothing known it *is* the image-only model (under its own Platt
    scale), so it cannot rank worse than that model without metadata."""
    trainer = _smoke_trainer(tmp_path, shared_data, {"image_only_companion": True})
    report = trainer.run()
    shipped = torch.load(tmp_path / "out" / "model.pt", weights_only=True)
    alone = _smoke_trainer(tmp_path, shared_data, {})
    cases = alone._subsample(load_cases(shared_data))
    is_val = split_by_group(cases, alone.val_fraction, alone.seed)
    inputs = alone.head_inputs(cases)
    fusion = alone.fit_fresh_head(inputs, ~is_val).state_dict()
    image_only = alone.fit_fresh_head(_without_metadata(inputs), ~is_val).state_dict()
    companion = {k.removeprefix("image_only."): v for k, v in shipped.items() if "image_only." in k}
    assert companion and all(torch.equal(v, image_only[k]) for k, v in companion.items())
    own = [k for k in shipped if not k.startswith("image_only") and k != "calibration"]
    assert all(torch.equal(shipped[k], fusion[k]) for k in own)
    assert not torch.equal(fusion["classifier.4.weight"], image_only["classifier.4.weight"])
    _assert_only_the_top_blocks_moved(shipped)
    calibration = report["calibration"]
    assert "skipped" in calibration or (
        calibration["image_only_scale"] != calibration["scale"]
        and torch.equal(
            shipped["image_only_calibration"],
            torch.tensor([calibration["image_only_scale"], calibration["image_only_shift"]]),
        )
    )
    for subset in report["image_only_model"].values():
        assert subset["fusion_no_metadata_minus_image_only_model"]["difference"] == 0.0


def test_diagnosis_head_is_trained_alongside_and_reported(
    tmp_path: Path, shared_data: Path
) -> None:
    """The auxiliary head learns to name diagnoses, and validation says how well it does."""
    # measured on the fusion model alone, as the option was (fresh_network has no companion)
    options = {"diagnosis_classes": len(DIAGNOSIS_CLASSES), "image_only_companion": False}
    trainer = _smoke_trainer(tmp_path, shared_data, options, diagnosis_loss_weight=0.5)
    report = trainer.run()
    cases = trainer._subsample(load_cases(shared_data))
    is_val = split_by_group(cases, trainer.val_fraction, trainer.seed)
    named = cases.frame.diagnosis.isin(DIAGNOSIS_CLASSES).to_numpy()
    head = report["diagnosis_head"]
    assert head["n_named"] == int((named & is_val).sum()) > 0
    assert sum(r["n"] for r in head["recall"].values()) == head["n_named"]
    assert set(head["recall"]) <= set(DIAGNOSIS_CLASSES)

    # on the training images, the trained head's cross-entropy is below the untrained one's
    trained = trainer.fresh_network()
    trained.load_state_dict(torch.load(tmp_path / "out" / "model.pt", weights_only=True))
    inputs = trainer.head_inputs(cases)
    rows = ~is_val & (inputs.diagnoses != NO_DIAGNOSIS_CLASS)
    targets = torch.from_numpy(inputs.diagnoses[rows])

    def train_loss(network: FusionNet) -> float:
        features = torch.from_numpy(trainer._tuned_features(network, inputs, "identity")[rows])
        with torch.inference_mode():
            logits = network.eval().diagnosis_logits(features)
            return float(torch.nn.functional.cross_entropy(logits, targets))

    assert train_loss(trained) < train_loss(trainer.fresh_network())
    _assert_only_the_top_blocks_moved(trained.state_dict())


def _assert_only_the_top_blocks_moved(trained: dict[str, torch.Tensor]) -> None:
    """The recipe fine-tunes blocks from ``fine_tuned_from`` on; below, ImageNet's weights stay."""
    options = json.loads((BUNDLE / "configs" / "train.json").read_text())["network_options"]
    first = options["fine_tuned_from"]
    imagenet = FusionNet(imagenet_init=True, **options).state_dict()
    backbone = [k for k in imagenet if k.startswith("backbone.")]

    def block(key: str) -> int | None:
        parts = key.split(".")
        return int(parts[2]) if parts[1] == "_blocks" else None

    frozen = [k for k in backbone if (b := block(k)) is not None and b < first]
    frozen += [k for k in backbone if k.startswith(("backbone._conv_stem.", "backbone._bn0."))]
    assert all(torch.equal(trained[k], imagenet[k]) for k in frozen)
    tuned = [f"backbone._blocks.{first}._project_conv.weight", "backbone._conv_head.weight"]
    assert all(not torch.equal(trained[k], imagenet[k]) for k in tuned)
    # BatchNorm statistics stay ImageNet's even in the tuned blocks (eval mode while training)
    key = f"backbone._blocks.{first}._bn2.running_mean"
    assert torch.equal(trained[key], imagenet[key])


def test_every_diagnosis_of_the_real_tables_has_a_name_and_agrees_with_the_label(
    shared_data: Path,
) -> None:
    frame = load_cases(shared_data).frame
    assert set(frame.diagnosis) <= set(DIAGNOSES.values())
    assert ((frame.diagnosis == "melanoma") == (frame.label == 1)).all()


def _sourced(value: object) -> Sourced:
    known = value is not None and not (isinstance(value, float) and np.isnan(value))
    return Sourced(value, Source.CSV, "metadata.csv") if known else Sourced.missing()


def test_shipped_weights_reproduce_the_model_card_auc(shared_data: Path, fusion_model) -> None:  # type: ignore[no-untyped-def]
    """Re-score the committed validation split with the shipped weights, as `infer` would."""
    metrics = json.loads((BUNDLE / "models" / "validation_metrics.json").read_text())
    train_config = json.loads((BUNDLE / "configs" / "train.json").read_text())
    cases = load_cases(shared_data)
    is_val = split_by_group(cases, train_config["trainer"]["val_fraction"], metrics["seed"])
    val = cases.frame[is_val]
    assert len(val) == metrics["subsets"]["all"]["with_metadata"]["n"]
    probabilities: list[float] = []
    rows = list(val.itertuples())
    for start in range(0, len(rows), 32):
        batch = rows[start : start + 32]
        findings = fusion_model.score(
            [load_rgb(r.image) for r in batch],
            [Demographics(_sourced(r.age), _sourced(r.sex), _sourced(r.site)) for r in batch],
        )
        probabilities += [f.probability for f in findings]
    auc = roc_auc_score(val.label, probabilities)
    assert auc == pytest.approx(metrics["subsets"]["all"]["with_metadata"]["auc"], abs=1e-3)
    assert f"{auc:.3f}" in (BUNDLE / "docs" / "README.md").read_text()


def test_evaluate_writes_the_report_and_agrees_with_training(
    tmp_path: Path, shared_data: Path
) -> None:
    out = tmp_path / "report"
    assert main(["evaluate", "--data-root", str(shared_data), "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    trained = json.loads((BUNDLE / "models" / "validation_metrics.json").read_text())
    for subset in ("all", "ham10000", "isic2020"):
        assert metrics["subsets"][subset]["fusion"]["auc"] == pytest.approx(
            trained["subsets"][subset]["with_metadata"]["auc"], abs=1e-4
        )
        assert metrics["subsets"][subset]["image_only"]["auc"] == pytest.approx(
            trained["subsets"][subset]["no_metadata"]["auc"], abs=1e-4
        )
        assert 0.5 < metrics["subsets"][subset]["metadata_only"]["auc"] < 0.8
    confusion = json.loads((out / "confusion.json").read_text())["counts"]["all"]
    assert confusion["true_positive"] + confusion["false_negative"] == 200
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
    assert all(d["ham10000"] + d["isic2020"] == d["n"] for d in diagnoses)
    assert (out / "diagnoses.csv").read_text().startswith("diagnosis,n,ham10000,isic2020,flagged")
    committed = (BUNDLE / "docs" / "evaluation" / "report.md").read_text()
    assert (out / "report.md").read_text() == committed
