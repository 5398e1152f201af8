"""Grad-CAM saliency on the shipped weights: shape, determinism, no state leak, plausibility."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from monai_bundle.scripts.lesion import measure_lesion
from monai_bundle.scripts.metadata import encode_metadata
from monai_bundle.scripts.network import field_of_view_mask
from monai_bundle.scripts.saliency import jet_colours, overlay_png, saliency_map
from monai_bundle.scripts.transforms import IMAGE_SIZE, load_rgb, preprocess_rgb
from tests.conftest import SAMPLES

SAMPLE = SAMPLES / "ISIC_0337631.jpg"  # SIIM-ISIC 2020 melanoma; samples.csv: female, 55, torso


@pytest.fixture(scope="module")
def rgb() -> np.ndarray:
    return load_rgb(SAMPLE)


@pytest.fixture(scope="module")
def inputs(rgb: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    return preprocess_rgb(rgb), torch.from_numpy(encode_metadata(55.0, "female", "torso"))


@pytest.fixture(scope="module")
def saliency(fusion_model, inputs) -> np.ndarray:  # type: ignore[no-untyped-def]
    return saliency_map(fusion_model.network, *inputs)


def _luminance_224(rgb: np.ndarray) -> np.ndarray:
    image = Image.fromarray(rgb).resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BILINEAR)
    return np.asarray(image, dtype=np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)


def _hook_state(network: torch.nn.Module) -> list[tuple[str, int, int, int]]:
    return [
        (name, len(m._forward_hooks), len(m._backward_hooks), len(m._forward_pre_hooks))
        for name, m in network.named_modules()
    ]


def test_map_is_224_square_float32_in_unit_range(saliency: np.ndarray) -> None:
    assert saliency.shape == (IMAGE_SIZE, IMAGE_SIZE)
    assert saliency.dtype == np.float32
    assert np.isfinite(saliency).all()
    assert saliency.min() >= 0.0 and saliency.max() <= 1.0
    assert saliency.max() == pytest.approx(1.0)


def test_map_is_deterministic(fusion_model, inputs, saliency) -> None:  # type: ignore[no-untyped-def]
    assert np.array_equal(saliency_map(fusion_model.network, *inputs), saliency)


def test_network_is_left_exactly_as_it_was(fusion_model, inputs) -> None:  # type: ignore[no-untyped-def]
    network = fusion_model.network
    image, metadata = inputs
    batch = image.unsqueeze(0).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        before = network(batch, metadata.unsqueeze(0)).clone()
    state = {k: v.clone() for k, v in network.state_dict().items()}
    flags = [p.requires_grad for p in network.parameters()]
    hooks = _hook_state(network)

    saliency_map(network, image, metadata)

    with torch.inference_mode():
        after = network(batch, metadata.unsqueeze(0))
    assert torch.equal(before, after)
    assert all(torch.equal(v, network.state_dict()[k]) for k, v in state.items())
    assert [p.requires_grad for p in network.parameters()] == flags
    assert all(p.grad is None for p in network.parameters())
    assert _hook_state(network) == hooks
    assert not network.training


def test_works_inside_the_services_inference_mode(fusion_model, inputs, saliency) -> None:  # type: ignore[no-untyped-def]
    with torch.inference_mode():
        inside = saliency_map(fusion_model.network, *inputs)
    assert np.array_equal(inside, saliency)


def test_map_is_not_uniform_and_favours_dark_pixels(rgb: np.ndarray, saliency: np.ndarray) -> None:
    """Dark pixels inside the field of view, the only part the network sees.

    A third of this sample's dark pixels are the dermoscope's black corners, which
    ``FieldOfView`` blanks on every image, so their saliency is near zero by construction; counted
    in, they decide the comparison rather than the lesion does.
    """
    assert saliency.std() > 0.01
    seen = field_of_view_mask(IMAGE_SIZE, IMAGE_SIZE).numpy() == 1.0
    luminance = _luminance_224(rgb)
    dark = luminance < np.median(luminance[seen])
    assert saliency[dark & seen].mean() > saliency[~dark & seen].mean()


def test_map_favours_the_segmented_lesion(rgb: np.ndarray, saliency: np.ndarray) -> None:
    """Stricter than "dark pixels", which here include the dermoscope's dark corners.

    Not a claim that the model looks *only* at the lesion. Models without the field-of-view
    mask put the peak of this sample's map in the dark bottom corners (the ruler is there too)
    and failed this test; see the model card's leave-one-clinic-out section.
    """
    mask = measure_lesion(rgb).mask
    small = Image.fromarray(mask.astype(np.uint8) * 255).resize((IMAGE_SIZE, IMAGE_SIZE))
    lesion = np.asarray(small) >= 128
    assert lesion.any() and not lesion.all()
    assert saliency[lesion].mean() > saliency[~lesion].mean()


def test_rejects_unpreprocessed_inputs(fusion_model, inputs) -> None:  # type: ignore[no-untyped-def]
    image, metadata = inputs
    with pytest.raises(ValueError, match="3x224x224"):
        saliency_map(fusion_model.network, image.unsqueeze(0), metadata)
    with pytest.raises(ValueError, match="metadata"):
        saliency_map(fusion_model.network, image, metadata[:5])


def test_overlay_png_is_a_224_rgb_png(
    rgb: np.ndarray, saliency: np.ndarray, tmp_path: Path
) -> None:
    path = tmp_path / "overlay.png"
    overlay_png(rgb, saliency, path)
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.mode == "RGB"
        assert image.size == (IMAGE_SIZE, IMAGE_SIZE)
        pixels = np.asarray(image, dtype=np.float32)
    # Hot areas are pushed towards red, cold ones towards blue.
    hot, cold = saliency > 0.9, saliency < 0.1
    assert (pixels[hot, 0] - pixels[hot, 2]).mean() > (pixels[cold, 0] - pixels[cold, 2]).mean()


def test_jet_colours_run_from_blue_to_red() -> None:
    ends = jet_colours(np.array([0.0, 0.5, 1.0]))
    assert ends.dtype == np.uint8
    assert ends[0].argmax() == 2 and ends[2].argmax() == 0
    assert ends[1][1] == 255
