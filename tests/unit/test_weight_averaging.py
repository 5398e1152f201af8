"""Stochastic weight averaging: the trained parameters end as the mean of the tail's steps."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from monai_bundle.scripts.data import NO_DIAGNOSIS_CLASS
from monai_bundle.scripts.metadata import METADATA_WIDTH
from monai_bundle.scripts.network import FusionNet
from monai_bundle.scripts.training import FusionTrainer

ROWS, BATCH, WIDTH = 24, 8, 1280


def _trainer(epochs: int, averaged: int) -> FusionTrainer:
    return FusionTrainer(
        data_root="unused",
        cache_dir="unused",
        output_dir="unused",
        seed=5,
        epochs=epochs,
        batch_size=BATCH,
        weight_averaging_epochs=averaged,
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
            yield features[rows], metadata[rows], labels[rows], diagnoses[rows]
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
        yield features, metadata, labels, diagnoses
        seen.append([p.detach().clone() for p in head])

    trainer._optimise(network, [(head, 1e-2)], epoch, BATCH, "test", [network.backbone])
    assert all(torch.equal(p, w) for p, w in zip(head, seen[-1], strict=True))


@pytest.mark.parametrize("averaged", [-1, 4])
def test_averaging_more_epochs_than_trained_is_refused(averaged: int) -> None:
    with pytest.raises(ValueError, match="weight_averaging_epochs"):
        _trainer(3, averaged)
