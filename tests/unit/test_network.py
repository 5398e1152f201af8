"""FusionNet: field of view, colour constancy, test-time views, metadata prior, calibration;
FusionEnsemble: the members' average behind FusionNet's scoring interface."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from monai_bundle.scripts.metadata import METADATA_WIDTH, encode_metadata, encode_missing
from monai_bundle.scripts.network import (
    IMAGE_FEATURES,
    VIEWS,
    FieldOfView,
    FusionEnsemble,
    FusionNet,
    ShadesOfGray,
)
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


def _samples() -> torch.Tensor:
    paths = sorted((REPO_ROOT / "tests" / "data").glob("*.jpg"))[:2]
    return torch.stack([preprocess_rgb(load_rgb(p)) for p in paths])


def test_shades_of_gray_removes_a_colour_cast_and_keeps_neutral_images() -> None:
    rng = np.random.default_rng(0)
    scene = rng.uniform(0.2, 0.6, (32, 32, 1)).repeat(3, axis=2)  # grey-world scene
    tinted = scene * np.array([1.0, 0.8, 0.6])  # yellowish light, as from an old dermatoscope
    corrected = _rgb(ShadesOfGray()(_normalised(tinted)))
    assert np.abs(tinted[..., 0] - tinted[..., 2]).mean() > 0.1
    assert np.abs(corrected[..., 0] - corrected[..., 2]).max() < 1e-4
    neutral = _rgb(ShadesOfGray()(_normalised(scene)))
    np.testing.assert_allclose(neutral, scene, atol=1e-5)


def test_shades_of_gray_survives_a_black_image() -> None:
    out = ShadesOfGray()(_normalised(np.zeros((8, 8, 3))))
    assert torch.isfinite(out).all()


def test_field_of_view_blacks_out_the_corners_of_every_image() -> None:
    batch = _samples()
    masked = FieldOfView()(batch)
    for index in range(len(batch)):
        rgb, original = _rgb(masked[index : index + 1]), _rgb(batch[index : index + 1])
        assert rgb[:10, :10].max() < 1e-5 and rgb[-10:, -10:].max() < 1e-5
        np.testing.assert_allclose(rgb[62:162, 62:162], original[62:162, 62:162], atol=1e-5)


def test_image_features_are_the_pooled_last_feature_map() -> None:
    torch.manual_seed(0)
    network = FusionNet().eval()
    image = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE)
    with torch.no_grad():
        feature_map = network.feature_map(image)
        features = network.image_features(image)
        masked = network.colour(network.field_of_view(image))
        library = network.backbone(masked)  # the library's own forward: conv head, pool, flatten
    assert feature_map.shape == (2, IMAGE_FEATURES, 7, 7)
    torch.testing.assert_close(features, feature_map.mean(dim=(2, 3)))
    torch.testing.assert_close(features, library)
    with torch.no_grad():
        assert network(image, torch.from_numpy(encode_missing(2))).shape == (2, 1)


def test_unknown_test_time_views_are_refused() -> None:
    with pytest.raises(ValueError, match="test_time_views"):
        FusionNet(test_time_views=("upside-down",))
    with pytest.raises(ValueError, match="test_time_views"):
        FusionNet(test_time_views=())


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
    network = FusionNet().eval()
    features = torch.randn(2, IMAGE_FEATURES)
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
    restored = FusionNet()
    restored.load_state_dict(network.state_dict())
    torch.testing.assert_close(restored.prior_weight, torch.from_numpy(weight))


def test_calibration_is_a_stored_affine_map_of_the_logit() -> None:
    torch.manual_seed(0)
    network = FusionNet().eval()
    features = torch.randn(3, IMAGE_FEATURES)
    metadata = torch.from_numpy(encode_missing(3))
    with torch.no_grad():
        raw = network.head(features, metadata)
        network.set_calibration(0.5, -2.0)
        torch.testing.assert_close(network.head(features, metadata), 0.5 * raw - 2.0)
    assert FusionNet().state_dict()["calibration"].tolist() == [1.0, 0.0]
    restored = FusionNet()
    restored.load_state_dict(network.state_dict())
    assert restored.calibration.tolist() == [0.5, -2.0]


def _ensemble_of_distinct_members() -> FusionEnsemble:
    """Two members that differ (each its own random head and calibration)."""
    torch.manual_seed(0)
    ensemble = FusionEnsemble(2, test_time_views=("identity", "hflip")).eval()
    for k, member in enumerate(ensemble.members):
        with torch.no_grad():
            for parameter in member.parameters():
                parameter.add_(0.05 * (k + 1) * torch.randn_like(parameter))
        member.set_calibration(1.0 + k, -0.5 * k)
    return ensemble


def test_an_ensemble_scores_the_calibrated_average_of_its_members() -> None:
    ensemble = _ensemble_of_distinct_members()
    images = _samples()
    metadata = torch.from_numpy(np.stack([encode_metadata(55, "female", "torso")] * 2))
    with torch.no_grad():
        each = [member(images, metadata) for member in ensemble.members]
        assert not torch.allclose(each[0], each[1])
        torch.testing.assert_close(ensemble(images, metadata), (each[0] + each[1]) / 2)
        ensemble.set_calibration(0.5, 1.0)
        torch.testing.assert_close(ensemble(images, metadata), 0.5 * (each[0] + each[1]) / 2 + 1.0)
        # the scoring features and map are the members', side by side: what the ONNX branch
        # returns and what Grad-CAM reads
        features, feature_map = ensemble.scoring_features_and_map(images)
        assert features.shape == (2, 2 * IMAGE_FEATURES)
        assert feature_map is not None and feature_map.shape[1] == 2 * IMAGE_FEATURES
        torch.testing.assert_close(
            features[:, IMAGE_FEATURES:], ensemble.members[1].scoring_features(images)
        )
        torch.testing.assert_close(feature_map.mean(dim=(2, 3)), ensemble.image_features(images))
    restored = FusionEnsemble(2, test_time_views=("identity", "hflip"))
    restored.load_state_dict(ensemble.state_dict())
    assert restored.calibration.tolist() == [0.5, 1.0]


def test_an_ensemble_refuses_features_of_the_wrong_width_and_a_single_member() -> None:
    ensemble = _ensemble_of_distinct_members()
    with pytest.raises(ValueError, match="expected 2 x 1280"):
        ensemble.head(torch.zeros(1, IMAGE_FEATURES), torch.from_numpy(encode_missing(1)))
    with pytest.raises(ValueError, match="at least 2 members"):
        FusionEnsemble(1)
