"""Training augmentations: reproducible from a seed, and they change what they claim to."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from monai_bundle.scripts.transforms import IMAGENET_MEAN, IMAGENET_STD, load_rgb, preprocess_rgb
from tests.conftest import REPO_ROOT
from training.images import Augmenter, decoded_images, normalised, with_hair, with_ruler


def _uint8_samples() -> torch.Tensor:
    paths = sorted((REPO_ROOT / "tests" / "data").glob("*.jpg"))[:2]
    rgb = [preprocess_rgb(load_rgb(p)) for p in paths]
    mean = torch.from_numpy(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.from_numpy(IMAGENET_STD).view(3, 1, 1)
    return torch.stack([((x * std + mean) * 255).round().to(torch.uint8) for x in rgb])


def _rgb(image: torch.Tensor) -> np.ndarray:
    return image.numpy().transpose(1, 2, 0) * IMAGENET_STD + IMAGENET_MEAN


def test_augmented_batches_repeat_under_the_same_seed_and_differ_under_another() -> None:
    batch = _uint8_samples()
    first = Augmenter()(batch, torch.Generator().manual_seed(1))
    again = Augmenter()(batch, torch.Generator().manual_seed(1))
    other = Augmenter()(batch, torch.Generator().manual_seed(2))
    assert first.shape == (2, 3, 224, 224) and first.dtype == torch.float32
    assert torch.equal(first, again)
    assert not torch.allclose(first, other)
    assert not torch.allclose(first, normalised(batch))  # it did change the images


def test_no_op_augmenter_returns_the_normalised_batch() -> None:
    """With every random part switched off, only flips and turns remain: pixel sums survive."""
    batch = _uint8_samples()
    quiet = Augmenter(
        crop_scale=(1.0, 1.0),
        crop_ratio=(1.0, 1.0),
        max_rotation_degrees=0.0,
        jitter=0.0,
        p_hair=0.0,
        p_ruler=0.0,
    )
    out = quiet(batch, torch.Generator().manual_seed(3))
    torch.testing.assert_close(
        out.sum(dim=(2, 3)), normalised(batch).sum(dim=(2, 3)), atol=0.5, rtol=1e-3
    )


@pytest.mark.parametrize("draw", [with_hair, with_ruler])
def test_artefacts_are_reproducible_and_leave_most_of_the_lesion(draw) -> None:  # type: ignore[no-untyped-def]
    batch = normalised(_uint8_samples())
    first, again = draw(batch), draw(batch.clone())
    assert torch.equal(first, again)
    changed = (first - batch).abs().amax(dim=1) > 0.05  # per pixel, any channel
    share = changed.float().mean(dim=(1, 2))
    assert ((share > 0.002) & (share < 0.6)).all(), share
    assert changed[:, 80:144, 80:144].float().mean() < 0.3  # the centre stays mostly as it was


def test_hair_strands_are_darker_than_the_skin_they_cross() -> None:
    batch = normalised(_uint8_samples())
    before, after = _rgb(batch[0]), _rgb(with_hair(batch)[0])
    changed = np.abs(after - before).max(axis=2) > 0.05
    assert (after[changed].mean(axis=1) < before[changed].mean(axis=1)).mean() > 0.95


def test_images_decoded_in_several_processes_are_those_decoded_in_one(tmp_path: Path) -> None:
    paths = [str(p) for p in sorted((REPO_ROOT / "tests" / "data").glob("ISIC_*.jpg"))] * 3
    one = decoded_images(paths, 64, None)
    several = decoded_images(paths, 64, tmp_path, workers=2)
    assert one.shape == (len(paths), 3, 64, 64) and torch.equal(one, several)
    assert len(list(tmp_path.glob("images-64-*.npy"))) == 1  # the cache the trainers read
    assert torch.equal(decoded_images(paths, 64, tmp_path), one)
