"""FusionNet's optional parts: colour constancy, block taps, test-time views, prior, calibration."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from monai_bundle.scripts.metadata import METADATA_WIDTH, encode_metadata, encode_missing
from monai_bundle.scripts.network import (
    VIEWS,
    FieldOfView,
    FusionNet,
    ShadesOfGray,
    _denormalised,
    with_image_only_companion,
)
from monai_bundle.scripts.saliency import saliency_map
from monai_bundle.scripts.transforms import (
    IMAGE_SIZE,
    IMAGENET_MEAN,
    IMAGENET_STD,
    load_rgb,
    preprocess_rgb,
)
from tests.conftest import REPO_ROOT


def _normalised(rgb: np.ndarray) -> torch.Tensor:
    """HxWx3 floats in [0, 1] as a 1x3xHxW ImageNet-normalised tensor."""
    array = (rgb.astype(np.float32) - IMAGENET_MEAN) / IMAGENET_STD
    return torch.from_numpy(array.transpose(2, 0, 1)).unsqueeze(0)


def _rgb(image: torch.Tensor) -> np.ndarray:
    return image[0].numpy().transpose(1, 2, 0) * IMAGENET_STD + IMAGENET_MEAN


def test_shades_of_gray_removes_a_colour_cast_and_keeps_neutral_images() -> None:
    rng = np.random.default_rng(0)
    scene = rng.uniform(0.2, 0.6, (32, 32, 1)).repeat(3, axis=2)  # grey-world scene
    tinted = scene * np.array([1.0, 0.8, 0.6])  # yellowish light, as from an old dermatoscope
    corrected = _rgb(ShadesOfGray()(_normalised(tinted)))
    # every pixel is grey again: the channels agree far better than before correction
    assert np.abs(tinted[..., 0] - tinted[..., 2]).mean() > 0.1
    assert np.abs(corrected[..., 0] - corrected[..., 2]).max() < 1e-4
    neutral = _rgb(ShadesOfGray()(_normalised(scene)))
    np.testing.assert_allclose(neutral, scene, atol=1e-5)


def test_shades_of_gray_survives_a_black_image() -> None:
    out = ShadesOfGray()(_normalised(np.zeros((8, 8, 3))))
    assert torch.isfinite(out).all()


def test_taps_append_pooled_block_outputs_after_the_head_features() -> None:
    torch.manual_seed(0)
    plain = FusionNet().eval()
    tapped = FusionNet(feature_taps=(10, 15)).eval()
    tapped.backbone.load_state_dict(plain.backbone.state_dict())
    image = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE)
    with torch.no_grad():
        head = plain.backbone(image)  # the library's own forward: conv head, pool, flatten
        features = tapped.image_features(image)
    assert tapped.image_feature_width == 1280 + 112 + 320 == features.shape[1]
    torch.testing.assert_close(features[:, :1280], head)
    with torch.no_grad():
        assert tapped(image, torch.from_numpy(encode_missing(2))).shape == (2, 1)


def test_invalid_options_are_refused() -> None:
    with pytest.raises(ValueError, match="feature_taps"):
        FusionNet(feature_taps=(16,))
    with pytest.raises(ValueError, match="test_time_views"):
        FusionNet(test_time_views=("upside-down",))
    with pytest.raises(ValueError, match="backbone"):
        FusionNet(backbone="resnet50")
    with pytest.raises(ValueError, match="metadata_prior"):
        FusionNet().set_metadata_prior(np.zeros(METADATA_WIDTH))


def test_scoring_features_average_the_test_time_views() -> None:
    network = FusionNet(imagenet_init=True, test_time_views=tuple(VIEWS)).eval()
    sample = sorted((REPO_ROOT / "tests" / "data").glob("*.jpg"))[0]
    image = preprocess_rgb(load_rgb(sample)).unsqueeze(0)
    with torch.no_grad():
        expected = torch.stack([network.image_features(f(image)) for f in VIEWS.values()])
        torch.testing.assert_close(network.scoring_features(image), expected.mean(dim=0))
    assert not torch.allclose(expected[0], expected[1])  # the views really differ


def test_metadata_prior_shifts_the_logit_only_for_known_fields() -> None:
    torch.manual_seed(0)
    network = FusionNet(metadata_prior=True).eval()
    features = torch.randn(2, network.image_feature_width)
    known = torch.from_numpy(np.stack([encode_metadata(70.0, "male", "torso")] * 2))
    missing = torch.from_numpy(encode_missing(2))
    with torch.no_grad():
        before_known = network.head(features, known)
        before_missing = network.head(features, missing)
        weight = np.zeros(METADATA_WIDTH, np.float32)
        weight[0] = 2.0  # age/100 slot: +1.4 log-odds at 70
        weight[1] = 0.5  # the age-missing indicator
        network.set_metadata_prior(weight)
        after_known, after_missing = network.head(features, known), network.head(features, missing)
    torch.testing.assert_close(after_missing, before_missing)
    torch.testing.assert_close(after_known - before_known, torch.full((2, 1), 1.4 - 0.5))
    restored = FusionNet(metadata_prior=True)
    restored.load_state_dict(network.state_dict())
    torch.testing.assert_close(restored.prior_weight, torch.from_numpy(weight))


def test_with_metadata_residual_nothing_known_is_exactly_the_image_only_classifier() -> None:
    torch.manual_seed(0)
    network = FusionNet(metadata_residual=True, metadata_prior=True).eval()
    network.set_metadata_prior(np.linspace(-1, 1, METADATA_WIDTH).astype(np.float32))
    features = torch.randn(3, network.image_feature_width)
    missing = torch.from_numpy(encode_missing(3))
    known = torch.from_numpy(np.stack([encode_metadata(70.0, "male", "torso")] * 3))
    with torch.no_grad():
        image_only = network.image_classifier(features)
        assert torch.equal(network.head(features, missing), image_only)
        # known fields do move it: through the correction and the prior
        assert (network.head(features, known) - image_only).abs().min() > 1e-3
        # the correction is a function of the image too, not one shift for every image
        correction = network.head(features, known) - image_only - network.prior_logit(known)
        assert correction.std() > 1e-4
    assert "image_classifier.4.weight" in network.state_dict()
    assert "image_classifier.4.weight" not in FusionNet().state_dict()


def test_the_diagnosis_head_reads_image_features_and_never_moves_the_melanoma_logit() -> None:
    torch.manual_seed(0)
    plain = FusionNet().eval()
    torch.manual_seed(0)
    with_head = FusionNet(diagnosis_classes=8).eval()
    features = torch.randn(3, with_head.image_feature_width)
    metadata = torch.from_numpy(encode_missing(3))
    with torch.no_grad():
        assert with_head.diagnosis_logits(features).shape == (3, 8)
        # built after the melanoma head, it leaves that head's initialisation and output alone
        assert torch.equal(with_head.head(features, metadata), plain.head(features, metadata))
    assert "diagnosis_classifier.4.weight" not in plain.state_dict()
    with pytest.raises(ValueError, match="diagnosis_classes"):
        plain.diagnosis_logits(features)


def test_calibration_is_a_stored_affine_map_of_the_logit() -> None:
    torch.manual_seed(0)
    network = FusionNet(calibrated=True).eval()
    features = torch.randn(3, network.image_feature_width)
    metadata = torch.from_numpy(encode_missing(3))
    with torch.no_grad():
        raw = network.head(features, metadata)
        network.set_calibration(0.5, -2.0)
        torch.testing.assert_close(network.head(features, metadata), 0.5 * raw - 2.0)
    assert FusionNet(calibrated=True).state_dict()["calibration"].tolist() == [1.0, 0.0]
    with pytest.raises(ValueError, match="calibrated"):
        FusionNet().set_calibration(1.0, 0.0)


def _samples() -> torch.Tensor:
    paths = sorted((REPO_ROOT / "tests" / "data").glob("*.jpg"))[:2]
    return torch.stack([preprocess_rgb(load_rgb(p)) for p in paths])


@pytest.mark.parametrize("view", ["hair", "ruler", "vignette"])
def test_robustness_views_are_reproducible_and_leave_most_of_the_lesion(view: str) -> None:
    """Cached training features must not change between runs: same image, same strands."""
    batch = _samples()
    first, again = VIEWS[view](batch), VIEWS[view](batch.clone())
    assert torch.equal(first, again)
    changed = (first - batch).abs().amax(dim=1) > 0.05  # per pixel, any channel
    share = changed.float().mean(dim=(1, 2))
    assert ((share > 0.002) & (share < 0.6)).all(), share
    # the centre of the image, where the lesion is, stays mostly as it was
    centre = changed[:, 80:144, 80:144].float().mean()
    assert centre < 0.3


def _total_variation(batch: torch.Tensor) -> torch.Tensor:
    return (batch[..., 1:, :] - batch[..., :-1, :]).abs().mean(dim=(1, 2, 3))


def test_zoom_is_a_reproducible_closer_look() -> None:
    batch = _samples()
    zoomed = VIEWS["zoom"](batch)
    assert torch.equal(zoomed, VIEWS["zoom"](batch.clone()))
    assert zoomed.shape == batch.shape
    # magnified 1.2-1.7 times: edges spread over more pixels, the colours stay the image's
    assert (_total_variation(zoomed) < 0.9 * _total_variation(batch)).all()
    torch.testing.assert_close(zoomed.mean(dim=(2, 3)), batch.mean(dim=(2, 3)), atol=0.4, rtol=0)


def test_colour_jitter_changes_the_colours_and_keeps_every_structure() -> None:
    batch = _samples()
    jittered = VIEWS["colour_jitter"](batch)
    assert torch.equal(jittered, VIEWS["colour_jitter"](batch.clone()))
    rgb, original = _denormalised(jittered), _denormalised(batch)
    for after, before in zip(rgb, original, strict=True):
        assert (after - before).abs().mean() > 0.01
        grey = torch.stack([after.mean(0).flatten(), before.mean(0).flatten()])
        assert torch.corrcoef(grey)[0, 1] > 0.9  # same pixels light and dark


def test_vignette_darkens_corners_and_keeps_the_centre() -> None:
    batch = _samples()
    rgb = _rgb(VIEWS["vignette"](batch)[:1])
    assert rgb[:8, :8].max() < 1e-5  # corners black
    np.testing.assert_allclose(rgb[100:124, 100:124], _rgb(batch[:1])[100:124, 100:124], atol=1e-5)


def test_hair_strands_are_darker_than_the_skin_they_cross() -> None:
    batch = _samples()
    before, after = _rgb(batch[:1]), _rgb(VIEWS["hair"](batch)[:1])
    changed = np.abs(after - before).max(axis=2) > 0.05
    assert (after[changed].mean(axis=1) < before[changed].mean(axis=1)).mean() > 0.95


def test_field_of_view_blacks_out_the_corners_of_every_image() -> None:
    batch = _samples()
    masked = FieldOfView()(batch)
    for index in range(len(batch)):
        rgb, original = _rgb(masked[index : index + 1]), _rgb(batch[index : index + 1])
        assert rgb[:10, :10].max() < 1e-5 and rgb[-10:, -10:].max() < 1e-5
        np.testing.assert_allclose(rgb[62:162, 62:162], original[62:162, 62:162], atol=1e-5)
    # masked features are cached apart from unmasked ones
    assert FusionNet(field_of_view=True).feature_signature() != FusionNet().feature_signature()


def test_features_from_a_cached_block_map_equal_the_end_to_end_features() -> None:
    """Fine-tuning reads the top blocks from cached maps; scoring runs the whole network."""
    torch.manual_seed(0)
    network = FusionNet(feature_taps=(4, 10, 14, 15), fine_tuned_from=14).eval()
    image = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE)
    with torch.no_grad():
        below = network.block_output(image, 13)
        pooled = network.pooled_taps(image)
        frozen = {name: pooled[name] for name in network.taps_below(14)}
        assert list(frozen) == ["block4", "block10"]
        from_map = network.features_from_block(below, 14, frozen)
        end_to_end = network.image_features(image)
    torch.testing.assert_close(from_map, end_to_end)
    columns = network.tap_columns()
    torch.testing.assert_close(end_to_end[:, columns["block10"]], pooled["block10"])
    assert columns["block15"].stop == network.image_feature_width


def test_only_the_blocks_from_fine_tuned_from_onwards_are_trainable() -> None:
    network = FusionNet(fine_tuned_from=14)
    trainable = {id(p) for p in network.trainable_backbone_parameters()}
    backbone = network.backbone
    assert all(id(p) in trainable for p in backbone._blocks[14].parameters())
    assert all(id(p) in trainable for p in backbone._conv_head.parameters())
    assert not any(id(p) in trainable for p in backbone._blocks[13].parameters())
    assert FusionNet().trainable_backbone_parameters() == []
    with pytest.raises(ValueError, match="fine_tuned_from"):
        FusionNet(fine_tuned_from=16)


def test_a_fine_tuned_backbone_never_reads_the_frozen_feature_cache() -> None:
    imagenet = FusionNet(imagenet_init=True, field_of_view=True)
    frozen_signature = imagenet.feature_signature()
    assert frozen_signature == "field-of-view-0.56"  # the key the ImageNet cache was built under
    with torch.no_grad():
        imagenet.backbone._blocks[15]._project_conv.weight.mul_(1.01)
    tuned_signature = imagenet.feature_signature()
    assert tuned_signature.startswith("field-of-view-0.56;backbone-")
    assert tuned_signature != frozen_signature


def _companion_pair() -> tuple[FusionNet, FusionNet, FusionNet]:
    """A fusion model and an image-only model with different top blocks and heads, joined."""
    options: dict[str, object] = {
        "feature_taps": (4, 14, 15),
        "fine_tuned_from": 14,
        "metadata_prior": True,
        "calibrated": True,
    }
    torch.manual_seed(0)
    fusion = FusionNet(imagenet_init=True, **options).eval()  # type: ignore[arg-type]
    fusion.set_metadata_prior(np.linspace(-1, 1, METADATA_WIDTH).astype(np.float32))
    torch.manual_seed(1)
    image_only = FusionNet(imagenet_init=True, **options).eval()  # type: ignore[arg-type]
    with torch.no_grad():  # as fine-tuning would: the two models' top blocks differ
        for parameter in image_only.backbone._blocks[15].parameters():
            parameter.mul_(1.1)
    return fusion, image_only, with_image_only_companion(fusion, image_only, options)


def test_the_image_only_companion_decides_alone_when_nothing_is_known() -> None:
    fusion, image_only, joined = _companion_pair()
    image = _samples()
    known = torch.from_numpy(np.stack([encode_metadata(70.0, "male", "torso")] * 2))
    age_only = torch.from_numpy(np.stack([encode_metadata(70.0, None, None)] * 2))
    missing = torch.from_numpy(encode_missing(2))
    with torch.no_grad():
        own, other = fusion.image_features(image), image_only.image_features(image)
        features = joined.image_features(image)
        # both models' features, from one pass through the shared lower blocks
        torch.testing.assert_close(features, torch.cat([own, other], dim=1))
        assert not torch.allclose(own, other)
        # nothing known: the image-only model's logit, whatever the fusion model says
        torch.testing.assert_close(joined.head(features, missing), image_only.head(other, missing))
        # anything known: the mean of the two models' logits, the prior included
        for metadata in (known, age_only):
            expected = (fusion.head(own, metadata) + image_only.head(other, missing)) / 2
            torch.testing.assert_close(joined.head(features, metadata), expected)
        # each kind has its own Platt scale
        raw_known, raw_missing = joined.head(features, known), joined.head(features, missing)
        joined.set_calibration(0.5, -2.0)
        joined.set_image_only_calibration(2.0, 1.0)
        torch.testing.assert_close(joined.head(features, known), 0.5 * raw_known - 2.0)
        torch.testing.assert_close(joined.head(features, missing), 2.0 * raw_missing + 1.0)
    # the shared lower blocks are stored once
    names = joined.state_dict()
    assert "image_only.backbone._blocks.15._project_conv.weight" in names
    assert not any(n.startswith("image_only.backbone._blocks.13.") for n in names)


def test_the_companion_scores_from_a_block_map_as_from_the_image() -> None:
    """Training scores the joined network from cached block-13 maps: same features as the
    image gives it end to end, and the same per-tap columns the feature cache stores."""
    _, _, joined = _companion_pair()
    image = _samples()
    with torch.no_grad():
        x = joined.block_output(image, 13)
        pooled = joined.pooled_taps(image)
        frozen = {"block4": pooled["block4"]}
        from_map = joined.features_from_block(x, 14, frozen)
        torch.testing.assert_close(from_map, joined.image_features(image))
        columns = joined.tap_columns()
        for name in joined.tap_names():
            torch.testing.assert_close(from_map[:, columns[name]], pooled[name])
    assert joined.tap_names()[-1] == "image_only_block15"
    assert "image_only" in joined.feature_signature()


def test_a_companion_needs_its_own_top_blocks_and_untouched_inputs() -> None:
    with pytest.raises(ValueError, match="fine_tuned_from"):
        FusionNet(image_only_companion=True)
    with pytest.raises(ValueError, match="exclude"):
        FusionNet(image_only_companion=True, fine_tuned_from=14, metadata_residual=True)
    fusion, image_only, _ = _companion_pair()
    image_only.set_metadata_prior(np.ones(METADATA_WIDTH, np.float32))
    with pytest.raises(ValueError, match="prior"):
        with_image_only_companion(fusion, image_only, {"fine_tuned_from": 14})


def test_companion_saliency_with_nothing_known_is_the_image_only_models() -> None:
    """Grad-CAM hooks both models' maps at once: with nothing known only the image-only model's
    map carries gradient, so the map is that model's alone."""
    _, image_only, joined = _companion_pair()
    image = _samples()[0]
    missing = torch.from_numpy(encode_missing(1)[0])
    known = torch.from_numpy(encode_metadata(70.0, "male", "torso"))
    alone = saliency_map(image_only, image, missing)
    np.testing.assert_allclose(saliency_map(joined, image, missing), alone, atol=1e-5)
    assert not np.allclose(saliency_map(joined, image, known), alone, atol=1e-3)
