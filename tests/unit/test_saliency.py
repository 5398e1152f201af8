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
from monai_bundle.scripts.saliency import (
    OVERLAY_ALPHA,
    jet_colours,
    overlay_png,
    overlay_rgb,
    saliency_map,
)
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


@pytest.mark.xfail(
    strict=True,
    reason="known limit since 0.6.0 (model card, Limits): on this faint 2.8%-of-frame ISIC 2020 "
    "melanoma the whole-network model's Grad-CAM peaks at the frame's edge cells; occluding the "
    "lesion raises its probability (0.012 -> 0.022), occluding the edges leaves it unchanged. "
    "Strict: this fails loudly once a model localises the lesion again.",
)
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


def _source(rows: int = 300, columns: int = 400) -> np.ndarray:
    """A non-square, non-224 image whose every pixel differs, so misplacement shows."""
    r, c = np.mgrid[0:rows, 0:columns]
    rgb = np.stack([40 + r * 150 // rows, 60 + c * 150 // columns, (r + c) % 97 + 80], axis=-1)
    return rgb.astype(np.uint8)


def _hot_square() -> np.ndarray:
    """Saliency 1 on the middle square of the network's 224x224 view, 0 elsewhere."""
    heat = np.zeros((IMAGE_SIZE, IMAGE_SIZE), np.float32)
    heat[80:144, 80:144] = 1.0
    return heat


def _redness(pixels: np.ndarray) -> np.ndarray:
    pixels = pixels.astype(np.int32)
    return pixels[..., 0] - np.maximum(pixels[..., 1], pixels[..., 2])


def test_overlay_is_drawn_on_the_source_at_its_own_size_and_colours() -> None:
    rgb = _source()
    overlay = overlay_rgb(rgb, _hot_square())
    assert overlay.shape == rgb.shape == (300, 400, 3)
    assert overlay.dtype == np.uint8
    # The square is rows 80-144 of 224 (107-193 of 300) and columns 80-144 (143-257 of 400);
    # outside it, with a margin for the bilinear stretch, the map is 0: the source, untouched.
    cold = np.ones((300, 400), bool)
    cold[100:200, 135:265] = False
    assert np.array_equal(overlay[cold], rgb[cold])
    # Inside, the pixels are the documented blend of the source with jet red, hence reddened.
    core = (slice(115, 185), slice(150, 250))
    expected = (1 - OVERLAY_ALPHA) * rgb[core] + OVERLAY_ALPHA * jet_colours(np.float32(1.0))
    assert np.abs(overlay[core].astype(np.float32) - expected).max() <= 1.0
    assert (_redness(overlay[core]) > _redness(rgb[core]) + 20).all()


@pytest.mark.parametrize("level", [0.0, 0.25, 0.5, 1.0])
def test_blend_weight_grows_with_saliency(level: float) -> None:
    """Weight ``OVERLAY_ALPHA * s``: at s = 0 the source exactly, at s = 1 ``OVERLAY_ALPHA``."""
    rgb = _source(90, 70)
    overlay = overlay_rgb(rgb, np.full((IMAGE_SIZE, IMAGE_SIZE), level, np.float32))
    weight = OVERLAY_ALPHA * level
    expected = (1 - weight) * rgb + weight * jet_colours(np.float32(level)).astype(np.float32)
    assert np.abs(overlay.astype(np.float32) - expected).max() <= 0.5 + 1e-3
    if level == 0.0:
        assert np.array_equal(overlay, rgb)


def test_overlay_png_is_the_sample_at_its_own_size_reddened_where_salient(
    rgb: np.ndarray, saliency: np.ndarray, tmp_path: Path
) -> None:
    path = tmp_path / "overlay.png"
    overlay_png(rgb, saliency, path)
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.mode == "RGB"
        assert image.size == (rgb.shape[1], rgb.shape[0]) != (IMAGE_SIZE, IMAGE_SIZE)
        pixels = np.asarray(image)
    assert np.array_equal(pixels, overlay_rgb(rgb, saliency))
    heat = np.asarray(
        Image.fromarray(saliency).resize((rgb.shape[1], rgb.shape[0]), Image.Resampling.BILINEAR)
    )
    hot, cold = heat > 0.9, heat < 0.1
    assert hot.any() and cold.any()
    # Hot areas are pushed towards red; cold ones keep (nearly) the sample's own colours.
    assert (_redness(pixels[hot]) - _redness(rgb[hot])).mean() > 20
    assert np.abs(pixels[cold].astype(np.int32) - rgb[cold]).max() <= 0.1 * OVERLAY_ALPHA * 255 + 1


def test_overlay_rejects_other_inputs() -> None:
    with pytest.raises(ValueError, match="HxWx3 uint8"):
        overlay_rgb(_source().astype(np.float32), _hot_square())
    with pytest.raises(ValueError, match="saliency must be"):
        overlay_rgb(_source(), np.zeros((300, 400), np.float32))


def test_jet_colours_run_from_blue_to_red() -> None:
    ends = jet_colours(np.array([0.0, 0.5, 1.0]))
    assert ends.dtype == np.uint8
    assert ends[0].argmax() == 2 and ends[2].argmax() == 0
    assert ends[1][1] == 255


def test_grad_cam_from_the_scoring_pass_is_the_map_of_a_fresh_pass(  # type: ignore[no-untyped-def]
    fusion_model, rgb, saliency
) -> None:
    """The service explains a scored image from the feature map scoring kept (no second run
    of the backbone); that map, and the score, must be what a fresh pass gives."""
    from plugin.domain import Demographics, Source, Sourced

    demo = Demographics(
        age=Sourced(55, Source.DICOM),
        sex=Sourced("female", Source.DICOM),
        site=Sourced("torso", Source.DICOM),
    )
    (finding, explanation), (other, _) = fusion_model.score_explainable(
        [rgb, rgb[::-1].copy()], [demo, Demographics.unknown()]
    )
    members = len(getattr(fusion_model.network, "members", [fusion_model.network]))
    assert explanation.feature_map is not None
    assert explanation.feature_map.shape[0] == 1280 * members  # each network's map, stacked
    reused = fusion_model.explain(rgb, explanation)
    assert np.abs(reused - saliency).max() < 1e-4
    assert reused.max() == pytest.approx(1.0)  # a real map, not an empty one
    (alone,) = fusion_model.score([rgb], [demo])
    assert finding.probability == pytest.approx(alone.probability, abs=1e-6)
    assert other.probability != pytest.approx(finding.probability, abs=1e-6)
