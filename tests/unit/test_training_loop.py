"""The training loop: weight averaging of the tail and per-row loss weights by clinic."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pandas as pd
import pytest
import torch

from monai_bundle.scripts.data import NO_DIAGNOSIS_CLASS
from monai_bundle.scripts.metadata import METADATA_WIDTH, encode_metadata, encode_missing
from monai_bundle.scripts.network import FusionNet
from monai_bundle.scripts.training import FusionTrainer, clinic_prevalence_weights

ROWS, BATCH, WIDTH = 24, 8, 1280


def _trainer(epochs: int, averaged: int, **options: float) -> FusionTrainer:
    return FusionTrainer(
        data_root="unused",
        cache_dir="unused",
        output_dir="unused",
        seed=5,
        epochs=epochs,
        batch_size=BATCH,
        weight_averaging_epochs=averaged,
        **options,  # type: ignore[arg-type]
    )


def test_the_trained_weights_are_the_mean_over_every_step_of_the_last_epochs() -> None:
    epochs, averaged = 3, 2
    trainer = _trainer(epochs, averaged)
    network = FusionNet()
    head = [*network.metadata_branch.parameters(), *network.classifier.parameters()]
    frozen = [p.detach().clone() for p in network.backbone.parameters()]
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(ROWS, WIDTH, generator=generator)
    metadata = torch.randn(ROWS, METADATA_WIDTH, generator=generator)
    labels = (torch.arange(ROWS) % 3 == 0).float()
    diagnoses = torch.full((ROWS,), NO_DIAGNOSIS_CLASS)
    trajectory: list[tuple[int, list[torch.Tensor]]] = []
    epoch_index = -1

    def epoch(_: torch.Generator) -> Iterator[tuple[torch.Tensor, ...]]:
        # the loop resumes this generator after each optimiser step: record where it got to
        nonlocal epoch_index
        epoch_index += 1
        for start in range(0, ROWS, BATCH):
            rows = slice(start, start + BATCH)
            yield features[rows], metadata[rows], labels[rows], diagnoses[rows], None
            trajectory.append((epoch_index, [p.detach().clone() for p in head]))

    trainer._optimise(network, [(head, 1e-2)], epoch, ROWS, "test", [network.backbone])

    tail = [weights for index, weights in trajectory if index >= epochs - averaged]
    assert len(trajectory) == epochs * ROWS // BATCH and len(tail) == averaged * ROWS // BATCH
    for k, parameter in enumerate(head):
        expected = torch.stack([weights[k] for weights in tail]).mean(dim=0)
        torch.testing.assert_close(parameter.detach(), expected)
    last = trajectory[-1][1]
    assert any(not torch.allclose(p, w) for p, w in zip(head, last, strict=True))
    backbone = network.backbone.parameters()
    assert all(torch.equal(p, f) for p, f in zip(backbone, frozen, strict=True))


def test_without_averaging_the_last_step_is_kept() -> None:
    trainer = _trainer(2, 0)
    network = FusionNet()
    head = list(network.classifier.parameters())
    features, metadata = torch.randn(BATCH, WIDTH), torch.randn(BATCH, METADATA_WIDTH)
    labels = torch.tensor([0.0, 1.0] * (BATCH // 2))
    diagnoses = torch.full((BATCH,), NO_DIAGNOSIS_CLASS)
    seen: list[list[torch.Tensor]] = []

    def epoch(_: torch.Generator) -> Iterator[tuple[torch.Tensor, ...]]:
        yield features, metadata, labels, diagnoses, None
        seen.append([p.detach().clone() for p in head])

    trainer._optimise(network, [(head, 1e-2)], epoch, BATCH, "test", [network.backbone])
    assert all(torch.equal(p, w) for p, w in zip(head, seen[-1], strict=True))


@pytest.mark.parametrize("averaged", [-1, 4])
def test_averaging_more_epochs_than_trained_is_refused(averaged: int) -> None:
    with pytest.raises(ValueError, match="weight_averaging_epochs"):
        _trainer(3, averaged)


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


def test_a_row_of_weight_zero_teaches_nothing() -> None:
    features, metadata = torch.randn(BATCH, WIDTH), torch.randn(BATCH, METADATA_WIDTH)
    labels = torch.tensor([0.0, 1.0] * (BATCH // 2))
    diagnoses = torch.full((BATCH,), NO_DIAGNOSIS_CLASS)
    kept = torch.arange(BATCH) < BATCH // 2
    trained = []
    for weights in (kept.float(), None):
        torch.manual_seed(0)
        network = FusionNet(dropout=0.0)
        head = list(network.classifier.parameters())
        rows = slice(None) if weights is not None else kept

        def epoch(
            _: torch.Generator, rows: object = rows, weights: torch.Tensor | None = weights
        ) -> Iterator[tuple[torch.Tensor | None, ...]]:
            yield features[rows], metadata[rows], labels[rows], diagnoses[rows], weights

        trainer = _trainer(2, 0, p_field_drop=0.0, p_all_drop=0.0)
        trainer._optimise(network, [(head, 1e-2)], epoch, BATCH, "test", [network.backbone])
        trained.append([p.detach().clone() for p in head])
    weighted, unweighted = trained
    for a, b in zip(weighted, unweighted, strict=True):
        torch.testing.assert_close(a, b)


def test_a_companion_calibration_without_known_fields_is_skipped_not_a_crash() -> None:
    """With the companion each case kind gets its own Platt fit; validation cases that all
    lack metadata leave the known-field fit without data, which must read as too few cases."""
    options = {"calibrated": True, "feature_taps": [15], "fine_tuned_from": 14}
    trainer = FusionTrainer(
        data_root="unused",
        cache_dir="unused",
        output_dir="unused",
        seed=5,
        calibrate_on="all",
        network={**options, "image_only_companion": True},
    )
    torch.manual_seed(0)
    network = FusionNet(**options, image_only_companion=True).eval()  # type: ignore[arg-type]
    rows = 40
    rng = np.random.default_rng(0)
    labels = np.arange(rows) % 2
    width = 2 * network.image_feature_width  # the fusion model's features, then the companion's
    features = (rng.normal(size=(rows, width)) + labels[:, None]).astype(np.float32)
    frame = pd.DataFrame(
        {"source": "ham10000", "label": labels, "group": [f"lesion{i}" for i in range(rows)]}
    )
    is_val = np.ones(rows, bool)
    known = np.stack([encode_metadata(60.0, "female", "torso")] * rows)
    fitted = trainer._calibrate(network, features, known, frame, is_val)
    assert fitted is not None and "image_only_scale" in fitted
    missing = encode_missing(rows)
    assert trainer._calibrate(network, features, missing, frame, is_val) == {
        "population": "all",
        "skipped": "too few validation cases",
    }
